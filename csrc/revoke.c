/*
 * Rights for every thread at once, on a stock kernel.
 *
 * PKRU belongs to each thread, and neither the kernel nor glibc can change
 * another thread's.  libmpk added a pkey_sync() to a patched kernel for
 * this; here it is done in userspace, with the sequence counter the 2016
 * debate proposed:
 *
 *  1. The hardware backend stamps the keys with a new revocation epoch and
 *     the rights every thread must now have (grants.c's pk_revoked_at,
 *     pk_revoked_bits), under state.c's mutex, which also keeps two revocations from overlapping.
 *  2. pk_broadcast() checks that the signal's handler is still this file's
 *     (someone may have installed theirs over it), and before its first
 *     use on this kernel that a frame edit is what sigreturn installs
 *     (check_locked).  Then it sends a dedicated real-time signal to every
 *     other thread of the process (tgkill over /proc/self/task).
 *  3. The handler, in each thread, takes the rights waiting for it in its
 *     slot of the pending table (every revocation it was signalled for and
 *     has not applied, merged), edits the PKRU saved in the interrupted
 *     context's XSAVE area, so that sigreturn installs it, and acknowledges.
 *     If the interrupted context is itself a signal handler, it applies
 *     nothing and says so: the outer handler's sigreturn would restore the
 *     register that the outer frame saved (handled_signal_blocked, or for a
 *     handler that blocks no handled signal, outer_frame_signal).
 *     A thread that provably never had the keys is not signalled at all
 *     (exposure.c): a thread that blocks every signal, like
 *     faulthandler's watchdog, then stalls no revocation of a key it never
 *     had.
 *  4. The broadcaster waits for every acknowledgement (with a timeout),
 *     signalling again every millisecond the threads found in a handler,
 *     scans /proc/self/task again for threads created meanwhile, and
 *     signals those too.  The backend then applies the change to its own
 *     thread.  Any thread not reached by the deadline makes the call fail
 *     (PK_E_BROADCAST): it never reports a change that some thread lacks.
 *
 * Races, and why they are covered:
 *  - A thread writing PKRU from a value it read before the handler ran
 *    would undo the edit: the handler counts itself and records what it
 *    applied in the thread's (initial-exec) TLS, and every write in
 *    backend_hardware.c, and probe's restore, checks the count around its
 *    read-modify-write and applies that record again if it moved.
 *  - A thread created during the broadcast copies its creator's register.
 *    Either the creator had already applied the change, or the new thread
 *    existed before the creator acknowledged, and so before the final scan.
 *  - A scope entered before the revocation re-grants nothing when it ends:
 *    its token's epoch is older than the key's stamp (grants.c).
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
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#if PK_X86
#include <cpuid.h>
#endif

#define MAX_TARGETS 4096
/* What a signalled thread answered. */
enum answer {
    WAITING = 0,
    APPLIED = 1,
    REFUSED = 2,    /* its signal frame was not usable */
    GONE = 3,       /* it exited first */
    IN_HANDLER = 4, /* it was running another signal handler: not applied */
    EXEMPT = 5,     /* not signalled: it provably never had the keys (exposure.c) */
};
/* One broadcast at a time (the state mutex): thread ids signalled, their
 * answers, and for those found in a handler, a handled signal their
 * interrupted context blocks. */
static pid_t target_tid[MAX_TARGETS];
static int target_answer[MAX_TARGETS];
static int target_signal[MAX_TARGETS];
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

const double pk_revocation_timeout = 5.0;

static int revocation_signal;
static int handler_installed;
/* Whether the frame edit works here (pk_revocation_check): -1 not checked
 * yet, 1 it works, 0 it does not. */
static int mechanism_works = -1;
#if PK_X86
static int xsave_pkru_offset = -1;
#endif

#ifndef FP_XSTATE_MAGIC1
#define FP_XSTATE_MAGIC1 0x46505853u
#endif
#define XFEATURE_PKRU 9
#define FXSAVE_SW_BYTES 464
#define XSAVE_HEADER 512
/* Signals a kernel sigset holds (the first 64 bits of uc_sigmask). */
#define KERNEL_SIGNALS 64


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

