/*
 * The shim's public surface: every declaration Python can reach.
 *
 * This file is read twice: by the C compiler (through pkeys_internal.h)
 * and by cffi's cdef parser (through _build_ffi.py).  It must therefore
 * stay free of preprocessor logic and of any type cffi does not know.
 */

/* Status codes of the validating entry points (state.c, regions.c,
 * virtual.c).  Negative so that a single int return carries either a
 * result (>= 0) or one of these. */
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
/* 1 in the simulated-register build (PKEYS_BUILD_SIMULATED_PKU=1): the
 * register is a thread-local variable and keys are a bitmap, so that the
 * hardware backend's code runs, and can be measured, on any CPU.  It
 * protects nothing.  0 in every other build. */
int pk_build_simulated(void);

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

/* ---- state.c: the one home of keys, grants and the emulated register ---
 *
 * Everything that must stay consistent across threads, asyncio tasks,
 * finalizers and fork() lives here, behind one mutex that no Python code
 * ever runs under (each entry point is one cffi call).  See state.c. */
#define PK_E_KEY_CLOSED -7     /* the key was freed: its identity no longer matches */
#define PK_E_WRONG_THREAD -8   /* a scope exited in a thread that did not enter it */
#define PK_E_UNBALANCED -9     /* a scope exited more often than it was entered */
#define PK_E_IN_USE -10        /* the key still guards tracked memory */
#define PK_E_NEED_PINS -11     /* software: pin foreign owners, then call again */
#define PK_E_BUSY -12          /* a protected buffer is being used */
#define PK_E_CLOSED -13        /* a protected buffer is closed */
#define PK_E_NOSPC -14         /* every key is allocated */

#define PK_MODE_HARDWARE 1
#define PK_MODE_SOFTWARE 2
int pk_state_init(int mode);
int pk_state_mode(void);
/* Whether a grant belongs to the process (software) rather than to the
 * thread that took it (hardware): a scope ended in another thread leaves a
 * hardware grant active in the thread that entered it. */
int pk_grants_per_process(void);

/* Scope kinds: what a grant does to a key while it is active. */
#define PK_GRANT_READ_WRITE 0
#define PK_GRANT_READ_ONLY 1
#define PK_GRANT_DENY 2

int pk_key_alloc(unsigned int flags, unsigned int access_rights, uint32_t *identity);
/* What a revocation reached (revoke.c). */
#define PK_BROADCAST_LISTED 64
/* listed_signal of a thread found inside a handler by its frame alone: a
 * handler installed without SA_SIGINFO leaves no signal number there. */
#define PK_HANDLER_SIGNAL_UNKNOWN 65
struct pk_broadcast {
    int threads;              /* other threads found */
    int answered;             /* ...that applied the change */
    int unanswered;           /* ...that did not answer in time (signal blocked?) */
    int refused;              /* ...whose signal frame could not be edited */
    int in_handler;           /* ...found only inside another signal handler */
    int exempt;               /* ...not signalled: provably never had the key */
    int listed[PK_BROADCAST_LISTED]; /* thread ids: unanswered, refused, in a handler */
    int listed_signal[PK_BROADCAST_LISTED]; /* in a handler: its signal, or one it blocked */
    double seconds;           /* how long it took */
};
#define PK_E_BROADCAST -15    /* some thread did not take the new rights */
#define PK_E_NO_REVOCATION -22 /* the signal-frame edit does not work on this kernel */
#define PK_E_SIGNAL_TAKEN -23 /* the revocation signal has another handler */
/* How long a change for every thread waits for them all to answer, in
 * seconds: the one default of every revocation path. */
extern const double pk_revocation_timeout;
int pk_key_free(int pkey, uint32_t identity, double timeout, struct pk_broadcast *result,
                uint64_t pins);
int pk_key_set_all(int pkey, uint32_t identity, int access_rights, double timeout,
                   struct pk_broadcast *result, uint64_t pins);
int pk_revocation_signal(void);
/* PK_OK when the signal-frame edit works on this kernel (checked once, and
 * before the first broadcast); else PK_E_NO_REVOCATION, PK_E_SIGNAL_TAKEN,
 * PK_E_UNSUPPORTED (no PKU) or PK_E_ERRNO. */
int pk_revocation_check(void);
/* exposure.c, for the Python side: a thread that threading starts records
 * its register before it runs anything (so a revocation can prove it never
 * had a key), and the raw layers say that the register may change behind
 * pkeys' back (which ends such proofs for the process). */
