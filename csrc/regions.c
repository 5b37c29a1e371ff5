/*
 * Which memory each key guards: the region table, under state.c's mutex.
 *
 * It serves two rules:
 *  - a key that still guards tracked memory cannot be freed;
 *  - the software backend re-applies mprotect to a key's regions when its
 *    rights change, and must never touch memory other than what was tagged.
 *
 * Who keeps a region's memory mapped, by owner:
 *  - PK_OWNER_CALLER, an int address: the caller's promise.
 *  - PK_OWNER_PACKAGE, a protected buffer: the buffer forgets its region
 *    (pk_region_forget) before it unmaps, and cannot close while in use.
 *    A buffer collected while a view of it escaped is unmapped by the last
 *    view, and forgotten just after.
 *  - Either way, a region found wholly unmapped is forgotten, and a partly
 *    unmapped one fails the change.
 *  - Any other value names a foreign Python buffer.  Its exporting object
 *    can be closed or collected at any moment, and that cannot be checked
 *    from C without Python.  So a software rights change that would touch
 *    such a region returns PK_E_NEED_PINS and records the keys it was
 *    changing; the caller pins the owners of those keys' regions only (a
 *    buffer export, which stops close() and collection): pkeys._scope in C
 *    when they are all alive and in place (scope_type.c, pin_in_c), else
 *    pkeys/_state.py's prepare_pins, which also drops the dead ones; then
 *    it calls again with a nonce naming the exports it pinned
 *    (pk_pins_vouch).  The call checks
 *    that each foreign region it touches lies inside its owner's pinned
 *    export, so neither a region added since nor a moved owner can slip
 *    through, and tagged memory of other keys costs nothing.
 *
 * Locking: one rule.  Every function here that reads or writes the table
 * either takes state.c's mutex itself (the pk_region_* and pk_owner_*
 * entry points) or is called by a backend with it held (pk_regions_*).
 * Nothing here calls back into state.c or a backend while holding it,
 * except pk_region_tag -> pk_backend->tag, which runs under the same
 * mutex and does not lock again.
 */
#include "backend.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct region {
    uintptr_t start;
    uintptr_t end;
    int prot;
    int pkey;
    uint64_t owner;
    /* The owner moved or shrank its memory (mmap.resize): where the pages
     * went is unknown, so they are never re-protected, but the region
     * still counts, and the key cannot be freed, until the owner goes. */
    int lost;
};

static struct region *table;
static size_t used, capacity;
/* key_at[i] is table[i].pkey (KEY_NONE once it is -1): what a change's
 * scans read to find its keys' regions.  Why a second array: a change
 * makes a syscall, which leaves little of the table in the L1 cache, and
 * scanning 40-byte entries then cost a cache line per one or two regions
 * (issue 16: a change must not cost more with other keys' memory tagged);
 * one byte per region puts 64 in a line.  Written wherever table[i] is
 * (put, remove_at, pk_regions_apply's forgetting). */
static uint8_t *key_at;
#define KEY_NONE 31u  /* a shift no key mask has a bit for */

/* This thread's pins: the keys its last PK_E_NEED_PINS was for, and the
 * exports it vouched for since (nonce 0 never matches). */
static __thread uint32_t pins_wanted;
static __thread const struct pk_pin *vouched;
static __thread int vouched_count;
static __thread uint64_t vouched_nonce;
static uint64_t last_nonce;

static size_t page_size(void)
{
    static size_t size;
    if (!size)
        size = (size_t)sysconf(_SC_PAGESIZE);
    return size;
}

int pk_effective_prot(int prot, unsigned int rights)
{
    /* Access-disable takes PROT_EXEC too: x86 without PKU cannot express
     * execute-without-read, and the package fails closed. */
    if (rights & PK_AD)
        return PROT_NONE;
    if (rights & PK_WD)
        return prot & ~PROT_WRITE;
    return prot;
}