/* What a slot says for `keys` given the rights in `pkru_bits`. */
static uint64_t waiting_of(uint32_t keys, uint32_t pkru_bits)
{
    uint64_t waiting = 0;
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if ((keys >> k) & 1u)
            waiting |= (1ull << (32 + k)) | (pkru_bits & PK_KEY_MASK(k));
    return waiting;
}

void pk_revocations_apply_here(uint32_t keys, uint32_t pkru_bits)
{
    uint32_t count;
    /* Recorded first, as the handler records it: a write of the caller's
     * that read the register before this sees the count move. */
    handled_since_mark = merge_waiting(handled_since_mark, waiting_of(keys, pkru_bits));
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    handled_count = handled_count + 1;
    do { /* a handler between the read and the write: apply its record too */
        count = handled_count;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        pk_wrpkru_unchecked(apply_waiting(pk_rdpkru_unchecked(), handled_since_mark));
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
    } while (handled_count != count);
}

static struct pending_slot *slot_of(pid_t tid)
{
    int i;
    for (i = 0; i < MAX_TARGETS; i++)
        if (__atomic_load_n(&pending[i].tid, __ATOMIC_ACQUIRE) == tid)
            return &pending[i];
    return NULL;
}

/* The PKRU slot of the interrupted context, or NULL if the frame is not an
 * XSAVE frame that includes PKRU.  The one lookup of that slot, for this
 * handler and guard.c's fault reports.  In the simulated-register build it
 * is the thread's variable itself: the handler runs in the thread it edits,
 * and sigreturn leaves that variable alone. */
uint32_t *pk_frame_pkru(void *ucontext)
{
#if PK_SIMULATED_PKU
    (void)ucontext;
    return (uint32_t *)&pk_simulated_pkru;
#elif PK_X86 && defined(__x86_64__)
    ucontext_t *uc = ucontext;
    unsigned char *fpstate;
    uint32_t magic, xstate_size;
    uint64_t xfeatures;
    if (xsave_pkru_offset <= 0 || !uc || !uc->uc_mcontext.fpregs)
        return NULL;
    fpstate = (unsigned char *)uc->uc_mcontext.fpregs;
    memcpy(&magic, fpstate + FXSAVE_SW_BYTES, sizeof magic);
    memcpy(&xfeatures, fpstate + FXSAVE_SW_BYTES + 8, sizeof xfeatures);
    memcpy(&xstate_size, fpstate + FXSAVE_SW_BYTES + 16, sizeof xstate_size);
    if (magic != FP_XSTATE_MAGIC1 || !(xfeatures & (1ull << XFEATURE_PKRU)) ||
        (uint32_t)xsave_pkru_offset + 4 > xstate_size)
        return NULL;
    return (uint32_t *)(fpstate + xsave_pkru_offset);
#else
    (void)ucontext;
    return NULL;
#endif
}

/* The slot, made to be the one sigreturn loads: it does only if the XSAVE
 * header says PKRU is there; otherwise it installs the init value. */
static uint32_t *editable_pkru(void *ucontext)
{
    uint32_t *slot = pk_frame_pkru(ucontext);
#if PK_X86 && defined(__x86_64__) && !PK_SIMULATED_PKU
    /* Not in the simulated build: its slot is a variable, and the real frame
     * may have no PKRU component (setting its xstate_bv bit there would make
     * sigreturn's XRSTOR fault). */
    if (slot) {
        unsigned char *fpstate = (unsigned char *)((ucontext_t *)ucontext)->uc_mcontext.fpregs;
        uint64_t xstate_bv;
        memcpy(&xstate_bv, fpstate + XSAVE_HEADER, sizeof xstate_bv);
        xstate_bv |= 1ull << XFEATURE_PKRU;
        memcpy(fpstate + XSAVE_HEADER, &xstate_bv, sizeof xstate_bv);
    }
#endif
    return slot;
}

