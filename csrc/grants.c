/*
 * The grants core: see grants.h for the rules.  Nothing here locks, reads
 * or writes a register, or touches memory protection.
 */
#include "grants.h"

#include <string.h>

uint32_t pk_key_identities[PK_NKEYS];
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
static __thread uint32_t thread_serial;
static uint32_t last_serial;

/* ---- identities --------------------------------------------------------- */

uint32_t pk_identity_next(void) { return last_identity + 1 ? last_identity + 1 : 1; }

void pk_identity_assign(int pkey, uint32_t identity)
{
    last_identity = identity;
    PK_STORE(pk_revoked_at[pkey], 0u);
    PK_STORE(pk_key_identities[pkey], identity);
    __atomic_or_fetch(&allocated_keys, 1u << pkey, __ATOMIC_SEQ_CST);
}

void pk_identity_retire(int pkey)
{
    PK_STORE(pk_key_identities[pkey], 0u);
    __atomic_and_fetch(&allocated_keys, ~(1u << pkey), __ATOMIC_SEQ_CST);
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

int pk_identity_check(uint32_t keys, const uint32_t *identities)
{
    int k;
    if (keys & 1u)
        return PK_E_KEY_ZERO;
    if (!keys || keys >> PK_NKEYS)
        return PK_E_KEY_RANGE;
    for (k = 1; k < PK_NKEYS; k++)
        if ((keys & (1u << k)) &&
            (!identities[k] || PK_LOAD(pk_key_identities[k]) != identities[k]))
            return PK_E_KEY_CLOSED;
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

int pk_revoked_since(int k, uint32_t epoch)
{
    return (int32_t)(PK_LOAD(pk_revoked_at[k]) - epoch) > 0;
}

/* ---- tokens ------------------------------------------------------------- */

uint32_t pk_thread_serial(void)
{
    if (!thread_serial)
        thread_serial = __atomic_add_fetch(&last_serial, 1, __ATOMIC_RELAXED) & 0x7fffffffu;
    return thread_serial;
}

int64_t pk_make_token(uint32_t epoch) { return ((int64_t)pk_thread_serial() << 32) | epoch; }

/*
 * The epoch a hardware grant's token carries: the latest of the stamps its
 * keys were counted under (pk_grants_adopt() recorded them).  Not the
 * global epoch read after counting: a revocation could bump that between
 * the counting and the read, and the token would then claim a grant voided
 * by that very revocation; once a nested scope had re-adopted the key under
 * the new stamp, the old scope's exit withdrew the new scope's grant (found
 * by tests/model/grants_model.c).  Any later stamp is a larger epoch than
 * every stamp before it, so the exit sees it as revoked since.
 */
uint32_t pk_grants_counted_under(const struct grants *g, uint32_t keys)
{
    uint32_t latest = 0;
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if ((keys & (1u << k)) && (int32_t)(g->epoch[k] - latest) > 0)
            latest = g->epoch[k];
    return latest;
}

/* ---- the algebra -------------------------------------------------------- */

/*
 * The grants of `g` for key k, cleared if they belonged to a freed key or
 * were voided by a revocation since.
 *
 * After a revocation the base is the rights the revocation gives every
 * thread, not what this thread's register holds: the register may not have
 * received the revocation yet (its signal is on its way).  Taking the base
 * from the register there was issue 15's item 2: a scope that began after
 * the stamp and before the signal recorded the old open rights as its
 * base, the signal closed the key inside the scope, and the scope's end
 * opened it again for good.  A thread that never looked at the key cannot
 * tell whether its register predates the revocation (a thread born during
 * the broadcast): its base is the stricter of the two (pk_grants_count).
 */
int pk_grants_adopt(struct grants *g, int k, uint32_t identity)
{
    uint32_t stamp = PK_LOAD(pk_revoked_at[k]);
    int same_key = g->identity[k] == identity;
    if (same_key && g->epoch[k] == stamp)
        return PK_ADOPT_SAME;
    memset(g->count[k], 0, sizeof g->count[k]);
    g->identity[k] = identity;
    g->epoch[k] = stamp;
    if (!stamp)
        return PK_ADOPT_FRESH;
    /* Read after the stamp: a later revocation's rights, if one came in
     * between, are what this thread is about to get anyway. */
    g->base[k] = (uint8_t)(PK_LOAD(pk_revoked_bits[k]) & 3u);
    return same_key ? PK_ADOPT_REVOKED : PK_ADOPT_FIRST;
}

void pk_grants_count(struct grants *g, uint32_t keys, int kind, const uint32_t *identities,
                     int delta, uint32_t pkru)
{
    int k, found;
    for (k = 1; k < PK_NKEYS; k++) {
        if (!(keys & (1u << k)))
            continue;
        found = pk_grants_adopt(g, k, identities[k]);
        if (delta > 0) {
            if (found == PK_ADOPT_FIRST) /* both bits are restrictions: OR is the stricter */
                g->base[k] = (uint8_t)(g->base[k] | pk_bits_of(pkru, k));
            else if (found != PK_ADOPT_REVOKED && !pk_grants_active(g, k))
                g->base[k] = (uint8_t)pk_bits_of(pkru, k);
            g->count[k][kind]++;
        } else if (g->count[k][kind]) {
            g->count[k][kind]--;
        }
    }
}

uint32_t pk_grants_compose(const struct grants *g, uint32_t keys, uint32_t pkru)
{
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if (keys & (1u << k))
            pkru = pk_with_bits(pkru, k, pk_grants_composed(g, k));
    return pkru;
}

/* Not freed, not revoked since the grant began (the token's epoch), and
 * counted under the key's latest revocation stamp (a revocation voids the
 * counts). */
uint32_t pk_grants_live(const struct grants *g, uint32_t keys, const uint32_t *identities,
                        uint32_t epoch)
{
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if ((keys & (1u << k)) &&
            (PK_LOAD(pk_key_identities[k]) != identities[k] || pk_revoked_since(k, epoch) ||
             g->epoch[k] != PK_LOAD(pk_revoked_at[k])))
            keys &= ~(1u << k);
    return keys;
}

int pk_grants_balanced(const struct grants *g, uint32_t keys, int kind,
                       const uint32_t *identities)
{
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if ((keys & (1u << k)) && (g->identity[k] != identities[k] || !g->count[k][kind]))
            return 0;
    return 1;
}

/* Keys freed while this thread held a grant on them: the freeing thread
 * could deny only its own register, so this one closes the number here
 * once its last grant on the old key ends, and a later key that gets the
 * number inherits nothing from it. */
uint32_t pk_grants_close_freed(struct grants *g, uint32_t keys, int kind,
                               const uint32_t *identities, uint32_t pkru)
{
    int k;
    for (k = 1; k < PK_NKEYS; k++) {
        if (!(keys & (1u << k)) || g->identity[k] != identities[k] ||
            PK_LOAD(pk_key_identities[k]) == identities[k])
            continue;
        if (g->count[k][kind])
            g->count[k][kind]--;
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
 * signal comes. */
uint32_t pk_grants_close_revoked(struct grants *g, uint32_t keys, const uint32_t *identities,
                                 uint32_t pkru)
{
    int k;
    for (k = 1; k < PK_NKEYS; k++) {
        if (!(keys & (1u << k)) || PK_LOAD(pk_key_identities[k]) != identities[k])
            continue;
        pk_grants_adopt(g, k, identities[k]);
        pkru = pk_with_bits(pkru, k,
                            pk_grants_active(g, k) ? pk_grants_composed(g, k)
                                                   : PK_LOAD(pk_revoked_bits[k]) & 3u);
    }
    return pkru;
}
