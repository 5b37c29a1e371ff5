/*
 * TEST ONLY.  The hardware backend's one-pass scope functions
 * (pk_grants_enter, pk_grants_enter_current and pk_grants_exit in
 * csrc/grants.h) against the sequences of core functions they stand for,
 * over every combination of a small domain of states: two keys, each with
 * its global identity and revocation stamp, this thread's identity, epoch,
 * counts and base for it, its bits in the register, and the scope's
 * identity for it; every grant kind; tokens from before, at and after the
 * stamp.  Key 1 takes the whole domain, key 2 a smaller one, so that a
 * closed key is met both before and after an open one.
 *
 * Equal means: the same live keys, balance, register value and token
 * epoch, and the same `struct grants` byte for byte.  An entry is compared
 * where every key's identity checks out: the backend checks them all before
 * it counts anything (counting adopts a key's revocation, so a refusal
 * after counting one key would change what later calls see).
 *
 * Usage: grants_fused [MUTANT]; MUTANT "epoch-before-count" takes a key's
 * epoch for the token before counting (adopting) it, to show the check
 * finds it.  Prints "cases N mismatches M" and the first mismatch.
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
static int epoch_first;

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
    pk_grants_recount(g, k);
    pk_grants_set_base(g, k, d->base);
    identities[k] = d->scope_identity;
    *pkru = pk_with_bits(*pkru, k, d->register_bits);
}

static void mismatch(const char *what, uint32_t keys, int kind, uint32_t epoch)
{
    if (!mismatches++)
        printf("first mismatch: %s (keys %#x kind %d token epoch %u)\n", what, keys, kind,
               epoch);
}

/* The mutant: pk_grants_enter taking each key's epoch before counting it. */
static uint32_t enter_epoch_first(struct grants *g, uint32_t keys, int kind,
                                  const uint32_t *identities, uint32_t pkru, uint32_t *epoch)
{
    uint32_t next = pkru, latest = 0;
    int k;
    PK_FOR_EACH_KEY(k, keys) {
        if ((int32_t)(g->epoch[k] - latest) > 0)
            latest = g->epoch[k];
        pk_grants_count_key(g, k, kind, identities[k], +1, pkru);
        next = pk_with_bits(next, k, pk_grants_composed(g, k));
    }
    *epoch = latest;
    return next;
}

static void check(const struct grants *start, const uint32_t *identities, uint32_t pkru,
                  uint32_t keys)
{
    int kind;
    for (kind = 0; kind < 3; kind++) {
        struct grants seq = *start, one = *start;
        uint32_t next_seq, next_one, epoch_seq, epoch_one;
        {
            /* the common entry: the same as the sequence, or refused (the
             * identity check fails, or a key must be adopted) with nothing
             * changed */
            struct grants fast = *start;
            uint32_t epoch_fast = 0, next_fast = 0;
            int status = pk_grants_enter_current(&fast, keys, kind, identities, pkru,
                                                 &epoch_fast, &next_fast);
            int checked = pk_identity_check(keys, identities);
            cases++;
            if (status == PK_OK) {
                struct grants seq_fast = *start;
                uint32_t epoch_seq_fast;
                pk_grants_count(&seq_fast, keys, kind, identities, +1, pkru);
                epoch_seq_fast = pk_grants_counted_under(&seq_fast, keys);
                if (checked != PK_OK || memcmp(&seq_fast, &fast, sizeof fast) ||
                    pk_grants_compose(&seq_fast, keys, pkru) != next_fast ||
                    epoch_seq_fast != epoch_fast)
                    mismatch("common entry", keys, kind, 0);
            } else if (memcmp(start, &fast, sizeof fast) ||
                       (status == PK_E_KEY_CLOSED && checked == PK_OK) ||
                       (status != PK_E_KEY_CLOSED && status != PK_GRANTS_ADOPT)) {
                mismatch("refused common entry", keys, kind, 0);
            }
        }
        if (pk_identity_check(keys, identities) == PK_OK) {
            pk_grants_count(&seq, keys, kind, identities, +1, pkru);
            epoch_seq = pk_grants_counted_under(&seq, keys);
            next_seq = pk_grants_compose(&seq, keys, pkru);
            next_one = epoch_first
                           ? enter_epoch_first(&one, keys, kind, identities, pkru, &epoch_one)
                           : pk_grants_enter(&one, keys, kind, identities, pkru, &epoch_one);
            cases++;
            if (memcmp(&seq, &one, sizeof seq) || next_seq != next_one || epoch_seq != epoch_one)
                mismatch("entry", keys, kind, 0);
        }
        for (epoch_seq = 4; epoch_seq <= 6; epoch_seq++) {
            struct grants exit_seq = *start, exit_one = *start;
            uint32_t live_seq = pk_grants_live(&exit_seq, keys, identities, epoch_seq);
            uint32_t live_one = 0, next_one = 0;
            int balanced_seq = pk_grants_balanced(&exit_seq, live_seq, kind, identities);
            int balanced_one = pk_grants_exit(&exit_one, keys, kind, identities, epoch_seq, pkru,
                                              &live_one, &next_one);
            cases++;
            if (balanced_seq != balanced_one) {
                mismatch("exit balance", keys, kind, epoch_seq);
                continue;
            }
            if (!balanced_seq) {  /* refused: nothing changed */
                if (memcmp(&exit_seq, &exit_one, sizeof exit_seq))
                    mismatch("refused exit", keys, kind, epoch_seq);
                continue;
            }
            pk_grants_count(&exit_seq, live_seq, kind, identities, -1, 0);
            next_seq = pk_grants_compose(&exit_seq, live_seq, pkru);
            if (live_seq != live_one || memcmp(&exit_seq, &exit_one, sizeof exit_seq) ||
                next_seq != next_one)
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
    epoch_first = argc > 1 && !strcmp(argv[1], "epoch-before-count");
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
