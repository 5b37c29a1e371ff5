/*
 * The software backend: the same API where there is no PKU.  One emulated
 * register for the whole process, grants counted per process, and every
 * change made real by re-protecting the key's regions with mprotect
 * (regions.c).  Every entry point runs under state.c's mutex.
 *
 * A change that would re-protect memory owned by a foreign Python buffer
 * answers PK_E_NEED_PINS unless `pins` vouches for the owners (regions.c);
 * the caller pins and calls again (pk_pins_prepare in pkeys._scope for
 * pkey_set and the scope types, pkeys/_state.py's retry_pinned for the
 * rest).
 */
#include "backend.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

/* The grants in force (process-wide) and the register. */
static struct grants process_grants;
/* The identity of each key that had a scope ended in a thread other than
 * the one that entered it: that thread's own record is wrong since. */
static uint32_t cross_thread[PK_NKEYS];
static uint32_t base_pkru = 0x55555554u;  /* the kernel's init value */
static uint32_t pkru = 0x55555554u;

/* The emulated register that the state implies. */
static uint32_t compute(void)
{
    uint32_t value = base_pkru;
    int k;
    for (k = 1; k < PK_NKEYS; k++)
        if (pk_grants_active(&process_grants, k))
            value = pk_with_bits(value, k, pk_grants_composed(&process_grants, k));
    return value;
}

/* Make the state's register real: re-protect the regions of the keys that
 * change.  Called after the counts changed.  Returns PK_OK, or
 * PK_E_NEED_PINS / PK_E_ERRNO with nothing applied. */
static int commit(uint64_t pins)
{
    uint32_t next = compute();
    uint32_t changed = next ^ pkru;
    uint32_t keys = 0;
    int k, err;
    for (k = 1; k < PK_NKEYS; k++)
        if (changed & PK_KEY_MASK(k))
            keys |= 1u << k;
    if (!keys)
        return PK_OK;
    if (pk_regions_need_pins(keys, pins))
        return PK_E_NEED_PINS;
    err = pk_regions_apply(pkru, next);
    if (err) {
        errno = -err;
        return PK_E_ERRNO;
    }
    pkru = next;
    pk_sw_mirror_pkru(next);
    return PK_OK;
}

/* A new base register, kept only if it could be applied. */
static int set_base(uint32_t value, uint64_t pins)
{
    uint32_t saved = base_pkru;
    int status;
    base_pkru = value;
    status = commit(pins);
    if (status != PK_OK)
        base_pkru = saved;
    return status;
}

static int sw_alloc(unsigned int flags, unsigned int rights, uint32_t identity)
{
    uint32_t allocated = pk_allocated_mask();
    int k;
    (void)flags;
    for (k = 1; k < PK_NKEYS; k++) {
        if (allocated & (1u << k))
            continue;
        base_pkru = pk_with_bits(base_pkru, k, rights & 3u);
        pk_grants_clear(&process_grants, k);
        process_grants.identity[k] = identity;
        /* A fresh key guards no region, so this only moves the register. */
        commit(0);
        return k;
    }
    return PK_E_NOSPC;
}

static int sw_free_key(int pkey, double timeout, struct pk_broadcast *result, uint64_t pins)
{
    (void)timeout, (void)result, (void)pins;
    pk_identity_retire(pkey);
    base_pkru = pk_with_bits(base_pkru, pkey, PK_AD);
    pk_grants_clear(&process_grants, pkey);
    process_grants.identity[pkey] = 0;
    commit(0); /* no region left, so nothing to pin */
    return PK_OK;
}

static int sw_get(int pkey) { return (int)pk_bits_of(PK_LOAD(pkru), pkey); }

/* While the process has grants on the key, they stay in force and the new
 * rights take over when the last one ends. */
static int sw_set(int pkey, uint32_t wanted, int rights, uint64_t pins)
{
    int status;
    pk_state_lock();
    status = pk_identity_status(PK_LOAD(pk_key_identities[pkey]), wanted);
    if (status == PK_OK)
        status = set_base(pk_with_bits(base_pkru, pkey, (unsigned)rights), pins);
    pk_state_unlock();
    return status;
}

