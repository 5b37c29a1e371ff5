/*
 * The memory under a protected buffer: memfd_secret pages placed inside a
 * guarded reservation, mseal, locking on fault, wiping only the pages that
 * were ever touched, and noticing fork().
 *
 * Why memfd_secret: a protection key stops the process's own threads, but
 * the kernel's "remote" accesses (/proc/PID/mem, process_vm_readv) ignore
 * PKRU.  memfd_secret pages are removed from the kernel's direct map, so
 * those paths cannot reach them (EIO / EFAULT).  The pages are MAP_SHARED
 * only, locked (they count against RLIMIT_MEMLOCK), left out of core dumps,
 * and zeroed by the kernel when they are freed.
 *
 * Only x86-64 is wired up (syscall numbers below); elsewhere, and in the
 * non-x86 test build, everything here reports ENOSYS.
 */
#include "pkeys_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) && !defined(PK_ASSUME_NON_X86)
#define NR_MEMFD_SECRET 447L /* Linux 5.14, CONFIG_SECRETMEM */
#define NR_MSEAL 462L        /* Linux 6.10, 64-bit only */
#define NR_CLOCK_GETTIME 228L
#else
#define NR_MEMFD_SECRET -1L
#define NR_MSEAL -1L
#define NR_CLOCK_GETTIME -1L
#endif
#define SECRETMEM_MAGIC 0x5345434dUL /* include/uapi/linux/magic.h */
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif
#ifndef SYS_mlock2
#if defined(__x86_64__)
#define SYS_mlock2 325
#endif
#endif

static long raw_syscall3(long number, long a, long b, long c)
{
    if (number < 0) {
        errno = ENOSYS;
        return -1;
    }
    return syscall(number, a, b, c);
}

static size_t page_size(void)
{
    static size_t size;
    if (!size)
        size = (size_t)sysconf(_SC_PAGESIZE);
    return size;
}

/* ---- memfd_secret ------------------------------------------------------ */

int pk_secretmem_probe(void)
{
    /* The syscall itself answers ENOSYS without CONFIG_SECRETMEM, with
     * secretmem.enable=0, and on kernels before 5.14: Python tells those
     * apart (pkeys._secretmem.availability). */
    long fd = raw_syscall3(NR_MEMFD_SECRET, O_CLOEXEC, 0, 0);
    if (fd < 0)
        return -errno;
    close((int)fd);
    return 0;
}

/*
 * Fault in every page of a fresh secret mapping, or fail with -errno.
 * MADV_POPULATE_WRITE goes through get_user_pages, which refuses secret
 * memory: EINVAL on 6.1, 6.12 and 6.18, for every mapping.
 * A system call that writes to the page faults it in through the ordinary
 * fault path instead, and a page the lock limit refuses makes it fail with
 * EFAULT (the kernel-mode fault is fixed up; no SIGBUS is sent).
 * clock_gettime needs no descriptor and changes nothing; the 16 bytes it
 * wrote are zeroed again, as the kernel handed the page out.
 */
static int populate_by_kernel_write(uintptr_t addr, size_t len)
{
    size_t offset;
    for (offset = 0; offset < len; offset += page_size()) {
        if (raw_syscall3(NR_CLOCK_GETTIME, CLOCK_MONOTONIC, (long)(addr + offset), 0) != 0)
            return -errno;
        memset((void *)(addr + offset), 0, sizeof(struct timespec));
    }
    return 0;
}

/*
 * A fresh memfd_secret file of `len` bytes: its descriptor (O_CLOEXEC), or
 * -errno.  Nothing is mapped yet.
 */
int pk_secretmem_create(size_t len)
{
    long fd;
    int err;
    if (!len || len % page_size())
        return -EINVAL;
    fd = raw_syscall3(NR_MEMFD_SECRET, O_CLOEXEC, 0, 0);
    if (fd < 0)
        return -errno;
    if (ftruncate((int)fd, (off_t)len) != 0) {
        err = errno;
        close((int)fd);
        return -err;
    }
    return (int)fd;
}

/* 0 if every page of a fresh file mapping is in the file already (mincore
 * reports the file's page cache where this process has no page table entry
 * yet), else ENODATA, or mincore's errno.  Unsafe assumption, written down:
 * mincore tells the truth only to the file's owner or a process that may
 * write it; to any other (a worker running as another user than the
 * process that made the file) it reports every page present, and the check
 * passes. */
