/*
 * Which threads may ever have had each key open: so that a revocation
 * need not stall on a thread that provably never had the key.
 *
 * A revocation normally needs an answer from every thread (revoke.c), and
 * a thread that blocks the revocation signal for good, such as the
 * watchdog of faulthandler.dump_traceback_later(), makes every revocation
 * fail.  But a thread whose register has denied the key all along has
 * nothing to revoke.  A thread is exempt from a revocation to
 * DISABLE_ACCESS of key k when it has not published k (below), and either:
 *
 *  A. it was born before k was allocated.  A new thread copies its
 *     creator's register, and before the allocation every thread denied
 *     k: the process starts with the kernel's init value, which denies
 *     keys 1-15, and pkeys frees a key only once every thread denies it
 *     (hw_free_key);
 *  B. its birth record (pk_exposure_birth_record, which pkeys' wrapper
 *     of threading.Thread makes before the thread runs anything) saw its
 *     register deny k.
 *
 * Every way a thread's register comes to allow a key is then one of:
 *  - a write by pkeys in that thread (a scope, pkey_set, wrpkru, a birth
 *    settle, an allocation by that thread): each publishes the keys it may
 *    open (pk_exposure_note) before it reads any state it acts on;
 *  - a change for every thread that gives access (pkey_set(...,
 *    threads="all") with rights that allow reading): it marks the key, and
 *    no thread is exempt for it until the key is allocated again;
 *  - code outside pkeys writing PKRU or allocating and freeing keys:
 *    pkeys' raw layers (pkeys.sys, pkeys.glibc, pkeys.pkru.write) turn
 *    exemption off for the rest of the process (pk_exposure_untracked),
 *    and the package already assumes that no other code does;
 *  - a register that allowed a key before pkeys was loaded: checked in the
 *    loading thread (pk_exposure_init).
 *
 * A publication racing with a revocation: the broadcaster opens the gate
 * (an odd count, with the change it makes) after stamping the revocation
 * and before it reads any record, and closes it when every thread has
 * answered; a publisher adds its keys, then looks at the gate and, if it
 * is open, applies that change to its own register, as the handler would
 * have (pk_revocations_apply_here).  So either the broadcaster sees the
 * publication and signals the thread, or the thread applies the change
 * itself before it reads any state it acts on.  It never waits: it may
 * hold the GIL.
 *
 * A thread's birth time comes from /proc/self/task/TID/stat, in clock
 * ticks (10 ms): a thread counts as born before an allocation only if it
 * started in an earlier tick than the one the allocation began in.  A
 * thread with a birth record is judged by the record alone.  A birth
 * record's claim ends as its thread exits (a pthread key's destructor), so
 * a thread that reuses the id, even in the same tick, never inherits it.
 *
 * Found by an adversary, and why they hold now: a pkey_set racing with
 * the free of its key left the number open in its thread, and a thread it
 * started then looked born before the next key of that number
 * (hw_free_key retires the identity first, hw_set checks it again after
 * writing, and a birth record overrides the birth time); the gate's keys
 * and rights read from two broadcasts (one word now); a dead thread's
 * birth record taken for a thread given its id on purpose (the destructor);
 * the table filled by 4096 thread births between broadcasts (a full table
 * frees the records of threads that are gone first).
 *
 * Unsafe assumptions, written down:
 *  - No code outside pkeys writes PKRU, or frees a key pkeys allocated
 *    (as everywhere in the package).
 *  - The thread's TLS destructors run when it exits (every pthread and
 *    Python thread; not a thread that ends with a raw exit system call,
 *    whose id would then have to be reused within its birth tick).
 */
#include "pkeys_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RECORDS 4096

/* One thread's record.  Written by its thread (atomics), read by the
 * broadcaster under the state mutex; freed when its thread exits (the
 * pthread key's destructor) or is found gone (sweep). */
struct exposure_record {
    pid_t tid;                 /* 0: free; SWEEPING: being freed */
    uint32_t opened;           /* bit k: the thread may have opened key k since */
    uint32_t denied_at_birth;  /* bit k: its register denied k when the record began */
    uint64_t began_ns;         /* CLOCK_BOOTTIME when the record began (birth records) */
};
#define SWEEPING ((pid_t)-1)
static struct exposure_record records[RECORDS];
static int records_used; /* high-water mark of claimed slots */
/* Its destructor runs as a thread that claimed a record exits. */
static pthread_key_t record_owner;
static pthread_once_t record_owner_once = PTHREAD_ONCE_INIT;

/* Keys this thread has published, and its record. */
PK_TLS uint32_t pk_exposure_published;
static PK_TLS struct exposure_record *my_record;

/* Set for good when exemption can no longer be proved: a raw-layer write,
 * a register that allowed keys before pkeys, a full record table. */
static int untracked;
/* Per key: when its allocation began (CLOCK_BOOTTIME ns) and whether a
 * change for every thread has given access since. */
static uint64_t allocated_ns[PK_NKEYS];
static int opened_for_all[PK_NKEYS];

