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
 * this thread: pkeys/_state.py's prepare_pins (the one place that knows
 * how) gives *nonce, to call again with, and *held, to keep until that call
 * returned and its outcome is recorded.  Its exception (a signal's, a
 * MemoryError) leaves all as it was: no grant changed.  Released by
 * dropping the reference: the exports are cffi buffers, which release at
 * deallocation, so no Python code runs, and nothing can interrupt, between
 * the call and the end of the path that records it.  Unsafe assumption,
 * written down: nothing else keeps `held` (a profiler that kept
 * prepare_pins' frame would keep the pins longer, which only makes the
 * owner's close() wait or raise BufferError meanwhile). */
int pk_pins_prepare(uint64_t *nonce, PyObject **held);
void pk_pins_release(PyObject *held);
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

/* A C int from a Python int or an open Key, without Python code; 0 when
 * the argument needs the general path (its checks and messages). */
int pk_fast_key_number(PyObject *pkey, int *number);

#endif
