/*
 * The grants core (grants.c): key identities, revocation stamps, tokens
 * and the counted-grant algebra.  No lock, no register, no mprotect: every
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

#define PK_LOAD(x) __atomic_load_n(&(x), __ATOMIC_SEQ_CST)
#define PK_STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_SEQ_CST)

/* 0: not allocated.  Written under the state mutex, read without it. */
extern uint32_t pk_key_identities[PK_NKEYS];

struct grants {
    uint32_t identity[PK_NKEYS];   /* the key the counts below belong to */
    uint32_t epoch[PK_NKEYS];      /* ...and the revocation they came after */
    uint32_t count[PK_NKEYS][3];   /* indexed by PK_GRANT_* */
    uint8_t base[PK_NKEYS];        /* rights outside every grant, while any is active */
};

/* This thread's grants: the ones in force on hardware, and on the software
 * backend the record of which grants a forked child keeps. */
extern __thread struct grants pk_thread_grants;

static inline unsigned pk_bits_of(uint32_t pkru, int k) { return (pkru >> PK_KEY_SHIFT(k)) & 3u; }

static inline uint32_t pk_with_bits(uint32_t pkru, int k, unsigned bits)
{
    return (pkru & ~PK_KEY_MASK(k)) | (bits << PK_KEY_SHIFT(k));
}

static inline int pk_grants_active(const struct grants *g, int k)
{
    return (g->count[k][0] | g->count[k][1] | g->count[k][2]) != 0;
}

static inline unsigned pk_grants_composed(const struct grants *g, int k)
{
    if (g->count[k][PK_GRANT_DENY])
        return PK_AD;
    if (g->count[k][PK_GRANT_READ_WRITE])
        return 0;
    if (g->count[k][PK_GRANT_READ_ONLY])
        return PK_WD;
    return g->base[k];
}

/* ---- identities (allocation and free: state mutex held) ----------------- */

/* The identity the next allocation will get (never 0). */
uint32_t pk_identity_next(void);
/* `pkey` is allocated with `identity` (from pk_identity_next), and never
 * revoked since. */
void pk_identity_assign(int pkey, uint32_t identity);
/* `pkey` is free: scopes and regions naming its identity are stale. */
void pk_identity_retire(int pkey);
/* PK_OK, PK_E_KEY_RANGE or PK_E_NOT_ALLOCATED (key 0 is always allocated). */
int pk_identity_check_number(int pkey);
/* Each key of `keys` still has the identity in `identities`: PK_OK,
 * PK_E_KEY_ZERO, PK_E_KEY_RANGE or PK_E_KEY_CLOSED. */
int pk_identity_check(uint32_t keys, const uint32_t *identities);

/* ---- revocations -------------------------------------------------------- */

/* Stamp a revocation of `pkey` to `rights` (state mutex held): bump the
 * epoch, record the rights, and void every grant on the key counted before.
 * Returns the new epoch. */
uint32_t pk_revocation_stamp(int pkey, unsigned rights);
/* `pkey` was revoked after `epoch`. */
int pk_revoked_since(int pkey, uint32_t epoch);

/* ---- tokens ------------------------------------------------------------- */

int64_t pk_make_token(uint32_t epoch);
/* The epoch a hardware grant's token carries (see grants.c). */
uint32_t pk_grants_counted_under(const struct grants *g, uint32_t keys);

/* ---- the algebra -------------------------------------------------------- */

/* What pk_grants_adopt() found: */
#define PK_ADOPT_SAME 0      /* the counts stand */
#define PK_ADOPT_REVOKED 1   /* voided by a revocation since this thread last looked */
#define PK_ADOPT_FIRST 2     /* this thread's first look at this key, revoked before */
#define PK_ADOPT_FRESH 3     /* first look (or a freed key's counts), never revoked */

int pk_grants_adopt(struct grants *g, int k, uint32_t identity);
/* Add (+1) or withdraw (-1) one grant of `kind` in `g`.  Entering a key's
 * first grant records its base from `pkru`. */
void pk_grants_count(struct grants *g, uint32_t keys, int kind, const uint32_t *identities,
                     int delta, uint32_t pkru);
/* `pkru` with each key of `keys` given what its grants compose to. */
uint32_t pk_grants_compose(const struct grants *g, uint32_t keys, uint32_t pkru);
/* The keys whose grant from a token of `epoch` is still counted in `g`. */
uint32_t pk_grants_live(const struct grants *g, uint32_t keys, const uint32_t *identities,
                        uint32_t epoch);
/* Every key of `keys` has a grant of `kind` to withdraw in `g`. */
int pk_grants_balanced(const struct grants *g, uint32_t keys, int kind,
                       const uint32_t *identities);
/* At a scope's end, for keys freed (close_freed) or revoked (close_revoked)
 * while it was open: `pkru` with what those keys must have now. */
uint32_t pk_grants_close_freed(struct grants *g, uint32_t keys, int kind,
                               const uint32_t *identities, uint32_t pkru);
uint32_t pk_grants_close_revoked(struct grants *g, uint32_t keys, const uint32_t *identities,
                                 uint32_t pkru);

#endif
