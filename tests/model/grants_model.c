/*
 * TEST ONLY.  An explicit-state exhaustive exploration of the grants core
 * (csrc/grants.c) under revocations: 2 or 3 threads run scopes on one key
 * while a revoker revokes it, and every interleaving of their steps, and
 * of each revocation signal's handler with them, is explored.
 *
 * The grant algebra is the real one: this file includes grants.c, which
 * has no lock, register or mprotect, and calls its pk_grants_count(),
 * pk_grants_compose(), pk_grants_live(), pk_grants_balanced() and
 * pk_grants_close_freed() on each model thread's own `struct grants`.  What is
 * modelled here is what surrounds them on the hardware backend, step by
 * step as backend_hardware.c's scope_enter/scope_exit and revoke do it (each step
 * is one read or write of shared state: the register, the handler's count,
 * the stamps): the register of each thread, the handler (revoke.c: apply
 * what is waiting, merge into handled_since_mark, count), and the
 * revoker's stamp, signals and wait.
 *
 * A state is everything: globals, each thread's grants, register, handler
 * record, pending bits, program counter and the locals of the operation it
 * is in.  Visited states are kept (as 128-bit hashes) and not explored
 * twice.  Checked in every state where no revocation is in flight and at
 * least one has returned: a thread between operations with no scope open
 * has the key closed.  Checked at the end of every run: every thread has
 * it closed, no scope exit was refused.
 *
 * Usage: grants_model THREADS PROGRAM REVOCATIONS [MUTANT]
 *   PROGRAM: one letter per operation, E (enter) and X (exit), shared by
 *   every thread but the second, which runs it with nesting (EEXX...)
 *   when the program has at least two scopes.
 *   MUTANT "base-from-register": take a first grant's base from the
 *   register as the code before issue 15 did, to show the check finds it.
 * Prints "states N transitions M violations V" and the first violation.
 */
#include "../../csrc/grants.c"

#include <stdio.h>
#include <stdlib.h>

/* ---- the model ---------------------------------------------------------- */
#define KEY 1
#define MAX_THREADS 3
#define MAX_OPS 8
#define INIT_PKRU 0x55555554u

enum { ENTER_MARK, ENTER_READ, ENTER_COUNT, ENTER_TOKEN, ENTER_WRITE,
       EXIT_MARK, EXIT_READ, EXIT_COUNT, EXIT_WRITE,
       SETTLE_MOVED, SETTLE_READ, SETTLE_WRITE, OP_DONE };

struct thread {
    struct grants g;
    uint32_t reg;                 /* the thread's PKRU */
    uint32_t handled_count;       /* revoke.c's per-thread handler record */
    uint64_t handled_since_mark;
    uint64_t waiting;             /* the revoker's pending slot for it */
    uint8_t pc, step;             /* operation index, step within it */
    uint8_t depth;                /* scopes open */
    uint8_t refused;
    int64_t tokens[MAX_OPS];
    /* the current operation's locals */
    uint32_t mark, old, live, next, now;
    int64_t token;
};

struct state {
    uint32_t epoch, revoked_at, revoked_bits;
    uint8_t rev_pc, rev_signalled, revocations_done, in_flight;
    struct thread t[MAX_THREADS];
};

static int n_threads, n_revocations, mutant;
static char programs[MAX_THREADS][MAX_OPS + 1];
static const uint32_t identity = 7;
static uint64_t states, transitions, violations;
static struct state first_bad;

/* The globals that the real functions read, from and to the model state. */
static void load(const struct state *s)
{
    pk_revocation_epoch = s->epoch;
    pk_revoked_at[KEY] = s->revoked_at;
    pk_revoked_bits[KEY] = s->revoked_bits;
    pk_key_identities[KEY] = identity;
}

static uint32_t ids[PK_NKEYS] = {[KEY] = identity};
static uint32_t apply_bits(uint32_t pkru, uint64_t waiting)
{
    if ((waiting >> (32 + KEY)) & 1)
        pkru = (pkru & ~PK_KEY_MASK(KEY)) | ((uint32_t)waiting & PK_KEY_MASK(KEY));
    return pkru;
}

/* ---- visited set: 128-bit hashes, open addressing ----------------------- */
static uint64_t *table;
static size_t table_size = 1u << 24;

static void hash_state(const struct state *s, uint64_t out[2])
{
    uint64_t words[(sizeof *s + 7) / 8] = {0};
    uint64_t a = 1469598103934665603ull, b = 0x9e3779b97f4a7c15ull;
    size_t i;
    memcpy(words, s, sizeof *s);
    for (i = 0; i < sizeof words / sizeof words[0]; i++) {
        a = (a ^ words[i]) * 0x100000001b3ull;
        a ^= a >> 31;
        b = (b + words[i] + 1) * 0xff51afd7ed558ccdull;
        b ^= b >> 29;
    }
    out[0] = a | 1, out[1] = b;
}

