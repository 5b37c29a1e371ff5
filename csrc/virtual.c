/*
 * Protected buffers in C, and virtual keys: any number of buffers, each
 * readable only inside its own use, with 15 hardware keys or fewer.
 *
 * A buffer (struct pk_vbuf) has either
 *  - a fixed key: the caller's shared Key, or its own Key when sealed; or
 *  - a virtual key: it borrows one of the pool's hardware keys while it is
 *    in use or was used recently, and otherwise has none.
 *
 * A virtual buffer without a key is closed by page protection alone: its
 * pages are PROT_NONE and tagged with key 0, as on the software backend.
 * Opening it (unlocked(), readinto(), write(), read_from()) takes a key:
 *  1. a pool key that no buffer holds, else
 *  2. a newly allocated key, while the pool is below its limit, else
 *  3. the key of the least recently used buffer that nobody is using.  That
 *     buffer is *evicted* first: its pages become PROT_NONE with key 0, and
 *     only then are the opening buffer's pages tagged with the key.
 * The key is granted like any scope (state.c), so hardware opens it for
 * this thread alone and the software backend for the process.
 *
 * Invariants, and what keeps them with threads:
 *  - A buffer's pages are readable only through a grant on the key it holds
 *    now.  Pool keys are never handed out otherwise, and their base rights
 *    are access-disable.
 *  - A buffer in use is never evicted.  Its usage cell (count | CLOSED |
 *    EVICTING) is taken with one atomic step before its key is read, and
 *    eviction is the atomic step from 0 users to EVICTING.  Whichever comes
 *    first wins; a use that meets EVICTING waits for the pool mutex, under
 *    which every eviction runs start to finish.
 *  - While a use holds the cell, the buffer's key cannot change, so the
 *    scope that ends the use withdraws the grant the use made.
 *  - The hot path (the buffer holds its key) takes no lock: an atomic
 *    increment, two loads, the grant.  Only a cold open locks the pool.
 *
 * Locks: the pool mutex is taken before state.c's mutex (which
 * pk_key_alloc, pk_key_free and pk_region_tag take inside), never after;
 * no Python runs under either.  Both are held across fork().
 */
#include "pkeys_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define USAGE_CLOSED 0x80000000u
#define USAGE_EVICTING 0x40000000u
#define USAGE_COUNT 0x3fffffffu
#define TAKE_SLOW 1 /* acquire(): the cell is being evicted; retry under the mutex */
/* Freeing a pool key revokes it in every thread first (state.c), waiting
 * pk_revocation_timeout; a key that some thread did not give up in time
 * stays in the pool, unused until then. */

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_SEQ_CST)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_SEQ_CST)

struct pk_vbuf {
    uint32_t usage;          /* users | USAGE_CLOSED | USAGE_EVICTING */
    int slot;                /* virtual: the pool slot held, or -1 */
    int fixed_pkey;          /* > 0: a fixed key, never evicted */
    uint32_t fixed_identity;
    uint64_t last_used;      /* the LRU clock at the latest open */
    uintptr_t inner;         /* the pages the key guards */
    size_t inner_length;
    int inherit;             /* PK_INHERIT_*: what a forked child has */
    uint32_t born;           /* pk_fork_generation() at creation */
};

struct pool_slot {
    int pkey;                /* > 0 when the slot has an allocated key */
    uint32_t identity;
    struct pk_vbuf *holder;  /* the buffer whose pages carry the key, or NULL */
    int used;                /* some buffer held the key since it was last revoked */
};

static pthread_mutex_t pool_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct pool_slot pool[PK_NKEYS];
static int pool_keys;                    /* slots with an allocated key */
static int pool_limit = PK_VKEYS_DEFAULT_LIMIT;
static uint64_t lru_clock;
static uint64_t assignments, evictions;  /* for tests and the bench */

static void pool_lock(void) { pthread_mutex_lock(&pool_mutex); }
static void pool_unlock(void) { pthread_mutex_unlock(&pool_mutex); }

/* Held across fork() with state.c's mutex, pool first (state.c's fork
 * hook). */
