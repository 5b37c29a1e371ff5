/*
 * The grants core: see grants.h for the rules.  Nothing here locks, reads
 * or writes a register, or touches memory protection.
 */
#include "grants.h"

#include <string.h>

uint32_t pk_key_identities[PK_NKEYS];
uint32_t pk_identity_changes;
static uint32_t allocated_keys;   /* written under the state mutex, read without */
static uint32_t last_identity;    /* under the state mutex */

/* Revocations (revoke.c): each bumps the epoch and stamps its keys with it
 * and with the rights every thread must now have.  A grant whose token
 * predates its key's stamp is already void.  0 means never revoked since
 * the key was allocated. */
uint32_t pk_revocation_epoch;
uint32_t pk_revoked_at[PK_NKEYS];
uint32_t pk_revoked_bits[PK_NKEYS];

__thread struct grants pk_thread_grants;
static PK_TLS uint32_t thread_serial;
static uint32_t last_serial;

/* ---- identities --------------------------------------------------------- */

uint32_t pk_identity_next(void) { return last_identity + 1 ? last_identity + 1 : 1; }

void pk_identity_assign(int pkey, uint32_t identity)
{
    last_identity = identity;
    PK_STORE(pk_revoked_at[pkey], 0u);
    PK_STORE(pk_key_identities[pkey], identity);
    __atomic_add_fetch(&pk_identity_changes, 1, __ATOMIC_SEQ_CST);
    __atomic_or_fetch(&allocated_keys, 1u << pkey, __ATOMIC_SEQ_CST);
}

void pk_identity_retire(int pkey)
{
    PK_STORE(pk_key_identities[pkey], 0u);
    __atomic_add_fetch(&pk_identity_changes, 1, __ATOMIC_SEQ_CST);
    __atomic_and_fetch(&allocated_keys, ~(1u << pkey), __ATOMIC_SEQ_CST);
}

void pk_identity_restore(int pkey, uint32_t identity)
{
    PK_STORE(pk_key_identities[pkey], identity);
    __atomic_add_fetch(&pk_identity_changes, 1, __ATOMIC_SEQ_CST);
    __atomic_or_fetch(&allocated_keys, 1u << pkey, __ATOMIC_SEQ_CST);
}

uint32_t pk_key_identity(int pkey)
{
    return (pkey > 0 && pkey < PK_NKEYS) ? PK_LOAD(pk_key_identities[pkey]) : 0;
}

uint32_t pk_allocated_mask(void) { return PK_LOAD(allocated_keys); }

int pk_identity_check_number(int pkey)
{
    if (pkey < 0 || pkey >= PK_NKEYS)
        return PK_E_KEY_RANGE;
    if (pkey && !PK_LOAD(pk_key_identities[pkey]))
        return PK_E_NOT_ALLOCATED;
    return PK_OK;
}


/* ---- revocations -------------------------------------------------------- */

uint32_t pk_revocation_stamp(int pkey, unsigned rights)
{
    uint32_t epoch = __atomic_add_fetch(&pk_revocation_epoch, 1, __ATOMIC_SEQ_CST);
    if (!epoch)
        epoch = __atomic_add_fetch(&pk_revocation_epoch, 1, __ATOMIC_SEQ_CST);
    PK_STORE(pk_revoked_bits[pkey], rights);
    PK_STORE(pk_revoked_at[pkey], epoch);
    return epoch;
}


/* ---- tokens ------------------------------------------------------------- */

uint32_t pk_thread_serial(void)
{
    if (!thread_serial)
        thread_serial = __atomic_add_fetch(&last_serial, 1, __ATOMIC_RELAXED) & 0x7fffffffu;
    return thread_serial;
}

int64_t pk_make_token(uint32_t epoch) { return ((int64_t)pk_thread_serial() << 32) | epoch; }


/* ---- the algebra -------------------------------------------------------- */

/* Byte b with its bit i moved to bit 2i (pk_spread). */
#define PK_SPREAD_BYTE(b)                                                              \
    (((b) & 1) | ((b) & 2) << 1 | ((b) & 4) << 2 | ((b) & 8) << 3 | ((b) & 16) << 4 |  \
     ((b) & 32) << 5 | ((b) & 64) << 6 | ((b) & 128) << 7)
#define PK_SPREAD_4(b) PK_SPREAD_BYTE(b), PK_SPREAD_BYTE((b) + 1), PK_SPREAD_BYTE((b) + 2), \
                       PK_SPREAD_BYTE((b) + 3)
#define PK_SPREAD_16(b) PK_SPREAD_4(b), PK_SPREAD_4((b) + 4), PK_SPREAD_4((b) + 8), \
                        PK_SPREAD_4((b) + 12)
#define PK_SPREAD_64(b) PK_SPREAD_16(b), PK_SPREAD_16((b) + 16), PK_SPREAD_16((b) + 32), \
                        PK_SPREAD_16((b) + 48)
const uint16_t pk_spread_table[256] = {PK_SPREAD_64(0), PK_SPREAD_64(64), PK_SPREAD_64(128),
                                       PK_SPREAD_64(192)};

/* Keys freed while this thread held a grant on them: the freeing thread
 * could deny only its own register, so this one closes the number here
 * once its last grant on the old key ends, and a later key that gets the
 * number inherits nothing from it. */
uint32_t pk_grants_close_freed(struct grants *g, uint32_t keys, int kind,
                               const uint32_t *identities, uint32_t pkru)
{
    int k;
    PK_FOR_EACH_KEY(k, keys) {
        if (g->identity[k] != identities[k] || PK_LOAD(pk_key_identities[k]) == identities[k])
            continue;
        pk_grants_withdraw_key(g, k, kind);
        if (!pk_grants_active(g, k))
            pkru = pk_with_bits(pkru, k, PK_AD);
    }
    return pkru;
}

/* Keys whose grant from this scope a revocation voided while it was open
 * (still allocated: close_freed handles freed ones).  The revocation's
 * signal may not have reached this thread yet, or may have reached only
 * the frame of a signal handler it was running: so the scope's end applies
 * the revocation's rights itself, unless a grant this thread counted since
 * is active, and never leaves the key open outside every scope until the
 * signal comes.
 *
 * Unless this thread has looked at the key since the revocation (its
 * counts were adopted under the stamp already): then it has written the
 * key's rights since -- a scope's end, pkey_set, wrpkru -- and those stand.
 * Applying the revocation's rights over them reopened a key that this
 * thread had closed after a revocation to "open" (found by an adversary). */
uint32_t pk_grants_close_revoked(struct grants *g, uint32_t keys, const uint32_t *identities,
                                 uint32_t pkru)
{
    int k;
    PK_FOR_EACH_KEY(k, keys) {
        int found;
        if (PK_LOAD(pk_key_identities[k]) != identities[k])
            continue;
        found = pk_grants_adopt(g, k, identities[k]);
        if (pk_grants_active(g, k))
            pkru = pk_with_bits(pkru, k, pk_grants_composed(g, k));
        else if (found != PK_ADOPT_SAME)
            pkru = pk_with_bits(pkru, k, PK_LOAD(pk_revoked_bits[k]) & 3u);
    }
    return pkru;
}
