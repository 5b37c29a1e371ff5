/*
 * The two backends behind state.c's entry points, with identical entry
 * points (like Wasmtime's mpk/enabled.rs and disabled.rs):
 *
 *  - backend_hardware.c: the real register (or the simulated one), grants
 *    per thread, pkey_alloc/pkey_mprotect; never asks for pins.
 *  - backend_software.c: an emulated register, grants per process, applied
 *    with mprotect to the region table; may answer PK_E_NEED_PINS.
 *
 * pk_state_init() picks one, once, and state.c, regions.c and virtual.c
 * call it through `pk_backend` without asking which it is.  Before that,
 * `pk_backend` is a table whose every entry answers PK_E_UNSUPPORTED.
 *
 * "locked": called with state.c's mutex held.  The arguments were checked
 * by state.c (key number, identity, rights, kind).
 */
#ifndef PKEYS_BACKEND_H
#define PKEYS_BACKEND_H

#include "grants.h"

struct pk_backend {
    int mode; /* PK_MODE_* (0: none chosen) */
    /* Whether a grant is the process's (software) rather than the
     * thread's: ending it from another thread still ends it. */
    int grants_per_process;
    /* locked: allocate a number for a key that will get `identity`;
     * returns it, or a PK_E_* status. */
    int (*alloc)(unsigned int flags, unsigned int rights, uint32_t identity);
    /* locked: free an allocated key that guards no region; calls
     * pk_identity_retire() once nothing can stop the free. */
    int (*free_key)(int pkey, double timeout, struct pk_broadcast *result, uint64_t pins);
    int (*get)(int pkey);
    /* identity: the key's, or 0 for the number's (pk_identity_status) */
    int (*set)(int pkey, uint32_t identity, int rights, uint64_t pins);
    /* locked: the rights of `pkey` in every thread, every grant voided. */
    int (*set_all)(int pkey, unsigned int rights, double timeout, struct pk_broadcast *result,
                   uint64_t pins);
    int64_t (*pkru_read)(void);
    int (*pkru_write)(uint32_t value, uint64_t pins);
    int64_t (*shadow)(void);
    int64_t (*scope_enter)(uint32_t keys, int kind, const uint32_t *identities, uint64_t pins);
    int (*scope_exit)(uint32_t keys, int kind, const uint32_t *identities, int64_t token,
                      uint64_t pins);
    int (*after_fork_in_child)(uint64_t pins);
    int (*birth_snapshot)(struct pk_birth *out);
    int (*birth_settle)(const struct pk_birth *birth);
    /* locked: give [addr, addr + len) `prot` under `pkey`; `tracked`: some
     * of it is in the region table already. */
    int (*tag)(uintptr_t addr, size_t len, int prot, int pkey, int tracked);
};

extern const struct pk_backend *pk_backend;
extern const struct pk_backend pk_backend_hardware;
extern const struct pk_backend pk_backend_software;

#endif