void pk_vkeys_pool_lock(void) { pool_lock(); }
void pk_vkeys_pool_unlock(void) { pool_unlock(); }

/* ---- the usage cell ---------------------------------------------------- */

static int acquire(struct pk_vbuf *b, int allow_closed)
{
    uint32_t seen = LOAD(b->usage);
    do {
        if ((seen & USAGE_CLOSED) && !allow_closed)
            return PK_E_CLOSED;
        if (seen & USAGE_EVICTING)
            return TAKE_SLOW;
        if ((seen & USAGE_COUNT) == USAGE_COUNT)
            return PK_E_BUSY;
    } while (!__atomic_compare_exchange_n(&b->usage, &seen, seen + 1, 1, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    return PK_OK;
}

static void release(struct pk_vbuf *b) { __atomic_sub_fetch(&b->usage, 1, __ATOMIC_SEQ_CST); }

/* ---- the pool ---------------------------------------------------------- */

/* Take a pool slot's key away from its holder, which nobody is using: its
 * pages become PROT_NONE with key 0 (pk_region_tag also drops the region
 * from the table).  Called with the pool mutex held and the holder's cell
 * at USAGE_EVICTING.  On failure the holder keeps the key and its pages
 * stay as they were: tagged, with access denied. */
static int evict(int s)
{
    struct pk_vbuf *victim = pool[s].holder;
    int status = pk_region_tag(victim->inner, victim->inner_length, PROT_NONE, 0, 0,
                               PK_OWNER_PACKAGE, 0);
    if (status == PK_OK) {
        STORE(victim->slot, -1);
        pool[s].holder = NULL;
        evictions++;
    }
    /* Publishes slot = -1 to the next user before it can take the cell. */
    STORE(victim->usage, 0u);
    return status;
}

/* The idle holder used least recently, its cell moved to USAGE_EVICTING;
 * -1 when every holder is in use. */
static int claim_victim(void)
{
    uint32_t tried = 0;
    for (;;) {
        int s, best = -1;
        for (s = 0; s < PK_NKEYS; s++) {
            struct pk_vbuf *h = pool[s].holder;
            if (!h || (tried & (1u << s)) || LOAD(h->usage) != 0)
                continue;
            if (best < 0 || LOAD(h->last_used) < LOAD(pool[best].holder->last_used))
                best = s;
        }
        if (best < 0)
            return -1;
        {
            uint32_t idle = 0;
            if (__atomic_compare_exchange_n(&pool[best].holder->usage, &idle, USAGE_EVICTING, 0,
                                            __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                return best;
        }
        tried |= 1u << best; /* a use began meanwhile: the next one */
    }
}

/* A slot whose key nobody holds: a free one, a new key, or an eviction. */
static int free_slot(void)
{
    int s, status;
    for (s = 0; s < PK_NKEYS; s++)
        if (pool[s].pkey > 0 && !pool[s].holder)
            return s;
    if (pool_keys < pool_limit) {
        uint32_t identity = 0;
        int pkey = pk_key_alloc(0, PK_AD, &identity);
        if (pkey > 0) {
            for (s = 0; s < PK_NKEYS && pool[s].pkey > 0; s++)
                ;
            pool[s] = (struct pool_slot){pkey, identity, NULL, 0};
            pool_keys++;
            return s;
        }
        /* Everything else is taken by Keys and other code: evict among
         * the pool's own keys, if it has any. */
        if (pkey != PK_E_NOSPC || pool_keys == 0)
            return pkey < 0 ? pkey : PK_E_NOSPC;
    }
    s = claim_victim();
    if (s < 0)
        return PK_E_ALL_KEYS_BUSY;
    status = evict(s);
    return status == PK_OK ? s : status;
}

/* Give `b` (whose cell this thread holds) a key.  Pool mutex held. */
static int assign(struct pk_vbuf *b)
{
    int s = free_slot(), status;
    if (s < 0)
        return s;
    /* A thread started inside a block of the previous holder copied its
     * creator's open rights for the key, and nothing ends them: revoke the
     * key in every thread before another buffer's pages carry it. */
    if (pool[s].used) {
        status = pk_key_set_all(pool[s].pkey, pool[s].identity, (int)PK_AD, pk_revocation_timeout, NULL, 0);
        if (status != PK_OK)
            return status;
        pool[s].used = 0;
    }
    /* Access is denied for the key in every thread now: the pages are
     * tagged closed and the caller's grant opens them. */
    status = pk_region_tag(b->inner, b->inner_length, PROT_READ | PROT_WRITE, pool[s].pkey,
                           pool[s].identity, PK_OWNER_PACKAGE, 0);
    if (status != PK_OK)
        return status;
    pool[s].holder = b;
    pool[s].used = 1;
    STORE(b->slot, s);
    assignments++;
    return PK_OK;
}

/* ---- taking a use and its key ------------------------------------------ */

static int forked_away(const struct pk_vbuf *b)
{
    return b->inherit == PK_INHERIT_NONE && b->born != pk_fork_generation();
}

static int key_of(const struct pk_vbuf *b, int *pkey, uint32_t *identity)
{
    int s;
    if (b->fixed_pkey) {
        *pkey = b->fixed_pkey;
        *identity = b->fixed_identity;
        return 1;
    }
    s = LOAD(b->slot);
    if (s < 0)
        return 0;
    *pkey = LOAD(pool[s].pkey);
    *identity = LOAD(pool[s].identity);
    return 1;
}

/* Take one use of `b` and make sure it holds a key; on success the caller
 * must release() it. */
static int take(struct pk_vbuf *b, int allow_closed, int *pkey, uint32_t *identity)
{
    int status;
    if (forked_away(b))
        return PK_E_NOT_INHERITED;
    status = acquire(b, allow_closed);
    if (status < 0)
        return status;
    if (status == PK_OK && key_of(b, pkey, identity))
        goto stamp; /* hot: no lock */
    pool_lock();
    if (status != PK_OK) {
        /* No eviction runs while the mutex is held: this cannot be slow. */
        status = acquire(b, allow_closed);
        if (status != PK_OK) {
            pool_unlock();
            return status < 0 ? status : PK_E_BUSY;
        }
    }
    if (!key_of(b, pkey, identity)) {
        status = assign(b);
        if (status != PK_OK) {
            pool_unlock();
            release(b);
            return status;
        }
        key_of(b, pkey, identity);
    }
    pool_unlock();
stamp:
    if (!b->fixed_pkey)
        STORE(b->last_used, __atomic_add_fetch(&lru_clock, 1, __ATOMIC_RELAXED));
    return PK_OK;
}

static void single_key(struct pk_scope *scope, int pkey, uint32_t identity, int kind)
{
    memset(scope, 0, sizeof *scope);
    scope->keys = 1u << pkey;
    scope->kind = kind; /* the buffer's usage cell is held by take() */
    scope->identities[pkey] = identity;
}

/* Open `b` for `kind`: a use, a key, a grant.  Returns the grant's token. */
static int64_t open_for(struct pk_vbuf *b, int kind, int allow_closed, uint64_t pins)
{
    struct pk_scope scope;
    int pkey = 0;
    uint32_t identity = 0;
    int64_t token;
    int status = take(b, allow_closed, &pkey, &identity);
    if (status != PK_OK)
        return status;
    PK_STEP();
    single_key(&scope, pkey, identity, kind);
    token = pk_scope_enter(&scope, pins);
    if (token < 0)
        release(b);
    return token;
}

/* End what open_for began.  The use is released when the grant ended (and,
 * on the software backend, also when it ended from the wrong thread, which
 * state.c withdraws anyway); otherwise it stays, as the grant does. */
static int close_for(struct pk_vbuf *b, int kind, int64_t token, uint64_t pins)
{
    struct pk_scope scope;
    int pkey = 0, status;
    uint32_t identity = 0;
    if (!key_of(b, &pkey, &identity))
        return PK_E_UNBALANCED;
    single_key(&scope, pkey, identity, kind);
    PK_STEP();
    status = pk_scope_exit(&scope, token, pins);
    if (status == PK_OK || (status == PK_E_WRONG_THREAD && pk_grants_per_process()))
        release(b);
    PK_STEP();
    return status;
}

/* ---- the entry points -------------------------------------------------- */

struct pk_vbuf *pk_vbuf_new(uintptr_t inner, size_t inner_length, int pkey, uint32_t identity,
                            int inherit)
{
    struct pk_vbuf *b;
    if (pkey < 0 || pkey >= PK_NKEYS || !inner_length)
        return NULL;
    pk_fork_hooks_install();
    b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->slot = -1;
    b->fixed_pkey = pkey;
    b->fixed_identity = identity;
    b->inner = inner;
    b->inner_length = inner_length;
    b->inherit = inherit;
    b->born = pk_fork_generation();
    return b;
}

/*
 * The buffer's last step but one: give back its pool key (its pages become
 * PROT_NONE with key 0 first, or are forgotten if already unmapped) and
 * free that key, so that the pool holds keys only for live buffers.  The
 * caller has closed the buffer, so nobody uses it; later calls find it
 * closed.  Idempotent.
 */
void pk_vbuf_detach(struct pk_vbuf *b)
{
    int s;
    if (!b)
        return;
    pool_lock();
    s = LOAD(b->slot);
    if (s >= 0 && pool[s].holder == b) {
        if (pk_region_tag(b->inner, b->inner_length, PROT_NONE, 0, 0, PK_OWNER_PACKAGE, 0) !=
            PK_OK)
            pk_region_forget(b->inner, b->inner_length);
        pool[s].holder = NULL;
        STORE(b->slot, -1);
        if (pk_key_free(pool[s].pkey, pool[s].identity, pk_revocation_timeout, NULL, 0) == PK_OK) {
            pool[s].pkey = 0;
            pool_keys--;
        }
    }
    pool_unlock();
}

/* The last step: free the struct.  Python calls it when its last reference
 * to the buffer goes (ffi.gc), never earlier: a thread that raced with
 * close() may still call in, and must find a closed cell, not freed
 * memory. */
void pk_vbuf_destroy(struct pk_vbuf *b)
{
    if (!b)
        return;
    /* A buffer whose close never ran (a failed creation) still closes here. */
    __atomic_or_fetch(&b->usage, USAGE_CLOSED, __ATOMIC_SEQ_CST);
    pk_vbuf_detach(b);
    free(b);
}

int64_t pk_vbuf_enter(struct pk_vbuf *b, int kind, uint64_t pins)
{
    if (kind != PK_GRANT_READ_ONLY && kind != PK_GRANT_READ_WRITE)
        return PK_E_RIGHTS;
    return open_for(b, kind, 0, pins);
}

int pk_vbuf_exit(struct pk_vbuf *b, int kind, int64_t token, uint64_t pins)
{
    return close_for(b, kind, token, pins);
}

/* End the grant of `op` (made by open_for): PK_E_NEED_PINS leaves it due,
 * for the caller's retry with pins. */
static int finish(struct pk_vbuf *b, int kind, struct pk_vbuf_op *op, uint64_t pins)
{
    int status = close_for(b, kind, op->token, pins);
    if (status == PK_E_NEED_PINS)
        return status;
    op->token = -1;
    if (status == PK_OK && op->error) {
        errno = op->error;
        return PK_E_ERRNO;
    }
    return status;
}

/* memmove with access open only for the copy.  `internal` (the buffer's
 * own close: canary and wipe) works on a closed buffer too. */
int pk_vbuf_copy(struct pk_vbuf *b, uintptr_t dst, uintptr_t src, size_t len, int kind,
                 int internal, struct pk_vbuf_op *op, uint64_t pins)
{
    if (op->token < 0) {
        int64_t token = open_for(b, kind, internal, pins);
        if (token < 0)
            return (int)token;
        memmove((void *)dst, (const void *)src, len);
        op->token = token;
        op->result = (int64_t)len;
    }
    return finish(b, kind, op, pins);
}

/* Compare `len` bytes at `addr` in the buffer with `expected`, in constant
 * time: result 1 equal, 0 different. */
int pk_vbuf_equal(struct pk_vbuf *b, uintptr_t addr, const unsigned char *expected, size_t len,
                  struct pk_vbuf_op *op, uint64_t pins)
{
    if (op->token < 0) {
        const volatile unsigned char *seen = (const volatile unsigned char *)addr;
        unsigned char difference = 0;
        size_t i;
        int64_t token = open_for(b, PK_GRANT_READ_ONLY, 1, pins);
        if (token < 0)
            return (int)token;
        for (i = 0; i < len; i++)
            difference |= seen[i] ^ expected[i];
        op->token = token;
        op->result = difference == 0;
    }
    return finish(b, PK_GRANT_READ_ONLY, op, pins);
}

/* Wipe [addr, addr + len): every byte, or only the resident pages
 * (pk_wipe_touched).  Works on a closed buffer.  The result is the pages
 * wiped (every page counts when `touched_only` is 0). */
int pk_vbuf_wipe(struct pk_vbuf *b, uintptr_t addr, size_t len, int touched_only,
                 struct pk_vbuf_op *op, uint64_t pins)
{
    if (op->token < 0) {
        size_t pages;
        int64_t token = open_for(b, PK_GRANT_READ_WRITE, 1, pins);
        if (token < 0)
            return (int)token;
        if (touched_only) {
            pages = pk_wipe_touched(addr, len);
        } else {
            pk_wipe(addr, len);
            pages = (len + (size_t)sysconf(_SC_PAGESIZE) - 1) / (size_t)sysconf(_SC_PAGESIZE);
        }
        op->token = token;
        op->result = (int64_t)pages;
    }
    return finish(b, PK_GRANT_READ_WRITE, op, pins);
}

/*
 * read(2) from `fd` straight into the buffer, with write access open (for
 * this thread, on hardware: the kernel's copy obeys the caller's PKRU) only
 * for the call.  Reads until `len` bytes, end of file, or, with
 * `stop_at_newline`, a read that ends in '\n' (a terminal in canonical
 * mode returns one line per read).  The result is the byte count; a failed
 * read is PK_E_ERRNO with its errno, once the grant has ended.
 */
int pk_vbuf_read(struct pk_vbuf *b, int fd, uintptr_t dst, size_t len, int stop_at_newline,
                 struct pk_vbuf_op *op, uint64_t pins)
{
    if (op->token < 0) {
        size_t done = 0;
        int64_t token = open_for(b, PK_GRANT_READ_WRITE, 0, pins);
        if (token < 0)
            return (int)token;
        op->error = 0;
        while (done < len) {
            ssize_t got = pk_read_unpinned(fd, (char *)dst + done, len - done);
            if (got < 0 && errno == EINTR)
                continue;
            if (got < 0) {
                op->error = errno;
                break;
            }
            if (got == 0)
                break;
            done += (size_t)got;
            if (stop_at_newline && ((const char *)dst)[done - 1] == '\n')
                break;
        }
        op->token = token;
        op->result = (int64_t)done;
    }
    return finish(b, PK_GRANT_READ_WRITE, op, pins);
}

/* The one step from idle to closed, taken under the
 * pool mutex so that an eviction under way is not mistaken for a use. */
int pk_vbuf_close(struct pk_vbuf *b)
{
    uint32_t idle = 0;
    int status;
    pool_lock();
    if (__atomic_compare_exchange_n(&b->usage, &idle, USAGE_CLOSED, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST))
        status = PK_OK;
    else
        status = (idle & USAGE_CLOSED) ? PK_E_CLOSED : PK_E_BUSY;
    pool_unlock();
    return status;
}

void pk_vbuf_reopen(struct pk_vbuf *b) { STORE(b->usage, 0u); }

int pk_vbuf_users(const struct pk_vbuf *b) { return (int)(LOAD(b->usage) & USAGE_COUNT); }

int pk_vbuf_pkey(const struct pk_vbuf *b)
{
    int pkey = -1;
    uint32_t identity;
    return key_of(b, &pkey, &identity) ? pkey : -1;
}

/* 1 in a forked child of the process that made the buffer. */
int pk_vbuf_forked(const struct pk_vbuf *b) { return b->born != pk_fork_generation(); }

/* ---- the pool's settings ----------------------------------------------- */

/* Set the most keys the pool may hold (1..15) and return the previous
 * limit; 0 only reads it.  Keys above a lowered limit go as their buffers
 * are evicted or closed (pk_vkeys_release_idle frees the idle ones now). */
int pk_vkeys_limit(int limit)
{
    int previous;
    if (limit < 0 || limit > PK_NKEYS - 1)
        return PK_E_KEY_RANGE;
    pool_lock();
    previous = pool_limit;
    if (limit)
        pool_limit = limit;
    pool_unlock();
    return previous;
}

/* Free the pool keys that no buffer holds.  Pool mutex held. */
static int free_unheld(void)
{
    int s, freed = 0;
    for (s = 0; s < PK_NKEYS; s++) {
        if (pool[s].pkey > 0 && !pool[s].holder &&
            pk_key_free(pool[s].pkey, pool[s].identity, pk_revocation_timeout, NULL, 0) == PK_OK) {
            pool[s].pkey = 0;
            pool_keys--;
            freed++;
        }
    }
    return freed;
}

/* Evict every buffer that nobody is using and free the pool keys that no
 * buffer holds then, for code that needs raw keys.  Returns keys freed. */
int pk_vkeys_release_idle(void)
{
    int s, freed;
    pool_lock();
    for (s = 0; s < PK_NKEYS; s++) {
        struct pk_vbuf *h = pool[s].holder;
        uint32_t idle = 0;
        if (h && __atomic_compare_exchange_n(&h->usage, &idle, USAGE_EVICTING, 0,
                                             __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            evict(s);
    }
    freed = free_unheld();
    pool_unlock();
    return freed;
}

/* Free the pool keys that no buffer holds, and only those: a key whose
 * free pk_vbuf_detach saw refused (it still guarded some other tracked
 * memory, or a thread did not answer the revocation in time) goes as soon
 * as that is over, not when a later buffer happens to reuse it.  Returns
 * keys freed. */
int pk_vkeys_free_unheld(void)
{
    int freed;
    pool_lock();
    freed = free_unheld();
    pool_unlock();
    return freed;
}

void pk_vkeys_stats(struct pk_vkeys_stats *out)
{
    int s;
    pool_lock();
    out->limit = pool_limit;
    out->keys = pool_keys;
    out->held = 0;
    out->mask = 0;
    for (s = 0; s < PK_NKEYS; s++) {
        if (pool[s].holder)
            out->held++;
        if (pool[s].pkey > 0)
            out->mask |= 1u << pool[s].pkey;
    }
    out->assignments = assignments;
    out->evictions = evictions;
    pool_unlock();
}

/* ---- ending access in every thread ------------------------------------- */

int pk_vbuf_revoke(struct pk_vbuf *b, double timeout, struct pk_broadcast *result,
                   uint64_t pins)
{
    int pkey = 0, status = PK_OK;
    uint32_t identity = 0;
    if (result)
        memset(result, 0, sizeof *result);
    /* Under the pool mutex the buffer's key cannot be evicted and reused
     * for another buffer meanwhile. */
    pool_lock();
    if (key_of(b, &pkey, &identity))
        status = pk_key_set_all(pkey, identity, (int)PK_AD, timeout, result, pins);
    pool_unlock();
    return status;
}

int pk_vbuf_end_elsewhere(struct pk_vbuf *b, double timeout, struct pk_broadcast *result)
{
    int status;
    if (pk_grants_per_process())
        return PK_E_UNSUPPORTED; /* the software backend ends such grants in pk_scope_exit */
    if (!pk_vbuf_users(b))
        return PK_E_UNBALANCED;
    status = pk_vbuf_revoke(b, timeout, result, 0);
    if (status == PK_OK)
        release(b);
    return status;
}
