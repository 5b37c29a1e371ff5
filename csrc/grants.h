/*
 * The grants core (grants.c, and the hot algebra inline here, so that a
 * scope's entry and exit make no calls for it): key identities,
 * revocation stamps, tokens and the counted-grant algebra.  No lock, no register, no mprotect: every
 * function works on the `struct grants` it is given and on the identity
 * and stamp tables below, so the exhaustive model
 * (tests/model/grants_model.c) drives exactly this code.  The callers
 * (state.c, backend_*.c) hold state.c's mutex wherever the comments below
 * ask for it.
 *
 * Grants are counted, never saved and restored.  Each scope adds one grant
 * of its kind to each of its keys and withdraws exactly that one on exit,
 * so scopes may end in any order (threads, asyncio tasks, generators, one
 * scope object entered twice).  While any grant is active on a key:
 *
 *     rights = deny grants > 0       ? DISABLE_ACCESS
 *            : read-write grants > 0 ? UNRESTRICTED
 *            : read-only grants > 0  ? DISABLE_WRITE
 *            :                         base
 *
 * and `base` is what the key had when its first grant began (pkey_set and
 * wrpkru change `base` while grants are active).  When the last grant ends
 * the key has `base` again.  A deny() scope wins over every allow(): the
 * package fails closed.
 *
 * Keys have identities, not just numbers: each allocation gets a fresh
 * 32-bit identity, and scopes, buffers and regions carry it.  A scope that
 * exits after its key was freed and the number reallocated finds a
 * different identity and withdraws nothing.
 *
 * A scope's token (returned by enter, given back to exit) is
 * (thread serial << 32 | revocation epoch): exit refuses a token from
 * another thread, and a grant made before a revocation of its key is not
 * withdrawn twice.
 */
#ifndef PKEYS_GRANTS_H
#define PKEYS_GRANTS_H

#include "pkeys_internal.h"

#include <string.h>

#define PK_LOAD(x) __atomic_load_n(&(x), __ATOMIC_SEQ_CST)
#define PK_STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_SEQ_CST)

/* 0: not allocated.  Written under the state mutex, read without it. */
extern uint32_t pk_key_identities[PK_NKEYS];
/* Bumped after each store to pk_key_identities: a reader that finds it
 * unchanged across a stretch of code knows that no identity changed in
 * that stretch (hw_scope_enter).  It would take 2^32 allocations and frees
 * within that stretch to wrap it. */
extern uint32_t pk_identity_changes;

struct grants {
    uint32_t identity[PK_NKEYS];   /* the key the counts below belong to */
    uint32_t epoch[PK_NKEYS];      /* ...and the revocation they came after */
    uint32_t count[PK_NKEYS][3];   /* indexed by PK_GRANT_* */
    uint32_t active[3];            /* bit k of active[kind]: count[k][kind] != 0 */
    uint32_t base;                 /* PKRU layout: each key's rights outside every grant,
                                      while any is active */
};

/* This thread's grants: the ones in force on hardware, and on the software
 * backend the record of which grants a forked child keeps. */
extern __thread struct grants pk_thread_grants;

/* Its address, computed once per call: GCC otherwise recomputes a
 * general-dynamic TLS address (a __tls_get_addr call) at each use in a
 * loop with atomics, which was a third of a four-key scope's C time. */
static inline struct grants *pk_my_grants(void)
{
    struct grants *g = &pk_thread_grants;
    __asm__("" : "+r"(g));  /* opaque from here: not rematerialised */
    return g;
}

/* Each key number of `keys` but 0, lowest first.  Scopes name one key or
 * a few: visiting only those keeps the hot paths' cost per key named, not
 * per key the register has (these loops were most of a scope's C time). */
#define PK_FOR_EACH_KEY(k, keys)                                                   \
    for (uint32_t pk_rest_ = (uint32_t)(keys) & ((1u << PK_NKEYS) - 2u);          \
         pk_rest_ && ((k) = __builtin_ctz(pk_rest_), 1); pk_rest_ &= pk_rest_ - 1)

static inline unsigned pk_bits_of(uint32_t pkru, int k) { return (pkru >> PK_KEY_SHIFT(k)) & 3u; }

static inline uint32_t pk_with_bits(uint32_t pkru, int k, unsigned bits)
{
    return (pkru & ~PK_KEY_MASK(k)) | (bits << PK_KEY_SHIFT(k));
}