static int reserve(size_t extra)
{
    struct region *grown;
    size_t wanted;
    if (used + extra <= capacity)
        return 0;
    wanted = capacity ? capacity * 2 : 64;
    while (wanted < used + extra)
        wanted *= 2;
    grown = realloc(table, wanted * sizeof *table);
    if (!grown)
        return -1;
    table = grown;
    {
        /* The table alone grown is still consistent: capacity says how
         * far both reach, and it grows only once both did. */
        uint8_t *keys = realloc(key_at, wanted);
        if (!keys)
            return -1;
        key_at = keys;
    }
    capacity = wanted;
    return 0;
}

static uint8_t key_byte(int pkey) { return pkey >= 0 ? (uint8_t)pkey : (uint8_t)KEY_NONE; }

/* table[used++] = r, with its key. */
static void put(struct region r)
{
    key_at[used] = key_byte(r.pkey);
    table[used++] = r;
}

/* Whether region i is one of `keys`' (a mask of 1u << pkey). */
static int keyed(size_t i, uint32_t keys) { return (keys >> key_at[i]) & 1u; }

static size_t round_up(size_t len) { return (len + page_size() - 1) & ~(page_size() - 1); }

static void remove_at(size_t i)
{
    key_at[i] = key_at[used - 1];
    table[i] = table[--used];
}

/* Cut [start, end) out of every region; reserve(2) must have succeeded. */
static void cut(uintptr_t start, uintptr_t end)
{
    size_t i = 0;
    while (i < used) {
        struct region r = table[i];
        if (r.end <= start || r.start >= end) {
            i++;
            continue;
        }
        remove_at(i);
        if (r.start < start) {
            struct region left = r;
            left.end = start;
            put(left);
        }
        if (r.end > end) {
            struct region right = r;
            right.start = end;
            put(right);
        }
    }
}

static int overlaps(uintptr_t start, uintptr_t end)
{
    size_t i;
    for (i = 0; i < used; i++)
        if (table[i].start < end && start < table[i].end)
            return 1;
    return 0;
}

static int unmapped_page(uintptr_t page)
{
    unsigned char residency;
    return mincore((void *)page, page_size(), &residency) != 0 && errno == ENOMEM;
}

/* Nothing of the region is mapped any more (judged by its two ends). */
static int wholly_unmapped(const struct region *r)
{
    return unmapped_page(r->start) && unmapped_page(r->end - page_size());
}

uint32_t pk_pins_wanted(void) { return pins_wanted; }

uint64_t pk_pins_vouch(const struct pk_pin *pins, int count)
{
    vouched = pins;
    vouched_count = count;
    vouched_nonce = __atomic_add_fetch(&last_nonce, 1, __ATOMIC_RELAXED);
    return vouched_nonce;
}

/* A pinned export of the region's owner covers it. */
static int pinned(const struct region *r)
{
    int i;
    for (i = 0; i < vouched_count; i++) {
        const struct pk_pin *pin = &vouched[i];
        uintptr_t start = pin->start & ~(uintptr_t)(page_size() - 1);
        if (pin->owner == r->owner && r->start >= start &&
            r->end <= round_up(pin->start + pin->length))
            return 1;
    }
    return 0;
}

int pk_regions_need_pins(uint32_t keys, uint64_t pins)
{
    size_t i;
    int trusted = pins && pins == vouched_nonce;
    for (i = 0; i < used; i++) {
        const struct region *r = &table[i];
        /* The key first: most regions are other keys' (issue 16, item 4). */
        if (keyed(i, keys) && r->owner >= 2 && !r->lost && (!trusted || !pinned(r))) {
            pins_wanted = keys;
            return 1;
        }
    }
    return 0;
}

