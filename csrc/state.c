/*
 * The package's one home for state: which keys are allocated and who they
 * are, the grants that scopes hold, and the software backend's emulated
 * register.  (Which memory each key guards is in regions.c, under the same
 * lock.)
 *
 * Why here, in C:
 *  - One mutex guards it, and no Python code ever runs while it is held:
 *    every entry point is a single cffi call.  A finalizer that the garbage
 *    collector runs at any allocation can therefore call in without ever
 *    waiting on its own thread.
 *  - fork() holds the mutex across the fork (pthread_atfork), so a child
 *    never inherits a half-made change, and the child keeps the same mutex.
 *  - The hardware hot paths (get, set, scopes) touch only this thread's
 *    register and thread-local counts, plus atomic reads of key identities,
 *    so they take no lock at all.
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
 * package fails closed.  Grants belong to the thread on hardware (PKRU is
 * per thread) and to the process on the software backend.
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
#include "pkeys_internal.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>

int pk_mode;

static pthread_mutex_t state_mutex = PTHREAD_MUTEX_INITIALIZER;

void pk_state_lock(void) { pthread_mutex_lock(&state_mutex); }
void pk_state_unlock(void) { pthread_mutex_unlock(&state_mutex); }

/* ---- keys -------------------------------------------------------------- */

/* 0: not allocated.  Written under the mutex, read without it. */
static uint32_t key_identity[PK_NKEYS];
static uint32_t allocated_keys;
static uint32_t last_identity;          /* under the mutex */
/* Revocations (revoke.c): each bumps the epoch and stamps its keys with it
 * and with the rights every thread must now have.  A grant whose token
 * predates its key's stamp is already void.  0 means never revoked since
 * the key was allocated. */
uint32_t pk_revocation_epoch;
uint32_t pk_revoked_at[PK_NKEYS];
uint32_t pk_revoked_bits[PK_NKEYS];

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_SEQ_CST)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_SEQ_CST)

/* ---- grants ------------------------------------------------------------ */

struct grants {
    uint32_t identity[PK_NKEYS];   /* the key the counts below belong to */
    uint32_t epoch[PK_NKEYS];      /* ...and the revocation they came after */
    uint32_t count[PK_NKEYS][3];   /* indexed by PK_GRANT_* */
    uint8_t base[PK_NKEYS];        /* rights outside every grant, while any is active */
};

/* This thread's grants: the ones in force on hardware, and on the software
 * backend the record of which grants a forked child keeps. */
static __thread struct grants thread_grants;
static __thread uint32_t thread_serial;
static uint32_t last_serial;

/* Software backend: the grants in force (process-wide) and the register. */
static struct grants process_grants;
/* The identity of each key that had a scope ended in a thread other than
 * the one that entered it: that thread's own record is wrong since. */
static uint32_t sw_cross_thread[PK_NKEYS];
static uint32_t sw_base_pkru = 0x55555554u;  /* the kernel's init value */
static uint32_t sw_pkru = 0x55555554u;

/* Hardware: this thread's PKRU as the package last wrote it. */
static __thread uint32_t shadow;
static __thread int shadow_valid;

static inline unsigned bits_of(uint32_t pkru, int k) { return (pkru >> PK_KEY_SHIFT(k)) & 3u; }

static inline uint32_t with_bits(uint32_t pkru, int k, unsigned bits)
{
    return (pkru & ~PK_KEY_MASK(k)) | (bits << PK_KEY_SHIFT(k));
}

static inline int active(const struct grants *g, int k)
{
    return (g->count[k][0] | g->count[k][1] | g->count[k][2]) != 0;
}

static inline unsigned composed(const struct grants *g, int k)
{
    if (g->count[k][PK_GRANT_DENY])
        return PK_AD;
    if (g->count[k][PK_GRANT_READ_WRITE])
        return 0;
    if (g->count[k][PK_GRANT_READ_ONLY])
        return PK_WD;
    return g->base[k];
}

