/*
 * C-level loops for `pkeys bench`: what an instruction, a syscall and the
 * mm lock cost with no Python in the way.
 *
 * Each loop is timed twice: CLOCK_MONOTONIC for nanoseconds and the TSC
 * for cycles (the TSC ticks at a constant reference rate, so "cycles" are
 * reference cycles, not core cycles under turbo).  Loops that need PKU
 * refuse without OSPKE, like everything else in the shim.
 */
#include "pkeys_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if PK_X86
#include <x86intrin.h>
#define PK_TSC() __rdtsc()
#else
#define PK_TSC() 0ULL
#endif

void pk_noop(void) {}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

struct stopwatch {
    uint64_t ns, tsc;
};

static inline void start(struct stopwatch *w)
{
    w->ns = now_ns();
    w->tsc = PK_TSC();
}

static inline void stop(const struct stopwatch *w, uint64_t n, struct pk_bench *out)
{
    out->cycles = PK_TSC() - w->tsc;
    out->nanoseconds = now_ns() - w->ns;
    out->iterations = n;
}

int pk_bench_rdpkru(uint64_t n, struct pk_bench *out)
{
    struct stopwatch w;
    uint32_t sink = 0;
    uint64_t i;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    start(&w);
    for (i = 0; i < n; i++)
        sink += pk_rdpkru_unchecked();
    stop(&w, n, out);
    __asm__ volatile("" : : "r"(sink));
    return PK_OK;
}

/* `alternate` flips the key's access-disable bit every iteration, so each
 * WRPKRU really changes the register; otherwise it rewrites the same value. */
int pk_bench_wrpkru(uint64_t n, int alternate, int pkey, struct pk_bench *out)
{
    struct stopwatch w;
    uint32_t base, flip;
    uint64_t i;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    if (pkey < 1 || pkey >= PK_NKEYS)
        return PK_E_KEY_RANGE;
    base = pk_rdpkru_unchecked();
    flip = alternate ? (1u << PK_KEY_SHIFT(pkey)) : 0;
    start(&w);
    for (i = 0; i < n; i++)
        pk_wrpkru_unchecked(base ^ ((i & 1) ? flip : 0));
    stop(&w, n, out);
    pk_wrpkru_unchecked(base);
    return PK_OK;
}

int pk_bench_glibc_pkey_set(uint64_t n, int pkey, struct pk_bench *out)
{
    struct stopwatch w;
    uint64_t i;
    int original;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    original = pk_glibc_pkey_get(pkey);
    if (original < 0)
        return PK_E_ERRNO;
    start(&w);
    for (i = 0; i < n; i++)
        pk_glibc_pkey_set(pkey, (unsigned int)(i & 1));
    stop(&w, n, out);
    pk_glibc_pkey_set(pkey, (unsigned int)original);
    return PK_OK;
}

int pk_bench_null_syscall(uint64_t n, struct pk_bench *out)
{
    struct stopwatch w;
    uint64_t i;
    start(&w);
    for (i = 0; i < n; i++)
        syscall(SYS_getppid);
    stop(&w, n, out);
    return PK_OK;
}

/* Threads that exist and sleep: their CPUs may still hold the mm's TLB
 * entries, which is what makes mprotect send shootdown IPIs. */
struct idle_threads {
    pthread_t threads[64];
    int count;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int done;
};

static void *idle_main(void *arg)
{
    struct idle_threads *idle = arg;
    pthread_mutex_lock(&idle->lock);
    while (!idle->done)
        pthread_cond_wait(&idle->wake, &idle->lock);
    pthread_mutex_unlock(&idle->lock);
    return NULL;
}

static int idle_start(struct idle_threads *idle, int count)
{
    memset(idle, 0, sizeof *idle);
    pthread_mutex_init(&idle->lock, NULL);
    pthread_cond_init(&idle->wake, NULL);
    for (idle->count = 0; idle->count < count && idle->count < 64; idle->count++)
        if (pthread_create(&idle->threads[idle->count], NULL, idle_main, idle) != 0)
            return -1;
    return 0;
}

static void idle_stop(struct idle_threads *idle)
{
    int i;
    pthread_mutex_lock(&idle->lock);
    idle->done = 1;
    pthread_cond_broadcast(&idle->wake);
    pthread_mutex_unlock(&idle->lock);
    for (i = 0; i < idle->count; i++)
        pthread_join(idle->threads[i], NULL);
    pthread_cond_destroy(&idle->wake);
    pthread_mutex_destroy(&idle->lock);
}

/* Toggle the range between read/write and read-only; pkey >= 0 uses
 * pkey_mprotect with that key, pkey < 0 plain mprotect. */
int pk_bench_mprotect(uint64_t n, uintptr_t addr, size_t len, int pkey, int idle_threads,
                      struct pk_bench *out)
{
    struct stopwatch w;
    struct idle_threads idle;
    uint64_t i;
    int status = PK_OK;
    if (idle_start(&idle, idle_threads) != 0) {
        idle_stop(&idle);
        return PK_E_ERRNO;
    }
    start(&w);
    for (i = 0; i < n; i++) {
        int prot = (i & 1) ? PROT_READ : PROT_READ | PROT_WRITE;
        int rc = pkey >= 0 ? pk_sys_pkey_mprotect(addr, len, prot, pkey)
                           : mprotect((void *)addr, len, prot);
        if (rc != 0) {
            status = PK_E_ERRNO;
            break;
        }
    }
    stop(&w, i, out);
    idle_stop(&idle);
    if (status == PK_OK)
        mprotect((void *)addr, len, PROT_READ | PROT_WRITE);
    return status;
}

