/*
 * Shared by the shim's C files; never seen by cffi.
 */
#ifndef PKEYS_INTERNAL_H
#define PKEYS_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "pkeys_api.h"
#include "pkeys_testing.h"

/* PK_ASSUME_NON_X86 builds the non-x86 variant on x86, so that the tests
 * can compile and run the path other architectures take. */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(PK_ASSUME_NON_X86)
#define PK_X86 1
#else
#define PK_X86 0
#endif

/* Set once by a constructor in cpu.c, before Python can call anything, and
 * never written again: OSPKE cannot change while the process runs. */
extern int pk_ospke_enabled;

/* PK_SIMULATED_PKU: the simulated-register build (_build_ffi.py defines it
 * when PKEYS_BUILD_SIMULATED_PKU=1).  Never the default, never in a wheel. */
#ifndef PK_SIMULATED_PKU
#define PK_SIMULATED_PKU 0
#endif

/* The PKRU instructions' machine code runs only on real PKU: x86, and not
 * the simulated build.  Code that reads CPUID's XSAVE layout for PKRU or
 * emits the instructions itself is limited to this. */
#define PK_REAL_PKRU (PK_X86 && !PK_SIMULATED_PKU)

/*
 * The PKRU instructions, for callers that have already checked
 * pk_ospke_enabled.  Without OSPKE both raise #UD (SIGILL).
 *
 * RDPKRU is 0f 01 ee: ECX must be 0; PKRU lands in EAX, EDX is zeroed.
 * WRPKRU is 0f 01 ef: EAX is the new value, ECX and EDX must be 0.
 *
 * The "memory" clobber on the write is what makes it a compiler barrier:
 * without it, loads and stores of protected memory could be moved across
 * the instruction that opens or closes access to them.  The CPU itself
 * does not execute WRPKRU speculatively, so no fence is needed.
 */
/* Initial-exec TLS: a fixed offset from the thread pointer, no call.  For
 * what a signal handler reads (a general-dynamic access there could
 * allocate in a thread that never touched the variable before) and for
 * the few bytes the hot paths touch on every scope. */
#define PK_TLS __thread __attribute__((tls_model("initial-exec")))

#if PK_SIMULATED_PKU
/* The simulated register: one per thread, initial-exec TLS so that a
 * signal handler can touch it (the revocation handler edits it, in the
 * thread it interrupted, where real PKU edits the signal frame).  Each
 * thread starts at the kernel's init value, 0x55555554, like a new
 * process; it does not copy its creator's register as real threads do,
 * because the shim never sees a thread being created (CPython starts its
 * threads from libpython, which a dlopened module cannot interpose).
 * Both accessors are compiler barriers, like the instructions. */
extern PK_TLS volatile uint32_t pk_simulated_pkru;

static inline uint32_t pk_rdpkru_unchecked(void)
{
    __asm__ volatile("" : : : "memory");
    return pk_simulated_pkru;
}

static inline void pk_wrpkru_unchecked(uint32_t value)
{
    __asm__ volatile("" : : : "memory");
    pk_simulated_pkru = value;
    __asm__ volatile("" : : : "memory");
}
#elif PK_X86
static inline uint32_t pk_rdpkru_unchecked(void)
{
    uint32_t eax, edx;
    __asm__ volatile(".byte 0x0f, 0x01, 0xee" : "=a"(eax), "=d"(edx) : "c"(0));
    (void)edx;
    return eax;
}

static inline void pk_wrpkru_unchecked(uint32_t value)
{
    __asm__ volatile(".byte 0x0f, 0x01, 0xef" : : "a"(value), "c"(0), "d"(0) : "memory");
}
#else
/* Unreachable: pk_ospke_enabled is always 0 off x86. */
static inline uint32_t pk_rdpkru_unchecked(void) { return 0; }
static inline void pk_wrpkru_unchecked(uint32_t value) { (void)value; }
#endif

/* Two bits per key: bit 2k is access-disable, bit 2k+1 write-disable. */
#define PK_NKEYS 16
#define PK_KEY_SHIFT(k) (2u * (unsigned)(k))
#define PK_KEY_MASK(k) (3u << PK_KEY_SHIFT(k))
#define PK_AD 1u  /* access-disable */
#define PK_WD 2u  /* write-disable */

/* TEST ONLY (test_steps.c): a boundary between two steps of a path that
 * reads and writes PKRU, where a test may deliver a revocation.  Unarmed:
 * one relaxed load and a branch not taken. */
extern int pk_test_steps_armed;
void pk_test_step(void);
#define PK_STEP()                                                                    \
    do {                                                                             \
        if (__builtin_expect(__atomic_load_n(&pk_test_steps_armed, __ATOMIC_RELAXED), 0)) \
            pk_test_step();                                                          \
    } while (0)

