/*
 * The package's entry points for keys, rights and scopes: they check their
 * arguments and hand over to the backend chosen once by pk_state_init()
 * (backend.h).  The grant algebra, identities and revocation stamps are in
 * grants.c; the backends' own state (register, grants in force) is in
 * backend_hardware.c and backend_software.c; which memory each key guards
 * is in regions.c.
 *
 * One mutex guards all of that state that is not per thread, and no Python
 * code ever runs while it is held: every entry point is a single cffi
 * call.  A finalizer that the garbage collector runs at any allocation can
 * therefore call in without ever waiting on its own thread.  fork() holds
 * it across the fork (pk_fork_hooks, below), so a child never inherits a
 * half-made change.
 */
#include "backend.h"

#include <pthread.h>
#include <string.h>

static pthread_mutex_t state_mutex = PTHREAD_MUTEX_INITIALIZER;

void pk_state_lock(void) { pthread_mutex_lock(&state_mutex); }
void pk_state_unlock(void) { pthread_mutex_unlock(&state_mutex); }

/* ---- the backend, chosen once ------------------------------------------ */

static const struct pk_backend unselected = {.mode = 0};

/* Written once, by pk_state_init under the mutex, before any key exists;
 * read without it. */
const struct pk_backend *pk_backend = &unselected;

static inline const struct pk_backend *backend(void)
{
    return __atomic_load_n(&pk_backend, __ATOMIC_ACQUIRE);
}

/* Every entry point answers PK_E_UNSUPPORTED until a backend is chosen
 * (the unavailable backend never chooses one). */
#define REQUIRE_BACKEND()                      \
    do {                                       \
        if (backend() == &unselected)          \
            return PK_E_UNSUPPORTED;           \
    } while (0)

int pk_state_init(int mode)
{
    const struct pk_backend *chosen;
    if (mode == PK_MODE_HARDWARE)
        chosen = &pk_backend_hardware;
    else if (mode == PK_MODE_SOFTWARE)
        chosen = &pk_backend_software;
    else
        return PK_E_RIGHTS;
    if (mode == PK_MODE_HARDWARE && !pk_ospke_enabled)
        return PK_E_UNSUPPORTED;
    pthread_mutex_lock(&state_mutex);
    if (mode == PK_MODE_HARDWARE)
        pk_exposure_init();
    __atomic_store_n(&pk_backend, chosen, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&state_mutex);
    pk_fork_hooks_install();
    return PK_OK;
}

int pk_state_mode(void) { return backend()->mode; }

/* ---- fork ---------------------------------------------------------------- */

/*
 * The one pthread_atfork registration of the shim.  Before the fork every
 * lock is taken in the order the code nests them (the virtual-key pool's
 * lock is held while it calls into state.c: pool first, then the state
 * mutex), so no other thread is inside either when the child is made;
 * after it they are released in the reverse order, and the child then
 * drops what secretmem.c keeps for the parent's memfd_secret mappings.
 * The child's only thread is the one that locked them: it may unlock.
 */
static void before_fork(void)
{
    pk_vkeys_pool_lock();
    pthread_mutex_lock(&state_mutex);
}

static void after_fork_in_parent(void)
{
    pthread_mutex_unlock(&state_mutex);
    pk_vkeys_pool_unlock();
}

static void after_fork_in_child(void)
{
    after_fork_in_parent();
    pk_exposure_forked_child();
    pk_secretmem_forked_child();
}

static pthread_once_t fork_hooks_once = PTHREAD_ONCE_INIT;

static void register_fork_hooks(void)
{
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
}

void pk_fork_hooks_install(void) { pthread_once(&fork_hooks_once, register_fork_hooks); }

/* Nothing to drop where no backend was ever chosen (no grant exists). */
int pk_after_fork_in_child(uint64_t pins)
{
    if (backend() == &unselected)
        return PK_OK;
    return backend()->after_fork_in_child(pins);
}

/* ---- allocation -------------------------------------------------------- */

/* Flags and rights are validated by the caller; the kernel rechecks them. */
int pk_key_alloc(unsigned int flags, unsigned int access_rights, uint32_t *identity)
{
    uint32_t next;
    int pkey;
    REQUIRE_BACKEND();
    pk_state_lock();
    next = pk_identity_next();
    pkey = backend()->alloc(flags, access_rights, next);
    if (pkey >= 0) {
        pk_identity_assign(pkey, next);
        *identity = next;
    }
    pk_state_unlock();
    return pkey;
}

/* Whether `pkey` may be given `access_rights`: an allocated key other than
 * key 0, and rights in 0..3. */
static int check_settable(int pkey, int access_rights)
{
    int status;
    REQUIRE_BACKEND();
    if ((status = pk_identity_check_number(pkey)) != PK_OK)
        return status;
    if (pkey == 0)
        return PK_E_KEY_ZERO;
    if (access_rights < 0 || access_rights > 3)
        return PK_E_RIGHTS;
    return PK_OK;
}

/* The key of number `pkey` is allocated, and still the one of `identity`
 * (0: any).  Under the state mutex where the answer must still hold when
 * the caller acts on it. */
