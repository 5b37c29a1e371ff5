/*
 * Rights for every thread at once, on a stock kernel.
 *
 * PKRU belongs to each thread, and neither the kernel nor glibc can change
 * another thread's.  libmpk added a pkey_sync() to a patched kernel for
 * this; here it is done in userspace, with the sequence counter the 2016
 * debate proposed:
 *
 *  1. state.c stamps the keys with a new revocation epoch and the rights
 *     every thread must now have (pk_revoked_at, pk_revoked_bits), under
 *     the state mutex, which also keeps two revocations from overlapping.
 *  2. pk_broadcast() sends a dedicated real-time signal to every other
 *     thread of the process (tgkill over /proc/self/task).
 *  3. The handler, in each thread, takes the rights waiting for it in its
 *     slot of the pending table (every revocation it was signalled for and
 *     has not applied, merged), edits the PKRU saved in the interrupted
 *     context's XSAVE area, so that sigreturn installs it, and acknowledges.
 *  4. The broadcaster waits for every acknowledgement (with a timeout),
 *     scans /proc/self/task again for threads created meanwhile, and
 *     signals those too.  state.c then applies the change to its own
 *     thread.
 *
 * Races, and why they are covered:
 *  - A thread writing PKRU from a value it read before the handler ran
 *    would undo the edit: the handler counts itself and records what it
 *    applied in the thread's (initial-exec) TLS, and every write in
 *    state.c, and probe's restore, checks the count around its
 *    read-modify-write and applies that record again if it moved.
 *  - A thread created during the broadcast copies its creator's register.
 *    Either the creator had already applied the change, or the new thread
 *    existed before the creator acknowledged, and so before the final scan.
 *  - A scope entered before the revocation re-grants nothing when it ends:
 *    its token's epoch is older than the key's stamp (state.c).
 *  - A handler that runs late (its thread had the signal blocked) applies
 *    what is waiting in its slot: the revocations it was signalled for,
 *    never one that predates it (a thread created after a revocation
 *    copied a register that already has it, and may have changed it since).
 *  - A thread that exits before answering is found gone (tgkill with
 *    signal 0 gives ESRCH) and counts as answered.
 *
 * The handler is async-signal-safe: it touches only static tables,
 * initial-exec TLS, atomics, the signal frame and gettid(2); errno is
 * preserved.
 *
 * Unsafe assumptions, written down:
 *  - The signal frame's FP state is in XSAVE format (checked: the fxsave
 *    area's software-reserved bytes carry FP_XSTATE_MAGIC1 and list PKRU)
 *    at the offset CPUID leaf 0xD sub-leaf 9 reports (the non-compacted
 *    layout the kernel uses for signal frames).
 *  - Setting PKRU's bit in the XSAVE header's xstate_bv makes sigreturn
 *    load the edited value rather than the init value.
 */
#include "pkeys_internal.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#if PK_X86
#include <cpuid.h>
#endif

#define MAX_TARGETS 4096
/* One broadcast at a time (the state mutex): thread ids signalled, and for
 * each, 0 while waiting, 1 when applied, 2 when its frame was not usable. */
static pid_t target_tid[MAX_TARGETS];
static int target_answer[MAX_TARGETS];
static int target_count;

/* What each thread still has to apply, by thread id: bits 32+k say key k
 * is waiting, with its rights in bits 2k..2k+1 (PKRU's layout).  Merged by
 * the broadcaster, taken whole by the handler with one exchange.  A slot
 * outlives a broadcast that its thread did not answer. */
struct pending_slot {
    pid_t tid;
    uint64_t waiting;
};
static struct pending_slot pending[MAX_TARGETS];

static int revocation_signal;
static int handler_installed;
#if PK_X86
static int xsave_pkru_offset = -1;
#endif

#ifndef FP_XSTATE_MAGIC1
#define FP_XSTATE_MAGIC1 0x46505853u
#endif
#define XFEATURE_PKRU 9
#define FXSAVE_SW_BYTES 464
#define XSAVE_HEADER 512

static pid_t current_tid(void) { return (pid_t)syscall(SYS_gettid); }

#define PK_TLS __thread __attribute__((tls_model("initial-exec")))

/* Per thread, written by the handler: how many times it ran, and what it
 * applied since the thread's last pk_revocations_mark(). */
static PK_TLS volatile uint32_t handled_count;
static PK_TLS volatile uint64_t handled_since_mark;

