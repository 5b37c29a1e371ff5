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

int pk_sys_mprotect(uintptr_t addr, size_t len, int prot)
{
    return mprotect((void *)addr, len, prot);
}