/*
 * The counts say how many grants of each kind a key has; the masks say
 * which keys have any of each kind, so that a scope's register value is
 * composed for all its keys at once (pk_grants_compose) instead of key by
 * key.  Every writer of a count keeps its mask bit (the functions below;
 * the software backend's direct edits call pk_grants_recount), and
 * tests/model/grants_fused.c compares whole structs, masks included.
 */
static inline uint32_t pk_grants_any(const struct grants *g)
{
    return g->active[0] | g->active[1] | g->active[2];
}

static inline int pk_grants_active(const struct grants *g, int k)
{
    return (pk_grants_any(g) >> k) & 1u;
}

static inline unsigned pk_grants_base(const struct grants *g, int k)
{
    return pk_bits_of(g->base, k);
}

static inline void pk_grants_set_base(struct grants *g, int k, unsigned bits)
{
    g->base = pk_with_bits(g->base, k, bits);
}

static inline unsigned pk_grants_composed(const struct grants *g, int k)
{
    if ((g->active[PK_GRANT_DENY] >> k) & 1u)
        return PK_AD;
    if ((g->active[PK_GRANT_READ_WRITE] >> k) & 1u)
        return 0;
    if ((g->active[PK_GRANT_READ_ONLY] >> k) & 1u)
        return PK_WD;
    return pk_grants_base(g, k);
}

/* Key k's mask bits from its counts, after a caller wrote them directly. */
static inline void pk_grants_recount(struct grants *g, int k)
{
    int kind;
    for (kind = 0; kind < 3; kind++)
        g->active[kind] = (g->active[kind] & ~(1u << k)) |
                          (uint32_t)(g->count[k][kind] != 0) << k;
}

/* Key k with no grant of any kind. */
static inline void pk_grants_clear(struct grants *g, int k)
{
    memset(g->count[k], 0, sizeof g->count[k]);
    g->active[0] &= ~(1u << k);
    g->active[1] &= ~(1u << k);
    g->active[2] &= ~(1u << k);
}

/* One grant of `kind` on key k withdrawn, if it has one. */
static inline void pk_grants_withdraw_key(struct grants *g, int k, int kind)
{
    if (g->count[k][kind] && !--g->count[k][kind])
        g->active[kind] &= ~(1u << k);
}

/* Bit k of `keys` at bit 2k: a mask of keys as PKRU's access-disable bits
 * (x2: write-disable; x3: both).  By table, a byte at a time. */
extern const uint16_t pk_spread_table[256];
static inline uint32_t pk_spread(uint32_t keys)
{
    return pk_spread_table[keys & 0xffu] | (uint32_t)pk_spread_table[(keys >> 8) & 0xffu] << 16;
}

/* ---- identities (allocation and free: state mutex held) ----------------- */

/* The identity the next allocation will get (never 0). */
uint32_t pk_identity_next(void);
/* `pkey` is allocated with `identity` (from pk_identity_next), and never
 * revoked since. */
void pk_identity_assign(int pkey, uint32_t identity);
/* `pkey` is free: scopes and regions naming its identity are stale. */
void pk_identity_retire(int pkey);
/* A retirement undone (a free that failed): `pkey` has `identity` again,
 * and its revocation stamps stand. */
void pk_identity_restore(int pkey, uint32_t identity);
/* A number's key, `current` (its pk_key_identities entry), is the one of
 * `wanted` (0: any key): PK_OK, PK_E_NOT_ALLOCATED or PK_E_KEY_CLOSED. */
static inline int pk_identity_status(uint32_t current, uint32_t wanted)
{
    if (!current)
        return PK_E_NOT_ALLOCATED;
    return wanted && current != wanted ? PK_E_KEY_CLOSED : PK_OK;
}
/* PK_OK, PK_E_KEY_RANGE or PK_E_NOT_ALLOCATED (key 0 is always allocated). */
int pk_identity_check_number(int pkey);
/* `keys` names at least one key, none of them 0 or out of range: PK_OK,
 * PK_E_KEY_ZERO or PK_E_KEY_RANGE. */
