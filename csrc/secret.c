/*
 * Memory hygiene for protected buffers: unlocking, advice, and wiping that
 * the compiler cannot remove.  (Locking is pk_mlock_onfault in
 * secretmem.c; copies with access opened only for their duration are in
 * virtual.c.)
 */
#include "pkeys_internal.h"

#include <string.h>
#include <sys/mman.h>

int pk_munlock(uintptr_t addr, size_t len) { return munlock((const void *)addr, len); }

int pk_madvise(uintptr_t addr, size_t len, int advice)
{
    return madvise((void *)addr, len, advice);
}

/* A memset whose result nothing reads is dead code to the optimiser; the
 * empty asm that "uses" the memory keeps it (explicit_bzero's technique,
 * without needing glibc >= 2.25). */
void pk_wipe(uintptr_t addr, size_t len)
{
    memset((void *)addr, 0, len);
    __asm__ volatile("" : : "r"(addr) : "memory");
}