void pk_exposure_birth_record(void);
void pk_exposure_untracked(void);
/* The last failed broadcast of the calling thread (PK_E_BROADCAST). */
void pk_revocation_last_failure(struct pk_broadcast *out);
/* Test only: the check's verdict (0 fails, 1 works, -1 check again). */
void pk_test_force_revocation_check(int verdict);
uint32_t pk_key_identity(int pkey);
/* identity: 0 for whatever key has the number now (an int argument), else
 * the Key's: refused (PK_E_KEY_CLOSED) once the number is another key's. */
int pk_key_get(int pkey, uint32_t identity);
int pk_key_set(int pkey, uint32_t identity, int access_rights, uint64_t pins);
int64_t pk_pkru_read(void);
int pk_pkru_write(uint32_t value, uint64_t pins);
/* What a scope grants, made once per scope object so that entering and
 * leaving pass one pointer. */
struct pk_scope {
    uint32_t keys;              /* bit k: key k */
    int kind;                   /* PK_GRANT_* */
    uint32_t identities[16];    /* identity of each key in `keys` */
};
int64_t pk_scope_enter(const struct pk_scope *scope, uint64_t pins);
int pk_scope_exit(const struct pk_scope *scope, int64_t token, uint64_t pins);
uint32_t pk_thread_serial(void);
uint32_t pk_allocated_mask(void);
int64_t pk_shadow_pkru(void);
int pk_after_fork_in_child(uint64_t pins);
/* A thread born inside a block: its creator's grants are not its own, yet
 * it copies the register they opened.  The creator takes a snapshot as it
 * starts the thread, and the new thread, before anything else, gives each
 * of those keys its creator's rights outside every grant (hardware; a
 * no-op on the software backend, whose grants are the process's). */
struct pk_birth {
    uint32_t keys;              /* bit k: the creator had grants on key k */
    uint32_t bits;              /* the creator's base rights for them (PKRU layout) */
    uint32_t epoch;             /* the revocation epoch at the snapshot */
    uint32_t identities[16];
};
int pk_birth_snapshot(struct pk_birth *out);
int pk_birth_settle(const struct pk_birth *birth);

/* ---- regions.c: which memory each key guards ------------------------- */
#define PK_OWNER_CALLER 0   /* an int address: the caller keeps it mapped */
#define PK_OWNER_PACKAGE 1  /* a protected buffer: untagged before it is unmapped */
/* Owners >= 2 are foreign Python buffers, pinned around software changes. */
struct pk_region {
    uintptr_t start;
    uintptr_t end;
    int prot;
    int pkey;
    uint64_t owner;
};
int pk_region_tag(uintptr_t addr, size_t len, int prot, int pkey, uint32_t identity,
                  uint64_t owner, uint64_t pins);
int pk_region_forget(uintptr_t addr, size_t len);
int pk_owner_gone(uint64_t owner);
int pk_owner_lost(uint64_t owner);
int pk_owner_moved(uint64_t owner, uintptr_t old_base, size_t old_size, uintptr_t base,
                   size_t size);
int pk_owner_regions(uint64_t owner);
/* Pins (software backend): an entry point that answers PK_E_NEED_PINS has
 * recorded, for this thread, the keys it was changing (pk_pins_wanted).
 * The caller pins the foreign owners of those keys' regions
 * (pk_pins_owners lists them, as many as fit in `out`, and returns how
 * many there are), describes each export, and calls again
 * with the nonce pk_pins_vouch returns as `pins`; the array must stay
 * alive and unchanged until that call returns.  The call checks that
 * every foreign region it would touch lies inside a pinned export of its
 * owner, and asks again if not. */
struct pk_pin {
    uint64_t owner;
    uintptr_t start;   /* the export's address and length */
    size_t length;
};
uint32_t pk_pins_wanted(void);
int pk_pins_owners(uint64_t *out, int capacity);
uint64_t pk_pins_vouch(const struct pk_pin *pins, int count);
int pk_regions_list(int pkey, struct pk_region *out, int capacity);
uint64_t pk_reprotections(void);
/* The prot that enforces `rights` on memory requested as `prot`. */
int pk_effective_prot(int prot, unsigned int rights);

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

/* ---- secret.c: memory hygiene for protected buffers ------------------- */
int pk_munlock(uintptr_t addr, size_t len);
int pk_madvise(uintptr_t addr, size_t len, int advice);
void pk_wipe(uintptr_t addr, size_t len);

/* ---- secretmem.c, virtual.c: the memory under protected buffers, and
 * virtual keys (any number of buffers on 15 hardware keys) ------------- */
#define PK_E_NOT_INHERITED -20 /* a secretmem buffer used in a forked child */
#define PK_E_ALL_KEYS_BUSY -21 /* every pool key's buffer is in use right now */

