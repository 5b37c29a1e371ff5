/*
 * TEST AND BENCH ONLY: entry points that the tests, the pytest plugin and
 * `pkeys bench` use, and that no production path calls.  Read by cffi (through
 * _build_ffi.py) after pkeys_api.h, and by the C compiler through
 * pkeys_internal.h, like that header; the same rules apply (no
 * preprocessor logic).
 */

/* ---- test_steps.c: a revocation at a chosen step boundary ------------- */
/* Arm this thread: at the `step`-th boundary it passes (1-based), `pkey`
 * is revoked (access-disable) in every thread by a helper thread, the
 * handler running here.  0 disarms. */
int pk_test_revoke_at_step(int step, int pkey, uint32_t identity);
/* 1 if the revocation was delivered since arming, 0 if the boundary was
 * not reached (and the thread is disarmed), negative: it failed. */
int pk_test_revoked_at_step(void);

/* ---- guard.c, sigframe.c: what the kernel does with PKRU and signals -- */
int pk_signal_pkru(int64_t *in_handler, int64_t *after_return);

/* ---- bench.c: C-level loops for `pkeys bench` ------------------------- */
struct pk_bench {
    uint64_t iterations;
    uint64_t nanoseconds;  /* clock_gettime(CLOCK_MONOTONIC) around the loop */
    uint64_t cycles;       /* rdtsc around the loop; 0 off x86 */
};
void pk_noop(void);
int pk_bench_rdpkru(uint64_t n, struct pk_bench *out);
int pk_bench_wrpkru(uint64_t n, int alternate, int pkey, struct pk_bench *out);
int pk_bench_glibc_pkey_set(uint64_t n, int pkey, struct pk_bench *out);
int pk_bench_null_syscall(uint64_t n, struct pk_bench *out);
int pk_bench_mprotect(uint64_t n, uintptr_t addr, size_t len, int pkey, int idle_threads,
                      struct pk_bench *out);
struct pk_contention {
    double seconds;          /* how long the fault workers ran */
    uint64_t faults;         /* pages faulted in by all workers */
    uint64_t flips;          /* access changes made by the flipper */
};
int pk_bench_contention(int workers, int flip_mode, int pkey, uint32_t flips_per_second,
                        double seconds, struct pk_contention *out);
#define PK_FLIP_NONE 0
#define PK_FLIP_PKEY_MPROTECT 1
#define PK_FLIP_WRPKRU 2
#define PK_FLIP_REVOKE 3
int pk_bench_revoke(uint64_t n, int pkey, int idle_threads, struct pk_bench *out);

/* ---- sigframe.c: the signal frame under a restrictive PKRU ------------- */
struct pk_sigframe {
    uint32_t signal_pkru;    /* PKRU when the signal was sent */
    uint32_t entry_pkru;     /* PKRU as the handler began */
    uint32_t after_pkru;     /* PKRU once sigreturn had restored it */
    int handler_ran;
    uintptr_t handler_stack; /* address of a local of the handler */
    uintptr_t stack_start;   /* the alternate stack, if any */
    uintptr_t stack_end;
};
/* Send SIGUSR2 to a SA_ONSTACK handler whose alternate stack is tagged
 * with `pkey`, while this thread's rights for `pkey` are `rights`
 * (PKEY_DISABLE_ACCESS or PKEY_DISABLE_WRITE).  Returns 0 once the handler
 * has run, -1 without OSPKE or on a setup error.  Before Linux 6.12 the
 * process dies of SIGSEGV instead: run it in a forked child. */
int pk_sigframe_altstack(int pkey, uint32_t rights, struct pk_sigframe *out);
/* A SIGSEGV/SIGBUS handler writing one report to `fd`, then dying of the
 * signal as if there had been no handler. */
struct pk_fault_report {
    int signo;
    int code;
    int pkey;                /* -1 unless si_code is SEGV_PKUERR */
    uint64_t addr;
};
int pk_fault_reporter(int fd);
