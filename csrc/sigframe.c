/*
 * sigframe.c: how the kernel writes a signal frame while PKRU denies the
 * memory it is written to, and what a dying child's fault was.
 *
 * Linux 6.12 (commit 70044df250d0) opens every key while it writes the
 * frame and restores the interrupted PKRU at sigreturn; earlier kernels
 * write the frame under the thread's own PKRU, fail, and kill the process
 * with SIGSEGV.  pk_sigframe_altstack shows the difference: a SA_ONSTACK
 * handler's alternate stack is tagged with a key that the thread has
 * access- or write-disabled.  Run it in a forked child, since on older
 * kernels the child dies.
 *
 * pk_fault_reporter: a SIGSEGV/SIGBUS handler that writes the siginfo to a
 * file descriptor and lets the process die of the signal all the same.
 */
#include "pkeys_internal.h"

#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define HIDDEN __attribute__((visibility("hidden")))

#if PK_REAL_PKRU && defined(__x86_64__)

/* Written by the handlers, read after the signal. */
HIDDEN volatile uint32_t pk_sigframe_entry_pkru;  /* PKRU as the handler began */
HIDDEN volatile uint32_t pk_sigframe_open_mask;   /* ANDed into it by the stub */
static volatile int handler_ran;
static volatile uintptr_t handler_stack;

static inline void record_handler(int signo, siginfo_t *info, void *context)
{
    (void)signo; (void)info; (void)context;
    int local = 0;
    handler_stack = (uintptr_t)&local;
    handler_ran = 1;
}

/* The SA_ONSTACK handler's first instructions.  The kernel starts every
 * handler with its init PKRU, which denies the key of our alternate stack,
 * so nothing may touch the stack before WRPKRU opens that key: no call, no
 * push.  RDPKRU clobbers EDX, the third handler argument: keep it in R11. */
HIDDEN void pk_sigframe_stub(int, siginfo_t *, void *);
HIDDEN void pk_sigframe_stub_body(int signo, siginfo_t *info, void *context)
{
    record_handler(signo, info, context);
}
__asm__(
    ".pushsection .text\n"
    ".p2align 4\n"
    "pk_sigframe_stub:\n"
    "    mov %rdx, %r11\n"
    "    xor %ecx, %ecx\n"
    "    .byte 0x0f, 0x01, 0xee\n"              /* rdpkru */
    "    mov %eax, pk_sigframe_entry_pkru(%rip)\n"
    "    and pk_sigframe_open_mask(%rip), %eax\n"
    "    xor %ecx, %ecx\n"
    "    xor %edx, %edx\n"
    "    .byte 0x0f, 0x01, 0xef\n"              /* wrpkru */
    "    mov %r11, %rdx\n"
    "    jmp pk_sigframe_stub_body\n"
    ".popsection\n");

static int install(int signo, void (*handler)(int, siginfo_t *, void *), int flags)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = handler;
    action.sa_flags = SA_SIGINFO | flags;
    sigemptyset(&action.sa_mask);
    /* A failed frame write must end in a plain SIGSEGV death, not in some
     * other SIGSEGV handler of the process. */
    signal(SIGSEGV, SIG_DFL);
    return sigaction(signo, &action, NULL);
}

int pk_sigframe_altstack(int pkey, uint32_t rights, struct pk_sigframe *out)
{
    if (!pk_ospke_enabled || pkey < 1 || pkey >= PK_NKEYS || rights < 1 || rights > 3)
        return -1;
    memset(out, 0, sizeof *out);
    handler_ran = 0;
    size_t size = 64 * 1024;
    void *stack = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (stack == MAP_FAILED)
        return -1;
    if (syscall(SYS_pkey_mprotect, stack, size, PROT_READ | PROT_WRITE, pkey) != 0)
        goto fail;
    stack_t alternate = {.ss_sp = stack, .ss_size = size, .ss_flags = 0};
    if (sigaltstack(&alternate, NULL) != 0)
        goto fail;
    pk_sigframe_open_mask = ~(3u << PK_KEY_SHIFT(pkey));
    if (install(SIGUSR2, pk_sigframe_stub, SA_ONSTACK) != 0)
        goto fail;
    out->stack_start = (uintptr_t)stack;
    out->stack_end = (uintptr_t)stack + size;
    uint32_t before = pk_rdpkru_unchecked();
    uint32_t restrictive = before | (rights << PK_KEY_SHIFT(pkey));
    out->signal_pkru = restrictive;
    pk_wrpkru_unchecked(restrictive);
    syscall(SYS_tkill, syscall(SYS_gettid), SIGUSR2);
    out->after_pkru = pk_rdpkru_unchecked();
    pk_wrpkru_unchecked(before);
    out->handler_ran = handler_ran;
    out->entry_pkru = pk_sigframe_entry_pkru;
    out->handler_stack = handler_stack;
    signal(SIGUSR2, SIG_DFL);
    stack_t off = {.ss_flags = SS_DISABLE};
    sigaltstack(&off, NULL);
    munmap(stack, size);
    return 0;
fail:
    munmap(stack, size);
    return -1;
}

#else  /* not x86-64, or the simulated register: nothing to probe */

int pk_sigframe_altstack(int pkey, uint32_t rights, struct pk_sigframe *out)
{
    (void)pkey; (void)rights; (void)out;
    return -1;
}

#endif

/* ---- the fault a dying child reports ------------------------------------ */

static int report_fd = -1;

static void report_fault(int signo, siginfo_t *info, void *context)
{
    (void)context;
    struct pk_fault_report report;
    memset(&report, 0, sizeof report);
    report.signo = signo;
    report.code = info->si_code;
    report.addr = (uint64_t)(uintptr_t)info->si_addr;
    /* si_pkey sits at offset 0x20 of siginfo_t on x86-64; glibc names it
     * nowhere.  Meaningful for SEGV_PKUERR only. */
    int pkey = -1;
    if (signo == SIGSEGV && info->si_code == 4)
        memcpy(&pkey, (const char *)info + 0x20, sizeof pkey);
    report.pkey = pkey;
    ssize_t written = write(report_fd, &report, sizeof report);
    (void)written;
    /* SA_RESETHAND restored the default action: die of this very signal. */
    raise(signo);
}

int pk_fault_reporter(int fd)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = report_fault;
    action.sa_flags = SA_SIGINFO | SA_RESETHAND;
    sigemptyset(&action.sa_mask);
    report_fd = fd;
    if (sigaction(SIGSEGV, &action, NULL) != 0 || sigaction(SIGBUS, &action, NULL) != 0)
        return -1;
    return 0;
}