static uint64_t merge_waiting(uint64_t older, uint64_t newer)
{
    uint64_t keys = newer >> 32, mask = 0;
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if ((keys >> k) & 1)
            mask |= (1ull << (32 + k)) | PK_KEY_MASK(k);
    return (older & ~mask) | newer;
}

uint32_t pk_revocations_mark(void)
{
    handled_since_mark = 0;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    return handled_count;
}

int pk_revocations_moved(uint32_t mark)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    return handled_count != mark;
}

static uint32_t apply_waiting(uint32_t pkru, uint64_t waiting)
{
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if ((waiting >> (32 + k)) & 1)
            pkru = (pkru & ~PK_KEY_MASK(k)) | ((uint32_t)waiting & PK_KEY_MASK(k));
    return pkru;
}

uint32_t pk_revocations_catch_up(uint32_t pkru) { return apply_waiting(pkru, handled_since_mark); }

static struct pending_slot *slot_of(pid_t tid)
{
    int i;
    for (i = 0; i < MAX_TARGETS; i++)
        if (__atomic_load_n(&pending[i].tid, __ATOMIC_ACQUIRE) == tid)
            return &pending[i];
    return NULL;
}

/* The PKRU slot of the interrupted context, or NULL if the frame is not an
 * XSAVE frame that includes PKRU.  In the simulated-register build it is
 * the thread's variable itself: the handler runs in the thread it edits,
 * and sigreturn leaves that variable alone. */
static uint32_t *saved_pkru(void *ucontext)
{
#if PK_SIMULATED_PKU
    (void)ucontext;
    return (uint32_t *)&pk_simulated_pkru;
#elif PK_X86 && defined(__x86_64__)
    ucontext_t *uc = ucontext;
    unsigned char *fpstate;
    uint32_t magic, xstate_size;
    uint64_t xfeatures, xstate_bv;
    if (xsave_pkru_offset <= 0 || !uc || !uc->uc_mcontext.fpregs)
        return NULL;
    fpstate = (unsigned char *)uc->uc_mcontext.fpregs;
    memcpy(&magic, fpstate + FXSAVE_SW_BYTES, sizeof magic);
    memcpy(&xfeatures, fpstate + FXSAVE_SW_BYTES + 8, sizeof xfeatures);
    memcpy(&xstate_size, fpstate + FXSAVE_SW_BYTES + 16, sizeof xstate_size);
    if (magic != FP_XSTATE_MAGIC1 || !(xfeatures & (1ull << XFEATURE_PKRU)) ||
        (uint32_t)xsave_pkru_offset + 4 > xstate_size)
        return NULL;
    /* sigreturn loads PKRU from the frame only if the header says it is
     * there; otherwise it would install the init value. */
    memcpy(&xstate_bv, fpstate + XSAVE_HEADER, sizeof xstate_bv);
    xstate_bv |= 1ull << XFEATURE_PKRU;
    memcpy(fpstate + XSAVE_HEADER, &xstate_bv, sizeof xstate_bv);
    return (uint32_t *)(fpstate + xsave_pkru_offset);
#else
    (void)ucontext;
    return NULL;
#endif
}

static void answer(int value)
{
    pid_t me = current_tid();
    int i, count = __atomic_load_n(&target_count, __ATOMIC_ACQUIRE);
    for (i = 0; i < count; i++) {
        if (__atomic_load_n(&target_tid[i], __ATOMIC_ACQUIRE) == me) {
            __atomic_store_n(&target_answer[i], value, __ATOMIC_RELEASE);
            return;
        }
    }
}

static void revocation_handler(int signo, siginfo_t *info, void *ucontext)
{
    int saved_errno = errno;
    struct pending_slot *mine = slot_of(current_tid());
    uint32_t *slot = saved_pkru(ucontext);
    uint64_t waiting;
    uint32_t value;
    (void)signo, (void)info;
    if (!mine) {
        errno = saved_errno;
        return; /* a late signal with nothing left to apply */
    }
    if (!slot) {
        answer(2);
        errno = saved_errno;
        return;
    }
    waiting = __atomic_exchange_n(&mine->waiting, 0, __ATOMIC_ACQ_REL);
    memcpy(&value, slot, sizeof value);
    value = apply_waiting(value, waiting);
    memcpy(slot, &value, sizeof value);
    /* For a register write this signal interrupted: see hw_write_settled. */
    handled_since_mark = merge_waiting(handled_since_mark, waiting);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    handled_count = handled_count + 1;
    answer(1);
    errno = saved_errno;
}