/* The rights of `pkey` now, and every grant on it voided (scopes that are
 * active keep no access and re-grant nothing when they end).  One register
 * for the whole process: no thread needs a signal. */
static int sw_set_all(int pkey, unsigned int rights, double timeout,
                      struct pk_broadcast *result, uint64_t pins)
{
    uint32_t saved_base = base_pkru;
    uint32_t saved_counts[3];
    int status;
    (void)timeout;
    if (pk_regions_need_pins(1u << pkey, pins))
        return PK_E_NEED_PINS;
    memcpy(saved_counts, process_grants.count[pkey], sizeof saved_counts);
    base_pkru = pk_with_bits(base_pkru, pkey, rights);
    pk_grants_clear(&process_grants, pkey);
    status = commit(pins);
    if (status != PK_OK) {
        base_pkru = saved_base;
        memcpy(process_grants.count[pkey], saved_counts, sizeof saved_counts);
        pk_grants_recount(&process_grants, pkey);
        return status;
    }
    pk_revocation_stamp(pkey, rights);
    if (result)
        memset(result, 0, sizeof *result);
    return PK_OK;
}

static int64_t sw_pkru_read(void) { return PK_LOAD(pkru); }

/* Keys with active grants keep them; the value becomes their base. */
static int sw_pkru_write(uint32_t value, uint64_t pins)
{
    int status;
    pk_state_lock();
    status = set_base(value, pins);
    pk_state_unlock();
    return status;
}

static int64_t sw_shadow(void) { return PK_LOAD(pkru); }

static int64_t sw_scope_enter(uint32_t keys, int kind, const uint32_t *identities, uint64_t pins)
{
    uint32_t epoch = 0;
    int status;
    pk_state_lock();
    status = pk_identity_check(keys, identities);
    if (status == PK_OK) {
        /* Under the mutex no revocation can come between these two. */
        epoch = PK_LOAD(pk_revocation_epoch);
        pk_grants_count(&process_grants, keys, kind, identities, +1, base_pkru);
        status = commit(pins);
        if (status == PK_OK)
            pk_grants_count(pk_my_grants(), keys, kind, identities, +1, 0);
        else
            pk_grants_count(&process_grants, keys, kind, identities, -1, 0);
    }
    pk_state_unlock();
    if (status != PK_OK)
        return status;
    return pk_make_token(epoch);
}

/* The grant is process-wide, so ending it from the wrong thread still ends
 * it (failing closed), and then reports the misuse. */
static int sw_scope_exit(uint32_t keys, int kind, const uint32_t *identities, int64_t token,
                         uint64_t pins)
{
    int own_thread = (uint32_t)((uint64_t)token >> 32) == pk_thread_serial();
    int status;
    pk_state_lock();
    {
        uint32_t live = pk_grants_live(&process_grants, keys, identities, (uint32_t)token);
        struct grants saved = process_grants;
        if (!pk_grants_balanced(&process_grants, live, kind, identities)) {
            status = PK_E_UNBALANCED;
        } else {
            pk_grants_count(&process_grants, live, kind, identities, -1, 0);
            status = commit(pins);
            if (status != PK_OK) {
                process_grants = saved;
            } else if (own_thread) {
                pk_grants_count(pk_my_grants(), live, kind, identities, -1, 0);
            } else {
                int k;
                for (k = 1; k < PK_NKEYS; k++)
                    if (live & (1u << k))
                        cross_thread[k] = identities[k];
            }
        }
    }
    pk_state_unlock();
    if (status != PK_OK)
        return status;
    return own_thread ? PK_OK : PK_E_WRONG_THREAD;
}

/*
 * In a forked child only the forking thread exists, so only its grants can
 * ever end.  The process-wide grants of the other threads are dropped
 * here, so that the child fails closed rather than keeping their access
 * for good (as on hardware, where the child has only the forking thread's
 * register).  Where this thread's own grants cannot be told apart, the
 * key is never left more open than it was, nor than outside every scope.
 */
