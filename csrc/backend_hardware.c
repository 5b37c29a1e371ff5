/*
 * The hardware backend: the calling thread's PKRU (or the simulated
 * register), grants counted per thread, keys from pkey_alloc.  The hot
 * paths (get, set, scopes) touch only this thread's register and
 * thread-local counts, plus atomic reads of key identities, so they take
 * no lock at all.  No entry point here ever answers PK_E_NEED_PINS: the
 * `pins` arguments exist only for the identical signatures.
 */
#include "backend.h"

#include <errno.h>
#include <string.h>

/* This thread's PKRU as the package last wrote it. */
static PK_TLS uint32_t shadow;
static PK_TLS int shadow_valid;

static inline void hw_write(uint32_t old, uint32_t value)
{
    /* WRPKRU serialises the pipeline: skip it when nothing changes. */
    if (value != old)
        pk_wrpkru_unchecked(value);
    shadow = value;
    shadow_valid = 1;
}

/* Write a value computed from a register read after pk_revocations_mark()
 * returned `mark`.  A revocation's handler may have edited the register
 * between that read and this write, and the write would undo it: so look
 * again afterwards and apply what the handler applied. */
static inline void hw_write_settled(uint32_t old, uint32_t value, uint32_t mark)
{
    hw_write(old, value);
    PK_STEP();
    if (pk_revocations_moved(mark)) {
        uint32_t now = pk_rdpkru_unchecked();
        PK_STEP();
        hw_write(now, pk_revocations_catch_up(now));
    }
    PK_STEP();
}

/* Stamp the revocation, then signal every other thread (revoke.c): a
 * thread that writes its register after reading an older epoch looks
 * again (hw_write_settled). */
static int revoke(int pkey, unsigned int rights, double timeout, struct pk_broadcast *result)
{
    int status;
    uint32_t now;
    pk_revocation_stamp(pkey, rights);
    status = pk_broadcast(1u << pkey, rights << PK_KEY_SHIFT(pkey), timeout, result);
    now = pk_rdpkru_unchecked();
    hw_write(now, pk_with_bits(now, pkey, rights)); /* and this thread, whatever happened */
    return status;
}

static int hw_alloc(unsigned int flags, unsigned int rights, uint32_t identity)
{
    uint64_t began = pk_exposure_clock(); /* before: see exposure.c's rule A */
    int pkey = pk_sys_pkey_alloc(flags, rights);
    (void)identity;
    if (pkey < 0)
        return errno == ENOSPC ? PK_E_NOSPC : PK_E_ERRNO;
    if (pkey >= PK_NKEYS) {
        /* A future kernel with more keys: refuse what PKRU cannot express. */
        pk_sys_pkey_free(pkey);
        return PK_E_KEY_RANGE;
    }
    /* The kernel wrote the initial rights into this thread's PKRU.  No
     * revocation of the number can be under way (it was free). */
    if (!(rights & PK_AD))
        pk_exposure_note(1u << pkey);
    pk_exposure_allocated(pkey, began);
    shadow = pk_rdpkru_unchecked();
    shadow_valid = 1;
    return pkey;
}

/* The kernel leaves every thread's rights alone, so a later allocation of
 * the number would inherit them: the key is first revoked in every thread
 * (revoke.c), and the free is refused if some thread did not answer.
 *
 * The identity is retired before the broadcast, not after it: a thread
 * that has already answered and then enters a scope on the key checks the
 * identity after its register write (hw_scope_enter) and takes its grant
 * back; one whose check came before the retirement wrote its register
 * before it too, and is signalled after it.  Retired only after, such a
 * scope kept the key open in its thread once the free had returned, and a
 * later key given the number was open there. */
static int hw_free_key(int pkey, double timeout, struct pk_broadcast *result, uint64_t pins)
{
    uint32_t identity = PK_LOAD(pk_key_identities[pkey]), old;
    int status;
    (void)pins;
    pk_identity_retire(pkey);
    status = revoke(pkey, PK_AD, timeout, result);
    if (status == PK_OK && pk_sys_pkey_free(pkey) != 0)
        status = PK_E_ERRNO;
    if (status != PK_OK) {
        pk_identity_restore(pkey, identity); /* some thread may still have access: keep it */
        return status;
    }
    old = pk_rdpkru_unchecked();
    hw_write(old, pk_with_bits(old, pkey, PK_AD));
    return PK_OK;
}