__attribute__((constructor)) static void pk_find_xsave_pkru(void)
{
#if PK_X86
    unsigned int eax, ebx, ecx, edx;
    if (!pk_ospke_enabled || PK_SIMULATED_PKU || __get_cpuid_max(0, NULL) < 0xd)
        return;
    __cpuid_count(0xd, XFEATURE_PKRU, eax, ebx, ecx, edx);
    (void)ecx, (void)edx;
    if (eax >= 4)
        xsave_pkru_offset = (int)ebx;
#endif
}

int pk_revocation_signal(void)
{
    if (!revocation_signal) {
        /* PKEYS_REVOKE_SIGNAL=N picks another one (N as SIGRTMIN+N). */
        const char *chosen = getenv("PKEYS_REVOKE_SIGNAL");
        int offset = chosen ? atoi(chosen) : SIGRTMAX - SIGRTMIN - 3;
        if (offset < 0 || SIGRTMIN + offset > SIGRTMAX)
            offset = SIGRTMAX - SIGRTMIN - 3;
        revocation_signal = SIGRTMIN + offset;
    }
    return revocation_signal;
}

static int install_handler(void)
{
    struct sigaction action, current;
    int signo = pk_revocation_signal();
    if (handler_installed)
        return 0;
    if (sigaction(signo, NULL, &current) != 0)
        return -1;
    if (!(current.sa_flags & SA_SIGINFO) && current.sa_handler != SIG_DFL &&
        current.sa_handler != SIG_IGN) {
        errno = EBUSY; /* someone else's signal: never take it over */
        return -1;
    }
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction != revocation_handler) {
        errno = EBUSY;
        return -1;
    }
    memset(&action, 0, sizeof action);
    action.sa_sigaction = revocation_handler;
    /* SA_RESTART: a read(2) or futex wait interrupted in another thread goes on. */
    action.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(signo, &action, NULL) != 0)
        return -1;
    handler_installed = 1;
    return 0;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int is_target(pid_t tid)
{
    int i;
    for (i = 0; i < target_count; i++)
        if (target_tid[i] == tid)
            return 1;
    return 0;
}

/* Signal every thread not signalled yet; returns how many were new, or -1. */
/* Forget the slots of threads that are gone, so that a new thread that
 * gets a recycled id inherits nothing. */
static void clear_gone(pid_t pid)
{
    int i;
    for (i = 0; i < MAX_TARGETS; i++) {
        pid_t tid = pending[i].tid;
        if (tid && syscall(SYS_tgkill, pid, tid, 0) != 0 && errno == ESRCH) {
            __atomic_store_n(&pending[i].waiting, 0, __ATOMIC_RELEASE);
            __atomic_store_n(&pending[i].tid, 0, __ATOMIC_RELEASE);
        }
    }
}