static inline int pk_keys_check(uint32_t keys)
{
    if (keys & 1u)
        return PK_E_KEY_ZERO;
    if (!keys || keys >> PK_NKEYS)
        return PK_E_KEY_RANGE;
    return PK_OK;
}
/* Each key of `keys` still has the identity in `identities`: PK_OK,
 * PK_E_KEY_ZERO, PK_E_KEY_RANGE or PK_E_KEY_CLOSED. */
static inline int pk_identity_check(uint32_t keys, const uint32_t *identities)
{
    int k, status = pk_keys_check(keys);
    if (status != PK_OK)
        return status;
    PK_FOR_EACH_KEY(k, keys)
        if (!identities[k] || PK_LOAD(pk_key_identities[k]) != identities[k])
            return PK_E_KEY_CLOSED;
    return PK_OK;
}

/* ---- revocations -------------------------------------------------------- */

/* Stamp a revocation of `pkey` to `rights` (state mutex held): bump the
 * epoch, record the rights, and void every grant on the key counted before.
 * Returns the new epoch. */
uint32_t pk_revocation_stamp(int pkey, unsigned rights);
/* `pkey` was revoked after `epoch`. */
static inline int pk_revoked_since(int k, uint32_t epoch)
{
    return (int32_t)(PK_LOAD(pk_revoked_at[k]) - epoch) > 0;
}

/* ---- tokens ------------------------------------------------------------- */

int64_t pk_make_token(uint32_t epoch);
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
static inline uint32_t pk_grants_counted_under(const struct grants *g, uint32_t keys)
{
    uint32_t latest = 0;
    int k;
    PK_FOR_EACH_KEY(k, keys)
        if ((int32_t)(g->epoch[k] - latest) > 0)
            latest = g->epoch[k];
    return latest;
}

/* ---- the algebra -------------------------------------------------------- */

/* What pk_grants_adopt() found: */
#define PK_ADOPT_SAME 0      /* the counts stand */
#define PK_ADOPT_REVOKED 1   /* voided by a revocation since this thread last looked */
#define PK_ADOPT_FIRST 2     /* this thread's first look at this key, revoked before */
#define PK_ADOPT_FRESH 3     /* first look (or a freed key's counts), never revoked */

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
static inline int pk_grants_adopt(struct grants *g, int k, uint32_t identity)
{
    uint32_t stamp = PK_LOAD(pk_revoked_at[k]);
    int same_key = g->identity[k] == identity;
    if (same_key && g->epoch[k] == stamp)
        return PK_ADOPT_SAME;
    pk_grants_clear(g, k);
    g->identity[k] = identity;
    g->epoch[k] = stamp;
    if (!stamp)
        return PK_ADOPT_FRESH;
    /* Read after the stamp: a later revocation's rights, if one came in
     * between, are what this thread is about to get anyway. */
    pk_grants_set_base(g, k, PK_LOAD(pk_revoked_bits[k]) & 3u);
    return same_key ? PK_ADOPT_REVOKED : PK_ADOPT_FIRST;
}

/* Key k adopted (pk_grants_adopt) for a grant about to be counted: if it
 * will be the first, its base recorded from `pkru`. */
static inline void pk_grants_open_key(struct grants *g, int k, uint32_t identity, uint32_t pkru)
{
    int found = pk_grants_adopt(g, k, identity);
    if (found == PK_ADOPT_FIRST) /* both bits are restrictions: OR is the stricter */
        g->base |= pkru & PK_KEY_MASK(k);
    else if (found != PK_ADOPT_REVOKED && !pk_grants_active(g, k))
        pk_grants_set_base(g, k, pk_bits_of(pkru, k));
}

/* Add (+1) or withdraw (-1) one grant of `kind` to key k in `g`.  Entering
 * a key's first grant records its base from `pkru`. */
static inline void pk_grants_count_key(struct grants *g, int k, int kind, uint32_t identity,
                                       int delta, uint32_t pkru)
{
    if (delta > 0) {
        pk_grants_open_key(g, k, identity, pkru);
        g->count[k][kind]++;
        g->active[kind] |= 1u << k;
    } else {
        pk_grants_adopt(g, k, identity);
        pk_grants_withdraw_key(g, k, kind);
    }
}

/* The same for each key of `keys`. */
static inline void pk_grants_count(struct grants *g, uint32_t keys, int kind,
                                   const uint32_t *identities, int delta, uint32_t pkru)
{
    int k;
    PK_FOR_EACH_KEY(k, keys)
        pk_grants_count_key(g, k, kind, identities[k], delta, pkru);
}