static int every_page_exists(uintptr_t addr, size_t len)
{
    unsigned char residency[256];
    size_t offset, i;
    for (offset = 0; offset < len; offset += sizeof residency * page_size()) {
        size_t pages = (len - offset) / page_size();
        if (pages > sizeof residency)
            pages = sizeof residency;
        if (mincore((void *)(addr + offset), pages * page_size(), residency) != 0)
            return errno;
        for (i = 0; i < pages; i++)
            if (!(residency[i] & 1))
                return ENODATA;
    }
    return 0;
}

/*
 * Replace [addr, addr + len) of a reservation the caller owns with the pages
 * of the secret file `fd` (from offset 0).  The reservation (with its guard
 * pages) comes first so that the secret pages are placed exactly, between
 * guards; MAP_FIXED then swaps the middle.  The caller keeps `fd`: the
 * mapping holds the file alive by itself.
 *
 * With `populate` (only for a fresh file: it writes to every page), every
 * page is populated before this returns (populate_by_kernel_write), so a
 * buffer that got secret memory can never SIGBUS later; without it nothing
 * is committed up front.  With PK_POPULATE_EXISTING (a file that another
 * process made, whose pages must not be written) every page must already
 * exist, or the mapping is refused with ENODATA: 6.1 and 6.12
 * map secret memory whatever RLIMIT_MEMLOCK says, and a page that the
 * first touch here would have to allocate can kill this process with
 * SIGBUS.  A pkeys sender populates every page at creation; a file that
 * someone sized and never wrote is refused.  Secret pages, once there,
 * cannot go (no truncation, no reclaim), so the check cannot go stale.
 *
 * On failure (-errno) the range is anonymous read/write memory again, as it
 * was: an mmap that fails after removing the old pages (EAGAIN when the
 * lock limit refuses, on older kernels) would otherwise leave a hole inside
 * a Python mmap object.
 */