/* What a forked child has of a buffer's pages. */
#define PK_INHERIT_ZEROS 0     /* anonymous with MADV_WIPEONFORK: zeros, canary too */
#define PK_INHERIT_NONE 1      /* secretmem with MADV_DONTFORK: nothing mapped */
#define PK_INHERIT_COPY 2      /* anonymous without WIPEONFORK (kernel < 4.14) */
#define PK_INHERIT_SHARED 3    /* secretmem, on_fork="shared": the same pages, no wipe on close */

#define PK_VKEYS_DEFAULT_LIMIT 8 /* hardware keys the pool may take; the rest stay free */

int pk_secretmem_probe(void);
int pk_secretmem_map(uintptr_t addr, size_t len, int populate);
int pk_secretmem_create(size_t len);
/* pk_secretmem_map_fd's `populate` for a file that another process made:
 * nothing is written, and every page must exist already. */
#define PK_POPULATE_EXISTING 2
int pk_secretmem_map_fd(uintptr_t addr, size_t len, int fd, int populate);
int64_t pk_secretmem_file_size(int fd);
int pk_mseal_available(void);
int pk_mseal(uintptr_t addr, size_t len);
int pk_mlock_onfault(uintptr_t addr, size_t len);
size_t pk_wipe_touched(uintptr_t addr, size_t len);
uint32_t pk_fork_generation(void);

struct pk_vbuf;
struct pk_vbuf *pk_vbuf_new(uintptr_t inner, size_t inner_length, int pkey, uint32_t identity,
                            int inherit);
void pk_vbuf_detach(struct pk_vbuf *b);
void pk_vbuf_destroy(struct pk_vbuf *b);
int64_t pk_vbuf_enter(struct pk_vbuf *b, int kind, uint64_t pins);
int pk_vbuf_exit(struct pk_vbuf *b, int kind, int64_t token, uint64_t pins);
/* One operation with access open only for its duration.  `op` carries it
 * across a retry: when the software backend needs foreign owners pinned
 * to end the grant (PK_E_NEED_PINS after the work was done), calling again
 * with the same `op` and pins only ends it.  `result` is the operation's
 * answer once the call returns PK_OK. */
struct pk_vbuf_op {
    int64_t token;    /* the grant, while the work is done and its end is due; else -1 */
    int64_t result;   /* bytes read, pages wiped, 1/0 for equal */
    int error;        /* errno of a failed read, reported once the grant has ended */
};
int pk_vbuf_copy(struct pk_vbuf *b, uintptr_t dst, uintptr_t src, size_t len, int kind,
                 int internal, struct pk_vbuf_op *op, uint64_t pins);
int pk_vbuf_equal(struct pk_vbuf *b, uintptr_t addr, const unsigned char *expected, size_t len,
                  struct pk_vbuf_op *op, uint64_t pins);
int pk_vbuf_wipe(struct pk_vbuf *b, uintptr_t addr, size_t len, int touched_only,
                 struct pk_vbuf_op *op, uint64_t pins);
int pk_vbuf_read(struct pk_vbuf *b, int fd, uintptr_t dst, size_t len, int stop_at_newline,
                 struct pk_vbuf_op *op, uint64_t pins);
int pk_vbuf_close(struct pk_vbuf *b);
void pk_vbuf_reopen(struct pk_vbuf *b);
int pk_vbuf_users(const struct pk_vbuf *b);
int pk_vbuf_pkey(const struct pk_vbuf *b);
int pk_vbuf_forked(const struct pk_vbuf *b);
/* Revoke the key the buffer holds now in every thread (every grant on it
 * ends; PK_OK at once when it holds none).  pk_vbuf_end_elsewhere ends a
 * use whose grant belongs to another thread (a generator closed there):
 * by that revocation, then the use is released. */
int pk_vbuf_revoke(struct pk_vbuf *b, double timeout, struct pk_broadcast *result,
                   uint64_t pins);
int pk_vbuf_end_elsewhere(struct pk_vbuf *b, double timeout, struct pk_broadcast *result);

struct pk_vkeys_stats {
    int limit;              /* the most keys the pool may take */
    int keys;               /* keys it holds now */
    int held;               /* of those, keys a buffer holds */
    uint32_t mask;          /* bit k: key k is the pool's */
    uint64_t assignments;   /* cold opens: a buffer took a key */
    uint64_t evictions;     /* of those, ones that took it from another buffer */
};
int pk_vkeys_limit(int limit);
int pk_vkeys_release_idle(void);
int pk_vkeys_free_unheld(void);
void pk_vkeys_stats(struct pk_vkeys_stats *out);