/* Add `keys` with their rights from `pkru_bits` to what `tid` must apply. */
static int add_waiting(pid_t tid, uint32_t keys, uint32_t pkru_bits)
{
    struct pending_slot *slot = slot_of(tid);
    uint64_t seen, wanted, mask = 0;
    int k;
    if (!slot) {
        slot = slot_of(0);
        if (!slot)
            return -1;
        __atomic_store_n(&slot->waiting, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&slot->tid, tid, __ATOMIC_RELEASE);
    }
    for (k = 1; k < PK_NKEYS; k++)
        if (keys & (1u << k))
            mask |= (1ull << (32 + k)) | PK_KEY_MASK(k);
    seen = __atomic_load_n(&slot->waiting, __ATOMIC_ACQUIRE);
    do {
        wanted = (seen & ~mask) | (mask & ~(uint64_t)0xffffffffu) | (pkru_bits & (uint32_t)mask);
    } while (!__atomic_compare_exchange_n(&slot->waiting, &seen, wanted, 1, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    return 0;
}

static int signal_new_threads(pid_t self, pid_t pid, int signo, uint32_t keys, uint32_t bits)
{
    DIR *tasks = opendir("/proc/self/task");
    struct dirent *entry;
    int added = 0;
    if (!tasks)
        return -1;
    while ((entry = readdir(tasks)) != NULL) {
        pid_t tid = (pid_t)atoi(entry->d_name);
        if (tid <= 0 || tid == self || is_target(tid))
            continue;
        if (target_count == MAX_TARGETS || add_waiting(tid, keys, bits) != 0)
            break;
        __atomic_store_n(&target_answer[target_count], 0, __ATOMIC_RELEASE);
        __atomic_store_n(&target_tid[target_count], tid, __ATOMIC_RELEASE);
        __atomic_store_n(&target_count, target_count + 1, __ATOMIC_RELEASE);
        if (syscall(SYS_tgkill, pid, tid, signo) != 0) {
            /* Exited since the listing: nothing left to change there. */
            __atomic_store_n(&target_answer[target_count - 1], 1, __ATOMIC_RELEASE);
            continue;
        }
        added++;
    }
    closedir(tasks);
    return added;
}

/* Every target answered, or is gone (it exited before it could). */
static int all_answered(pid_t pid)
{
    int i, all = 1;
    for (i = 0; i < target_count; i++) {
        if (__atomic_load_n(&target_answer[i], __ATOMIC_ACQUIRE))
            continue;
        if (syscall(SYS_tgkill, pid, target_tid[i], 0) != 0 && errno == ESRCH)
            __atomic_store_n(&target_answer[i], 3, __ATOMIC_RELEASE);
        else
            all = 0;
    }
    return all;
}

int pk_broadcast(uint32_t keys, uint32_t bits, double timeout, struct pk_broadcast *result)
{
    pid_t self = current_tid(), pid = getpid();
    int signo = pk_revocation_signal(), added, i, status = PK_OK;
    double started = now_seconds(), deadline = started + (timeout > 0 ? timeout : 0);

    if (result)
        memset(result, 0, sizeof *result);
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    if (install_handler() != 0)
        return PK_E_ERRNO;
    __atomic_store_n(&target_count, 0, __ATOMIC_RELEASE);
    clear_gone(pid);
    do {
        added = signal_new_threads(self, pid, signo, keys, bits);
        if (added < 0)
            return PK_E_ERRNO;
        while (!all_answered(pid) && now_seconds() < deadline) {
            struct timespec pause = {0, 20000};
            nanosleep(&pause, NULL);
        }
        /* Threads created meanwhile: their creators may have copied the
         * old register into them before answering. */
    } while (added > 0 && all_answered(pid));

    if (result) {
        int listed = 0;
        result->threads = target_count;
        for (i = 0; i < target_count; i++) {
            int value = __atomic_load_n(&target_answer[i], __ATOMIC_ACQUIRE);
            if (value == 1 || value == 3)
                result->answered++;
            else if (value == 2)
                result->refused++;
            else
                result->unanswered++;
        }
        for (i = 0; i < target_count && listed < PK_BROADCAST_LISTED; i++)
            if (!__atomic_load_n(&target_answer[i], __ATOMIC_ACQUIRE))
                result->listed[listed++] = target_tid[i];
        for (i = 0; i < target_count && listed < PK_BROADCAST_LISTED; i++)
            if (__atomic_load_n(&target_answer[i], __ATOMIC_ACQUIRE) == 2)
                result->listed[listed++] = target_tid[i];
        result->seconds = now_seconds() - started;
        if (result->unanswered || result->refused)
            status = PK_E_BROADCAST;
    } else if (!all_answered(pid)) {
        status = PK_E_BROADCAST;
    }
    __atomic_store_n(&target_count, 0, __ATOMIC_RELEASE);
    return status;
}

/*
 * Whether editing the signal frame works on this kernel: send the signal
 * to this thread with a handler that flips one key's access-disable bit in
 * the saved PKRU, and see whether sigreturn installed it.  1: it works,
 * 0: it does not, negative: no PKU.
 */
static volatile int selftest_seen;

static void selftest_handler(int signo, siginfo_t *info, void *ucontext)
{
    uint32_t *slot = saved_pkru(ucontext);
    uint32_t value;
    (void)signo, (void)info;
    if (slot) {
        memcpy(&value, slot, sizeof value);
        value ^= 1u << PK_KEY_SHIFT(PK_NKEYS - 1);
        memcpy(slot, &value, sizeof value);
        selftest_seen = 1;
    }
}

int pk_revocation_selftest(void)
{
    struct sigaction action, previous;
    uint32_t before, after;
    int signo = SIGRTMAX - 1, works;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = selftest_handler;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (sigaction(signo, &action, &previous) != 0)
        return PK_E_ERRNO;
    selftest_seen = 0;
    before = pk_rdpkru_unchecked();
    syscall(SYS_tgkill, getpid(), current_tid(), signo);
    after = pk_rdpkru_unchecked();
    works = selftest_seen && after == (before ^ (1u << PK_KEY_SHIFT(PK_NKEYS - 1)));
    pk_wrpkru_unchecked(before);
    sigaction(signo, &previous, NULL);
    return works;
}