/* While a broadcast that may exempt threads decides and waits, the change
 * it makes, as one word that cannot be read torn (keys << 32 | rights in
 * PKRU's layout); 0 otherwise.  And whether the broadcast is this thread's. */
static uint64_t gate;
static PK_TLS int broadcasting_here;

static uint64_t boottime_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_BOOTTIME, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* Free a record whose thread was `tid`: marked first, so that a thread
 * claiming the slot meanwhile (only from 0) cannot have its fields wiped,
 * and two sweeps cannot both free it. */
static void free_record(struct exposure_record *record, pid_t tid)
{
    if (!__atomic_compare_exchange_n(&record->tid, &tid, SWEEPING, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_RELAXED))
        return;
    __atomic_store_n(&record->opened, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&record->denied_at_birth, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&record->began_ns, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&record->tid, 0, __ATOMIC_SEQ_CST);
}

/*
 * As its thread exits (after its last Python code): the birth record's
 * claim goes at once, so a thread that gets the same id (which a
 * privileged process can choose: ns_last_pid, clone3's set_tid) is never
 * taken for this one.  A record of keys it opened stays until a sweep finds
 * the id gone: errs only towards signalling a thread that reuses the id.
 */
static void record_owner_exits(void *value)
{
    struct exposure_record *record = value;
    pid_t tid = __atomic_load_n(&record->tid, __ATOMIC_SEQ_CST);
    __atomic_store_n(&record->denied_at_birth, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&record->began_ns, 0, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&record->opened, __ATOMIC_SEQ_CST))
        free_record(record, tid);
}

static void make_record_owner(void)
{
    if (pthread_key_create(&record_owner, record_owner_exits) != 0)
        pk_exposure_untracked(); /* no way to see threads exit: prove nothing */
}

static struct exposure_record *claim_free_slot(pid_t me)
{
    int i;
    for (i = 0; i < RECORDS; i++) {
        pid_t free_slot = 0;
        if (__atomic_compare_exchange_n(&records[i].tid, &free_slot, me, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED)) {
            int used = __atomic_load_n(&records_used, __ATOMIC_RELAXED);
            while (used < i + 1 && !__atomic_compare_exchange_n(&records_used, &used, i + 1, 0,
                                                                __ATOMIC_SEQ_CST,
                                                                __ATOMIC_RELAXED))
                ;
            return &records[i];
        }
    }
    return NULL;
}

/* This thread's record, claimed on first use; NULL if the table is full
 * even after freeing the records of threads that are gone. */
static struct exposure_record *claim_record(void)
{
    struct exposure_record *record;
    pid_t me;
    if (my_record)
        return my_record;
    pthread_once(&record_owner_once, make_record_owner);
    me = pk_current_tid();
    if (!(record = claim_free_slot(me))) {
        pk_exposure_sweep(getpid());
        record = claim_free_slot(me);
    }
    if (record)
        pthread_setspecific(record_owner, record);
    my_record = record;
    return record;
}

void pk_exposure_publish(uint32_t keys)
{
    struct exposure_record *record = claim_record();
    keys &= (1u << PK_NKEYS) - 2u;
    if (!record)
        __atomic_store_n(&untracked, 1, __ATOMIC_SEQ_CST);
    else
        __atomic_or_fetch(&record->opened, keys, __ATOMIC_SEQ_CST);
    pk_exposure_published |= keys;
    /* The other half of the gate: see the header comment. */
    if (!broadcasting_here) {
        uint64_t change = __atomic_load_n(&gate, __ATOMIC_SEQ_CST);
        if (change)
            pk_revocations_apply_here((uint32_t)(change >> 32), (uint32_t)change);
    }
}

void pk_exposure_birth_record(void)
{
    struct exposure_record *record;
    uint32_t pkru, denied = 0;
    int k;
    /* Its settle may have claimed the record already (and published). */
    if (!pk_ospke_enabled || !(record = claim_record()) ||
        __atomic_load_n(&record->began_ns, __ATOMIC_SEQ_CST))
        return;
    pkru = pk_rdpkru_unchecked();
    for (k = 1; k < PK_NKEYS; k++)
        if (((pkru >> PK_KEY_SHIFT(k)) & PK_AD) && !((pk_exposure_published >> k) & 1u))
            denied |= 1u << k;
    __atomic_store_n(&record->began_ns, boottime_ns(), __ATOMIC_SEQ_CST);
    __atomic_store_n(&record->denied_at_birth, denied, __ATOMIC_SEQ_CST);
}

void pk_exposure_untracked(void) { __atomic_store_n(&untracked, 1, __ATOMIC_SEQ_CST); }

void pk_exposure_init(void)
{
    int k;
    uint32_t pkru;
    if (!pk_ospke_enabled)
        return;
    pkru = pk_rdpkru_unchecked();
    for (k = 1; k < PK_NKEYS; k++)
        if (!((pkru >> PK_KEY_SHIFT(k)) & PK_AD))
            pk_exposure_untracked();
}

uint64_t pk_exposure_clock(void) { return boottime_ns(); }

