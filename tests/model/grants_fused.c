/*
 * TEST ONLY.  The hardware backend's one-pass scope functions
 * (pk_grants_enter, pk_grants_exit_check, pk_grants_withdraw in
 * csrc/grants.h) against the sequences of core functions they stand for,
 * over every combination of a small domain of states: two keys, each with
 * its global identity and revocation stamp, this thread's identity, epoch,
 * counts and base for it, its bits in the register, and the scope's
 * identity for it; every grant kind; tokens from before, at and after the
 * stamp.  Key 1 takes the whole domain, key 2 a smaller one, so that a
 * closed key is met both before and after an open one.
 *
 * Equal means: the same status, live keys, register value and token epoch,
 * and the same `struct grants` byte for byte.  Where an entry is refused
 * (a closed key) the one-pass function has counted and withdrawn again the
 * keys before the closed one, so it is compared by what any later call can
 * observe of each key (its counts under the identity and stamp they would
 * be adopted with, and its base while a grant is active), not byte for
 * byte.
 *
 * Usage: grants_fused [MUTANT]; MUTANT "no-undo" leaves the keys counted
 * before a closed one counted, to show the check finds it.  Prints
 * "cases N mismatches M" and the first mismatch.
 */
#include "../../csrc/grants.c"

#include <stdio.h>

struct key_domain {
    uint32_t global_identity, scope_identity, stamp, stamp_bits, identity, epoch;
    uint32_t counts;  /* bit i: one grant of kind i */
    uint8_t base, register_bits;
};

static const uint32_t stamps[] = {0, 5};
static uint64_t cases, mismatches;
static int no_undo;

static void set_key(struct grants *g, uint32_t *identities, uint32_t *pkru, int k,
                    const struct key_domain *d)
{
    int i;
    pk_key_identities[k] = d->global_identity;
    pk_revoked_at[k] = d->stamp;
    pk_revoked_bits[k] = d->stamp_bits;
    g->identity[k] = d->identity;
    g->epoch[k] = d->epoch;
    for (i = 0; i < 3; i++)
        g->count[k][i] = (d->counts >> i) & 1u;
    g->base[k] = d->base;
    identities[k] = d->scope_identity;
    *pkru = pk_with_bits(*pkru, k, d->register_bits);
}

/* What a later call can observe of key k in `a` and `b`: its counts under
 * the key's identity and stamp (counts of any other identity are a freed
 * key's, which no call adopts again), and its base while a grant is
 * active.  A key not allocated: every field, since pkey_free's failure
 * restores its identity, whichever it was. */
static int same_view(const struct grants *a, const struct grants *b, int k, uint32_t identity)
{
    uint32_t zero[3] = {0, 0, 0};
    if (!identity)
        return a->identity[k] == b->identity[k] && a->epoch[k] == b->epoch[k] &&
               !memcmp(a->count[k], b->count[k], sizeof zero) && a->base[k] == b->base[k];
    const uint32_t *ca = a->identity[k] == identity && a->epoch[k] == pk_revoked_at[k]
                             ? a->count[k] : zero;
    const uint32_t *cb = b->identity[k] == identity && b->epoch[k] == pk_revoked_at[k]
                             ? b->count[k] : zero;
    if (memcmp(ca, cb, sizeof zero))
        return 0;
    return !(ca[0] | ca[1] | ca[2]) || a->base[k] == b->base[k];
}

static void mismatch(const char *what, uint32_t keys, int kind, uint32_t epoch)
{
    if (!mismatches++)
        printf("first mismatch: %s (keys %#x kind %d token epoch %u)\n", what, keys, kind,
               epoch);
}

/* The mutant: pk_grants_enter without its undo of the keys counted before
 * a closed one. */
static int enter_without_undo(struct grants *g, uint32_t keys, int kind,
                              const uint32_t *identities, uint32_t pkru, uint32_t *next,
                              uint32_t *epoch)
{
    int k;
    PK_FOR_EACH_KEY(k, keys) {
        if (!identities[k] || pk_key_identities[k] != identities[k])
            return PK_E_KEY_CLOSED;
        pk_grants_count_key(g, k, kind, identities[k], +1, pkru);
    }
    *epoch = pk_grants_counted_under(g, keys);
    *next = pk_grants_compose(g, keys, pkru);
    return PK_OK;
}