/* state.c's mutex (see there), and its one fork hook, which also holds
 * the virtual-key pool's lock across fork() and tells secretmem.c about a
 * child. */
void pk_state_lock(void);
void pk_state_unlock(void);
void pk_fork_hooks_install(void);
void pk_vkeys_pool_lock(void);
void pk_vkeys_pool_unlock(void);
void pk_secretmem_forked_child(void);

/* regions.c, for the software backend; called with the state lock held. */
/* Software backend: make the regions of the keys whose bits differ between
 * the two emulated registers match `new_pkru`.  On failure everything is
 * put back as `old_pkru` had it and -errno is returned. */
int pk_regions_apply(uint32_t old_pkru, uint32_t new_pkru);
/* Whether a software change of `keys` must wait for foreign owners to be
 * pinned: some region of theirs has a Python owner and `pins` is stale. */
int pk_regions_need_pins(uint32_t keys, uint64_t pins);
int pk_regions_count(int pkey);

/* Revocations: state.c stamps them, revoke.c delivers them. */
extern uint32_t pk_revocation_epoch;
extern uint32_t pk_revoked_at[PK_NKEYS];
extern uint32_t pk_revoked_bits[PK_NKEYS];
/* Signal every other thread to give `keys` the rights in `bits` (PKRU's
 * layout), and wait until each has.  State mutex held. */
int pk_broadcast(uint32_t keys, uint32_t bits, double timeout, struct pk_broadcast *result);
/* Around a read-modify-write of this thread's PKRU: mark before the read;
 * after the write, if a revocation's handler ran in between (moved), write
 * again with what it applied (catch_up). */
uint32_t pk_revocations_mark(void);
int pk_revocations_moved(uint32_t mark);
uint32_t pk_revocations_catch_up(uint32_t pkru);
/* Apply a change for every thread to this thread's register now, as its
 * handler would (exposure.c, for a thread a broadcast left out that opens
 * a key meanwhile); the caller's catch-up applies it again. */
void pk_revocations_apply_here(uint32_t keys, uint32_t pkru_bits);
/* In a handler: the PKRU saved in its signal frame's XSAVE area, or NULL
 * where the frame has none (revoke.c holds the one lookup of its offset). */
uint32_t *pk_frame_pkru(void *ucontext);

/* exposure.c: which keys each thread may ever have had open, so that a
 * revocation need not stall on a thread that provably never had the key.
 * Every path that may open keys in this thread's register calls
 * pk_exposure_note() with them first, before it reads the state it acts
 * on: one thread-local test, and a call once per thread and key. */
extern PK_TLS uint32_t pk_exposure_published;
void pk_exposure_publish(uint32_t keys);
static inline void pk_exposure_note(uint32_t keys)
{
    if (__builtin_expect((keys & ~pk_exposure_published & ((1u << PK_NKEYS) - 2u)) != 0, 0))
        pk_exposure_publish(keys);
}
/* The keys a register value allows some access to. */
static inline uint32_t pk_keys_opened_by(uint32_t pkru)
{
    uint32_t keys = 0;
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if (!((pkru >> PK_KEY_SHIFT(k)) & PK_AD))
            keys |= 1u << k;
    return keys;
}
void pk_exposure_init(void);
void pk_exposure_forked_child(void);
/* Allocation (state mutex held): the clock before pkey_alloc, then the key. */
uint64_t pk_exposure_clock(void);
void pk_exposure_allocated(int pkey, uint64_t began_ns);
/* A change for every thread gives access to the key: none is exempt now. */
void pk_exposure_opened_for_all(int pkey);
/* The broadcaster (state mutex held): the keys of a change to `bits`
 * (PKRU's layout) that a thread can be exempt from (all of them, or 0);
 * the gate around deciding and waiting; whether `tid` denies `keys`
 * provably; records of threads that are gone, freed. */
uint32_t pk_exposure_exemptable(uint32_t keys, uint32_t bits);
void pk_exposure_gate_open(uint32_t keys, uint32_t bits);
void pk_exposure_gate_close(void);
int pk_exposure_thread_denies(pid_t tid, uint32_t keys);
void pk_exposure_sweep(pid_t pid);

/* The calling thread's id (gettid(2); async-signal-safe). */
pid_t pk_current_tid(void);

/* A small /proc file, NUL-terminated: its length, or -1 (revoke.c). */
ssize_t pk_read_text_file(const char *path, char *text, size_t size);

/* read(2) into a protected buffer, through a wiped bounce page where the
 * file system cannot pin secret memory (secretmem.c). */
ssize_t pk_read_unpinned(int fd, void *dst, size_t len);

#endif