static int sw_after_fork_in_child(uint64_t pins)
{
    struct grants saved;
    uint32_t saved_base, untrusted = 0;
    int k, g, status;
    pk_state_lock();
    saved = process_grants;
    saved_base = base_pkru;
    for (k = 1; k < PK_NKEYS; k++) {
        const struct grants *own = pk_my_grants();
        /* This thread's record holds its grants on the key if it counted
         * one since the key's last revocation; else it has none now.  The
         * record can only over-count: a scope ended from another thread
         * leaves the entering thread's count as it was.  So once that has
         * happened on the key, a record that claims grants cannot be told
         * from one that has them: drop them all. */
        int current = own->identity[k] == process_grants.identity[k] &&
                      own->epoch[k] == PK_LOAD(pk_revoked_at[k]);
        int unknowable = current && cross_thread[k] == process_grants.identity[k] &&
                         pk_grants_active(own, k);
        if (unknowable) {
            untrusted |= 1u << k;
            /* Dropping a deny() or read-only grant would open the key: the
             * child keeps the stricter of the rights in force now and those
             * outside every scope (both bits are restrictions: OR). */
            base_pkru = pk_with_bits(base_pkru, k,
                                     pk_bits_of(pkru, k) | pk_bits_of(base_pkru, k));
        }
        for (g = 0; g < 3; g++) {
            uint32_t mine = current && !unknowable ? own->count[k][g] : 0;
            if (process_grants.count[k][g] > mine)
                process_grants.count[k][g] = mine;
        }
        pk_grants_recount(&process_grants, k);
    }
    status = commit(pins);
    if (status != PK_OK) {
        process_grants = saved;
        base_pkru = saved_base;
    } else {
        /* This thread's own scopes were among the grants dropped: in this
         * child they were revoked, and their ends withdraw nothing (else
         * each would raise "ended more often than it was entered"). */
        PK_FOR_EACH_KEY(k, untrusted)
            pk_revocation_stamp(k, pk_bits_of(base_pkru, k));
    }
    pk_state_unlock();
    return status;
}

/* Grants are the process's: a new thread has them already. */
static int sw_birth_snapshot(struct pk_birth *out)
{
    (void)out;
    return 0;
}

static int sw_birth_settle(const struct pk_birth *birth)
{
    (void)birth;
    return PK_OK;
}

static int sw_tag(uintptr_t addr, size_t len, int prot, int pkey, int tracked)
{
    unsigned rights = pkey ? pk_bits_of(pkru, pkey) : 0;
    int effective = pk_effective_prot(prot, rights);
    /* Hardware refuses a protection the mapping cannot have (PROT_WRITE on
     * a read-only file mapping: EACCES) at tagging time; so must the
     * emulation, though it is about to apply less.  Memory that is already
     * tracked was checked when it was first tagged, and opening it here,
     * even briefly, could expose a denied key's data. */
    if (effective != prot && !tracked && mprotect((void *)addr, len, prot) != 0)
        return PK_E_ERRNO;
    if (mprotect((void *)addr, len, effective) != 0)
        return PK_E_ERRNO;
    return PK_OK;
}

const struct pk_backend pk_backend_software = {
    .mode = PK_MODE_SOFTWARE,
    .grants_per_process = 1,
    .alloc = sw_alloc,
    .free_key = sw_free_key,
    .get = sw_get,
    .set = sw_set,
    .set_all = sw_set_all,
    .pkru_read = sw_pkru_read,
    .pkru_write = sw_pkru_write,
    .shadow = sw_shadow,
    .scope_enter = sw_scope_enter,
    .scope_exit = sw_scope_exit,
    .after_fork_in_child = sw_after_fork_in_child,
    .birth_snapshot = sw_birth_snapshot,
    .birth_settle = sw_birth_settle,
    .tag = sw_tag,
};
