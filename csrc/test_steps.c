/*
 * TEST ONLY: a revocation delivered at a chosen step boundary.
 *
 * The hardware paths that read and write a thread's PKRU (scope enter and
 * exit, pkey_set, wrpkru, probe's restore, buffer enter and exit) mark each
 * boundary between their steps with PK_STEP().  A test arms the calling
 * thread with pk_test_revoke_at_step(n, key): at the n-th boundary it
 * passes, a helper thread revokes the key with the real mechanism (stamp,
 * signal, handler, wait) while this thread waits for it, so the handler
 * runs in this thread exactly there.  Walking n = 1, 2, ... until the
 * operation ends before the n-th boundary covers every boundary.
 *
 * Unarmed, PK_STEP() is one relaxed load of a global and a branch not
 * taken; nothing here runs in production.
 */
#include "pkeys_internal.h"

#include <pthread.h>

int pk_test_steps_armed; /* how many threads are armed: PK_STEP()'s fast test */

static __thread int steps_left;   /* boundaries to pass before the revocation */
static __thread int revoked_here; /* it was delivered since arming */
static __thread int revoke_pkey;
static __thread uint32_t revoke_identity;

struct revocation {
    int pkey;
    uint32_t identity;
    int status;
};

static void *revoke_in_helper(void *arg)
{
    struct revocation *r = arg;
    r->status = pk_key_set_all(r->pkey, r->identity, (int)PK_AD, 10.0, NULL, 0);
    return NULL;
}

void pk_test_step(void)
{
    struct revocation r;
    pthread_t helper;
    if (steps_left <= 0 || --steps_left > 0)
        return;
    __atomic_sub_fetch(&pk_test_steps_armed, 1, __ATOMIC_SEQ_CST);
    r.pkey = revoke_pkey;
    r.identity = revoke_identity;
    r.status = PK_E_UNSUPPORTED;
    /* This thread waits in pthread_join, where the revocation's signal
     * interrupts it: the handler edits the register as it was here. */
    if (pthread_create(&helper, NULL, revoke_in_helper, &r) == 0) {
        pthread_join(helper, NULL);
        revoked_here = r.status == PK_OK ? 1 : r.status;
    } else {
        revoked_here = PK_E_ERRNO;
    }
}

int pk_test_revoke_at_step(int step, int pkey, uint32_t identity)
{
    if (steps_left > 0)
        __atomic_sub_fetch(&pk_test_steps_armed, 1, __ATOMIC_SEQ_CST);
    steps_left = step > 0 ? step : 0;
    revoked_here = 0;
    revoke_pkey = pkey;
    revoke_identity = identity;
    if (steps_left)
        __atomic_add_fetch(&pk_test_steps_armed, 1, __ATOMIC_SEQ_CST);
    return PK_OK;
}

int pk_test_revoked_at_step(void)
{
    int result = revoked_here;
    if (steps_left > 0) { /* not reached: disarm */
        steps_left = 0;
        __atomic_sub_fetch(&pk_test_steps_armed, 1, __ATOMIC_SEQ_CST);
    }
    return result;
}
