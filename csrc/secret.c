/*
 * Memory hygiene for protected buffers: locking, advice, and wiping that
 * the compiler cannot remove, plus copies made with access opened only
 * for their duration.
 */
#include "pkeys_internal.h"

#include <string.h>
#include <sys/mman.h>

int pk_mlock(uintptr_t addr, size_t len) { return mlock((const void *)addr, len); }

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

int pk_hw_copy(uintptr_t dst, uintptr_t src, size_t len, uint32_t mask, uint32_t bits)
{
    int64_t saved = pk_hw_enter(mask, bits);
    if (saved < 0)
        return (int)saved;
    memcpy((void *)dst, (const void *)src, len);
    pk_hw_leave(mask, (uint32_t)saved);
    return PK_OK;
}

int pk_hw_wipe(uintptr_t addr, size_t len, uint32_t mask, uint32_t bits)
{
    int64_t saved = pk_hw_enter(mask, bits);
    if (saved < 0)
        return (int)saved;
    pk_wipe(addr, len);
    pk_hw_leave(mask, (uint32_t)saved);
    return PK_OK;
}