/* `pkru` with each key of `keys` given what its grants compose to: the
 * strongest kind with a grant (deny, then read-write, then read-only),
 * else the base. */
static inline uint32_t pk_grants_compose(const struct grants *g, uint32_t keys, uint32_t pkru)
{
    uint32_t deny = g->active[PK_GRANT_DENY] & keys;
    uint32_t read_write = g->active[PK_GRANT_READ_WRITE] & keys & ~deny;
    uint32_t read_only = g->active[PK_GRANT_READ_ONLY] & keys & ~deny & ~read_write;
    uint32_t outside = keys & ~(deny | read_write | read_only);
    return (pkru & ~(pk_spread(keys) * 3u)) | pk_spread(deny) * PK_AD |
           pk_spread(read_only) * PK_WD | (g->base & pk_spread(outside) * 3u);
}

/* The keys whose grant from a token of `epoch` is still counted in `g`:
 * not freed, not revoked since the grant began (the token's epoch), and
 * counted under the key's latest revocation stamp (a revocation voids the
 * counts). */
static inline int pk_grants_live_key(const struct grants *g, int k, uint32_t identity,
                                     uint32_t epoch)
{
    /* this thread's own value first: the compiler does not move a plain
     * read across the atomic loads (no handler writes `g`) */
    uint32_t counted_under = g->epoch[k];
    uint32_t stamp = PK_LOAD(pk_revoked_at[k]);  /* once: both tests see one stamp */
    return PK_LOAD(pk_key_identities[k]) == identity && (int32_t)(stamp - epoch) <= 0 &&
           counted_under == stamp;
}

static inline uint32_t pk_grants_live(const struct grants *g, uint32_t keys,
                                      const uint32_t *identities, uint32_t epoch)
{
    uint32_t live = keys;
    int k;
    PK_FOR_EACH_KEY(k, keys)
        if (!pk_grants_live_key(g, k, identities[k], epoch))
            live &= ~(1u << k);
    return live;
}

/* Key k has a grant of `kind` to withdraw in `g`. */
static inline int pk_grants_balanced_key(const struct grants *g, int k, int kind,
                                         uint32_t identity)
{
    return g->identity[k] == identity && g->count[k][kind];
}

/* Every key of `keys` has a grant of `kind` to withdraw in `g`. */
static inline int pk_grants_balanced(const struct grants *g, uint32_t keys, int kind,
                                     const uint32_t *identities)
{
    int k;
    PK_FOR_EACH_KEY(k, keys)
        if (!pk_grants_balanced_key(g, k, kind, identities[k]))
            return 0;
    return 1;
}

/*
 * A scope's entry and exit in one pass over their keys each, for the
 * hardware backend's hot path: a scope of four keys otherwise walks them
 * five times.  Each is the sequence of the functions above that it names,
 * and is exactly that sequence because each key's step reads and writes
 * only that key's counts and that key's bits of the register value: doing
 * the steps key by key is doing them function by function
 * (tests/model/grants_fused.c checks the two against each other over every
 * state of a small domain).
 */

/* pk_grants_count(+1) with `pkru`, then *epoch = pk_grants_counted_under()
 * and the return value pk_grants_compose() of `pkru`.  The caller has
 * checked every key's identity first: counting adopts a key's revocation
 * (pk_grants_adopt), so an entry refused after counting one key would leave
 * that revocation adopted and not applied to the register.
 *
 * Unsafe assumption, written down: a count never wraps (2^32 grants of one
 * kind on one key in one thread, each with its own token in memory). */
static inline uint32_t pk_grants_enter(struct grants *g, uint32_t keys, int kind,
                                       const uint32_t *identities, uint32_t pkru,
                                       uint32_t *epoch)
{
    uint32_t latest = 0;
    int k;
    PK_FOR_EACH_KEY(k, keys) {
        pk_grants_count_key(g, k, kind, identities[k], +1, pkru);
        if ((int32_t)(g->epoch[k] - latest) > 0)
            latest = g->epoch[k];
    }
    *epoch = latest;
    return pk_grants_compose(g, keys, pkru);
}

