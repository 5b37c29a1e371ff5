/*
 * The kernel's protection-key syscalls, issued through syscall(2) so that
 * they work with any libc, including ones without pkey_* wrappers.
 * errno is left exactly as the kernel set it.
 */
#include "pkeys_internal.h"

#include <errno.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Old headers may lack the numbers; on x86-64 they are fixed ABI. */
#if defined(__x86_64__) && !defined(SYS_pkey_mprotect)
#define SYS_pkey_mprotect 329
#define SYS_pkey_alloc 330
#define SYS_pkey_free 331
#endif

#if PK_SIMULATED_PKU
/*
 * The simulated-register build's keys: a bitmap, with the kernel's rules
 * (arch/x86/mm/pkeys.c, mm/mprotect.c) and errors.  Key 0 starts allocated
 * and, as in the kernel, pkey_free(0) succeeds.  pkey_alloc gives the
 * lowest free key and sets its rights in the calling thread's register
 * only; pkey_mprotect checks the key and then is plain mprotect: nothing
 * is tagged, so nothing is protected.  No execute-only key is reserved.
 */
static uint32_t simulated_keys = 1u;

int pk_sys_pkey_alloc(unsigned int flags, unsigned int access_rights)
{
    uint32_t seen = __atomic_load_n(&simulated_keys, __ATOMIC_ACQUIRE);
    int pkey;
    if (flags != 0 || (access_rights & ~(PK_AD | PK_WD)) != 0) {
        errno = EINVAL;
        return -1;
    }
    do {
        for (pkey = 1; pkey < PK_NKEYS && (seen & (1u << pkey)); pkey++)
            ;
        if (pkey == PK_NKEYS) {
            errno = ENOSPC;
            return -1;
        }
    } while (!__atomic_compare_exchange_n(&simulated_keys, &seen, seen | (1u << pkey), 0,
                                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    pk_wrpkru_unchecked((pk_rdpkru_unchecked() & ~PK_KEY_MASK(pkey)) |
                        (access_rights << PK_KEY_SHIFT(pkey)));
    return pkey;
}

static int simulated_allocated(int pkey)
{
    return pkey >= 0 && pkey < PK_NKEYS &&
           (__atomic_load_n(&simulated_keys, __ATOMIC_ACQUIRE) & (1u << pkey));
}

int pk_sys_pkey_free(int pkey)
{
    if (!simulated_allocated(pkey)) {
        errno = EINVAL;
        return -1;
    }
    __atomic_fetch_and(&simulated_keys, ~(1u << pkey), __ATOMIC_ACQ_REL);
    return 0;
}

int pk_sys_pkey_mprotect(uintptr_t addr, size_t len, int prot, int pkey)
{
    if (pkey != -1 && !simulated_allocated(pkey)) {
        errno = EINVAL;
        return -1;
    }
    return mprotect((void *)addr, len, prot);
}
#else
int pk_sys_pkey_alloc(unsigned int flags, unsigned int access_rights)
{
#ifdef SYS_pkey_alloc
    return (int)syscall(SYS_pkey_alloc, flags, access_rights);
#else
    (void)flags, (void)access_rights;
    errno = ENOSYS;
    return -1;
#endif
}

int pk_sys_pkey_free(int pkey)
{
#ifdef SYS_pkey_free
    return (int)syscall(SYS_pkey_free, pkey);
#else
    (void)pkey;
    errno = ENOSYS;
    return -1;
#endif
}

int pk_sys_pkey_mprotect(uintptr_t addr, size_t len, int prot, int pkey)
{
#ifdef SYS_pkey_mprotect
    return (int)syscall(SYS_pkey_mprotect, addr, len, prot, pkey);
#else
    (void)addr, (void)len, (void)prot, (void)pkey;
    errno = ENOSYS;
    return -1;
#endif
}

#endif

int pk_sys_mprotect(uintptr_t addr, size_t len, int prot)
{
    return mprotect((void *)addr, len, prot);
}
