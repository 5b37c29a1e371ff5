/*
 * The shim's public surface: every declaration Python can reach.
 *
 * This file is read twice: by the C compiler (through pkeys_internal.h)
 * and by cffi's cdef parser (through _build_ffi.py).  It must therefore
 * stay free of preprocessor logic and of any type cffi does not know.
 */

/* Status codes of the validating (pk_hw_*) entry points.  Negative so that
 * a single int return carries either a result (>= 0) or one of these. */
#define PK_OK 0
#define PK_E_UNSUPPORTED -1    /* OSPKE is off: no PKU instruction may run */
#define PK_E_KEY_RANGE -2      /* key outside 0..15 */
#define PK_E_NOT_ALLOCATED -3  /* key not allocated through the package */
#define PK_E_KEY_ZERO -4       /* rights of key 0 must never change */
#define PK_E_RIGHTS -5         /* rights outside 0..3 */
#define PK_E_ERRNO -6          /* the kernel refused; see errno */

/* ---- cpu.c: what the processor and the OS enable ---------------------- */
int pk_cpu_has_pku(void);     /* CPUID.(EAX=7,ECX=0):ECX[bit 3] */
int pk_cpu_has_ospke(void);   /* CPUID.(EAX=7,ECX=0):ECX[bit 4]: CR4.PKE is set */
int pk_arch_is_x86(void);

/* Raw register access.  Both check OSPKE first and refuse (-1) without it,
 * so that no call from Python can reach a SIGILL. */
int64_t pk_rdpkru(void);
int pk_wrpkru(uint32_t value);

/* ---- sys.c: the kernel's syscalls, any libc --------------------------- */
int pk_sys_pkey_alloc(unsigned int flags, unsigned int access_rights);
int pk_sys_pkey_free(int pkey);
int pk_sys_pkey_mprotect(uintptr_t addr, size_t len, int prot, int pkey);
int pk_sys_mprotect(uintptr_t addr, size_t len, int prot);

/* ---- glibc.c: glibc's pkey_* functions, found at run time ------------- */
#define PK_GLIBC_ALLOC 1
#define PK_GLIBC_FREE 2
#define PK_GLIBC_MPROTECT 4
#define PK_GLIBC_GET 8
#define PK_GLIBC_SET 16
int pk_glibc_available(void);  /* bitmask of the PK_GLIBC_* found */
const char *pk_glibc_version(void);
int pk_glibc_pkey_alloc(unsigned int flags, unsigned int access_rights);
int pk_glibc_pkey_free(int pkey);
int pk_glibc_pkey_mprotect(uintptr_t addr, size_t len, int prot, int pkey);
int pk_glibc_pkey_get(int pkey);
int pk_glibc_pkey_set(int pkey, unsigned int access_rights);

/* ---- safe.c: the validating hardware backend -------------------------- */
int pk_hw_alloc(unsigned int flags, unsigned int access_rights);
int pk_hw_free(int pkey);
int pk_hw_get(int pkey);
int pk_hw_set(int pkey, int access_rights);
int pk_hw_wrpkru(uint32_t value);
int64_t pk_hw_enter(uint32_t mask, uint32_t bits);
int pk_hw_leave(uint32_t mask, uint32_t saved);
uint32_t pk_allocated_mask(void);
int64_t pk_shadow_pkru(void);

/* ---- guard.c: guarded accesses and the package's SIGSEGV handler ------ */
struct pk_fault {
    int signo;       /* SIGSEGV */
    int code;        /* si_code: SEGV_PKUERR (4) on PKU, SEGV_ACCERR (2) on mprotect */
    int pkey;        /* si_pkey for SEGV_PKUERR, else -1 */
    uintptr_t addr;  /* si_addr */
    int64_t handler_pkru; /* PKRU the handler ran with (-1 without PKU) */
};
#define PK_MAX_LABELS 1024
#define PK_LABEL_LEN 64
int pk_guard_install(void);
int pk_probe(uintptr_t addr, int write, struct pk_fault *fault);
void pk_sw_mirror_pkru(uint32_t value);
int pk_label_add(uintptr_t start, uintptr_t end, int pkey, const char *label);
void pk_label_remove(int slot);
int pk_pkru_xstate_offset(void);
int pk_signal_pkru(int64_t *in_handler, int64_t *after_return);

/* ---- secret.c: memory hygiene for protected buffers ------------------- */
int pk_mlock(uintptr_t addr, size_t len);
int pk_munlock(uintptr_t addr, size_t len);
int pk_madvise(uintptr_t addr, size_t len, int advice);
void pk_wipe(uintptr_t addr, size_t len);
/* Copy or wipe with access to the keys under `mask` set to `bits` for the
 * duration, and restored before returning: no Python code ever runs with
 * the access open.  Same validation and status codes as pk_hw_enter. */
int pk_hw_copy(uintptr_t dst, uintptr_t src, size_t len, uint32_t mask, uint32_t bits);
int pk_hw_wipe(uintptr_t addr, size_t len, uint32_t mask, uint32_t bits);

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