/* Revoke (and restore) a key in every thread while `idle_threads` other
 * threads exist: the latency of Key.revoke() against the re-tagging with
 * pkey_mprotect that users would otherwise reach for. */
int pk_bench_revoke(uint64_t n, int pkey, int idle_threads, struct pk_bench *out)
{
    struct stopwatch w;
    struct idle_threads idle;
    uint64_t i;
    int status = PK_OK;
    if (!pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    if (idle_start(&idle, idle_threads) != 0) {
        idle_stop(&idle);
        return PK_E_ERRNO;
    }
    start(&w);
    for (i = 0; i < n && status == PK_OK; i++)
        status = pk_key_set_all(pkey, 0, (i & 1) ? 0 : (int)PK_AD, 5.0, NULL, 0);
    stop(&w, i, out);
    idle_stop(&idle);
    if (status == PK_OK)
        status = pk_key_set_all(pkey, 0, 0, 5.0, NULL, 0);
    return status;
}

/* ---- contention: page faults vs. access flips ----------------------- */

#define FAULT_PAGES 64

struct contention {
    atomic_int stop;
    atomic_uint_fast64_t faults;
    atomic_uint_fast64_t flips;
    int flip_mode, pkey;
    uint32_t flips_per_second;
    uintptr_t region;
    size_t page;
};

static void *fault_worker(void *arg)
{
    struct contention *c = arg;
    uint64_t local = 0;
    size_t length = FAULT_PAGES * c->page;
    while (!atomic_load_explicit(&c->stop, memory_order_relaxed)) {
        char *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        size_t off;
        if (p == MAP_FAILED)
            break;
        for (off = 0; off < length; off += c->page)
            ((volatile char *)p)[off] = 1; /* one page fault each */
        munmap(p, length);
        local += FAULT_PAGES;
    }
    atomic_fetch_add(&c->faults, local);
    return NULL;
}

static void *flipper(void *arg)
{
    struct contention *c = arg;
    uint64_t period_ns = c->flips_per_second ? 1000000000ULL / c->flips_per_second : 0;
    uint64_t next = now_ns(), count = 0;
    uint32_t base = c->flip_mode == PK_FLIP_WRPKRU ? pk_rdpkru_unchecked() : 0;
    while (!atomic_load_explicit(&c->stop, memory_order_relaxed)) {
        if (c->flip_mode == PK_FLIP_PKEY_MPROTECT) {
            /* Takes the mm lock for write, like every protection change. */
            pk_sys_pkey_mprotect(c->region, c->page, (count & 1) ? PROT_NONE : PROT_READ | PROT_WRITE,
                                 c->pkey);
        } else if (c->flip_mode == PK_FLIP_REVOKE) {
            /* No mm lock: a signal to every thread, the workers included. */
            pk_key_set_all(c->pkey, 0, (count & 1) ? 0 : (int)PK_AD, 5.0, NULL, 0);
        } else {
            /* This thread's register only: no lock, no other CPU involved. */
            pk_wrpkru_unchecked(base ^ ((count & 1) ? (1u << PK_KEY_SHIFT(c->pkey)) : 0));
        }
        count++;
        if (period_ns) {
            struct timespec ts;
            next += period_ns;
            ts.tv_sec = (time_t)(next / 1000000000ULL);
            ts.tv_nsec = (long)(next % 1000000000ULL);
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        }
    }
    if (c->flip_mode == PK_FLIP_WRPKRU)
        pk_wrpkru_unchecked(base);
    atomic_store(&c->flips, count);
    return NULL;
}

int pk_bench_contention(int workers, int flip_mode, int pkey, uint32_t flips_per_second,
                        double seconds, struct pk_contention *out)
{
    struct contention c;
    pthread_t threads[64], flip_thread;
    int started = 0, flipping = 0, i;
    uint64_t began;
    struct timespec duration;
    if (workers < 1 || workers > 64 || seconds <= 0)
        return PK_E_RIGHTS;
    if ((flip_mode == PK_FLIP_WRPKRU || flip_mode == PK_FLIP_REVOKE) && !pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    memset(&c, 0, sizeof c);
    c.flip_mode = flip_mode;
    c.pkey = pkey;
    c.flips_per_second = flips_per_second;
    c.page = (size_t)sysconf(_SC_PAGESIZE);
    c.region = (uintptr_t)mmap(NULL, c.page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if ((void *)c.region == MAP_FAILED)
        return PK_E_ERRNO;
    began = now_ns();
    for (i = 0; i < workers; i++)
        if (pthread_create(&threads[started], NULL, fault_worker, &c) == 0)
            started++;
    if (flip_mode != PK_FLIP_NONE && pthread_create(&flip_thread, NULL, flipper, &c) == 0)
        flipping = 1;
    duration.tv_sec = (time_t)seconds;
    duration.tv_nsec = (long)((seconds - (double)duration.tv_sec) * 1e9);
    nanosleep(&duration, NULL);
    atomic_store(&c.stop, 1);
    for (i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    if (flipping)
        pthread_join(flip_thread, NULL);
    out->seconds = (double)(now_ns() - began) / 1e9;
    out->faults = atomic_load(&c.faults);
    out->flips = atomic_load(&c.flips);
    munmap((void *)c.region, c.page);
    return started == workers ? PK_OK : PK_E_ERRNO;
}