static int visit(const struct state *s)
{
    uint64_t h[2];
    size_t i;
    hash_state(s, h);
    for (i = (size_t)(h[0] % table_size);; i = (i + 1) % table_size) {
        if (!table[2 * i]) {
            table[2 * i] = h[0], table[2 * i + 1] = h[1];
            states++;
            if (states * 2 > table_size) {
                fprintf(stderr, "state table full\n");
                exit(2);
            }
            return 1;
        }
        if (table[2 * i] == h[0] && table[2 * i + 1] == h[1])
            return 0;
    }
}

/* ---- the invariant ------------------------------------------------------ */
static int key_open(uint32_t pkru) { return !((pkru >> PK_KEY_SHIFT(KEY)) & PK_AD); }

static int violated(const struct state *s)
{
    int i;
    if (s->in_flight || !s->revocations_done)
        return 0;
    for (i = 0; i < n_threads; i++) {
        const struct thread *t = &s->t[i];
        if (t->step == 0 && t->depth == 0 && key_open(t->reg))
            return 1; /* between operations, outside every scope, key open */
    }
    return 0;
}

static int finished(const struct state *s)
{
    int i;
    if (s->rev_pc < 3 * n_revocations)
        return 0;
    for (i = 0; i < n_threads; i++)
        if (programs[i][s->t[i].pc])
            return 0;
    return 1;
}

static int end_violated(const struct state *s)
{
    int i;
    for (i = 0; i < n_threads; i++)
        if (key_open(s->t[i].reg) || s->t[i].refused || s->t[i].waiting)
            return 1;
    return 0;
}

/* ---- steps --------------------------------------------------------------- */

/* One step of thread i; returns 0 if it has nothing left to do. */
static int thread_step(struct state *s, int i)
{
    struct thread *t = &s->t[i];
    char op = programs[i][t->pc];
    if (!op)
        return 0;
    load(s);
    if (t->step == 0)
        t->step = op == 'E' ? ENTER_MARK : EXIT_MARK;
    switch (t->step) {
    case ENTER_MARK:
    case EXIT_MARK: /* pk_revocations_mark() */
        t->handled_since_mark = 0;
        t->mark = t->handled_count;
        t->step = op == 'E' ? ENTER_READ : EXIT_READ;
        break;
    case ENTER_READ:
        t->old = t->reg;
        t->step = ENTER_COUNT;
        break;
    case ENTER_COUNT: {
        int first = !pk_grants_active(&t->g, KEY) || t->g.epoch[KEY] != pk_revoked_at[KEY];
        pk_grants_count(&t->g, 1u << KEY, PK_GRANT_READ_WRITE, ids, +1, t->old);
        if (mutant && first)
            pk_grants_set_base(&t->g, KEY, pk_bits_of(t->old, KEY));
        t->step = ENTER_TOKEN;
        break;
    }
    case ENTER_TOKEN:
        t->token = ((int64_t)(i + 1) << 32) | pk_grants_counted_under(&t->g, 1u << KEY);
        t->step = ENTER_WRITE;
        break;
    case ENTER_WRITE:
        t->reg = pk_grants_compose(&t->g, 1u << KEY, t->old);
        t->step = SETTLE_MOVED;
        break;
    case EXIT_READ:
        t->old = t->reg;
        t->step = EXIT_COUNT;
        break;
    case EXIT_COUNT:
        /* as hw_scope_exit: one pass that finds the live keys and withdraws
         * their grants without adopting them again (a revocation stamped
         * since is the signal's to apply), or refuses */
        t->token = t->tokens[t->depth - 1];
        if (!pk_grants_exit(&t->g, 1u << KEY, PK_GRANT_READ_WRITE, ids, (uint32_t)t->token,
                            t->old, &t->live, &t->next)) {
            t->refused = 1;
            t->tokens[--t->depth] = 0;
            t->step = OP_DONE;
            break;
        }
        t->next = pk_grants_close_freed(&t->g, (1u << KEY) & ~t->live, PK_GRANT_READ_WRITE, ids,
                                        t->next);
        t->step = EXIT_WRITE;
        break;
    case EXIT_WRITE:
        t->reg = t->next;
        t->step = SETTLE_MOVED;
        break;
    case SETTLE_MOVED: /* hw_write_settled: pk_revocations_moved(mark) */
        t->step = t->handled_count != t->mark ? SETTLE_READ : OP_DONE;
        break;
    case SETTLE_READ:
        t->now = t->reg;
        t->step = SETTLE_WRITE;
        break;
    case SETTLE_WRITE:
        t->reg = apply_bits(t->now, t->handled_since_mark);
        t->step = OP_DONE;
        break;
    }
    if (t->step == OP_DONE) {
        if (op == 'E')
            t->tokens[t->depth++] = t->token;
        else if (!t->refused)
            t->tokens[--t->depth] = 0;
        t->pc++;
        t->step = 0;
        t->mark = t->old = t->live = t->next = t->now = 0;
        t->token = 0;
    }
    s->epoch = pk_revocation_epoch; /* pk_grants_count writes nothing global; kept for clarity */
    return 1;
}