/*
 * Whether the interrupted context may itself be a signal handler: it blocks
 * a signal that has a handler installed.  The kernel blocks a handler's own
 * signal (and its sa_mask) while it runs, and the sigreturn that ends it
 * restores the PKRU saved in *its* frame, not the one edited here; so an
 * edit of this frame would last only until then.  Returns that signal, or 0.
 *
 * Unsafe assumptions, written down:
 *  - An outer handler that leaves no signal with a handler blocked is not
 *    seen here: SA_NODEFER with an sa_mask of SIG_DFL/SIG_IGN signals only
 *    (faulthandler.register(..., chain=True) has an empty one), SA_RESETHAND
 *    (its signal is SIG_DFL again while it runs), or a handler whose signal
 *    is reset while it runs.  outer_frame_signal() looks for its frame.
 *  - A thread that blocks a handled signal on purpose (SIGINT, which Python
 *    handles, in a worker thread) is taken for one inside a handler: its
 *    revocation fails with RevocationError rather than succeeding.  That
 *    errs on the side that never reports a false success.
 */
#if PK_X86 && defined(__x86_64__) && !PK_SIMULATED_PKU
/*
 * The other way to see an outer handler: its signal frame, further up the
 * stack the interrupted context runs on.  The kernel starts each x86-64
 * signal frame (struct rt_sigframe) with the handler's return address,
 * the sa_restorer that glibc gives every handler it installs (__restore_rt),
 * followed by the kernel's struct ucontext and the siginfo.  A handler
 * that leaves no handled signal blocked (SA_NODEFER with an empty sa_mask,
 * as faulthandler.register(..., chain=True) installs, or SA_RESETHAND) is
 * found this way.
 *
 * Every delivery scans, whatever the interrupted register holds: a handler
 * may have opened a key itself.  A match counts only if the words after
 * it are a frame: known uc_flags, an FP state pointer just above it,
 * 64-byte aligned, whose bytes carry the XSAVE magic, and a saved stack
 * pointer above it.  The stack is read with process_vm_readv(2), which
 * fails instead of faulting at the end of the mapping and ignores PKRU,
 * into one of a few static buffers: this handler may run on a small
 * alternate stack, which a buffer of its own would overflow (a 4 KiB one
 * did).  A false match costs a retry (the broadcaster signals again) and
 * at worst a RevocationError, never a false success: a frame left above
 * the stack pointer by a handler that siglongjmp'd out, in a buffer not
 * written since, is such a match.  Cost: one read per FRAME_SCAN_CHUNK of
 * stack per thread and revocation (about 16 syscalls for a thread deep in
 * its stack).
 *
 * Unsafe assumptions, written down:
 *  - The outer frame lies within FRAME_SCAN_BYTES above the interrupted
 *    stack pointer (a handler blocked deeper than that is not seen).
 *  - The outer handler was installed through glibc (its restorer is ours);
 *    a runtime that installs handlers with its own restorer is not seen.
 *  - process_vm_readv on this process is allowed (a seccomp filter that
 *    refuses it turns the scan off, and only the mask check remains).
 */
#define FRAME_SCAN_BYTES (64 * 1024)
#define FRAME_SCAN_CHUNK 4096
#define SCAN_BUFFERS 8
#define KERNEL_UCONTEXT_SIZE 304 /* uc_flags, uc_link, uc_stack, sigcontext, 64-bit mask */
#define UC_FLAGS_KNOWN 0x7u      /* UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS */

static uintptr_t frame_restorer; /* set where the handler is installed */

/* The scans' buffers, each taken by one handler at a time (a thread's own
 * handler never nests: the signal is blocked while it runs). */
static uint64_t scan_buffer[SCAN_BUFFERS][FRAME_SCAN_CHUNK / 8];
static int scan_buffer_taken[SCAN_BUFFERS];

static int take_scan_buffer(void)
{
    for (;;) {
        int i;
        for (i = 0; i < SCAN_BUFFERS; i++)
            if (!__atomic_exchange_n(&scan_buffer_taken[i], 1, __ATOMIC_ACQUIRE))
                return i;
        sched_yield(); /* all taken by other threads' handlers: they finish */
    }
}

/* Bytes of this process at `address` copied into `into`, up to `size`,
 * without faulting; how many, or -1. */
static long read_own(uintptr_t address, void *into, size_t size)
{
    struct iovec local = {into, size}, remote = {(void *)address, size};
    return syscall(SYS_process_vm_readv, getpid(), &local, 1, &remote, 1, 0);
}

