/*
 * The hardware backend's validating operations.
 *
 * glibc cannot tell whether a key is valid because it does not track
 * pkey_alloc/pkey_free (the objection raised in the 2016 debate over
 * pkey_get/pkey_set).  These functions do: a key is usable only if it was
 * allocated through them and not freed since.  They run in C so that the
 * check costs nanoseconds and each Python-level operation stays one cffi
 * call.
 *
 * Assumptions, all checked or guaranteed elsewhere:
 *  - pk_ospke_enabled is tested before every PKRU instruction here.
 *  - Key 0 covers all ordinary memory, the interpreter's included, so its
 *    rights are never changed: denying it would kill the process at the
 *    next instruction that touches the heap.
 *  - Allocation and freeing are serialised by the Python layer's lock; the
 *    atomics below only make the bitmap safe to read concurrently.
 */
#include "pkeys_internal.h"

#include <stdatomic.h>

/* Bit k: key k is allocated through the package.  Keys are process-wide,
 * and a forked child inherits both the keys and this copy of the bitmap. */
static _Atomic uint32_t allocated_keys;
/* The same set spread to PKRU's layout (3 << 2k per key), for mask checks. */
static _Atomic uint32_t allocated_pkru_bits;

/* This thread's PKRU as the package last wrote it.  A mismatch with the
 * register means something else wrote PKRU (glibc's pkey_set, a signal
 * handler that jumped out, foreign code). */
static __thread uint32_t shadow;
static __thread int shadow_valid;

static inline void record_shadow(uint32_t value)
{
    shadow = value;
    shadow_valid = 1;
}

static inline uint32_t replace_rights(uint32_t pkru, int pkey, unsigned int rights)
{
    return (pkru & ~PK_KEY_MASK(pkey)) | (rights << PK_KEY_SHIFT(pkey));
}

/* WRPKRU serialises the pipeline, so skip it when nothing changes (as the
 * kernel and PartitionAlloc do). */
static inline void write_pkru(uint32_t old, uint32_t new_value)
{
    if (new_value != old)
        pk_wrpkru_unchecked(new_value);
    record_shadow(new_value);
}

static inline int check_key(int pkey)
{
    if (pkey < 0 || pkey >= PK_NKEYS)
        return PK_E_KEY_RANGE;
    if (pkey != 0 &&
        !(atomic_load_explicit(&allocated_keys, memory_order_relaxed) & (1u << pkey)))
        return PK_E_NOT_ALLOCATED;
    return PK_OK;
}

static void set_allocated(int pkey, int on)
{
    if (on) {
        atomic_fetch_or(&allocated_keys, 1u << pkey);
        atomic_fetch_or(&allocated_pkru_bits, PK_KEY_MASK(pkey));
    } else {
        atomic_fetch_and(&allocated_pkru_bits, ~PK_KEY_MASK(pkey));
        atomic_fetch_and(&allocated_keys, ~(1u << pkey));
    }
}

/* Flags and rights are validated by the caller; the kernel rechecks them. */
int pk_hw_alloc(unsigned int flags, unsigned int access_rights)
{
    int pkey;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    pkey = pk_sys_pkey_alloc(flags, access_rights);
    if (pkey < 0)
        return PK_E_ERRNO;
    if (pkey >= PK_NKEYS) {
        /* A future kernel with more keys: refuse what PKRU cannot express. */
        pk_sys_pkey_free(pkey);
        return PK_E_KEY_RANGE;
    }
    set_allocated(pkey, 1);
    /* The kernel wrote the initial rights into this thread's PKRU. */
    record_shadow(pk_rdpkru_unchecked());
    return pkey;
}

int pk_hw_free(int pkey)
{
    int status;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    if ((status = check_key(pkey)) != PK_OK)
        return status;
    if (pkey == 0)
        return PK_E_KEY_ZERO;
    if (pk_sys_pkey_free(pkey) != 0)
        return PK_E_ERRNO;
    set_allocated(pkey, 0);
    /* The kernel leaves every thread's rights alone, so a later pkey_alloc
     * returning this number would inherit them.  Deny it here at least. */
    {
        uint32_t old = pk_rdpkru_unchecked();
        write_pkru(old, replace_rights(old, pkey, 1u));
    }
    return PK_OK;
}

int pk_hw_get(int pkey)
{
    int status;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    if ((status = check_key(pkey)) != PK_OK)
        return status;
    return (int)((pk_rdpkru_unchecked() >> PK_KEY_SHIFT(pkey)) & 3u);
}

int pk_hw_set(int pkey, int access_rights)
{
    int status;
    uint32_t old;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    if ((status = check_key(pkey)) != PK_OK)
        return status;
    if (pkey == 0)
        return PK_E_KEY_ZERO;
    if (access_rights < 0 || access_rights > 3)
        return PK_E_RIGHTS;
    old = pk_rdpkru_unchecked();
    write_pkru(old, replace_rights(old, pkey, (unsigned int)access_rights));
    return PK_OK;
}

int pk_hw_wrpkru(uint32_t value)
{
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    if (value & PK_KEY_MASK(0))
        return PK_E_KEY_ZERO;
    write_pkru(pk_rdpkru_unchecked(), value);
    return PK_OK;
}

/*
 * Scoped access: replace the bits under `mask` with `bits` and return the
 * previous register value for pk_hw_leave.  Every key under the mask must
 * be allocated, and key 0 may not be touched.
 */
int64_t pk_hw_enter(uint32_t mask, uint32_t bits)
{
    uint32_t old;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    if (mask & PK_KEY_MASK(0))
        return PK_E_KEY_ZERO;
    if (mask & ~atomic_load_explicit(&allocated_pkru_bits, memory_order_relaxed))
        return PK_E_NOT_ALLOCATED;
    old = pk_rdpkru_unchecked();
    write_pkru(old, (old & ~mask) | (bits & mask));
    return old;
}

/*
 * Restore the bits under `mask` from `saved`, leaving other keys as the
 * block left them.  A key freed inside the block is skipped: freeing
 * already denied it, and restoring its old rights would hand them to
 * whoever allocates the number next.
 */
int pk_hw_leave(uint32_t mask, uint32_t saved)
{
    uint32_t old;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    mask &= atomic_load_explicit(&allocated_pkru_bits, memory_order_relaxed);
    old = pk_rdpkru_unchecked();
    write_pkru(old, (old & ~mask) | (saved & mask));
    return PK_OK;
}

uint32_t pk_allocated_mask(void)
{
    return atomic_load(&allocated_keys);
}

int64_t pk_shadow_pkru(void)
{
    return shadow_valid ? (int64_t)shadow : -1;
}