void pk_exposure_allocated(int pkey, uint64_t began_ns)
{
    __atomic_store_n(&opened_for_all[pkey], 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&allocated_ns[pkey], began_ns, __ATOMIC_SEQ_CST);
}

void pk_exposure_opened_for_all(int pkey)
{
    __atomic_store_n(&opened_for_all[pkey], 1, __ATOMIC_SEQ_CST);
}

void pk_exposure_forked_child(void)
{
    /* The record belongs to the parent's thread id. */
    if (my_record)
        pthread_setspecific(record_owner, NULL);
    my_record = NULL;
    pk_exposure_published = 0;
    broadcasting_here = 0;
    __atomic_store_n(&gate, 0, __ATOMIC_SEQ_CST);
}

/* ---- the broadcaster's side (state mutex held) -------------------------- */

static uint64_t tick_ns;

/* When `tid` started, in clock ticks since boot; 0 if unknown. */
static uint64_t start_tick(pid_t tid)
{
    char path[64], text[1024];
    const char *after_name;
    int field;
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
    if (pk_read_text_file(path, text, sizeof text) < 0)
        return 0;
    /* The name may hold spaces and parentheses: count from the last ')'. */
    after_name = strrchr(text, ')');
    if (!after_name)
        return 0;
    /* Field 22, starttime; after ')' comes field 3. */
    for (field = 2; field < 22 && after_name; field++)
        after_name = strchr(after_name + 1, ' ');
    return after_name ? strtoull(after_name + 1, NULL, 10) : 0;
}

uint32_t pk_exposure_exemptable(uint32_t keys, uint32_t bits)
{
    int k;
    if (__atomic_load_n(&untracked, __ATOMIC_SEQ_CST))
        return 0;
    if (!tick_ns) {
        long ticks_per_second = sysconf(_SC_CLK_TCK);
        if (ticks_per_second <= 0)
            return 0;
        tick_ns = 1000000000u / (uint64_t)ticks_per_second;
    }
    for (k = 1; k < PK_NKEYS; k++)
        if ((keys >> k) & 1u) {
            if (!((bits >> PK_KEY_SHIFT(k)) & PK_AD) ||
                __atomic_load_n(&opened_for_all[k], __ATOMIC_SEQ_CST))
                return 0;
        }
    return keys;
}

void pk_exposure_gate_open(uint32_t keys, uint32_t bits)
{
    broadcasting_here = 1;
    __atomic_store_n(&gate, (uint64_t)keys << 32 | bits, __ATOMIC_SEQ_CST);
}

void pk_exposure_gate_close(void)
{
    __atomic_store_n(&gate, 0, __ATOMIC_SEQ_CST);
    broadcasting_here = 0;
}

int pk_exposure_thread_denies(pid_t tid, uint32_t keys)
{
    uint32_t opened = 0, born_denying = 0;
    int has_birth_record = 0;
    uint64_t started;
    int used, i, k;
    /* Again here, after the gate opened: a publisher that found the table
     * full said so before it looked at the gate. */
    if (__atomic_load_n(&untracked, __ATOMIC_SEQ_CST))
        return 0;
    used = __atomic_load_n(&records_used, __ATOMIC_SEQ_CST);
    /* Read the records first: a publication after this read sees the gate. */
    for (i = 0; i < used; i++)
        if (__atomic_load_n(&records[i].tid, __ATOMIC_SEQ_CST) == tid)
            opened |= __atomic_load_n(&records[i].opened, __ATOMIC_SEQ_CST);
    if (opened & keys)
        return 0;
    started = start_tick(tid);
    if (!started)
        return 0;
    for (i = 0; i < used; i++) {
        /* A birth record counts if its thread started before it began: a
         * record of an earlier thread with the same id began before this
         * thread started. */
        uint64_t began = __atomic_load_n(&records[i].began_ns, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&records[i].tid, __ATOMIC_SEQ_CST) == tid && began &&
            started <= began / tick_ns) {
            born_denying |= __atomic_load_n(&records[i].denied_at_birth, __ATOMIC_SEQ_CST);
            has_birth_record = 1;
        }
    }
    /* A thread with a birth record is judged by what its register held
     * (rule B) and never by its birth time (rule A): the record is the
     * register itself, where rule A infers it. */
    if (has_birth_record)
        return (born_denying & keys) == keys;
    for (k = 1; k < PK_NKEYS; k++) {
        uint64_t allocated = __atomic_load_n(&allocated_ns[k], __ATOMIC_SEQ_CST);
        if (((keys >> k) & 1u) && !(allocated && started < allocated / tick_ns))
            return 0;
    }
    return 1;
}

/* Records of threads that are gone: free again (the broadcaster, and a
 * claim that found the table full). */
void pk_exposure_sweep(pid_t pid)
{
    int used = __atomic_load_n(&records_used, __ATOMIC_SEQ_CST), i;
    for (i = 0; i < used; i++) {
        pid_t tid = __atomic_load_n(&records[i].tid, __ATOMIC_SEQ_CST);
        if (tid > 0 && syscall(SYS_tgkill, pid, tid, 0) != 0 && errno == ESRCH)
            free_record(&records[i], tid);
    }
}