/* The signal of the frame whose return address is at `at`: its siginfo's,
 * which the kernel writes for SA_SIGINFO handlers only, or
 * PK_HANDLER_SIGNAL_UNKNOWN; 0 if no frame is there.  Out of line: its
 * buffer is on the stack only while a candidate is checked. */
__attribute__((noinline)) static int frame_at(uintptr_t at)
{
    unsigned char frame[8 + KERNEL_UCONTEXT_SIZE + sizeof(int)];
    uint64_t uc_flags, fpstate, saved_sp;
    uint32_t magic;
    int signo;
    if (read_own(at, frame, sizeof frame) != (long)sizeof frame)
        return 0;
    memcpy(&uc_flags, frame + 8 + offsetof(ucontext_t, uc_flags), sizeof uc_flags);
    memcpy(&fpstate, frame + 8 + offsetof(ucontext_t, uc_mcontext.fpregs), sizeof fpstate);
    memcpy(&saved_sp, frame + 8 + offsetof(ucontext_t, uc_mcontext.gregs[REG_RSP]),
           sizeof saved_sp);
    memcpy(&signo, frame + 8 + KERNEL_UCONTEXT_SIZE, sizeof signo); /* siginfo.si_signo */
    if ((uc_flags & ~(uint64_t)UC_FLAGS_KNOWN) || fpstate <= at || fpstate - at > 4096 ||
        fpstate % 64 || saved_sp <= at)
        return 0;
    if (read_own(fpstate + FXSAVE_SW_BYTES, &magic, sizeof magic) != (long)sizeof magic ||
        magic != FP_XSTATE_MAGIC1)
        return 0;
    return signo >= 1 && signo <= KERNEL_SIGNALS ? signo : PK_HANDLER_SIGNAL_UNKNOWN;
}

/* `words`: a static buffer of FRAME_SCAN_CHUNK bytes. */
static int scan_for_frame(uintptr_t at, uint64_t *words)
{
    uintptr_t end;
    for (end = at + FRAME_SCAN_BYTES; at < end;) {
        long got = read_own(at, words, FRAME_SCAN_CHUNK), i;
        if (got < 8)
            return 0; /* the end of the stack's mapping, or no process_vm_readv */
        for (i = 0; i < got / 8; i++) {
            int signo;
            if (words[i] == frame_restorer && (signo = frame_at(at + (uintptr_t)i * 8)) != 0)
                return signo;
        }
        at += (uintptr_t)got & ~(uintptr_t)7;
    }
    return 0;
}

/* noinline: the handler's own frame stays small for the deliveries that
 * return before this (our own check's). */
__attribute__((noinline)) static int outer_frame_signal(void *ucontext)
{
    const ucontext_t *uc = ucontext;
    int buffer, signo;
    if (!frame_restorer || !uc)
        return 0;
    buffer = take_scan_buffer();
    signo = scan_for_frame((uintptr_t)uc->uc_mcontext.gregs[REG_RSP] & ~(uintptr_t)7,
                           scan_buffer[buffer]);
    __atomic_store_n(&scan_buffer_taken[buffer], 0, __ATOMIC_RELEASE);
    return signo;
}

/* From our handler's sigaction as the kernel holds it (glibc fills in
 * sa_restorer when it installs a handler, and reports it back). */
static void learn_restorer(const struct sigaction *ours)
{
    frame_restorer = (uintptr_t)ours->sa_restorer;
}
#else
static int outer_frame_signal(void *ucontext)
{
    (void)ucontext;
    return 0;
}

static void learn_restorer(const struct sigaction *ours) { (void)ours; }
#endif

static int handled_signal_blocked(void *ucontext)
{
    const ucontext_t *uc = ucontext;
    uint64_t blocked;
    int signo;
    if (!uc)
        return 0;
    memcpy(&blocked, &uc->uc_sigmask, sizeof blocked);
    for (signo = 1; signo <= KERNEL_SIGNALS; signo++) {
        struct sigaction current;
        if (!((blocked >> (signo - 1)) & 1) || signo == revocation_signal ||
            signo == SIGKILL || signo == SIGSTOP)
            continue;
        /* glibc refuses its own internal signals here (EINVAL): skipped. */
        if (sigaction(signo, NULL, &current) != 0)
            continue;
        if ((current.sa_flags & SA_SIGINFO) ||
            (current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN))
            return signo;
    }
    return 0;
}

