/*
 * Shared by the files of pkeys._scope (csrc/scope_type.c,
 * csrc/scope_rights.c): the hot paths in C.  Never seen by cffi.
 */
#ifndef PKEYS_SCOPE_TYPE_H
#define PKEYS_SCOPE_TYPE_H

#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030B0000
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <stdint.h>

#include "pkeys_api.h"

/* pkeys.Key's C base: what allow(), deny(), pkey_get() and pkey_set()
 * read without Python code. */
typedef struct {
    PyObject_HEAD
    int pkey;                       /* -1 once closed (Key._pkey) */
    unsigned int identity;          /* Key._identity */
    struct pk_scope scopes[3];      /* one per PK_GRANT_* kind, made once */
} KeyObject;

extern PyTypeObject *pk_key_base;
extern PyTypeObject *pk_key_class;  /* pkeys.Key itself (configure()) */

/* Whether `o` is a Key: pkeys.Key itself without a call, else a subclass. */
static inline int pk_is_key(PyObject *o)
{
    return Py_TYPE(o) == pk_key_class || PyObject_TypeCheck(o, pk_key_base);
}

/* scope_rights.c: pkeys.pkey_get and pkeys.pkey_set (one thread's rights). */
PyObject *pk_fast_pkey_get(PyObject *module, PyObject *pkey);
PyObject *pk_fast_pkey_set(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames);
PyObject *pk_fast_configure_rights(PyObject *module, PyObject *args, PyObject *kwargs);

/* scope_type.c: the thread serial a token carries (pk_thread_serial), and
 * the write= argument of allow() and unlocked(): positional at `first`
 * or by name; *write keeps its default when absent. */
uint32_t pk_scope_thread_serial(void);
/* Calls raiser(status), a Python function that raises the package's
 * exception for it; returns NULL with that exception set. */
PyObject *pk_raise_with(PyObject *raiser, int status);
/* Calls raiser(status, errno), which raises with ffi.errno set to the
 * errno of the failed call (cffi's is what its own calls saved, and the
 * shim's entry points called from here are not cffi's). */
PyObject *pk_raise_failed(PyObject *raiser, int status, int error);
/* The software backend's pins, for a call that answered PK_E_NEED_PINS in
 * this thread: pk_pins_prepare gives *nonce, to call again with, and fills
 * *held, to keep until that call returned and its outcome is recorded;
 * pk_pins_release then releases what it holds and empties it again.  A
 * pk_held starts empty (PK_HELD_EMPTY) and must not move while it holds
 * pins: C reads its pk_pin array during the call (pk_pins_vouch).
 *
 * The common case is pinned here in C (scope_type.c, pin_in_c): every
 * owner asked for is in pkeys._state._owners, alive, and exports exactly
 * the span it had, and there are at most PK_PINS_INLINE of them.  Anything
 * else -- an owner missing, dead, moved or shrunk, more owners -- goes to
 * pkeys/_state.py's prepare_pins, the one place that knows how to handle
 * those, whose held objects are then kept in `general`.
 *
 * An exception (a signal's, a MemoryError) leaves all as it was: no grant
 * changed, nothing held.  Releasing runs no Python code for an mmap or any
 * other exporter written in C (an export's release only counts down), so
 * nothing can interrupt between the call and the end of the path that
 * records it.  Unsafe assumption, written down: nothing else keeps
 * `general` (a profiler that kept prepare_pins' frame would keep the pins
 * longer, which only makes the owner's close() wait or raise BufferError
 * meanwhile). */
#define PK_PINS_INLINE 4
struct pk_held {
    PyObject *general;                      /* prepare_pins' held, or NULL */
    int count;                              /* exports[0..count) are held */
    Py_buffer exports[PK_PINS_INLINE];
    struct pk_pin pins[PK_PINS_INLINE];     /* what was vouched for */
};
#define PK_HELD_EMPTY {.general = NULL, .count = 0}
int pk_pins_prepare(uint64_t *nonce, struct pk_held *held);
/* The same for a call that ends a grant (a scope's or a block's exit),
 * which a `with` statement makes once: an exception while pinning (a
 * signal's KeyboardInterrupt) would leave the grant with nothing left to
 * end it.  So the exception is kept in *pending (the first one, if several)
 * and the pins are prepared again, up to PK_PINS_ENDING_TRIES times; the
 * caller ends the grant, then raises *pending (pk_pins_raise_pending).
 * Returns -1, with the first exception set again, only once the tries are
 * spent: the grant then stays, as before. */
#define PK_PINS_ENDING_TRIES 16
struct pk_pending_error {
    PyObject *type, *value, *traceback;
};
#define PK_PENDING_NONE {NULL, NULL, NULL}
int pk_pins_prepare_ending(uint64_t *nonce, struct pk_held *held,
                           struct pk_pending_error *pending);
/* NULL with *pending raised (over any exception set), if there is one;
 * else `result`. */
PyObject *pk_pins_raise_pending(struct pk_pending_error *pending, PyObject *result);
void pk_pins_release(struct pk_held *held);
PyObject *pk_pins_configure(PyObject *module, PyObject *args, PyObject *kwargs);
/* Raises RuntimeError: each configure function runs once, at import. */
PyObject *pk_configured_already(const char *function);
int pk_write_argument(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                      Py_ssize_t first, const char *function, int *write);

/* scope_block.c: pkeys.Unlocked, its exporter, and ProtectedBuffer's base. */
/* Room for one more item in an array that starts inline (`inline_items`)
 * and doubles on the heap: 0, or -1 with MemoryError set. */
int pk_reserve_one(void **items, const void *inline_items, Py_ssize_t count,
                   Py_ssize_t *capacity, size_t item_size);
PyObject *pk_block_new(PyObject *owner, PyObject *mapping, int write);
PyObject *pk_block_configure(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *pk_block_guard_seen(PyObject *module, PyObject *args);
int pk_block_init(PyObject *module);
int pk_buffer_base_init(PyObject *module);

/* A key number from a Python int (*identity 0) or an open Key (*identity
 * its own), without Python code; 0 when the argument needs the general
 * path (its checks and messages). */
int pk_fast_key_number(PyObject *pkey, int *number, uint32_t *identity);

#endif
