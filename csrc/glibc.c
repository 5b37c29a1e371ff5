/*
 * glibc's pkey_* functions (glibc >= 2.27), looked up with dlsym so that
 * the shim builds and loads against any libc.  Where a function is absent
 * its wrapper fails with ENOSYS.
 *
 * glibc's pkey_get and pkey_set execute RDPKRU/WRPKRU without checking
 * the CPU, so their wrappers refuse (ENOSYS) when OSPKE is off; the
 * Python layer turns that case into UnsupportedError before calling.
 */
#include "pkeys_internal.h"

#include <dlfcn.h>
#include <errno.h>

#ifdef __GLIBC__
#include <gnu/libc-version.h>
#endif

static int (*glibc_alloc)(unsigned int, unsigned int);
static int (*glibc_free)(int);
static int (*glibc_mprotect)(void *, size_t, int, int);
static int (*glibc_get)(int);
static int (*glibc_set)(int, unsigned int);

/* dlsym returns void *; POSIX guarantees it converts to a function pointer. */
#define PK_LOOKUP(ptr, name) (*(void **)(&(ptr)) = dlsym(RTLD_DEFAULT, name))

__attribute__((constructor)) static void pk_find_glibc(void)
{
    PK_LOOKUP(glibc_alloc, "pkey_alloc");
    PK_LOOKUP(glibc_free, "pkey_free");
    PK_LOOKUP(glibc_mprotect, "pkey_mprotect");
    PK_LOOKUP(glibc_get, "pkey_get");
    PK_LOOKUP(glibc_set, "pkey_set");
}

int pk_glibc_available(void)
{
    return (glibc_alloc ? PK_GLIBC_ALLOC : 0) | (glibc_free ? PK_GLIBC_FREE : 0) |
           (glibc_mprotect ? PK_GLIBC_MPROTECT : 0) | (glibc_get ? PK_GLIBC_GET : 0) |
           (glibc_set ? PK_GLIBC_SET : 0);
}

const char *pk_glibc_version(void)
{
#ifdef __GLIBC__
    return gnu_get_libc_version();
#else
    return "";
#endif
}

int pk_glibc_pkey_alloc(unsigned int flags, unsigned int access_rights)
{
    if (!glibc_alloc) {
        errno = ENOSYS;
        return -1;
    }
    return glibc_alloc(flags, access_rights);
}

int pk_glibc_pkey_free(int pkey)
{
    if (!glibc_free) {
        errno = ENOSYS;
        return -1;
    }
    return glibc_free(pkey);
}

int pk_glibc_pkey_mprotect(uintptr_t addr, size_t len, int prot, int pkey)
{
    if (!glibc_mprotect) {
        errno = ENOSYS;
        return -1;
    }
    return glibc_mprotect((void *)addr, len, prot, pkey);
}

/* The simulated-register build refuses too: glibc would run the real
 * instruction, on a register that build does not use. */
int pk_glibc_pkey_get(int pkey)
{
    if (!glibc_get || !pk_ospke_enabled || PK_SIMULATED_PKU) {
        errno = ENOSYS;
        return -1;
    }
    return glibc_get(pkey);
}

int pk_glibc_pkey_set(int pkey, unsigned int access_rights)
{
    if (!glibc_set || !pk_ospke_enabled || PK_SIMULATED_PKU) {
        errno = ENOSYS;
        return -1;
    }
    return glibc_set(pkey, access_rights);
}