static int hw_get(int pkey) { return (int)pk_bits_of(pk_rdpkru_unchecked(), pkey); }

/* While this thread has grants on the key, they stay in force and the new
 * rights take over when the last one ends. */
static int hw_set(int pkey, uint32_t wanted, int rights, uint64_t pins)
{
    struct grants *g = pk_my_grants();
    uint32_t mark = pk_revocations_mark();
    uint32_t old, identity = PK_LOAD(pk_key_identities[pkey]);
    int status;
    (void)pins;
    /* freed since the caller's check, or (wanted) no longer the caller's key */
    if ((status = pk_identity_status(identity, wanted)) != PK_OK)
        return status;
    pk_exposure_note(rights & PK_AD ? 0u : 1u << pkey);
    PK_STEP();
    old = pk_rdpkru_unchecked();
    PK_STEP();
    pk_grants_adopt(g, pkey, identity);
    PK_STEP();
    if (pk_grants_active(g, pkey)) {
        pk_grants_set_base(g, pkey, (unsigned)rights);
    } else {
        hw_write_settled(old, pk_with_bits(old, pkey, (unsigned)rights), mark);
        /* A free in another thread may have raced with this write (see
         * hw_free_key): once it is written, check again and close the key. */
        if (!(rights & PK_AD) && PK_LOAD(pk_key_identities[pkey]) != identity) {
            old = pk_rdpkru_unchecked();
            hw_write(old, pk_with_bits(old, pkey, PK_AD));
            return wanted ? PK_E_KEY_CLOSED : PK_E_NOT_ALLOCATED;
        }
    }
    return PK_OK;
}

static int hw_set_all(int pkey, unsigned int rights, double timeout,
                      struct pk_broadcast *result, uint64_t pins)
{
    (void)pins;
    if (!(rights & PK_AD))
        pk_exposure_opened_for_all(pkey);
    return revoke(pkey, rights, timeout, result);
}

static int64_t hw_pkru_read(void) { return pk_rdpkru_unchecked(); }

/* Keys with active grants keep them; the value becomes their base. */
static int hw_pkru_write(uint32_t value, uint64_t pins)
{
    struct grants *g = pk_my_grants();
    uint32_t mark = pk_revocations_mark();
    uint32_t old, next = value;
    int k;
    (void)pins;
    pk_exposure_note(pk_keys_opened_by(value));
    PK_STEP();
    old = pk_rdpkru_unchecked();
    PK_STEP();
    for (k = 1; k < PK_NKEYS; k++) {
        if (!PK_LOAD(pk_key_identities[k]))
            continue;
        pk_grants_adopt(g, k, PK_LOAD(pk_key_identities[k]));
        if (pk_grants_active(g, k)) {
            pk_grants_set_base(g, k, pk_bits_of(value, k));
            next = pk_with_bits(next, k, pk_grants_composed(g, k));
        }
    }
    PK_STEP();
    hw_write_settled(old, next, mark);
    return PK_OK;
}

static int64_t hw_shadow(void) { return shadow_valid ? (int64_t)shadow : -1; }

static int64_t hw_scope_enter(uint32_t keys, int kind, const uint32_t *identities, uint64_t pins)
{
    struct grants *g = pk_my_grants();
    uint32_t mark = pk_revocations_mark(), old, next, epoch;
    uint32_t changes = PK_LOAD(pk_identity_changes);  /* before the check below */
    int64_t token;
    int status;
    (void)pins;
    if ((status = pk_keys_check(keys)) != PK_OK)
        return status;
    pk_exposure_note(kind == PK_GRANT_DENY ? 0u : keys);
    PK_STEP();
    old = pk_rdpkru_unchecked();
    PK_STEP();
    status = pk_grants_enter_current(g, keys, kind, identities, old, &epoch, &next);
    if (status == PK_GRANTS_ADOPT) {
        /* Every key checked before anything is counted: counting adopts a
         * key's revocation, so a refused entry must count nothing (see
         * pk_grants_enter). */
        if ((status = pk_identity_check(keys, identities)) == PK_OK)
            next = pk_grants_enter(g, keys, kind, identities, old, &epoch);
    }
    if (status != PK_OK)
        return status;
    token = pk_make_token(epoch);
    PK_STEP();
    hw_write_settled(old, next, mark);
    /* A pkey_free in another thread may have raced with this grant: once
     * the register is written, check again and take it back.  If no
     * identity changed since before the first check, none of these did;
     * and a free whose change comes after this read signals this thread
     * after this write (hw_free_key retires, then revokes). */
    if (PK_LOAD(pk_identity_changes) != changes && pk_identity_check(keys, identities) != PK_OK) {
        pk_grants_count(g, keys, kind, identities, -1, 0);
        old = pk_rdpkru_unchecked();
        hw_write(old, pk_grants_compose(g, keys, old));
        return PK_E_KEY_CLOSED;
    }
    return token;
}