/* What adopt() found: */
#define ADOPT_SAME 0      /* the counts stand */
#define ADOPT_REVOKED 1   /* voided by a revocation since this thread last looked */
#define ADOPT_FIRST 2     /* this thread's first look at this key, revoked before */
#define ADOPT_FRESH 3     /* first look (or a freed key's counts), never revoked */

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
 * the broadcast): its base is the stricter of the two (count_grant).
 */
static inline int adopt(struct grants *g, int k, uint32_t identity)
{
    uint32_t stamp = LOAD(pk_revoked_at[k]);
    int same_key = g->identity[k] == identity;
    if (same_key && g->epoch[k] == stamp)
        return ADOPT_SAME;
    memset(g->count[k], 0, sizeof g->count[k]);
    g->identity[k] = identity;
    g->epoch[k] = stamp;
    if (!stamp)
        return ADOPT_FRESH;
    /* Read after the stamp: a later revocation's rights, if one came in
     * between, are what this thread is about to get anyway. */
    g->base[k] = (uint8_t)(LOAD(pk_revoked_bits[k]) & 3u);
    return same_key ? ADOPT_REVOKED : ADOPT_FIRST;
}

uint32_t pk_thread_serial(void)
{
    if (!thread_serial)
        thread_serial = __atomic_add_fetch(&last_serial, 1, __ATOMIC_RELAXED) & 0x7fffffffu;
    return thread_serial;
}

static inline int64_t make_token(uint32_t epoch)
{
    return ((int64_t)pk_thread_serial() << 32) | epoch;
}

/*
 * The epoch a hardware grant's token carries: the latest of the stamps its
 * keys were counted under (adopt() recorded them).  Not the global epoch
 * read after counting: a revocation could bump that between the counting
 * and the read, and the token would then claim a grant voided by that
 * very revocation; once a nested scope had re-adopted the key under the
 * new stamp, the old scope's exit withdrew the new scope's grant (found by
 * tests/model/grants_model.c).  Any later stamp is a larger epoch than
 * every stamp before it, so the exit sees it as revoked since.
 */
static uint32_t counted_under(const struct grants *g, uint32_t keys)
{
    uint32_t latest = 0;
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if ((keys & (1u << k)) && (int32_t)(g->epoch[k] - latest) > 0)
            latest = g->epoch[k];
    return latest;
}

static inline int revoked_since(int k, uint32_t epoch)
{
    return (int32_t)(LOAD(pk_revoked_at[k]) - epoch) > 0;
}

/* ---- the register ------------------------------------------------------ */

static inline void hw_write(uint32_t old, uint32_t value)
{
    /* WRPKRU serialises the pipeline: skip it when nothing changes. */
    if (value != old)
        pk_wrpkru_unchecked(value);
    shadow = value;
    shadow_valid = 1;
}

/* Write a value computed from a register read after pk_revocations_mark()
 * returned `mark`.  A revocation's handler may have edited the register
 * between that read and this write, and the write would undo it: so look
 * again afterwards and apply what the handler applied. */
static inline void hw_write_settled(uint32_t old, uint32_t value, uint32_t mark)
{
    hw_write(old, value);
    PK_STEP();
    if (pk_revocations_moved(mark)) {
        uint32_t now = pk_rdpkru_unchecked();
        PK_STEP();
        hw_write(now, pk_revocations_catch_up(now));
    }
    PK_STEP();
}

/* The emulated register that the software backend's state implies. */
static uint32_t sw_compute(void)
{
    uint32_t pkru = sw_base_pkru;
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if (active(&process_grants, k))
            pkru = with_bits(pkru, k, composed(&process_grants, k));
    return pkru;
}

/* Make the software state's register real: re-protect the regions of the
 * keys that change.  Called with the mutex held, after the counts changed.
 * Returns PK_OK, or PK_E_NEED_PINS / PK_E_ERRNO with nothing applied. */