/*
 * The common entry, in one pass: each key's identity checked (the
 * loop of pk_identity_check, for `keys` that pk_keys_check passed) and its
 * counts found standing in `g` (pk_grants_adopt would change nothing),
 * then pk_grants_enter.  Returns PK_OK, with *epoch and *next as
 * pk_grants_enter gives them; or, with `g` as it was, PK_E_KEY_CLOSED, or
 * PK_GRANTS_ADOPT where some key must be adopted anew: the caller then
 * checks every identity and calls pk_grants_enter.  A key is counted as
 * soon as it passes, and the counts are taken back if a later one fails:
 * nothing but this thread reads `g` (revoke.c's handler does not).
 */
#define PK_GRANTS_ADOPT 1
static inline int pk_grants_enter_current(struct grants *g, uint32_t keys, int kind,
                                          const uint32_t *identities, uint32_t pkru,
                                          uint32_t *epoch, uint32_t *next)
{
    uint32_t had_grants = pk_grants_any(g), latest = 0, first_grant;
    int k, status;
    PK_FOR_EACH_KEY(k, keys) {
        uint32_t identity = identities[k], counted_for = g->identity[k];
        uint32_t counted_under = g->epoch[k];
        if (!identity || PK_LOAD(pk_key_identities[k]) != identity) {
            status = PK_E_KEY_CLOSED;
            goto undo;
        }
        if (counted_for != identity || counted_under != PK_LOAD(pk_revoked_at[k])) {
            status = PK_GRANTS_ADOPT;
            goto undo;
        }
        g->count[k][kind]++;
        if ((int32_t)(counted_under - latest) > 0)
            latest = counted_under;
    }
    /* the keys that had no grant take their base from the register, all
     * at once (pk_grants_open_key, key by key) */
    first_grant = pk_spread(keys & ~had_grants) * 3u;
    g->base = (g->base & ~first_grant) | (pkru & first_grant);
    g->active[kind] |= keys;
    *epoch = latest;
    *next = pk_grants_compose(g, keys, pkru);
    return PK_OK;
undo:
    /* the keys before k (lowest first) were counted */
    PK_FOR_EACH_KEY(k, keys & ((1u << k) - 1u))
        g->count[k][kind]--;
    return status;
}

/*
 * A scope's exit: *live = pk_grants_live(), and if pk_grants_balanced() of
 * the live keys, pk_grants_count(-1) of them, *next = pk_grants_compose()
 * of them in `pkru`, and 1.  Else 0, with `g` as it was.
 *
 * Each live key was counted under its key's current identity and stamp,
 * so adopting it again (as pk_grants_count does) would find its counts
 * standing, and is skipped.  A revocation stamped during this pass is not
 * adopted: the exit takes effect before it, and its signal (or
 * hw_write_settled, if the handler ran meanwhile) applies it to the
 * register.  A key found unbalanced after others were withdrawn gives
 * theirs back: the pass changes nothing but counts until it knows.
 */
static inline int pk_grants_exit(struct grants *g, uint32_t keys, int kind,
                                 const uint32_t *identities, uint32_t epoch, uint32_t pkru,
                                 uint32_t *live, uint32_t *next)
{
    uint32_t found = keys, emptied = 0;
    int k;
    PK_FOR_EACH_KEY(k, keys) {
        /* read before pk_grants_live_key's atomic loads */
        uint32_t identity = identities[k], counted_for = g->identity[k], left;
        if (!pk_grants_live_key(g, k, identity, epoch)) {
            found &= ~(1u << k);
            continue;
        }
        if (counted_for != identity || !g->count[k][kind])
            goto unbalanced;
        left = --g->count[k][kind];
        emptied |= (uint32_t)!left << k;
    }
    g->active[kind] &= ~emptied;
    *live = found;
    *next = pk_grants_compose(g, found, pkru);
    return 1;
unbalanced:
    /* the live keys before k (lowest first) were withdrawn */
    PK_FOR_EACH_KEY(k, found & ((1u << k) - 1u))
        g->count[k][kind]++;
    return 0;
}

/* At a scope's end, for keys freed (close_freed) or revoked (close_revoked)
 * while it was open: `pkru` with what those keys must have now. */
uint32_t pk_grants_close_freed(struct grants *g, uint32_t keys, int kind,
                               const uint32_t *identities, uint32_t pkru);
uint32_t pk_grants_close_revoked(struct grants *g, uint32_t keys, const uint32_t *identities,
                                 uint32_t pkru);

#endif
