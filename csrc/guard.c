/*
 * Guarded accesses (pk_probe) and the package's SIGSEGV handler.
 *
 * One handler serves two purposes:
 *
 *  1. A fault inside pk_probe is caught: the handler records siginfo and
 *     siglongjmps back.  The kernel runs handlers with its init PKRU
 *     (0x55555554) and siglongjmp skips sigreturn, so pk_probe restores
 *     PKRU itself afterwards.
 *
 *  2. Any other fault is fatal and not ours to swallow.  If it hit a
 *     labelled protected buffer, or was a PKU fault, the handler writes one
 *     line to stderr (address, key, label, the interrupted thread's rights)
 *     and then chains: it calls the handler it displaced (faulthandler
 *     prints the Python traceback there), resets SIGSEGV to SIG_DFL and
 *     returns, so the access faults again and the process dies of SIGSEGV
 *     exactly as it would have.
 *
 * Why chain by calling and then resetting, not by reinstalling the
 * displaced handler: faulthandler's handler, once disabled, returns without
 * doing anything, so reinstalling it would fault forever; and when enabled
 * it re-raises the signal, which stays blocked (no SA_NODEFER here) until
 * we return with SIG_DFL in place.
 *
 * Everything the handler does is async-signal-safe: no malloc, no stdio,
 * only write(2), sigaction(2), raise(3), and reads of a fixed table.
 */
#include "pkeys_internal.h"

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef SEGV_PKUERR
#define SEGV_PKUERR 4
#endif


/* volatile: the handler reads them, so the stores around the guarded access
 * must happen when written, not be merged away as dead. */
static PK_TLS sigjmp_buf *volatile guard_env;
static PK_TLS struct pk_fault *volatile guard_fault;

/* Keeps the compiler from moving memory accesses across the guard edges. */
#define PK_COMPILER_BARRIER() __asm__ volatile("" ::: "memory")

static struct sigaction displaced;       /* what we replaced when installing */
static atomic_int installed;
static atomic_uint sw_pkru = 0x55555554u; /* software backend's register, for messages */

/* The labelled buffers.  A slot is published by storing `end` last and
 * retired by zeroing it first, so the handler never sees half an entry
 * as valid (a label may be stale, never out of bounds). */
struct label_slot {
    uintptr_t start;
    _Atomic uintptr_t end;
    int pkey;
    char label[PK_LABEL_LEN];
};
static struct label_slot labels[PK_MAX_LABELS];

/* si_pkey: glibc's siginfo_t does not name it; the kernel puts it right
 * after si_addr and si_addr_lsb's padding, at offset 0x20 on x86-64. */
static int siginfo_pkey(const siginfo_t *info)
{
#if PK_X86 && defined(__x86_64__)
    int pkey;
    memcpy(&pkey, (const char *)info + 0x20, sizeof pkey);
    return pkey;
#else
    (void)info;
    return -1;
#endif
}

/* The PKRU of the interrupted code: the handler's own is the kernel's init
 * value, the interrupted one is saved in the signal frame's XSAVE area. */
static int64_t interrupted_pkru(void *ucontext)
{
    const uint32_t *saved = pk_frame_pkru(ucontext);
    if (saved) {
        uint32_t value;
        memcpy(&value, saved, sizeof value);
        return value;
    }
    if (!pk_ospke_enabled)
        return atomic_load(&sw_pkru);
    return -1;
}

/* ---- async-signal-safe formatting ---- */
struct line {
    char text[256];
    size_t len;
};

static void put(struct line *l, const char *s)
{
    while (*s && l->len < sizeof l->text - 1)
        l->text[l->len++] = *s++;
}