static int check_same_key(int pkey, uint32_t identity)
{
    return pk_identity_status(PK_LOAD(pk_key_identities[pkey]), identity);
}

/*
 * Free a key: refused for key 0, for a key still guarding tracked memory,
 * and (identity != 0) for a Key object whose key was already freed.
 *
 * Whether the key is still allocated is decided under the mutex only: a
 * free in another thread retires the identity before its broadcast and
 * restores it if the broadcast fails (hw_free_key), and holds the mutex
 * throughout.  A look before the mutex could see that free in flight, take
 * the key for freed, and a Key.close() would then mark its Key closed while
 * the failed free left the key allocated.
 */
int pk_key_free(int pkey, uint32_t identity, double timeout, struct pk_broadcast *result,
                uint64_t pins)
{
    int status;
    REQUIRE_BACKEND();
    if (pkey < 0 || pkey >= PK_NKEYS)
        return PK_E_KEY_RANGE;
    if (pkey == 0)
        return PK_E_KEY_ZERO;
    pk_state_lock();
    if ((status = check_same_key(pkey, identity)) != PK_OK)
        ;
    else if (pk_regions_count(pkey))
        status = PK_E_IN_USE;
    else
        status = backend()->free_key(pkey, timeout, result, pins);
    pk_state_unlock();
    return status;
}

/* ---- rights ------------------------------------------------------------ */

int pk_key_get(int pkey, uint32_t identity)
{
    int status;
    REQUIRE_BACKEND();
    if ((status = pk_identity_check_number(pkey)) != PK_OK)
        return status;
    /* Key 0 has no identity (only an int names it); a read racing a free is
     * as stale as any read. */
    if (identity && (status = check_same_key(pkey, identity)) != PK_OK)
        return status;
    return backend()->get(pkey);
}

/* The rights outside scopes.  While this thread (hardware) or the process
 * (software) has grants on the key, they stay in force and the new rights
 * take over when the last one ends. */
int pk_key_set(int pkey, uint32_t identity, int access_rights, uint64_t pins)
{
    int status = check_settable(pkey, access_rights);
    if (status != PK_OK)
        return status;
    /* The identity is checked by the backend, where the change is made:
     * a Key closed, and its number given to a new key, since the caller
     * read the number must not have the new key's rights set. */
    return backend()->set(pkey, identity, access_rights, pins);
}

/* The rights of `pkey` in every thread at once, and every grant on it
 * voided (scopes that are active keep no access and re-grant nothing when
 * they end). */
int pk_key_set_all(int pkey, uint32_t identity, int access_rights, double timeout,
                   struct pk_broadcast *result, uint64_t pins)
{
    int status = check_settable(pkey, access_rights);
    if (status != PK_OK)
        return status;
    pk_state_lock();
    if ((status = check_same_key(pkey, identity)) == PK_OK)
        status = backend()->set_all(pkey, (unsigned)access_rights, timeout, result, pins);
    pk_state_unlock();
    return status;
}

int64_t pk_pkru_read(void)
{
    REQUIRE_BACKEND();
    return backend()->pkru_read();
}

/* The whole register.  Keys with active grants keep them; the value
 * becomes their base. */
int pk_pkru_write(uint32_t value, uint64_t pins)
{
    REQUIRE_BACKEND();
    if (value & PK_KEY_MASK(0))
        return PK_E_KEY_ZERO;
    return backend()->pkru_write(value, pins);
}

int64_t pk_shadow_pkru(void)
{
    if (backend() == &unselected)
        return -1;
    return backend()->shadow();
}

/* ---- scopes ------------------------------------------------------------ */

/* Each backend checks the scope's key identities itself, before it counts
 * them (the software backend under its mutex; the hardware one again after
 * its register write). */
int64_t pk_scope_enter(const struct pk_scope *scope, uint64_t pins)
{
    REQUIRE_BACKEND();
    if (scope->kind < 0 || scope->kind > 2)
        return PK_E_RIGHTS;
    return backend()->scope_enter(scope->keys, scope->kind, scope->identities, pins);
}

int pk_scope_exit(const struct pk_scope *scope, int64_t token, uint64_t pins)
{
    REQUIRE_BACKEND();
    if (scope->kind < 0 || scope->kind > 2 || token < 0)
        return PK_E_RIGHTS;
    return backend()->scope_exit(scope->keys, scope->kind, scope->identities, token, pins);
}

/* Whether a scope's grant ended from another thread (PK_E_WRONG_THREAD)
 * ended anyway: so on the software backend, whose grants are the
 * process's. */
int pk_grants_per_process(void) { return backend()->grants_per_process; }

/* ---- threads born inside a block ---------------------------------------- */

int pk_birth_snapshot(struct pk_birth *out)
{
    memset(out, 0, sizeof *out);
    /* First: a revocation stamped after this read is skipped by settle,
     * since it reaches the new thread by itself. */
    out->epoch = PK_LOAD(pk_revocation_epoch);
    if (backend() == &unselected)
        return 0;
    return backend()->birth_snapshot(out);
}

int pk_birth_settle(const struct pk_birth *birth)
{
    if (backend() == &unselected)
        return PK_OK;
    return backend()->birth_settle(birth);
}
