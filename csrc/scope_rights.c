/*
 * pkeys.pkey_get and pkeys.pkey_set in C, for the calls that need no
 * Python: an int or an open Key, rights as an int, this thread.  Anything
 * else -- another type, a value outside a C int, threads=, a refusal --
 * goes to the Python functions of pkeys/_api.py, which check and raise as
 * they always did.  The software backend's PK_E_NEED_PINS is answered
 * here, as the scope types answer it (pk_pins_prepare): going back to
 * Python for it cost more than the mprotect the call makes.
 *
 * The entry points' addresses come from pkeys._api at import (see
 * scope_type.c for why, and the assumption written down there).
 */
#include "scope_type.h"

#include <errno.h>
#include <limits.h>

static __typeof__(pk_key_get) *key_get;
static __typeof__(pk_key_set) *key_set;
static PyObject *get_any;          /* pkeys._api's general pkey_get(pkey) */
static PyObject *set_any;          /* ...pkey_set(pkey, access_rights, *, threads) */
static PyObject *set_failed;       /* (pkey, identity, rights, status, errno) -> None, or raises */
static PyObject *rights_by_value;  /* the four PkeyRights, by value */

/* An int that fits a C int. */
static int fast_int(PyObject *value, int *out)
{
    int overflow;
    long number;
    if (!PyLong_CheckExact(value))
        return 0;
    number = PyLong_AsLongAndOverflow(value, &overflow);
    if (overflow || number < INT_MIN || number > INT_MAX || (number == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = (int)number;
    return 1;
}

/* An int (identity 0: whatever key has the number), or an open Key (its
 * identity: the shim refuses the call once the number is another key's,
 * as after a pkey_free of the number and a new allocation). */
int pk_fast_key_number(PyObject *pkey, int *number, uint32_t *identity)
{
    if (fast_int(pkey, number)) {
        *identity = 0;
        return 1;
    }
    if (pk_key_base && pk_is_key(pkey) && ((KeyObject *)pkey)->pkey >= 0) {
        *number = ((KeyObject *)pkey)->pkey;
        *identity = ((KeyObject *)pkey)->identity;
        return 1;
    }
    return 0;
}

PyObject *pk_fast_pkey_get(PyObject *module, PyObject *pkey)
{
    int number, rights;
    uint32_t identity;
    (void)module;
    if (!key_get || !pk_fast_key_number(pkey, &number, &identity) ||
        (rights = key_get(number, identity)) < 0 || rights > 3)
        return PyObject_CallFunctionObjArgs(get_any, pkey, NULL);
    return PyTuple_GetItem(rights_by_value, rights) == NULL
               ? NULL
               : Py_NewRef(PyTuple_GetItem(rights_by_value, rights));
}

/*
 * The software backend, on a key that guards a foreign buffer: the owners
 * pinned (in C for the common case: scope_type.c), the call again, the
 * pins released once it returned.  A rights change is complete when the
 * shim returns, so nothing is left to record first.  Returns the final
 * status and *error its errno, or PK_E_NEED_PINS with the exception set
 * when the pins could not be taken (nothing changed then).  Out of line:
 * its pk_held would otherwise widen the frame of every pkey_set.
 */
static __attribute__((noinline)) int set_pinned(int number, uint32_t identity, int rights,
                                                int *error)
{
    struct pk_held held = PK_HELD_EMPTY;
    int status = PK_E_NEED_PINS;
    *error = 0;
    while (status == PK_E_NEED_PINS) {
        uint64_t nonce;
        pk_pins_release(&held);
        if (pk_pins_prepare(&nonce, &held) < 0)
            return PK_E_NEED_PINS;
        status = key_set(number, identity, rights, nonce);
        *error = errno;
    }
    pk_pins_release(&held);
    return status;
}

PyObject *pk_fast_pkey_set(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    int number, rights, status, error;
    uint32_t identity;
    (void)module;
    if (!key_set || kwnames || nargs != 2 || !pk_fast_key_number(args[0], &number, &identity) ||
        !fast_int(args[1], &rights)) {
        /* The general path, with every argument as given. */
        Py_ssize_t names = kwnames ? PyTuple_Size(kwnames) : 0, i;
        PyObject *positional = PyTuple_New(nargs), *named = NULL, *result = NULL;
        if (!positional)
            return NULL;
        for (i = 0; i < nargs; i++)
            PyTuple_SetItem(positional, i, Py_NewRef(args[i]));
        if (names && !(named = PyDict_New()))
            goto done;
        for (i = 0; i < names; i++)
            if (PyDict_SetItem(named, PyTuple_GetItem(kwnames, i), args[nargs + i]) < 0)
                goto done;
        result = PyObject_Call(set_any, positional, named);
    done:
        Py_DECREF(positional);
        Py_XDECREF(named);
        return result;
    }
    status = key_set(number, identity, rights, 0);
    if (status == PK_E_NEED_PINS) {
        if ((status = set_pinned(number, identity, rights, &error)) == PK_E_NEED_PINS)
            return NULL;  /* nothing changed */
    } else {
        error = status ? errno : 0;  /* read on failure only: a libc call */
    }
    if (status) {
        PyObject *result = PyObject_CallFunction(set_failed, "iIiii", number, identity, rights,
                                                 status, error);
        if (!result)
            return NULL;
        Py_DECREF(result);
    }
    Py_RETURN_NONE;
}

PyObject *pk_fast_configure_rights(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"key_get", "key_set", "get_any", "set_any", "set_failed",
                            "rights_by_value", NULL};
    unsigned long long get, set;
    PyObject *general[3], *rights, **slots[4] = {&get_any, &set_any, &set_failed,
                                                  &rights_by_value};
    int i;
    (void)module;
    if (key_get)
        return pk_configured_already("configure_rights");
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KKOOOO!:configure_rights", names, &get, &set,
                                     &general[0], &general[1], &general[2], &PyTuple_Type,
                                     &rights))
        return NULL;
    if (!get || !set || PyTuple_Size(rights) != 4) {
        PyErr_SetString(PyExc_ValueError, "configure_rights: two addresses and four rights");
        return NULL;
    }
    for (i = 0; i < 3; i++)
        if (!PyCallable_Check(general[i])) {
            PyErr_SetString(PyExc_TypeError, "configure_rights: the general paths are callables");
            return NULL;
        }
    /* Configured once (above): every slot is still empty. */
    for (i = 0; i < 4; i++)
        *slots[i] = Py_NewRef(i < 3 ? general[i] : rights);
    key_get = (__typeof__(key_get))(uintptr_t)get;
    key_set = (__typeof__(key_set))(uintptr_t)set;
    Py_RETURN_NONE;
}