static void put_hex(struct line *l, uintptr_t v)
{
    char digits[2 + 2 * sizeof v + 1];
    int i = (int)sizeof digits - 1;
    digits[i] = 0;
    do {
        digits[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v && i > 2);
    digits[--i] = 'x';
    digits[--i] = '0';
    put(l, digits + i);
}

static void put_int(struct line *l, long v)
{
    char digits[24];
    int i = (int)sizeof digits - 1;
    unsigned long u = v < 0 ? 0UL - (unsigned long)v : (unsigned long)v;
    digits[i] = 0;
    do {
        digits[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        digits[--i] = '-';
    put(l, digits + i);
}

static const char *rights_words(unsigned int bits)
{
    static const char *words[] = {"read/write", "no access", "read-only", "no access"};
    return words[bits & 3];
}

static void report_unguarded(const siginfo_t *info, void *ucontext)
{
    uintptr_t addr = (uintptr_t)info->si_addr;
    const struct label_slot *slot = NULL;
    struct line l = {.len = 0};
    int pkey = info->si_code == SEGV_PKUERR ? siginfo_pkey(info) : -1;
    int64_t pkru;
    ssize_t ignored;
    int i;

    for (i = 0; i < PK_MAX_LABELS; i++) {
        uintptr_t end = atomic_load_explicit(&labels[i].end, memory_order_acquire);
        if (end && labels[i].start <= addr && addr < end) {
            slot = &labels[i];
            break;
        }
    }
    if (!slot && info->si_code != SEGV_PKUERR)
        return; /* not a fault the package knows anything about */
    if (slot && pkey < 0)
        pkey = slot->pkey;

    put(&l, "pkeys: ");
    put(&l, info->si_code == SEGV_PKUERR ? "protection-key fault" : "access fault");
    put(&l, " at ");
    put_hex(&l, addr);
    if (slot) {
        put(&l, " in protected buffer '");
        put(&l, slot->label);
        put(&l, "'");
    }
    if (pkey >= 0) {
        put(&l, " (pkey ");
        put_int(&l, pkey);
        put(&l, ")");
        pkru = interrupted_pkru(ucontext);
        if (pkru >= 0 && pkey < PK_NKEYS) {
            put(&l, "; this thread's rights for pkey ");
            put_int(&l, pkey);
            put(&l, ": ");
            put(&l, rights_words((unsigned int)(pkru >> PK_KEY_SHIFT(pkey))));
        }
    }
    put(&l, "\n");
    ignored = write(STDERR_FILENO, l.text, l.len);
    (void)ignored;
}

static void handler(int signo, siginfo_t *info, void *ucontext)
{
    int saved_errno = errno;
    sigjmp_buf *env = guard_env;
    struct pk_fault *record = guard_fault;
    struct sigaction reset;

    /* Only a genuine fault (si_code > 0) of the guarded access is caught;
     * a signal sent by kill/raise is never a fault we own. */
    if (env && info && info->si_code > 0) {
        guard_env = NULL;
        if (record) {
            record->signo = signo;
            record->code = info->si_code;
            record->pkey = info->si_code == SEGV_PKUERR ? siginfo_pkey(info) : -1;
            record->addr = (uintptr_t)info->si_addr;
            record->handler_pkru = pk_ospke_enabled ? (int64_t)pk_rdpkru_unchecked() : -1;
        }
        siglongjmp(*env, 1);
    }

    if (info && info->si_code > 0)
        report_unguarded(info, ucontext);

    if (displaced.sa_flags & SA_SIGINFO) {
        if (displaced.sa_sigaction)
            displaced.sa_sigaction(signo, info, ucontext);
    } else if (displaced.sa_handler != SIG_DFL && displaced.sa_handler != SIG_IGN &&
               displaced.sa_handler != NULL) {
        displaced.sa_handler(signo);
    }

    memset(&reset, 0, sizeof reset);
    reset.sa_handler = SIG_DFL;
    sigemptyset(&reset.sa_mask);
    sigaction(signo, &reset, NULL);
    if (!info || info->si_code <= 0)
        raise(signo); /* sent, not a fault: returning would not repeat it */
    errno = saved_errno;
}

static void our_action(struct sigaction *action)
{
    memset(action, 0, sizeof *action);
    action->sa_sigaction = handler;
    action->sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action->sa_mask);
}

static int is_ours(const struct sigaction *action)
{
    return (action->sa_flags & SA_SIGINFO) && action->sa_sigaction == handler;
}

/*
 * Make our handler the one that runs first.  Called when buffers are made
 * and opened, so a handler installed since (faulthandler enabled later)
 * ends up beneath ours and is chained to.  Idempotent and cheap when
 * already on top (one sigaction call).
 */
int pk_guard_install(void)
{
    static pthread_mutex_t install_mutex = PTHREAD_MUTEX_INITIALIZER;
    struct sigaction current, ours;
    int status = 0;
    if (sigaction(SIGSEGV, NULL, &current) != 0)
        return -1;
    if (is_ours(&current))
        return 0;
    pthread_mutex_lock(&install_mutex);
    if (sigaction(SIGSEGV, NULL, &current) != 0) {
        status = -1;
    } else if (!is_ours(&current)) {
        our_action(&ours);
        /* Publish what we chain to before our handler can run. */
        displaced = current;
        if (sigaction(SIGSEGV, &ours, NULL) != 0)
            status = -1;
        else
            atomic_store(&installed, 1);
    }
    pthread_mutex_unlock(&install_mutex);
    return status;
}

/*
 * Touch one byte at `addr` (read, or an atomic read-modify-write of the
 * same value for `write`) and report whether it faulted.  Returns 0 when
 * the access succeeded, 1 with *fault filled when it faulted, -1 when the
 * handler could not be installed.
 *
 * The caller's PKRU is restored after a fault.  SIGBUS is not caught.
 *
 * A thread that blocks SIGSEGV would not survive a fault: the kernel
 * cannot deliver a synchronous signal that is blocked, so it resets the
 * action to the default and kills the process.  So SIGSEGV is unblocked
 * for the access and blocked again after it (a SIGSEGV already pending
 * then is delivered, as it would be on any unblocking).
 */
int pk_probe(uintptr_t addr, int write, struct pk_fault *fault)
{
    sigjmp_buf env;
    /* A revocation handled between this read and the restore below is
     * applied again on top of the saved value. */
    volatile uint32_t mark = pk_revocations_mark();
    volatile uint32_t saved_pkru = pk_ospke_enabled ? pk_rdpkru_unchecked() : 0;
    volatile int faulted = 0;
    sigset_t segv, caller_mask;
    PK_STEP();

    /* Installed once and left in place: restoring the previous handler
     * after each probe would pull it out from under a probe running in
     * another thread.  Faults that are not probes still reach the handler
     * it displaced (see handler()). */
    if (pk_guard_install() != 0)
        return -1;

    sigemptyset(&segv);
    sigaddset(&segv, SIGSEGV);
    if (pthread_sigmask(SIG_UNBLOCK, &segv, &caller_mask) != 0)
        return -1;
    memset(fault, 0, sizeof *fault);
    fault->pkey = -1;
    fault->handler_pkru = -1;
    guard_fault = fault;
    /* savemask=1: the handler runs with SIGSEGV blocked, and leaving it by
     * siglongjmp must unblock it again, or the next fault would kill. */
    if (sigsetjmp(env, 1) == 0) {
        guard_env = &env;
        PK_COMPILER_BARRIER();
        if (write) {
#if PK_X86
            __asm__ volatile("lock orb $0, (%0)" : : "r"(addr) : "memory");
#else
            volatile unsigned char *p = (volatile unsigned char *)addr;
            *p = *p;
#endif
        } else {
            (void)*(volatile unsigned char *)addr;
        }
        PK_COMPILER_BARRIER();
        guard_env = NULL;
    } else {
        faulted = 1;
        if (pk_ospke_enabled) {
            /* Write first, then look: a handler that runs between a look
             * and the write would have its edit overwritten. */
            PK_STEP();
            pk_wrpkru_unchecked(saved_pkru);
            PK_STEP();
            if (pk_revocations_moved(mark)) {
                uint32_t now = pk_rdpkru_unchecked();
                PK_STEP();
                pk_wrpkru_unchecked(pk_revocations_catch_up(now));
            }
            PK_STEP();
        }
    }
    guard_fault = NULL;
    if (sigismember(&caller_mask, SIGSEGV))
        pthread_sigmask(SIG_SETMASK, &caller_mask, NULL);
    return faulted;
}

void pk_sw_mirror_pkru(uint32_t value)
{
    atomic_store(&sw_pkru, value);
}

int pk_label_add(uintptr_t start, uintptr_t end, int pkey, const char *label)
{
    int i;
    for (i = 0; i < PK_MAX_LABELS; i++) {
        uintptr_t expected = 0;
        /* Claim a free slot by parking a non-zero sentinel in `end`... */
        if (atomic_compare_exchange_strong(&labels[i].end, &expected, (uintptr_t)1)) {
            labels[i].start = end; /* empty range while being filled */
            labels[i].pkey = pkey;
            strncpy(labels[i].label, label, PK_LABEL_LEN - 1);
            labels[i].label[PK_LABEL_LEN - 1] = 0;
            labels[i].start = start;
            /* ...and publish the real end last. */
            atomic_store_explicit(&labels[i].end, end, memory_order_release);
            return i;
        }
    }
    errno = ENOSPC;
    return -1;
}

void pk_label_remove(int slot)
{
    if (slot >= 0 && slot < PK_MAX_LABELS)
        atomic_store_explicit(&labels[slot].end, 0, memory_order_release);
}

/*
 * What a C signal handler sees: raise SIGUSR2 with a handler that records
 * PKRU, let it return through sigreturn, and read PKRU again.  The kernel
 * runs the handler with its init value and sigreturn restores the
 * interrupted one; siglongjmp would not (see pk_probe).
 */
static volatile int64_t pkru_seen_by_handler;

static void record_pkru(int signo)
{
    (void)signo;
    pkru_seen_by_handler = pk_ospke_enabled ? (int64_t)pk_rdpkru_unchecked() : -1;
}

int pk_signal_pkru(int64_t *in_handler, int64_t *after_return)
{
    struct sigaction action, previous;
    memset(&action, 0, sizeof action);
    action.sa_handler = record_pkru;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGUSR2, &action, &previous) != 0)
        return -1;
    pkru_seen_by_handler = -1;
    raise(SIGUSR2);
    *after_return = pk_ospke_enabled ? (int64_t)pk_rdpkru_unchecked() : -1;
    *in_handler = pkru_seen_by_handler;
    sigaction(SIGUSR2, &previous, NULL);
    return 0;
}