static int sw_commit(uint64_t pins)
{
    uint32_t next = sw_compute();
    uint32_t changed = next ^ sw_pkru;
    uint32_t keys = 0;
    int k, err;
    for (k = 1; k < PK_NKEYS; k++)
        if (changed & PK_KEY_MASK(k))
            keys |= 1u << k;
    if (!keys)
        return PK_OK;
    if (pk_regions_need_pins(keys, pins))
        return PK_E_NEED_PINS;
    err = pk_regions_apply(sw_pkru, next);
    if (err) {
        errno = -err;
        return PK_E_ERRNO;
    }
    sw_pkru = next;
    pk_sw_mirror_pkru(next);
    return PK_OK;
}

/* ---- setup and fork ---------------------------------------------------- */

static void before_fork(void) { pthread_mutex_lock(&state_mutex); }
static void after_fork(void) { pthread_mutex_unlock(&state_mutex); }

int pk_state_init(int mode)
{
    static int atfork_registered;
    if (mode != PK_MODE_HARDWARE && mode != PK_MODE_SOFTWARE)
        return PK_E_RIGHTS;
    if (mode == PK_MODE_HARDWARE && !pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    pthread_mutex_lock(&state_mutex);
    pk_mode = mode;
    if (!atfork_registered) {
        /* The child's only thread is the one that locked it: it may unlock. */
        pthread_atfork(before_fork, after_fork, after_fork);
        atfork_registered = 1;
    }
    pthread_mutex_unlock(&state_mutex);
    return PK_OK;
}

int pk_state_mode(void) { return pk_mode; }

/*
 * In a forked child only the forking thread exists, so only its grants can
 * ever end.  On hardware the child has that thread's register already.  On
 * the software backend the process-wide grants of the other threads are
 * dropped here, so that the child fails closed rather than keeping their
 * access for good.
 */
int pk_after_fork_in_child(uint64_t pins)
{
    struct grants saved;
    int k, g, status;
    if (pk_mode != PK_MODE_SOFTWARE)
        return PK_OK;
    pk_state_lock();
    saved = process_grants;
    for (k = 1; k < PK_NKEYS; k++) {
        const struct grants *own = &thread_grants;
        /* This thread's counts are its own grants only if no revocation
         * voided them since and no scope of the key ever ended in a thread
         * other than its own; otherwise drop them all (fail closed). */
        int trusted = own->identity[k] == process_grants.identity[k] &&
                      own->epoch[k] == LOAD(pk_revoked_at[k]) &&
                      sw_cross_thread[k] != process_grants.identity[k];
        for (g = 0; g < 3; g++) {
            uint32_t mine = trusted ? own->count[k][g] : 0;
            if (process_grants.count[k][g] > mine)
                process_grants.count[k][g] = mine;
        }
    }
    status = sw_commit(pins);
    if (status != PK_OK)
        process_grants = saved;
    pk_state_unlock();
    return status;
}

/*
 * The rights of `pkey` in every thread at once, and every grant on it
 * voided (scopes that are active keep no access and re-grant nothing when
 * they end).  Called with the mutex held.
 */
static int revoke_locked(int pkey, unsigned int rights, double timeout,
                         struct pk_broadcast *result, uint64_t pins)
{
    uint32_t epoch;
    if (pk_mode == PK_MODE_SOFTWARE) {
        uint32_t saved_base = sw_base_pkru;
        uint32_t saved_counts[3];
        int status;
        memcpy(saved_counts, process_grants.count[pkey], sizeof saved_counts);
        sw_base_pkru = with_bits(sw_base_pkru, pkey, rights);
        memset(process_grants.count[pkey], 0, sizeof process_grants.count[pkey]);
        status = sw_commit(pins);
        if (status != PK_OK) {
            sw_base_pkru = saved_base;
            memcpy(process_grants.count[pkey], saved_counts, sizeof saved_counts);
            return status;
        }
    }
    /* Stamp before signalling: a thread that writes its register after
     * reading an older epoch looks again (hw_write_settled). */
    epoch = __atomic_add_fetch(&pk_revocation_epoch, 1, __ATOMIC_SEQ_CST);
    if (!epoch)
        epoch = __atomic_add_fetch(&pk_revocation_epoch, 1, __ATOMIC_SEQ_CST);
    STORE(pk_revoked_bits[pkey], rights);
    STORE(pk_revoked_at[pkey], epoch);
    if (pk_mode == PK_MODE_SOFTWARE) {
        if (result)
            memset(result, 0, sizeof *result);
        return PK_OK;
    }
    {
        int status = pk_broadcast(1u << pkey, rights << PK_KEY_SHIFT(pkey), timeout, result);
        uint32_t now = pk_rdpkru_unchecked();
        hw_write(now, with_bits(now, pkey, rights)); /* and this thread, whatever happened */
        return status;
    }
}

/* ---- allocation -------------------------------------------------------- */

static int check_number(int pkey)
{
    if (pkey < 0 || pkey >= PK_NKEYS)
        return PK_E_KEY_RANGE;
    if (pkey && !LOAD(key_identity[pkey]))
        return PK_E_NOT_ALLOCATED;
    return PK_OK;
}

/* Flags and rights are validated by the caller; the kernel rechecks them. */
int pk_key_alloc(unsigned int flags, unsigned int access_rights, uint32_t *identity)
{
    int pkey = -1, k;
    if (!pk_mode)
        return PK_E_UNSUPPORTED;
    pk_state_lock();
    if (pk_mode == PK_MODE_HARDWARE) {
        pkey = pk_sys_pkey_alloc(flags, access_rights);
        if (pkey < 0) {
            pk_state_unlock();
            return errno == ENOSPC ? PK_E_NOSPC : PK_E_ERRNO;
        }
        if (pkey >= PK_NKEYS) {
            /* A future kernel with more keys: refuse what PKRU cannot express. */
            pk_sys_pkey_free(pkey);
            pk_state_unlock();
            return PK_E_KEY_RANGE;
        }
        /* The kernel wrote the initial rights into this thread's PKRU. */
        shadow = pk_rdpkru_unchecked();
        shadow_valid = 1;
    } else {
        for (k = 1; k < PK_NKEYS && pkey < 0; k++)
            if (!(allocated_keys & (1u << k)))
                pkey = k;
        if (pkey < 0) {
            pk_state_unlock();
            return PK_E_NOSPC;
        }
        sw_base_pkru = with_bits(sw_base_pkru, pkey, access_rights & 3u);
        memset(process_grants.count[pkey], 0, sizeof process_grants.count[pkey]);
        /* A fresh key guards no region, so this only moves the register. */
        sw_commit(0);
    }
    if (++last_identity == 0)
        ++last_identity;
    STORE(pk_revoked_at[pkey], 0u);
    STORE(key_identity[pkey], last_identity);
    process_grants.identity[pkey] = last_identity;
    __atomic_or_fetch(&allocated_keys, 1u << pkey, __ATOMIC_SEQ_CST);
    *identity = last_identity;
    pk_state_unlock();
    return pkey;
}

/* Whether `pkey` may be given `access_rights`: an allocated key other than
 * key 0, and rights in 0..3. */
static int check_settable(int pkey, int access_rights)
{
    int status;
    if (!pk_mode)
        return PK_E_UNSUPPORTED;
    if ((status = check_number(pkey)) != PK_OK)
        return status;
    if (pkey == 0)
        return PK_E_KEY_ZERO;
    if (access_rights < 0 || access_rights > 3)
        return PK_E_RIGHTS;
    return PK_OK;
}

/*
 * Free a key: refused for key 0, for a key still guarding tracked memory,
 * and (identity != 0) for a Key object whose key was already freed.  The
 * kernel leaves every thread's rights alone, so a later allocation of the
 * number would inherit them: on hardware the key is first revoked in every
 * thread (revoke.c), and the free is refused if some thread did not answer.
 */
int pk_key_free(int pkey, uint32_t identity, double timeout, struct pk_broadcast *result,
                uint64_t pins)
{
    int status = check_settable(pkey, 0);
    if (status != PK_OK)
        return status;
    pk_state_lock();
    if (identity && LOAD(key_identity[pkey]) != identity) {
        status = PK_E_KEY_CLOSED;
    } else if (!LOAD(key_identity[pkey])) {
        status = PK_E_NOT_ALLOCATED;
    } else if (pk_regions_count(pkey)) {
        status = PK_E_IN_USE;
    } else if (pk_mode == PK_MODE_HARDWARE &&
               (status = revoke_locked(pkey, PK_AD, timeout, result, pins)) != PK_OK) {
        /* Some thread may still have access: the number must not be reused. */
    } else if (pk_mode == PK_MODE_HARDWARE && pk_sys_pkey_free(pkey) != 0) {
        status = PK_E_ERRNO;
    } else {
        STORE(key_identity[pkey], 0u);
        __atomic_and_fetch(&allocated_keys, ~(1u << pkey), __ATOMIC_SEQ_CST);
        if (pk_mode == PK_MODE_HARDWARE) {
            uint32_t old = pk_rdpkru_unchecked();
            hw_write(old, with_bits(old, pkey, PK_AD));
        } else {
            sw_base_pkru = with_bits(sw_base_pkru, pkey, PK_AD);
            memset(process_grants.count[pkey], 0, sizeof process_grants.count[pkey]);
            process_grants.identity[pkey] = 0;
            sw_commit(0); /* no region left, so nothing to pin */
        }
        status = PK_OK;
    }
    pk_state_unlock();
    return status;
}

uint32_t pk_key_identity(int pkey)
{
    return (pkey > 0 && pkey < PK_NKEYS) ? LOAD(key_identity[pkey]) : 0;
}

uint32_t pk_allocated_mask(void) { return LOAD(allocated_keys); }

/* ---- rights ------------------------------------------------------------ */

int pk_key_get(int pkey)
{
    int status;
    if (!pk_mode)
        return PK_E_UNSUPPORTED;
    if ((status = check_number(pkey)) != PK_OK)
        return status;
    if (pk_mode == PK_MODE_HARDWARE)
        return (int)bits_of(pk_rdpkru_unchecked(), pkey);
    return (int)bits_of(LOAD(sw_pkru), pkey);
}

/* The rights outside scopes.  While this thread (hardware) or the process
 * (software) has grants on the key, they stay in force and the new rights
 * take over when the last one ends. */
int pk_key_set(int pkey, int access_rights, uint64_t pins)
{
    int status = check_settable(pkey, access_rights);
    if (status != PK_OK)
        return status;
    if (pk_mode == PK_MODE_HARDWARE) {
        struct grants *g = &thread_grants;
        uint32_t mark = pk_revocations_mark();
        uint32_t old;
        PK_STEP();
        old = pk_rdpkru_unchecked();
        PK_STEP();
        adopt(g, pkey, LOAD(key_identity[pkey]));
        PK_STEP();
        if (active(g, pkey))
            g->base[pkey] = (uint8_t)access_rights;
        else
            hw_write_settled(old, with_bits(old, pkey, (unsigned)access_rights), mark);
        return PK_OK;
    }
    pk_state_lock();
    {
        uint32_t saved = sw_base_pkru;
        sw_base_pkru = with_bits(sw_base_pkru, pkey, (unsigned)access_rights);
        status = sw_commit(pins);
        if (status != PK_OK)
            sw_base_pkru = saved;
    }
    pk_state_unlock();
    return status;
}

int pk_key_set_all(int pkey, uint32_t identity, int access_rights, double timeout,
                   struct pk_broadcast *result, uint64_t pins)
{
    int status = check_settable(pkey, access_rights);
    if (status != PK_OK)
        return status;
    pk_state_lock();
    if (identity && LOAD(key_identity[pkey]) != identity)
        status = PK_E_KEY_CLOSED;
    else if (!LOAD(key_identity[pkey]))
        status = PK_E_NOT_ALLOCATED;
    else if (pk_mode == PK_MODE_SOFTWARE && pk_regions_need_pins(1u << pkey, pins))
        status = PK_E_NEED_PINS;
    else
        status = revoke_locked(pkey, (unsigned)access_rights, timeout, result, pins);
    pk_state_unlock();
    return status;
}

int64_t pk_pkru_read(void)
{
    if (pk_mode == PK_MODE_HARDWARE)
        return pk_rdpkru_unchecked();
    if (pk_mode == PK_MODE_SOFTWARE)
        return LOAD(sw_pkru);
    return PK_E_UNSUPPORTED;
}

/* The whole register.  Keys with active grants keep them; the value
 * becomes their base. */
int pk_pkru_write(uint32_t value, uint64_t pins)
{
    int status, k;
    if (!pk_mode)
        return PK_E_UNSUPPORTED;
    if (value & PK_KEY_MASK(0))
        return PK_E_KEY_ZERO;
    if (pk_mode == PK_MODE_HARDWARE) {
        struct grants *g = &thread_grants;
        uint32_t mark = pk_revocations_mark();
        uint32_t old, next = value;
        PK_STEP();
        old = pk_rdpkru_unchecked();
        PK_STEP();
        for (k = 1; k < PK_NKEYS; k++) {
            if (!LOAD(key_identity[k]))
                continue;
            adopt(g, k, LOAD(key_identity[k]));
            if (active(g, k)) {
                g->base[k] = (uint8_t)bits_of(value, k);
                next = with_bits(next, k, composed(g, k));
            }
        }
        PK_STEP();
        hw_write_settled(old, next, mark);
        return PK_OK;
    }
    pk_state_lock();
    {
        uint32_t saved = sw_base_pkru;
        sw_base_pkru = value;
        status = sw_commit(pins);
        if (status != PK_OK)
            sw_base_pkru = saved;
    }
    pk_state_unlock();
    return status;
}

int64_t pk_shadow_pkru(void)
{
    if (pk_mode == PK_MODE_SOFTWARE)
        return LOAD(sw_pkru);
    return shadow_valid ? (int64_t)shadow : -1;
}

/* ---- scopes ------------------------------------------------------------ */

static int check_identities(uint32_t keys, const uint32_t *identities)
{
    int k;
    if (keys & 1u)
        return PK_E_KEY_ZERO;
    if (!keys || keys >> PK_NKEYS)
        return PK_E_KEY_RANGE;
    for (k = 1; k < PK_NKEYS; k++)
        if ((keys & (1u << k)) && (!identities[k] || LOAD(key_identity[k]) != identities[k]))
            return PK_E_KEY_CLOSED;
    return PK_OK;
}

/* Add (+1) or withdraw (-1) one grant of `kind` in `g`.  Entering a key's
 * first grant records its base from `pkru`. */
static void count_grant(struct grants *g, uint32_t keys, int kind, const uint32_t *identities,
                        int delta, uint32_t pkru)
{
    int k, found;
    for (k = 1; k < PK_NKEYS; k++) {
        if (!(keys & (1u << k)))
            continue;
        found = adopt(g, k, identities[k]);
        if (delta > 0) {
            if (found == ADOPT_FIRST) /* both bits are restrictions: OR is the stricter */
                g->base[k] = (uint8_t)(g->base[k] | bits_of(pkru, k));
            else if (found != ADOPT_REVOKED && !active(g, k))
                g->base[k] = (uint8_t)bits_of(pkru, k);
            g->count[k][kind]++;
        } else if (g->count[k][kind]) {
            g->count[k][kind]--;
        }
    }
}

static uint32_t hw_compose(const struct grants *g, uint32_t keys, uint32_t pkru)
{
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if (keys & (1u << k))
            pkru = with_bits(pkru, k, composed(g, k));
    return pkru;
}

int64_t pk_scope_enter(const struct pk_scope *scope, uint64_t pins)
{
    uint32_t keys = scope->keys;
    const uint32_t *identities = scope->identities;
    int kind = scope->kind;
    uint32_t epoch = 0;
    int status;
    if (!pk_mode)
        return PK_E_UNSUPPORTED;
    if (kind < 0 || kind > 2)
        return PK_E_RIGHTS;
    if ((status = check_identities(keys, identities)) != PK_OK)
        return status;

    if (pk_mode == PK_MODE_HARDWARE) {
        uint32_t mark = pk_revocations_mark(), old;
        int64_t token;
        PK_STEP();
        old = pk_rdpkru_unchecked();
        PK_STEP();
        count_grant(&thread_grants, keys, kind, identities, +1, old);
        token = make_token(counted_under(&thread_grants, keys));
        PK_STEP();
        hw_write_settled(old, hw_compose(&thread_grants, keys, old), mark);
        /* A pkey_free in another thread may have raced with this grant:
         * once the register is written, check again and take it back. */
        if (check_identities(keys, identities) != PK_OK) {
            count_grant(&thread_grants, keys, kind, identities, -1, 0);
            old = pk_rdpkru_unchecked();
            hw_write(old, hw_compose(&thread_grants, keys, old));
            return PK_E_KEY_CLOSED;
        }
        return token;
    }

    pk_state_lock();
    status = check_identities(keys, identities);
    if (status == PK_OK) {
        /* Under the mutex no revocation can come between these two. */
        epoch = LOAD(pk_revocation_epoch);
        count_grant(&process_grants, keys, kind, identities, +1, sw_base_pkru);
        status = sw_commit(pins);
        if (status == PK_OK)
            count_grant(&thread_grants, keys, kind, identities, +1, 0);
        else
            count_grant(&process_grants, keys, kind, identities, -1, 0);
    }
    pk_state_unlock();
    if (status != PK_OK)
        return status;
    return make_token(epoch);
}

/* The keys whose grant from `token` is still counted in `g`: not freed,
 * not revoked since the grant began (the token's epoch), and counted under
 * the key's latest revocation stamp (a revocation voids the counts). */
static uint32_t live_keys(const struct grants *g, uint32_t keys, const uint32_t *identities,
                          uint32_t epoch)
{
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if ((keys & (1u << k)) &&
            (LOAD(key_identity[k]) != identities[k] || revoked_since(k, epoch) ||
             g->epoch[k] != LOAD(pk_revoked_at[k])))
            keys &= ~(1u << k);
    return keys;
}

/* Keys freed while this thread held a grant on them: the freeing thread
 * could deny only its own register, so this one closes the number here
 * once its last grant on the old key ends, and a later key that gets the
 * number inherits nothing from it. */
static uint32_t close_freed(struct grants *g, uint32_t keys, int kind, const uint32_t *identities,
                            uint32_t pkru)
{
    int k;
    for (k = 1; k < PK_NKEYS; k++) {
        if (!(keys & (1u << k)) || g->identity[k] != identities[k] ||
            LOAD(key_identity[k]) == identities[k])
            continue;
        if (g->count[k][kind])
            g->count[k][kind]--;
        if (!active(g, k))
            pkru = with_bits(pkru, k, PK_AD);
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
static uint32_t close_revoked(struct grants *g, uint32_t keys, const uint32_t *identities,
                              uint32_t pkru)
{
    int k;
    for (k = 1; k < PK_NKEYS; k++) {
        if (!(keys & (1u << k)) || LOAD(key_identity[k]) != identities[k])
            continue;
        adopt(g, k, identities[k]);
        pkru = with_bits(pkru, k, active(g, k) ? composed(g, k) : LOAD(pk_revoked_bits[k]) & 3u);
    }
    return pkru;
}

static int balanced(const struct grants *g, uint32_t keys, int kind, const uint32_t *identities)
{
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if ((keys & (1u << k)) && (g->identity[k] != identities[k] || !g->count[k][kind]))
            return 0;
    return 1;
}

int pk_scope_exit(const struct pk_scope *scope, int64_t token, uint64_t pins)
{
    uint32_t keys = scope->keys;
    const uint32_t *identities = scope->identities;
    int kind = scope->kind;
    uint32_t epoch = (uint32_t)token;
    int own_thread = (uint32_t)((uint64_t)token >> 32) == pk_thread_serial();
    int status = PK_OK;
    if (!pk_mode)
        return PK_E_UNSUPPORTED;
    if (kind < 0 || kind > 2 || token < 0)
        return PK_E_RIGHTS;

    if (pk_mode == PK_MODE_HARDWARE) {
        uint32_t old, live, next, mark = pk_revocations_mark();
        /* Another thread's register cannot be touched from here: refuse,
         * and leave the grant for its own thread to end. */
        if (!own_thread)
            return PK_E_WRONG_THREAD;
        PK_STEP();
        live = live_keys(&thread_grants, keys, identities, epoch);
        if (!balanced(&thread_grants, live, kind, identities))
            return PK_E_UNBALANCED;
        PK_STEP();
        old = pk_rdpkru_unchecked();
        PK_STEP();
        count_grant(&thread_grants, live, kind, identities, -1, 0);
        next = hw_compose(&thread_grants, live, old);
        next = close_freed(&thread_grants, keys & ~live, kind, identities, next);
        next = close_revoked(&thread_grants, keys & ~live, identities, next);
        PK_STEP();
        hw_write_settled(old, next, mark);
        return PK_OK;
    }

    /* Software: the grant is process-wide, so ending it from the wrong
     * thread still ends it (failing closed), and then reports the misuse. */
    pk_state_lock();
    {
        uint32_t live = live_keys(&process_grants, keys, identities, epoch);
        struct grants saved = process_grants;
        if (!balanced(&process_grants, live, kind, identities)) {
            status = PK_E_UNBALANCED;
        } else {
            count_grant(&process_grants, live, kind, identities, -1, 0);
            status = sw_commit(pins);
            if (status != PK_OK) {
                process_grants = saved;
            } else if (own_thread) {
                count_grant(&thread_grants, live, kind, identities, -1, 0);
            } else {
                int k;
                for (k = 1; k < PK_NKEYS; k++)
                    if (live & (1u << k))
                        sw_cross_thread[k] = identities[k];
            }
        }
    }
    pk_state_unlock();
    if (status != PK_OK)
        return status;
    return own_thread ? PK_OK : PK_E_WRONG_THREAD;
}

/* ---- threads born inside a block ---------------------------------------- */

/* The keys this thread holds grants on, with their base rights: what a
 * thread it starts now must have instead of the register it copies. */
int pk_birth_snapshot(struct pk_birth *out)
{
    const struct grants *g = &thread_grants;
    int k;
    memset(out, 0, sizeof *out);
    /* First: a revocation stamped after this read is skipped by settle,
     * since it reaches the new thread by itself. */
    out->epoch = LOAD(pk_revocation_epoch);
    if (pk_mode != PK_MODE_HARDWARE)
        return 0;
    for (k = 1; k < PK_NKEYS; k++) {
        uint32_t identity = LOAD(key_identity[k]);
        if (!identity || g->identity[k] != identity || g->epoch[k] != LOAD(pk_revoked_at[k]) ||
            !active(g, k))
            continue;
        out->keys |= 1u << k;
        out->bits = with_bits(out->bits, k, g->base[k]);
        out->identities[k] = identity;
    }
    return out->keys != 0;
}

/* In the new thread, before it runs anything else. */
int pk_birth_settle(const struct pk_birth *birth)
{
    uint32_t mark, old, next;
    int k;
    if (pk_mode != PK_MODE_HARDWARE || !birth->keys)
        return PK_OK;
    mark = pk_revocations_mark();
    old = pk_rdpkru_unchecked();
    next = old;
    for (k = 1; k < PK_NKEYS; k++)
        if ((birth->keys & (1u << k)) && LOAD(key_identity[k]) == birth->identities[k] &&
            !revoked_since(k, birth->epoch))
            next = with_bits(next, k, bits_of(birth->bits, k));
    hw_write_settled(old, next, mark);
    return PK_OK;
}