static int hw_scope_exit(uint32_t keys, int kind, const uint32_t *identities, int64_t token,
                         uint64_t pins)
{
    struct grants *g = pk_my_grants();
    uint32_t old, live, next, mark = pk_revocations_mark();
    (void)pins;
    /* Another thread's register cannot be touched from here: refuse, and
     * leave the grant for its own thread to end. */
    if ((uint32_t)((uint64_t)token >> 32) != pk_thread_serial())
        return PK_E_WRONG_THREAD;
    PK_STEP();
    old = pk_rdpkru_unchecked();
    PK_STEP();
    if (!pk_grants_exit(g, keys, kind, identities, (uint32_t)token, old, &live, &next))
        return PK_E_UNBALANCED;
    if (keys & ~live) {  /* freed or revoked while the scope was open: rare */
        next = pk_grants_close_freed(g, keys & ~live, kind, identities, next);
        next = pk_grants_close_revoked(g, keys & ~live, identities, next);
    }
    PK_STEP();
    hw_write_settled(old, next, mark);
    return PK_OK;
}

/* A forked child has its forking thread's register already. */
static int hw_after_fork_in_child(uint64_t pins)
{
    (void)pins;
    return PK_OK;
}

/* ---- threads born inside a block ---------------------------------------- */

/* The keys this thread holds grants on, with their base rights: what a
 * thread it starts now must have instead of the register it copies. */
static int hw_birth_snapshot(struct pk_birth *out)
{
    const struct grants *g = pk_my_grants();
    int k;
    for (k = 1; k < PK_NKEYS; k++) {
        uint32_t identity = PK_LOAD(pk_key_identities[k]);
        if (!identity || g->identity[k] != identity ||
            g->epoch[k] != PK_LOAD(pk_revoked_at[k]) || !pk_grants_active(g, k))
            continue;
        out->keys |= 1u << k;
        out->bits = pk_with_bits(out->bits, k, pk_grants_base(g, k));
        out->identities[k] = identity;
    }
    return out->keys != 0;
}

/* In the new thread, before it runs anything else. */
static int hw_birth_settle(const struct pk_birth *birth)
{
    uint32_t mark, old, next;
    int k;
    if (!birth->keys)
        return PK_OK;
    mark = pk_revocations_mark();
    pk_exposure_note(birth->keys & pk_keys_opened_by(birth->bits));
    old = pk_rdpkru_unchecked();
    next = old;
    for (k = 1; k < PK_NKEYS; k++)
        if ((birth->keys & (1u << k)) &&
            PK_LOAD(pk_key_identities[k]) == birth->identities[k] &&
            !pk_revoked_since(k, birth->epoch))
            next = pk_with_bits(next, k, pk_bits_of(birth->bits, k));
    hw_write_settled(old, next, mark);
    return PK_OK;
}

static int hw_tag(uintptr_t addr, size_t len, int prot, int pkey, int tracked)
{
    (void)tracked;
    return pk_sys_pkey_mprotect(addr, len, prot, pkey) != 0 ? PK_E_ERRNO : PK_OK;
}

const struct pk_backend pk_backend_hardware = {
    .mode = PK_MODE_HARDWARE,
    .grants_per_process = 0,
    .alloc = hw_alloc,
    .free_key = hw_free_key,
    .get = hw_get,
    .set = hw_set,
    .set_all = hw_set_all,
    .pkru_read = hw_pkru_read,
    .pkru_write = hw_pkru_write,
    .shadow = hw_shadow,
    .scope_enter = hw_scope_enter,
    .scope_exit = hw_scope_exit,
    .after_fork_in_child = hw_after_fork_in_child,
    .birth_snapshot = hw_birth_snapshot,
    .birth_settle = hw_birth_settle,
    .tag = hw_tag,
};