static void answer(int value, int signo)
{
    pid_t me = pk_current_tid();
    int i, count = __atomic_load_n(&target_count, __ATOMIC_ACQUIRE);
    for (i = 0; i < count; i++) {
        if (__atomic_load_n(&target_tid[i], __ATOMIC_ACQUIRE) == me) {
            __atomic_store_n(&target_signal[i], signo, __ATOMIC_RELEASE);
            __atomic_store_n(&target_answer[i], value, __ATOMIC_RELEASE);
            return;
        }
    }
}

/* Set in the thread running pk_revocation_check's own delivery, whose
 * context is no handler whatever its mask says. */
static PK_TLS volatile int checking_here;

static void revocation_handler(int signo, siginfo_t *info, void *ucontext)
{
    int saved_errno = errno, outer;
    struct pending_slot *mine = slot_of(pk_current_tid());
    uint32_t *slot;
    uint64_t waiting;
    uint32_t value;
    (void)signo, (void)info;
    if (!mine) {
        errno = saved_errno;
        return; /* a late signal with nothing left to apply */
    }
    if (!checking_here && ((outer = handled_signal_blocked(ucontext)) != 0 ||
                           (outer = outer_frame_signal(ucontext)) != 0)) {
        /* Leave what is waiting for a delivery outside that handler: the
         * broadcaster signals again until one comes, or gives up. */
        answer(IN_HANDLER, outer);
        errno = saved_errno;
        return;
    }
    slot = editable_pkru(ucontext);
    if (!slot) {
        answer(REFUSED, 0);
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
    answer(APPLIED, 0);
    errno = saved_errno;
}

__attribute__((constructor)) static void pk_find_xsave_pkru(void)
{
#if PK_X86
    unsigned int eax, ebx, ecx, edx;
    if (!pk_ospke_enabled || PK_SIMULATED_PKU || __get_cpuid_max(0, NULL) < 0xd)
        return;
    /* Leaf 0xD sub-leaf 9 describes XSAVE component 9, PKRU: EBX is its
     * offset in the standard (non-compacted) layout the signal frame uses. */
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

/* Whether the signal's handler is ours, for the broadcast about to use it.
 * Installs it the first time; never takes over someone else's handler, and
 * notices one installed over ours since (sending the signal then would run
 * their handler, or with SIG_DFL kill the process).  The check costs one
 * sigaction(2), next to a broadcast's tgkill per thread. */
static int own_the_signal(void)
{
    struct sigaction action, current;
    int signo = pk_revocation_signal();
    if (sigaction(signo, NULL, &current) != 0)
        return PK_E_ERRNO;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == revocation_handler) {
        learn_restorer(&current);
        return PK_OK;
    }
    if (handler_installed || (current.sa_flags & SA_SIGINFO) ||
        (current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN))
        return PK_E_SIGNAL_TAKEN;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = revocation_handler;
    /* SA_RESTART: a read(2) or futex wait interrupted in another thread goes on. */
    action.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(signo, &action, NULL) != 0 || sigaction(signo, NULL, &current) != 0)
        return PK_E_ERRNO;
    learn_restorer(&current);
    handler_installed = 1;
    return PK_OK;
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
    uint64_t seen, wanted, mask = waiting_of(keys, 0xffffffffu);
    if (!slot) {
        slot = slot_of(0);
        if (!slot)
            return -1;
        __atomic_store_n(&slot->waiting, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&slot->tid, tid, __ATOMIC_RELEASE);
    }
    seen = __atomic_load_n(&slot->waiting, __ATOMIC_ACQUIRE);
    do {
        wanted = (seen & ~mask) | (mask & ~(uint64_t)0xffffffffu) | (pkru_bits & (uint32_t)mask);
    } while (!__atomic_compare_exchange_n(&slot->waiting, &seen, wanted, 1, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    return 0;
}

pid_t pk_current_tid(void) { return (pid_t)syscall(SYS_gettid); }

ssize_t pk_read_text_file(const char *path, char *text, size_t size)
{
    ssize_t length;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    length = read(fd, text, size - 1);
    close(fd);
    if (length <= 0)
        return -1;
    text[length] = 0;
    return length;
}

/* How many threads the process has ("Threads:" in /proc/self/status), or
 * 0 if that cannot be read. */
static int process_threads(void)
{
    char text[4096];
    const char *field;
    if (pk_read_text_file("/proc/self/status", text, sizeof text) < 0)
        return 0;
    field = strstr(text, "\nThreads:");
    return field ? atoi(field + sizeof "\nThreads:" - 1) : 0;
}

/* Signal every thread not signalled yet, except those exempt from a change
 * of `exemptable` keys; returns how many were new, or -1.  `listed`: how
 * many threads the scan saw, this one included. */
static int signal_new_threads(pid_t self, pid_t pid, int signo, uint32_t keys, uint32_t bits,
                              uint32_t exemptable, int *listed)
{
    DIR *tasks = opendir("/proc/self/task");
    struct dirent *entry;
    int added = 0;
    *listed = 0;
    if (!tasks)
        return -1;
    while ((entry = readdir(tasks)) != NULL) {
        pid_t tid = (pid_t)atoi(entry->d_name);
        if (tid > 0)
            ++*listed;
        if (tid <= 0 || tid == self || is_target(tid))
            continue;
        if (target_count == MAX_TARGETS)
            break;
        if (exemptable && pk_exposure_thread_denies(tid, exemptable)) {
            __atomic_store_n(&target_answer[target_count], EXEMPT, __ATOMIC_RELEASE);
            __atomic_store_n(&target_signal[target_count], 0, __ATOMIC_RELEASE);
            __atomic_store_n(&target_tid[target_count], tid, __ATOMIC_RELEASE);
            __atomic_store_n(&target_count, target_count + 1, __ATOMIC_RELEASE);
            continue;
        }
        if (add_waiting(tid, keys, bits) != 0)
            break;
        __atomic_store_n(&target_answer[target_count], WAITING, __ATOMIC_RELEASE);
        __atomic_store_n(&target_signal[target_count], 0, __ATOMIC_RELEASE);
        __atomic_store_n(&target_tid[target_count], tid, __ATOMIC_RELEASE);
        __atomic_store_n(&target_count, target_count + 1, __ATOMIC_RELEASE);
        if (syscall(SYS_tgkill, pid, tid, signo) != 0) {
            /* Exited since the listing: nothing left to change there. */
            __atomic_store_n(&target_answer[target_count - 1], GONE, __ATOMIC_RELEASE);
            continue;
        }
        added++;
    }
    closedir(tasks);
    return added;
}

/* How often a thread found inside another handler is signalled again. */
#define RESIGNAL_SECONDS 0.001

/* Every target answered, or is gone (it exited before it could).  Those
 * found inside another signal handler are signalled again (`resignal`),
 * until a delivery finds them outside it. */
static int all_answered(pid_t pid, int signo, int resignal)
{
    int i, all = 1;
    for (i = 0; i < target_count; i++) {
        int value = __atomic_load_n(&target_answer[i], __ATOMIC_ACQUIRE);
        if (value == APPLIED || value == REFUSED || value == GONE || value == EXEMPT)
            continue;
        all = 0;
        if (value == IN_HANDLER && resignal) {
            __atomic_store_n(&target_answer[i], WAITING, __ATOMIC_RELEASE);
            if (syscall(SYS_tgkill, pid, target_tid[i], signo) != 0 && errno == ESRCH)
                __atomic_store_n(&target_answer[i], GONE, __ATOMIC_RELEASE);
        } else if (value == WAITING && syscall(SYS_tgkill, pid, target_tid[i], 0) != 0 &&
                   errno == ESRCH) {
            __atomic_store_n(&target_answer[i], GONE, __ATOMIC_RELEASE);
        }
    }
    if (!all) { /* one more look: the last of them may have just answered */
        for (i = 0; i < target_count; i++) {
            int value = __atomic_load_n(&target_answer[i], __ATOMIC_ACQUIRE);
            if (value != APPLIED && value != REFUSED && value != GONE && value != EXEMPT)
                return 0;
        }
    }
    return 1;
}

/* The last broadcast of this thread that failed, for the paths that pass
 * no result of their own (a pool eviction): pk_revocation_last_failure. */
static __thread struct pk_broadcast last_failure;

void pk_revocation_last_failure(struct pk_broadcast *out) { *out = last_failure; }

static void summarise(struct pk_broadcast *out, double started)
{
    int i, listed = 0, pass;
    memset(out, 0, sizeof *out);
    out->threads = target_count;
    for (i = 0; i < target_count; i++) {
        int value = __atomic_load_n(&target_answer[i], __ATOMIC_ACQUIRE);
        if (value == APPLIED || value == GONE)
            out->answered++;
        else if (value == EXEMPT)
            out->exempt++;
        else if (value == REFUSED)
            out->refused++;
        else if (__atomic_load_n(&target_signal[i], __ATOMIC_ACQUIRE))
            out->in_handler++; /* found in a handler, and in none since */
        else
            out->unanswered++;
    }
    /* Listed in that order: unanswered, refused, in a handler. */
    for (pass = 0; pass < 3; pass++) {
        for (i = 0; i < target_count && listed < PK_BROADCAST_LISTED; i++) {
            int value = __atomic_load_n(&target_answer[i], __ATOMIC_ACQUIRE);
            int outer = __atomic_load_n(&target_signal[i], __ATOMIC_ACQUIRE);
            int waiting = value == WAITING || value == IN_HANDLER;
            if ((pass == 0 && waiting && !outer) || (pass == 1 && value == REFUSED) ||
                (pass == 2 && waiting && outer)) {
                out->listed_signal[listed] = pass == 2 ? outer : 0;
                out->listed[listed++] = target_tid[i];
            }
        }
    }
    out->seconds = now_seconds() - started;
}

static int check_locked(void);

/* Whether the calling thread is the process's only one: then a change of
 * its own register is a change for every thread, with or without frames
 * to edit (no other thread exists to create one meanwhile). */
static int only_thread(pid_t self)
{
    DIR *tasks = opendir("/proc/self/task");
    struct dirent *entry;
    int alone = 1;
    if (!tasks)
        return 0;
    while (alone && (entry = readdir(tasks)) != NULL) {
        pid_t tid = (pid_t)atoi(entry->d_name);
        if (tid > 0 && tid != self)
            alone = 0;
    }
    closedir(tasks);
    return alone;
}

static int broadcast_to_others(pid_t self, uint32_t keys, uint32_t bits, double timeout,
                           struct pk_broadcast *result);

int pk_broadcast(uint32_t keys, uint32_t bits, double timeout, struct pk_broadcast *result)
{
    pid_t self = pk_current_tid();
    int status;
    if (result)
        memset(result, 0, sizeof *result);
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    status = own_the_signal();
    if (status != PK_OK)
        return status;
    status = check_locked();
    if (status == PK_E_NO_REVOCATION && only_thread(self))
        return PK_OK; /* nobody to reach, and nobody to be created meanwhile */
    if (status != PK_OK)
        return status;
    return broadcast_to_others(self, keys, bits, timeout, result);
}

static int broadcast_to_others(pid_t self, uint32_t keys, uint32_t bits, double timeout,
                           struct pk_broadcast *result)
{
    pid_t pid = getpid();
    int signo = pk_revocation_signal(), added, status;
    double started = now_seconds(), deadline = started + (timeout > 0 ? timeout : 0);
    double resignal_at = started;
    struct pk_broadcast summary;
    uint32_t exemptable;
    int unlisted = 0;

    __atomic_store_n(&target_count, 0, __ATOMIC_RELEASE);
    clear_gone(pid);
    pk_exposure_sweep(pid);
    exemptable = pk_exposure_exemptable(keys, bits);
    /* Open from before any exemption is decided until the last thread has
     * answered: a thread left out that opens the keys meanwhile applies
     * the change itself (exposure.c). */
    if (exemptable)
        pk_exposure_gate_open(exemptable, bits);
    do {
        /* A thread exiting while the kernel lists /proc/self/task can end
         * the listing early and hide the threads after it (seen: a thread
         * born after an exiting one was never signalled, and the call
         * reported success).  So the process's own count is read first,
         * and a scan that saw fewer threads is made again; threads that
         * exited meanwhile lower the next count.  Still short at the
         * deadline: the call fails. */
        int counted = process_threads(), listed;
        added = signal_new_threads(self, pid, signo, keys, bits, exemptable, &listed);
        if (added < 0) {
            if (exemptable)
                pk_exposure_gate_close();
            return PK_E_ERRNO;
        }
        unlisted = counted > listed ? counted - listed : 0;
        if (unlisted && !added) {
            struct timespec pause = {0, 100000};
            nanosleep(&pause, NULL);
        }
        for (;;) {
            double now = now_seconds();
            struct timespec pause = {0, 20000};
            int resignal = now >= resignal_at;
            if (resignal)
                resignal_at = now + RESIGNAL_SECONDS;
            if (all_answered(pid, signo, resignal) || now >= deadline)
                break;
            nanosleep(&pause, NULL);
        }
        /* Threads created meanwhile: their creators may have copied the
         * old register into them before answering. */
    } while ((added > 0 || unlisted) && all_answered(pid, signo, 0) &&
             (!unlisted || now_seconds() < deadline));

    if (exemptable)
        pk_exposure_gate_close();
    summarise(&summary, started);
    summary.unanswered += unlisted; /* never seen, so never reached */
    status = summary.unanswered || summary.refused || summary.in_handler ? PK_E_BROADCAST : PK_OK;
    if (status != PK_OK)
        last_failure = summary;
    if (result)
        *result = summary;
    __atomic_store_n(&target_count, 0, __ATOMIC_RELEASE);
    return status;
}

/*
 * Whether editing the signal frame works on this kernel, checked once
 * before the first broadcast with the real signal and handler: this thread
 * signals itself with key 15's access-disable bit to flip, and sees whether
 * sigreturn installed the flipped value.  Then the register and this
 * thread's handler record are put back as they were.  The PKRU signal path
 * changed three times in the 6.12 stable series (70044df250d0,
 * ae6012d72fa6, d1e420772cd1), so this is not taken on trust.
 */
static int check_locked(void)
{
    pid_t self = pk_current_tid();
    uint32_t before, flipped, after;
    uint32_t saved_count = handled_count;
    uint64_t saved_since_mark = handled_since_mark;
    struct pending_slot *slot;
    sigset_t only_ours, saved_mask;
    int signo = pk_revocation_signal();
    if (mechanism_works >= 0)
        return mechanism_works ? PK_OK : PK_E_NO_REVOCATION;
    before = pk_rdpkru_unchecked();
    flipped = before ^ (PK_AD << PK_KEY_SHIFT(PK_NKEYS - 1));
    if (add_waiting(self, 1u << (PK_NKEYS - 1), flipped) != 0)
        return PK_E_ERRNO;
    sigemptyset(&only_ours);
    sigaddset(&only_ours, signo);
    /* Delivered before tgkill returns, even if this thread blocks it. */
    pthread_sigmask(SIG_UNBLOCK, &only_ours, &saved_mask);
    checking_here = 1;
    syscall(SYS_tgkill, getpid(), self, signo);
    checking_here = 0;
    after = pk_rdpkru_unchecked();
    pthread_sigmask(SIG_SETMASK, &saved_mask, NULL);
    pk_wrpkru_unchecked(before);
    handled_since_mark = saved_since_mark;
    handled_count = saved_count;
    slot = slot_of(self);
    if (slot) {
        __atomic_store_n(&slot->waiting, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&slot->tid, 0, __ATOMIC_RELEASE);
    }
    mechanism_works = after == flipped;
    return mechanism_works ? PK_OK : PK_E_NO_REVOCATION;
}

int pk_revocation_check(void)
{
    int status;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    pk_state_lock();
    status = own_the_signal();
    if (status == PK_OK)
        status = check_locked();
    pk_state_unlock();
    return status;
}

void pk_test_force_revocation_check(int verdict)
{
    pk_state_lock();
    mechanism_works = verdict < 0 ? -1 : verdict != 0;
    pk_state_unlock();
}