int pk_pins_owners(uint64_t *out, int capacity_out)
{
    uint32_t keys = pins_wanted;
    size_t i;
    int count = 0, j, seen;
    pk_state_lock();
    for (i = 0; i < used; i++) {
        const struct region *r = &table[i];
        if (!keyed(i, keys) || r->owner < 2 || r->lost)
            continue;
        for (seen = 0, j = 0; j < count && j < capacity_out; j++)
            seen |= out[j] == r->owner;
        if (seen)
            continue;
        if (count < capacity_out)
            out[count] = r->owner;
        count++;
    }
    pk_state_unlock();
    return count;
}

int pk_regions_count(int pkey)
{
    size_t i;
    int count = 0;
    for (i = 0; i < used; i++)
        count += table[i].pkey == pkey;
    return count;
}

static unsigned rights_in(uint32_t pkru, int pkey) { return (pkru >> PK_KEY_SHIFT(pkey)) & 3u; }

/* The keys whose rights differ between two registers, one bit each. */
static uint32_t changed_keys(uint32_t old_pkru, uint32_t new_pkru)
{
    uint32_t keys = 0;
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if (rights_in(old_pkru, k) != rights_in(new_pkru, k))
            keys |= 1u << k;
    return keys;
}

/* Region i is of one of `keys` (so not forgotten) and its pages follow
 * its key's rights. */
static int follows(size_t i, uint32_t keys) { return keyed(i, keys) && !table[i].lost; }

/* How many mprotect calls the emulation issued for rights changes: the
 * tests check that an unchanged register costs none, and the bench
 * compares the software backend with the raw calls it makes. */
static uint64_t reprotections;

uint64_t pk_reprotections(void) { return __atomic_load_n(&reprotections, __ATOMIC_RELAXED); }

static int protect(const struct region *r, uint32_t pkru)
{
    __atomic_add_fetch(&reprotections, 1, __ATOMIC_RELAXED);
    return mprotect((void *)r->start, r->end - r->start,
                    pk_effective_prot(r->prot, rights_in(pkru, r->pkey)));
}

int pk_regions_apply(uint32_t old_pkru, uint32_t new_pkru)
{
    /* Once per change, not per region: the table is scanned whole, and
     * most of it is other keys' regions. */
    uint32_t keys = changed_keys(old_pkru, new_pkru);
    size_t i, j;
    int err = 0, forgot = 0;
    for (i = 0; i < used; i++) {
        if (!follows(i, keys))
            continue;
        if (protect(&table[i], new_pkru) == 0)
            continue;
        err = errno;
        if (err == ENOMEM && wholly_unmapped(&table[i])) {
            table[i].pkey = -1; /* gone with its memory: forgotten below */
            key_at[i] = KEY_NONE;
            forgot = 1;
            err = 0;
            continue;
        }
        break;
    }
    if (err) {
        /* Fail closed: put back what was changed, so that no region is more
         * open than the rights reported (the old ones); a region that cannot
         * even be put back is shut entirely. */
        for (j = 0; j <= i && j < used; j++) {
            if (!follows(j, keys))
                continue;
            if (protect(&table[j], old_pkru) != 0)
                mprotect((void *)table[j].start, table[j].end - table[j].start, PROT_NONE);
        }
    }
    for (i = 0; forgot && i < used;) {
        if (key_at[i] == KEY_NONE)
            remove_at(i);
        else
            i++;
    }
    return err ? -err : 0;
}

int pk_region_tag(uintptr_t addr, size_t len, int prot, int pkey, uint32_t identity,
                  uint64_t owner, uint64_t pins)
{
    uintptr_t end;
    int status = PK_OK;
    (void)pins;
    if (!pk_state_mode())
        return PK_E_UNSUPPORTED;
    if (pkey < 0 || pkey >= PK_NKEYS)
        return PK_E_KEY_RANGE;
    if (!len || addr % page_size() || addr + len < addr)
        return PK_E_RIGHTS;
    end = addr + ((len + page_size() - 1) & ~(page_size() - 1));

    pk_state_lock();
    if (pkey && !pk_key_identity(pkey))
        status = PK_E_NOT_ALLOCATED;
    else if (pkey && identity && pk_key_identity(pkey) != identity)
        status = PK_E_KEY_CLOSED;
    else if (reserve(2) != 0) {
        errno = ENOMEM;
        status = PK_E_ERRNO;
    } else
        status = pk_backend->tag(addr, len, prot, pkey, overlaps(addr, end));
    if (status == PK_OK) {
        cut(addr, end);
        if (pkey)
            put((struct region){addr, end, prot, pkey, owner, 0});
    }
    pk_state_unlock();
    return status;
}