/* The revoker: per revocation, stamp (as revoke_locked), signal each
 * thread (add_waiting), then wait until every handler has run. */
static int revoker_step(struct state *s)
{
    int r = s->rev_pc / 3, phase = s->rev_pc % 3, i;
    if (r >= n_revocations)
        return 0;
    if (phase == 0) {
        s->epoch++;
        s->revoked_bits = PK_AD;
        s->revoked_at = s->epoch;
        s->in_flight = 1;
        s->rev_signalled = 0;
        s->rev_pc++;
    } else if (phase == 1) {
        /* one thread per step, in order; the handler may run at once */
        struct thread *t = &s->t[s->rev_signalled];
        t->waiting |= (1ull << (32 + KEY)) | ((uint64_t)PK_AD << PK_KEY_SHIFT(KEY));
        if (++s->rev_signalled == n_threads)
            s->rev_pc++;
    } else {
        for (i = 0; i < n_threads; i++)
            if (s->t[i].waiting)
                return 0; /* not enabled: someone has not answered */
        s->in_flight = 0;
        s->revocations_done++;
        s->rev_pc++;
    }
    return 1;
}

/* The revocation handler in thread i, between two of its steps. */
static int handler_step(struct state *s, int i)
{
    struct thread *t = &s->t[i];
    uint64_t waiting = t->waiting;
    if (!waiting)
        return 0;
    t->waiting = 0;
    t->reg = apply_bits(t->reg, waiting);
    t->handled_since_mark |= waiting; /* one key: merging is or-ing */
    t->handled_count++;
    return 1;
}

static void explore(const struct state *s)
{
    int actor;
    if (!visit(s))
        return;
    if (violated(s) || (finished(s) && end_violated(s))) {
        if (!violations++)
            first_bad = *s;
        return;
    }
    for (actor = 0; actor < 2 * n_threads + 1; actor++) {
        struct state next = *s;
        int moved = actor < n_threads ? thread_step(&next, actor)
                  : actor < 2 * n_threads ? handler_step(&next, actor - n_threads)
                  : revoker_step(&next);
        if (moved) {
            transitions++;
            explore(&next);
        }
    }
}

int main(int argc, char **argv)
{
    struct state start;
    int i;
    if (argc < 4) {
        fprintf(stderr, "usage: %s THREADS PROGRAM REVOCATIONS [base-from-register]\n", argv[0]);
        return 2;
    }
    n_threads = atoi(argv[1]);
    n_revocations = atoi(argv[3]);
    mutant = argc > 4 && !strcmp(argv[4], "base-from-register");
    if (n_threads < 1 || n_threads > MAX_THREADS || strlen(argv[2]) > MAX_OPS)
        return 2;
    for (i = 0; i < n_threads; i++) {
        size_t n = strlen(argv[2]), j;
        strcpy(programs[i], argv[2]);
        if (i == 1 && n >= 4) /* nested: all the entries, then all the exits */
            for (j = 0; j < n; j++)
                programs[i][j] = j < n / 2 ? 'E' : 'X';
    }
    if (getenv("GRANTS_MODEL_TABLE_LOG2")) /* room for twice the states expected */
        table_size = (size_t)1 << atoi(getenv("GRANTS_MODEL_TABLE_LOG2"));
    table = calloc(2 * table_size, sizeof *table);
    if (!table)
        return 2;
    memset(&start, 0, sizeof start);
    for (i = 0; i < n_threads; i++)
        start.t[i].reg = INIT_PKRU; /* the key closed: allocated with access disabled */
    explore(&start);
    printf("states %llu transitions %llu violations %llu\n", (unsigned long long)states,
           (unsigned long long)transitions, (unsigned long long)violations);
    if (violations) {
        for (i = 0; i < n_threads; i++)
            printf("thread %d: pc %d step %d depth %d reg %#x base %u count %u epoch %u\n", i,
                   first_bad.t[i].pc, first_bad.t[i].step, first_bad.t[i].depth,
                   first_bad.t[i].reg, pk_grants_base(&first_bad.t[i].g, KEY),
                   first_bad.t[i].g.count[KEY][0], first_bad.t[i].g.epoch[KEY]);
        printf("revoker: pc %d done %d stamp %u\n", first_bad.rev_pc, first_bad.revocations_done,
               first_bad.revoked_at);
    }
    return violations ? 1 : 0;
}