static void check(const struct grants *start, const uint32_t *identities, uint32_t pkru,
                  uint32_t keys)
{
    int kind;
    for (kind = 0; kind < 3; kind++) {
        struct grants seq = *start, one = *start;
        uint32_t next_seq = 0, next_one = 0, epoch_seq = 0, epoch_one = 0;
        int status_seq = pk_identity_check(keys, identities), status_one, k;
        if (status_seq == PK_OK) {
            pk_grants_count(&seq, keys, kind, identities, +1, pkru);
            epoch_seq = pk_grants_counted_under(&seq, keys);
            next_seq = pk_grants_compose(&seq, keys, pkru);
        }
        if (no_undo)
            status_one = enter_without_undo(&one, keys, kind, identities, pkru, &next_one,
                                            &epoch_one);
        else
            status_one = pk_grants_enter(&one, keys, kind, identities, pkru, &next_one,
                                         &epoch_one);
        cases++;
        if (status_seq != status_one) {
            mismatch("entry status", keys, kind, 0);
        } else if (status_seq == PK_OK) {
            if (memcmp(&seq, &one, sizeof seq) || next_seq != next_one || epoch_seq != epoch_one)
                mismatch("entry", keys, kind, 0);
        } else {
            PK_FOR_EACH_KEY(k, keys)
                if (!same_view(start, &one, k, pk_key_identities[k]))
                    mismatch("refused entry left counts", keys, kind, 0);
        }
        for (epoch_seq = 4; epoch_seq <= 6; epoch_seq++) {
            struct grants exit_seq = *start, exit_one = *start;
            uint32_t live_seq = pk_grants_live(&exit_seq, keys, identities, epoch_seq), live_one;
            int balanced_seq = pk_grants_balanced(&exit_seq, live_seq, kind, identities);
            int balanced_one = pk_grants_exit_check(&exit_one, keys, kind, identities, epoch_seq,
                                                    &live_one);
            cases++;
            if (live_seq != live_one || balanced_seq != balanced_one ||
                memcmp(&exit_seq, &exit_one, sizeof exit_seq)) {
                mismatch("exit check", keys, kind, epoch_seq);
                continue;
            }
            if (!balanced_seq)
                continue;
            pk_grants_count(&exit_seq, live_seq, kind, identities, -1, 0);
            next_seq = pk_grants_compose(&exit_seq, live_seq, pkru);
            next_one = pk_grants_withdraw(&exit_one, live_one, kind, identities, pkru);
            if (memcmp(&exit_seq, &exit_one, sizeof exit_seq) || next_seq != next_one)
                mismatch("withdrawal", keys, kind, epoch_seq);
        }
    }
}

/* Every state of key 1 (whole domain), with key 2 absent or in each state
 * of its smaller domain. */
static void explore(const struct key_domain *second, size_t seconds)
{
    static const uint32_t ids[] = {7, 8}, scope_ids[] = {0, 7, 8};
    struct key_domain d;
    size_t a, b, c, e, f, s;
    for (a = 0; a < 2; a++)
    for (b = 0; b < 3; b++)
    for (c = 0; c < 2; c++)
    for (d.stamp_bits = 1; d.stamp_bits <= 2; d.stamp_bits++)
    for (e = 0; e < 2; e++)
    for (f = 0; f < 2; f++)
    for (d.counts = 0; d.counts < 8; d.counts++)
    for (d.base = 0; d.base < 4; d.base++)
    for (d.register_bits = 0; d.register_bits < 4; d.register_bits++) {
        d.global_identity = a ? ids[0] : 0;
        d.scope_identity = scope_ids[b];
        d.stamp = stamps[c];
        d.identity = ids[e];
        d.epoch = stamps[f];
        for (s = 0; s <= seconds; s++) {
            struct grants g;
            uint32_t identities[PK_NKEYS] = {0}, pkru = 0x55555554u;
            memset(&g, 0, sizeof g);
            set_key(&g, identities, &pkru, 1, &d);
            if (s < seconds)
                set_key(&g, identities, &pkru, 2, &second[s]);
            check(&g, identities, pkru, s < seconds ? 0x6u : 0x2u);
        }
    }
}

int main(int argc, char **argv)
{
    struct key_domain second[64];
    size_t n = 0;
    uint32_t a, c, e, f, counts;
    no_undo = argc > 1 && !strcmp(argv[1], "no-undo");
    for (a = 0; a < 2; a++)
    for (c = 0; c < 2; c++)
    for (e = 0; e < 2; e++)
    for (f = 0; f < 2; f++)
    for (counts = 0; counts < 4; counts += 2) {
        struct key_domain d = {a ? 7 : 0, 7, stamps[c], 1, e ? 7 : 8, stamps[f], counts, 1, 1};
        second[n++] = d;
    }
    explore(second, n);
    printf("cases %llu mismatches %llu\n", (unsigned long long)cases,
           (unsigned long long)mismatches);
    return mismatches ? 1 : 0;
}