int pk_secretmem_map_fd(uintptr_t addr, size_t len, int fd, int populate)
{
    void *got;
    int err;
    if (!len || addr % page_size() || len % page_size() || fd < 0)
        return -EINVAL;
    got = mmap((void *)addr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    err = errno;
    if (got != MAP_FAILED) {
        /* Some kernels (6.1, 6.12) map secret memory whatever RLIMIT_MEMLOCK
         * says, and refuse a page only at its first touch, with SIGBUS; a
         * check of the limit beforehand races with other threads and
         * processes.  Populating every page now turns that refusal into an
         * error (EFAULT where the touch would SIGBUS): the caller then falls
         * back or raises, and no later touch can fault. */
        if (populate == PK_POPULATE_EXISTING)
            err = every_page_exists(addr, len);
        else if (populate)
            err = -populate_by_kernel_write(addr, len);
        else
            err = 0;
        if (!err)
            return 0;
    }
    mmap((void *)addr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
         0);
    return -err;
}

/*
 * A fresh secret file mapped over [addr, addr + len) (pk_secretmem_map_fd),
 * its descriptor closed at once: the mapping keeps the file alive, and no
 * descriptor is left for a child to inherit.
 */
int pk_secretmem_map(uintptr_t addr, size_t len, int populate)
{
    int fd, status;
    if (!len || addr % page_size() || len % page_size())
        return -EINVAL;
    fd = pk_secretmem_create(len);
    if (fd < 0)
        return fd;
    status = pk_secretmem_map_fd(addr, len, fd, populate);
    close(fd);
    return status;
}

/*
 * The size of `fd` if it is a memfd_secret file, -EBADF if it is no open
 * descriptor, -EINVAL if it is any other file (whose pages the kernel's
 * remote reads could reach: never mapped as a secret).
 */
int64_t pk_secretmem_file_size(int fd)
{
    struct statfs fs;
    struct stat st;
    if (fstatfs(fd, &fs) != 0 || fstat(fd, &st) != 0)
        return -errno;
    if ((unsigned long)fs.f_type != SECRETMEM_MAGIC || !S_ISREG(st.st_mode))
        return -EINVAL;
    return (int64_t)st.st_size;
}

/* ---- reading into secret memory ----------------------------------------- */

/*
 * read(2) into [dst, dst + len) of a buffer whose access the caller has
 * open.  Secret pages cannot be pinned, and read paths that pin the
 * destination (get_user_pages) fail on them with EFAULT: 9p (what `pkeys
 * vm` shares host directories over; on 6.1 for reads of about 2,000 bytes
 * and more, on 6.12 for every size), O_DIRECT, some FUSE file systems.
 * Then one page at a time goes through a bounce page instead: private to
 * this call, locked (best effort), out of core dumps and forked children,
 * wiped and unmapped before returning.  Nothing reaches Python.  Returns
 * what read(2) returns.
 */
ssize_t pk_read_unpinned(int fd, void *dst, size_t len)
{
    ssize_t got = read(fd, dst, len);
    void *bounce;
    int err;
    if (got >= 0 || errno != EFAULT)
        return got;
    bounce = mmap(NULL, page_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (bounce == MAP_FAILED)
        return -1;
    (void)mlock(bounce, page_size());
    (void)madvise(bounce, page_size(), MADV_DONTDUMP);
    (void)madvise(bounce, page_size(), MADV_DONTFORK);
    do
        got = read(fd, bounce, len < page_size() ? len : page_size());
    while (got < 0 && errno == EINTR);
    err = errno;
    if (got > 0)
        memcpy(dst, bounce, (size_t)got);
    pk_wipe((uintptr_t)bounce, page_size());
    munmap(bounce, page_size());
    errno = err;
    return got;
}

/* ---- mseal ------------------------------------------------------------- */

int pk_mseal_available(void)
{
    /* A zero-length seal succeeds wherever the syscall exists. */
    return raw_syscall3(NR_MSEAL, 0, 0, 0) == 0;
}

int pk_mseal(uintptr_t addr, size_t len)
{
    return raw_syscall3(NR_MSEAL, (long)addr, (long)len, 0) == 0 ? 0 : -errno;
}

/* ---- locking ----------------------------------------------------------- */

/*
 * Lock pages as they are first touched (mlock2 MLOCK_ONFAULT, Linux 4.4):
 * a page that was never written holds nothing to swap out, and locking it
 * up front would commit the whole buffer (1 GiB for a 1 GiB buffer) before
 * it is used.  Kernels without mlock2 get a plain mlock.
 */
int pk_mlock_onfault(uintptr_t addr, size_t len)
{
#ifdef SYS_mlock2
    if (syscall(SYS_mlock2, addr, len, MLOCK_ONFAULT) == 0)
        return 0;
    if (errno != ENOSYS && errno != EINVAL)
        return -1;
#endif
    return mlock((const void *)addr, len);
}

/* ---- wiping ------------------------------------------------------------ */

/*
 * Zero the pages of [addr, addr + len) that hold data, and only those, so
 * that closing a large untouched buffer does not commit it.  mincore()
 * tells which pages are resident.  A page that is not resident was either
 * never touched (it reads as zeros) or, in an unlocked buffer, swapped
 * out: writing zeros to it would only fault it back in, and could not
 * reach the copy on the swap device.  If mincore fails every page is
 * wiped.  Returns how many pages were wiped.  The caller has access open.
 */
size_t pk_wipe_touched(uintptr_t addr, size_t len)
{
    unsigned char residency[1024];
    uintptr_t start = addr & ~(uintptr_t)(page_size() - 1);
    uintptr_t end = addr + len;
    size_t wiped = 0;
    while (start < end) {
        size_t pages = (end - start + page_size() - 1) / page_size();
        size_t i;
        if (pages > sizeof residency)
            pages = sizeof residency;
        if (mincore((void *)start, pages * page_size(), residency) != 0)
            memset(residency, 1, pages);
        for (i = 0; i < pages; i++) {
            uintptr_t page = start + i * page_size();
            uintptr_t from = page < addr ? addr : page;
            uintptr_t to = page + page_size() > end ? end : page + page_size();
            if (!(residency[i] & 1))
                continue;
            pk_wipe(from, to - from);
            wiped++;
        }
        start += pages * page_size();
    }
    return wiped;
}

/* ---- fork -------------------------------------------------------------- */

/* Bumped in every forked child, so that a buffer made before the fork can
 * tell (one load) that it is now in a child: secretmem pages were not
 * inherited there (MADV_DONTFORK), and WIPEONFORK zeroed anonymous ones,
 * canary included. */
static uint32_t fork_generation;

/* From state.c's fork hook, in the child. */
void pk_secretmem_forked_child(void) { __atomic_add_fetch(&fork_generation, 1, __ATOMIC_SEQ_CST); }

uint32_t pk_fork_generation(void)
{
    pk_fork_hooks_install();
    return __atomic_load_n(&fork_generation, __ATOMIC_SEQ_CST);
}