int pk_region_forget(uintptr_t addr, size_t len)
{
    uintptr_t end = addr + ((len + page_size() - 1) & ~(page_size() - 1));
    pk_state_lock();
    if (reserve(2) != 0) {
        pk_state_unlock();
        errno = ENOMEM;
        return PK_E_ERRNO;
    }
    cut(addr, end);
    pk_state_unlock();
    return PK_OK;
}

int pk_owner_gone(uint64_t owner)
{
    size_t i = 0;
    int dropped = 0;
    if (owner < 2)
        return 0;
    pk_state_lock();
    while (i < used) {
        if (table[i].owner == owner) {
            remove_at(i);
            dropped++;
        } else {
            i++;
        }
    }
    pk_state_unlock();
    return dropped;
}

int pk_owner_lost(uint64_t owner)
{
    size_t i;
    int marked = 0;
    pk_state_lock();
    for (i = 0; i < used; i++) {
        if (table[i].owner == owner && !table[i].lost) {
            table[i].lost = 1;
            marked++;
        }
    }
    pk_state_unlock();
    return marked;
}

/*
 * A foreign owner's memory spanned [old_base, old_base + old_size) and now
 * spans [base, base + size): mmap.resize moved or resized it (mremap).  The
 * kernel carried the pages along with their protection (and, on hardware,
 * their key), and a grown mapping's new tail is the same VMA, so it has
 * them too.  So each region follows: the same offset from the new base,
 * extended to the new end if it reached the old end, cut at the new end,
 * dropped if nothing of it is left.  Without this the software backend
 * re-protected the old address and left the moved pages shut, and the next
 * scope on the key faulted.  Only for an mmap: other exporters that move
 * reallocate, and their regions are frozen instead (pk_owner_lost).
 * Returns how many regions remain.
 */
int pk_owner_moved(uint64_t owner, uintptr_t old_base, size_t old_size, uintptr_t base,
                   size_t size)
{
    uintptr_t old_end = old_base + round_up(old_size), end = base + round_up(size);
    size_t i = 0;
    int kept = 0;
    if (owner < 2)
        return 0;
    pk_state_lock();
    while (i < used) {
        struct region *r = &table[i];
        /* Outside the old span: another thread applied this move already. */
        if (r->owner != owner || r->start < old_base || r->start >= old_end) {
            i++;
            continue;
        }
        if (r->end >= old_end)
            r->end = end;
        else
            r->end = base + (r->end - old_base);
        r->start = base + (r->start - old_base);
        if (r->end > end)
            r->end = end;
        if (r->start >= r->end) {
            remove_at(i);
            continue;
        }
        kept++;
        i++;
    }
    pk_state_unlock();
    return kept;
}

int pk_owner_regions(uint64_t owner)
{
    size_t i;
    int count = 0;
    pk_state_lock();
    for (i = 0; i < used; i++)
        count += table[i].owner == owner;
    pk_state_unlock();
    return count;
}

/* The regions of `pkey` (all with -1), as many as fit; returns how many
 * there are. */
int pk_regions_list(int pkey, struct pk_region *out, int capacity_out)
{
    size_t i;
    int count = 0;
    pk_state_lock();
    for (i = 0; i < used; i++) {
        if (pkey >= 0 && table[i].pkey != pkey)
            continue;
        if (count < capacity_out)
            out[count] = (struct pk_region){table[i].start, table[i].end, table[i].prot,
                                            table[i].pkey, table[i].owner};
        count++;
    }
    pk_state_unlock();
    return count;
}
