/*
 * pkeys._scope: the hot path of scopes, as CPython types written in C
 * (Limited API 3.11, so one abi3 wheel serves every later version).
 *
 * Why: a `with` written in Python cannot come within 3x of
 * `with threading.Lock():` (pku-facts.md, issue 16).  These types make
 * `with key.allow():` and `with pkeys.allow(k1, k2):` two direct C calls
 * into the shim.
 *
 * One copy of the state: this module is not linked against the cffi
 * module.  At import, pkeys._key hands configure() the addresses of the
 * shim's entry points (ffi.addressof(lib, ...)) and the Python functions
 * of the rare paths (errors, and the software backend's pins for
 * PK_E_NEED_PINS when they are not the common case pinned here: see
 * pk_pins_prepare).  Errors are raised there,
 * so both paths raise the same exceptions with the same messages.  The
 * call made again with pins is made here, and its outcome recorded
 * before the pins are released: no Python code runs between a grant
 * changing and its token being recorded (or dropped), so an exception
 * raised asynchronously (a signal's KeyboardInterrupt) cannot separate
 * them.
 *
 * Unsafe assumption, written down: configure() is given the addresses of
 * functions whose types are the ones pkeys_api.h declares (__typeof__
 * below), and the cffi module that holds them stays loaded for the life
 * of the process (an extension module is never unloaded).
 *
 * Concurrency: every method runs with the GIL held and calls into the
 * shim without releasing it; the shim's own rules (state.c) cover other
 * threads.  A Python callback (an error path) can run any code, a garbage
 * collection included, so a Scope's token stack is never held in a local
 * across one.
 */
#include "scope_type.h"

#include <errno.h>
#include <string.h>

/* ---- the shim's entry points and Python's rare paths (configure()) ---- */
static __typeof__(pk_scope_enter) *scope_enter;
static __typeof__(pk_scope_exit) *scope_exit;
static __typeof__(pk_thread_serial) *thread_serial;
/* Asked on PK_E_WRONG_THREAD, not at configure(): the backend is chosen
 * after this module is configured (pkeys/_select.py). */
static __typeof__(pk_grants_per_process) *grants_per_process;
static PyObject *prepare_pins;  /* () -> (nonce, held): pk_pins_prepare */
/* Errors get errno too: cffi's ffi.errno is what its own calls saved, and
 * these calls are not cffi's. */
static PyObject *raise_failed;  /* (status, errno) -> raises, with ffi.errno set */
static PyObject *raise_status;  /* (status) -> raises the package's exception */
static PyObject *key_closed;    /* () -> raises InvalidKeyError for a closed Key */
static PyObject *allow_any;     /* (keys, write) -> Scope: pkeys.allow for key numbers */

static PyTypeObject *scope_type;
PyTypeObject *pk_key_base;
PyTypeObject *pk_key_class;

#define INLINE_TOKENS 4

typedef struct {
    PyObject_HEAD
    struct pk_scope scope;          /* what this scope grants: its own copy */
    int64_t *tokens;                /* one per entry not ended yet, latest last */
    Py_ssize_t count;
    Py_ssize_t capacity;
    int64_t inline_tokens[INLINE_TOKENS];
} ScopeObject;

/* What a raiser returned: it must raise; never return as if it had. */
static PyObject *raised(PyObject *result, int status)
{
    Py_XDECREF(result);
    if (!PyErr_Occurred())
        PyErr_Format(PyExc_SystemError, "pkeys: status %d raised nothing", status);
    return NULL;
}

PyObject *pk_raise_with(PyObject *raiser, int status)
{
    return raised(PyObject_CallFunction(raiser, "i", status), status);
}

PyObject *pk_raise_failed(PyObject *raiser, int status, int error)
{
    return raised(PyObject_CallFunction(raiser, "ii", status, error), status);
}

static PyObject *raise_for(int status)
{
    return pk_raise_with(raise_status, status);
}

PyObject *pk_configured_already(const char *function)
{
    /* Once: a later call could point the hot paths at any address. */
    PyErr_Format(PyExc_RuntimeError, "pkeys._scope.%s: configured already, by pkeys at import",
                 function);
    return NULL;
}

/* A new scope granting *scope; a zeroed one for the caller to fill when
 * NULL. */
static ScopeObject *new_scope(const struct pk_scope *scope)
{
    allocfunc alloc = (allocfunc)PyType_GetSlot(scope_type, Py_tp_alloc);
    ScopeObject *self = (ScopeObject *)alloc(scope_type, 0);
    if (!self)
        return NULL;
    if (scope)  /* else the caller fills it (allocated zeroed) */
        self->scope = *scope;
    self->tokens = self->inline_tokens;
    self->capacity = INLINE_TOKENS;
    self->count = 0;
    return self;
}

int pk_reserve_one(void **items, const void *inline_items, Py_ssize_t count,
                   Py_ssize_t *capacity, size_t item_size)
{
    void *grown;
    if (count < *capacity)
        return 0;
    if (!(grown = PyMem_Malloc((size_t)*capacity * 2 * item_size))) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(grown, *items, (size_t)count * item_size);
    if (*items != inline_items)
        PyMem_Free(*items);
    *items = grown;
    *capacity *= 2;
    return 0;
}

/* Room for one more token, made before the grant is taken: once it is,
 * nothing may fail before its token is recorded. */
static int reserve_token(ScopeObject *self)
{
    return pk_reserve_one((void **)&self->tokens, self->inline_tokens, self->count,
                          &self->capacity, sizeof *self->tokens);
}

/* ---- the software backend's pins --------------------------------------- */

/* What the C pinning reads (configure_pins(), from pkeys._state at import):
 * the shim's pin entry points, the owners by token and their class. */
static __typeof__(pk_pins_owners) *pins_owners;
static __typeof__(pk_pins_vouch) *pins_vouch;
static PyObject *owners;        /* pkeys._state._owners: {token: _Owner}, never rebound */
static PyObject *owner_class;   /* pkeys._state._Owner: its ref, base and size are read */
static PyObject *name_ref, *name_base, *name_size;

static void release_exports(struct pk_held *held)
{
    while (held->count > 0)
        PyBuffer_Release(&held->exports[--held->count]);
}

/* Whether the exception set is one of those _Owner.pin takes for "closed"
 * (cffi's from_buffer raises them for a closed mmap or a non-buffer). */
static int closed_owner_error(void)
{
    return PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_ValueError) ||
           PyErr_ExceptionMatches(PyExc_BufferError);
}

/* An int attribute of an _Owner, as a uintptr_t (base) or a size. */
static int owner_number(PyObject *owner, PyObject *name, unsigned long long *value)
{
    PyObject *number = PyObject_GetAttr(owner, name);
    if (!number)
        return -1;
    *value = PyLong_AsUnsignedLongLong(number);
    Py_DECREF(number);
    return *value == (unsigned long long)-1 && PyErr_Occurred() ? -1 : 0;
}

/* Pin one owner as _Owner.pin does when nothing has changed: an export
 * of the live exporter, at the base and of the size it had when tagged.
 * 1: held->exports[held->count] holds it, and held->pins[held->count]
 * describes it; 0: the general path must look at it (missing, dead,
 * closed, moved or resized), nothing taken, no exception; -1: an
 * exception, nothing taken.  Python code may run here (a weakref's or an
 * exporter's finalizer, the lambda that holds a non-mmap exporter): it can
 * change the dict and the C table, which is why the owner is held while
 * it is read, and why the call checks what it touches against what was
 * vouched for. */
static int pin_one(uint64_t token, struct pk_held *held)
{
    Py_buffer *view = &held->exports[held->count];
    PyObject *key, *owner, *ref = NULL, *exporter = NULL;
    unsigned long long base, size;
    int result = -1;
    if (!(key = PyLong_FromUnsignedLongLong(token)))
        return -1;
    owner = PyDict_GetItemWithError(owners, key);  /* borrowed */
    Py_DECREF(key);
    if (!owner)
        return PyErr_Occurred() ? -1 : 0;
    if (Py_TYPE(owner) != (PyTypeObject *)owner_class)
        return 0;  /* not ours to read: the general path decides */
    Py_INCREF(owner);
    if (!(ref = PyObject_GetAttr(owner, name_ref)) || !(exporter = PyObject_CallNoArgs(ref)))
        goto done;
    if (exporter == Py_None) {
        result = 0;  /* collected: the general path forgets it */
        goto done;
    }
    if (PyObject_GetBuffer(exporter, view, PyBUF_SIMPLE) < 0) {
        if (closed_owner_error()) {
            PyErr_Clear();  /* closed: the general path asks again and forgets it */
            result = 0;
        }
        goto done;
    }
    if (owner_number(owner, name_base, &base) < 0 || owner_number(owner, name_size, &size) < 0) {
        PyBuffer_Release(view);
        goto done;
    }
    if ((uintptr_t)view->buf != base || (unsigned long long)view->len != size) {
        PyBuffer_Release(view);  /* moved or resized: the general path follows it */
        result = 0;
        goto done;
    }
    held->pins[held->count] = (struct pk_pin){token, (uintptr_t)view->buf, (size_t)view->len};
    held->count++;
    result = 1;
done:
    Py_XDECREF(exporter);
    Py_XDECREF(ref);
    Py_DECREF(owner);
    return result;
}

/* The common case in C: 1 with every owner asked for pinned and vouched
 * for, 0 for the general path (nothing held, no exception), -1 on an
 * exception (nothing held). */
static int pin_in_c(uint64_t *nonce, struct pk_held *held)
{
    uint64_t tokens[PK_PINS_INLINE];
    int count, i, pinned;
    if (!owners)
        return 0;  /* not configured yet: pkeys._state is importing */
    count = pins_owners(tokens, PK_PINS_INLINE);
    if (count > PK_PINS_INLINE)
        return 0;
    for (i = 0; i < count; i++) {
        if ((pinned = pin_one(tokens[i], held)) <= 0) {
            release_exports(held);
            return pinned;
        }
    }
    /* Last, after every Python code that pinning ran: a nested call's own
     * vouch (from that code) is replaced, not the other way round. */
    *nonce = pins_vouch(count ? held->pins : NULL, count);
    return 1;
}

int pk_pins_prepare(uint64_t *nonce, struct pk_held *held)
{
    PyObject *result;
    int pinned = pin_in_c(nonce, held);
    if (pinned != 0)
        return pinned < 0 ? -1 : 0;
    /* The general path: pkeys/_state.py's prepare_pins. */
    if (!(result = PyObject_CallNoArgs(prepare_pins)))
        return -1;
    if (!PyTuple_Check(result) || PyTuple_Size(result) != 2) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_SystemError, "pkeys: prepare_pins gives (nonce, held)");
        return -1;
    }
    *nonce = PyLong_AsUnsignedLongLong(PyTuple_GetItem(result, 0));
    if (PyErr_Occurred()) {
        Py_DECREF(result);
        return -1;
    }
    held->general = Py_NewRef(PyTuple_GetItem(result, 1));
    Py_DECREF(result);
    return 0;
}

int pk_pins_prepare_ending(uint64_t *nonce, struct pk_held *held,
                           struct pk_pending_error *pending)
{
    int tries;
    for (tries = 0; tries < PK_PINS_ENDING_TRIES; tries++) {
        if (pk_pins_prepare(nonce, held) == 0)
            return 0;
        if (pending->type) {
            PyErr_Clear();  /* the first one is the one raised */
        } else {
            PyErr_Fetch(&pending->type, &pending->value, &pending->traceback);
        }
    }
    PyErr_Restore(pending->type, pending->value, pending->traceback);
    pending->type = pending->value = pending->traceback = NULL;
    return -1;
}

PyObject *pk_pins_raise_pending(struct pk_pending_error *pending, PyObject *result)
{
    if (!pending->type)
        return result;
    Py_XDECREF(result);
    PyErr_Restore(pending->type, pending->value, pending->traceback);
    pending->type = pending->value = pending->traceback = NULL;
    return NULL;
}

void pk_pins_release(struct pk_held *held)
{
    release_exports(held);
    Py_CLEAR(held->general);
}

PyObject *pk_pins_configure(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"pins_owners", "pins_vouch", "owners", "owner_class", NULL};
    unsigned long long listed, vouch;
    PyObject *dict, *cls;
    (void)module;
    if (owners)
        return pk_configured_already("configure_pins");
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KKO!O!:configure_pins", names, &listed,
                                     &vouch, &PyDict_Type, &dict, &PyType_Type, &cls))
        return NULL;
    if (!listed || !vouch) {
        PyErr_SetString(PyExc_ValueError, "configure_pins: an entry point's address is 0");
        return NULL;
    }
    if (!(name_ref = PyUnicode_InternFromString("ref")) ||
        !(name_base = PyUnicode_InternFromString("base")) ||
        !(name_size = PyUnicode_InternFromString("size"))) {
        Py_CLEAR(name_ref);
        Py_CLEAR(name_base);
        return NULL;
    }
    pins_owners = (__typeof__(pins_owners))(uintptr_t)listed;
    pins_vouch = (__typeof__(pins_vouch))(uintptr_t)vouch;
    owner_class = Py_NewRef(cls);
    owners = Py_NewRef(dict);  /* last: it says the rest is set */
    Py_RETURN_NONE;
}

/* ---- Scope -------------------------------------------------------------- */

static PyObject *scope_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    /* Scope(identities, kind): {key number: identity}, a PK_GRANT_* kind.
     * The package makes scopes through Key.allow/deny and pkeys.allow. */
    static char *names[] = {"identities", "kind", NULL};
    PyObject *identities, *number, *identity;
    struct pk_scope scope;
    Py_ssize_t position = 0;
    int kind;
    (void)type;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!i:Scope", names, &PyDict_Type,
                                     &identities, &kind))
        return NULL;
    memset(&scope, 0, sizeof scope);
    scope.kind = kind;
    while (PyDict_Next(identities, &position, &number, &identity)) {
        long k = PyLong_AsLong(number);
        unsigned long value = PyLong_AsUnsignedLong(identity);
        if (PyErr_Occurred())
            return NULL;
        if (k < 0 || k > 15 || value > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "Scope: key numbers are 0..15, identities 32-bit");
            return NULL;
        }
        scope.keys |= 1u << k;
        scope.identities[k] = (uint32_t)value;
    }
    /* Refused here with their own messages: the shim's statuses for them
     * name no argument. */
    if (kind < PK_GRANT_READ_WRITE || kind > PK_GRANT_DENY) {
        PyErr_Format(PyExc_ValueError, "Scope: kind %d is not a PK_GRANT_* kind", kind);
        return NULL;
    }
    if (!scope.keys) {
        PyErr_SetString(PyExc_TypeError, "Scope needs at least one key");
        return NULL;
    }
    return (PyObject *)new_scope(&scope);
}

static void scope_dealloc(PyObject *op)
{
    ScopeObject *self = (ScopeObject *)op;
    PyTypeObject *type = Py_TYPE(op);
    freefunc release = (freefunc)PyType_GetSlot(type, Py_tp_free);
    if (self->tokens != self->inline_tokens)
        PyMem_Free(self->tokens);
    release(op);
    Py_DECREF(type);
}

/* The rare path of an entry: the software backend's pins, then the call
 * again, its token recorded before the pins go; else the exception. */
static PyObject *enter_rare(ScopeObject *self, int64_t token)
{
    int error = errno;
    struct pk_held held = PK_HELD_EMPTY;
    while (token == PK_E_NEED_PINS) {
        uint64_t nonce;
        pk_pins_release(&held);
        if (pk_pins_prepare(&nonce, &held) < 0)
            return NULL;  /* no grant taken */
        /* prepare_pins ran Python code, which may have entered this scope */
        if (reserve_token(self) < 0) {
            pk_pins_release(&held);
            return NULL;
        }
        token = scope_enter(&self->scope, nonce);
        error = errno;
    }
    if (token >= 0)
        self->tokens[self->count++] = token;
    pk_pins_release(&held);
    if (token < 0)
        return pk_raise_failed(raise_failed, (int)token, error);
    return Py_NewRef((PyObject *)self);
}

static PyObject *scope_enter_method(PyObject *op, PyObject *unused)
{
    ScopeObject *self = (ScopeObject *)op;
    int64_t token;
    (void)unused;
    if (reserve_token(self) < 0)
        return NULL;
    token = scope_enter(&self->scope, 0);
    if (token < 0)
        return enter_rare(self, token);
    self->tokens[self->count++] = token;
    Py_INCREF(op);
    return op;
}

/* The index of the token an exit ends: the only one, or this thread's
 * latest entry, or (another thread's) the latest, which the shim then
 * refuses.  It stays in the list until the exit's outcome is known. */
static int find_token(ScopeObject *self, Py_ssize_t *index)
{
    if (self->count == 0) {
        raise_for(PK_E_UNBALANCED);
        return -1;
    }
    *index = self->count - 1;
    if (self->count > 1) {
        uint32_t serial = thread_serial();
        Py_ssize_t i;
        for (i = self->count - 1; i >= 0; i--)
            if ((uint32_t)((uint64_t)self->tokens[i] >> 32) == serial) {
                *index = i;
                break;
            }
    }
    return 0;
}

static Py_ssize_t token_index(ScopeObject *self, int64_t token)
{
    Py_ssize_t i;
    for (i = self->count - 1; i >= 0; i--)
        if (self->tokens[i] == token)
            return i;
    return -1;
}

static void remove_token(ScopeObject *self, Py_ssize_t index)
{
    memmove(&self->tokens[index], &self->tokens[index + 1],
            (size_t)(self->count - index - 1) * sizeof *self->tokens);
    self->count--;
}

/* The rare path of an exit: the software backend's pins, then the call
 * again, its outcome recorded before the pins go; else the exception. */
static PyObject *exit_rare(ScopeObject *self, int64_t token, int status)
{
    int error = errno;
    struct pk_held held = PK_HELD_EMPTY;
    struct pk_pending_error pending = PK_PENDING_NONE;
    Py_ssize_t index;
    while (status == PK_E_NEED_PINS) {
        uint64_t nonce;
        pk_pins_release(&held);
        if (pk_pins_prepare_ending(&nonce, &held, &pending) < 0)
            return NULL;  /* the grant and its token stay: the scope is still active */
        /* prepare_pins ran Python code: a finalizer exiting this scope may
         * have ended this very entry; this exit then ends the one it would
         * take now. */
        if (token_index(self, token) < 0) {
            if (find_token(self, &index) < 0) {
                pk_pins_release(&held);
                return pk_pins_raise_pending(&pending, NULL);
            }
            token = self->tokens[index];
        }
        status = scope_exit(&self->scope, token, nonce);
        error = errno;
    }
    /* On hardware a grant refused for the wrong thread stays active in the
     * thread that entered it (its register), and so does its token. */
    if (status != PK_E_WRONG_THREAD || grants_per_process())
        remove_token(self, token_index(self, token));
    pk_pins_release(&held);
    /* An interrupt kept while pinning is raised, whatever else the exit says. */
    if (status)
        return pk_pins_raise_pending(&pending, pk_raise_failed(raise_failed, status, error));
    return pk_pins_raise_pending(&pending, Py_NewRef(Py_None));
}

static PyObject *scope_exit_method(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    ScopeObject *self = (ScopeObject *)op;
    Py_ssize_t index;
    int64_t token;
    int status;
    (void)args;
    (void)nargs;
    if (find_token(self, &index) < 0)
        return NULL;
    token = self->tokens[index];
    status = scope_exit(&self->scope, token, 0);
    if (status)
        return exit_rare(self, token, status);
    remove_token(self, index);
    Py_RETURN_NONE;
}

static PyObject *scope_get_active(PyObject *op, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(((ScopeObject *)op)->count);
}

static PyMethodDef scope_methods[] = {
    {"__enter__", scope_enter_method, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))scope_exit_method, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef scope_getset[] = {
    {"active", scope_get_active, NULL,
     PyDoc_STR("How many entries of this scope object have not ended yet."), NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(scope_doc,
"While active, grants this thread (the whole process on the software\n"
"backend) access to some keys: read-write, read-only, or none (deny).\n"
"\n"
"Each entry adds one grant and each exit withdraws one.  One scope object\n"
"may be entered again inside its own block (exits then come in reverse\n"
"order); blocks that can end in any order -- asyncio tasks, generators,\n"
"threads -- each take their own scope from ``key.allow()``, which is\n"
"cheap.  A scope must end in the thread that entered it (ScopeError).\n"
"Several active scopes on one key combine as: any deny wins, then any\n"
"read-write grant, then any read-only grant; when the last one ends the\n"
"key has the rights it had before the first began (or those given by\n"
"``pkey_set`` meanwhile).");

static PyType_Slot scope_slots[] = {
    {Py_tp_doc, (void *)scope_doc},
    {Py_tp_new, scope_tp_new},
    {Py_tp_dealloc, scope_dealloc},
    {Py_tp_methods, scope_methods},
    {Py_tp_getset, scope_getset},
    {0, NULL},
};

static PyType_Spec scope_spec = {
    "pkeys.Scope", sizeof(ScopeObject), 0, Py_TPFLAGS_DEFAULT, scope_slots,
};

/* ---- KeyBase: what Key.allow() and Key.deny() read -------------------- */

static PyObject *key_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    KeyObject *self = (KeyObject *)alloc(type, 0);
    (void)args;
    (void)kwargs;
    if (self)
        self->pkey = -1;  /* closed until _bind(): a failed __init__ leaves nothing */
    return (PyObject *)self;
}

static void key_dealloc(PyObject *op)
{
    PyTypeObject *type = Py_TYPE(op);
    freefunc release = (freefunc)PyType_GetSlot(type, Py_tp_free);
    release(op);
    Py_DECREF(type);
}

static PyObject *key_bind(PyObject *op, PyObject *args)
{
    KeyObject *self = (KeyObject *)op;
    int pkey, kind;
    unsigned int identity;
    if (!PyArg_ParseTuple(args, "iI:_bind", &pkey, &identity))
        return NULL;
    if (pkey < 1 || pkey > 15) {
        PyErr_SetString(PyExc_ValueError, "_bind: a Key's number is 1..15");
        return NULL;
    }
    for (kind = PK_GRANT_READ_WRITE; kind <= PK_GRANT_DENY; kind++) {
        struct pk_scope *scope = &self->scopes[kind];
        memset(scope, 0, sizeof *scope);
        scope->keys = 1u << pkey;
        scope->kind = kind;
        scope->identities[pkey] = identity;
    }
    self->identity = identity;
    self->pkey = pkey;
    Py_RETURN_NONE;
}

uint32_t pk_scope_thread_serial(void)
{
    return thread_serial();
}

int pk_write_argument(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                      Py_ssize_t first, const char *function, int *write)
{
    PyObject *value = NULL;
    Py_ssize_t names = kwnames ? PyTuple_Size(kwnames) : 0, i;
    if (nargs > first + 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most 1 positional argument (%zd given)",
                     function, nargs - first);
        return -1;
    }
    if (nargs == first + 1)
        value = args[first];
    for (i = 0; i < names; i++) {
        PyObject *name = PyTuple_GetItem(kwnames, i);
        if (!name || PyUnicode_CompareWithASCIIString(name, "write") != 0 || value) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R",
                         function, name);
            return -1;
        }
        value = args[nargs + i];
    }
    if (value && (*write = PyObject_IsTrue(value)) < 0)
        return -1;
    return 0;
}

static PyObject *key_allow(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    KeyObject *self = (KeyObject *)op;
    int write = 1;
    if ((nargs || kwnames) && pk_write_argument(args, nargs, kwnames, 0, "allow", &write) < 0)
        return NULL;
    if (self->pkey < 0) {
        PyObject *result = PyObject_CallNoArgs(key_closed);
        Py_XDECREF(result);
        return NULL;
    }
    return (PyObject *)new_scope(&self->scopes[write ? PK_GRANT_READ_WRITE : PK_GRANT_READ_ONLY]);
}

static PyObject *key_deny(PyObject *op, PyObject *unused)
{
    KeyObject *self = (KeyObject *)op;
    (void)unused;
    if (self->pkey < 0) {
        PyObject *result = PyObject_CallNoArgs(key_closed);
        Py_XDECREF(result);
        return NULL;
    }
    return (PyObject *)new_scope(&self->scopes[PK_GRANT_DENY]);
}

static PyMethodDef key_methods[] = {
    {"_bind", key_bind, METH_VARARGS,
     PyDoc_STR("_bind(pkey, identity): the key this object now owns.")},
    {"allow", (PyCFunction)(void (*)(void))key_allow, METH_FASTCALL | METH_KEYWORDS,
     PyDoc_STR("allow(write=True)\n--\n\n"
               "A scope that lets this thread read, and write unless ``write`` is\n"
               "false, memory tagged with this key.")},
    {"deny", key_deny, METH_NOARGS,
     PyDoc_STR("deny()\n--\n\n"
               "A scope that denies this thread all access while it is active,\n"
               "whatever allow() scopes are active too.")},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef key_members[] = {
    {"_identity", T_UINT, offsetof(KeyObject, identity), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *key_get_pkey(PyObject *op, void *closure)
{
    (void)closure;
    return PyLong_FromLong(((KeyObject *)op)->pkey);
}

/* Only ever closes: the number is given by _bind() alone, because
 * pkeys.allow, pkey_get and pkey_set read it as a bit index without a
 * check (key._pkey = 2**31 - 1 must not reach them). */
static int key_set_pkey(PyObject *op, PyObject *value, void *closure)
{
    long number;
    (void)closure;
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "a Key's _pkey cannot be deleted");
        return -1;
    }
    number = PyLong_AsLong(value);
    if (number == -1 && PyErr_Occurred())
        return -1;
    if (number != -1) {
        PyErr_SetString(PyExc_ValueError, "a Key's _pkey can only be set to -1 (closed)");
        return -1;
    }
    ((KeyObject *)op)->pkey = -1;
    return 0;
}

static PyGetSetDef key_getset[] = {
    {"_pkey", key_get_pkey, key_set_pkey,
     PyDoc_STR("The key number, -1 once closed (set only to -1)."), NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot key_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("The C part of pkeys.Key: its number, identity and scopes.")},
    {Py_tp_new, key_tp_new},
    {Py_tp_dealloc, key_dealloc},
    {Py_tp_methods, key_methods},
    {Py_tp_members, key_members},
    {Py_tp_getset, key_getset},
    {0, NULL},
};

static PyType_Spec key_spec = {
    "pkeys._scope.KeyBase", sizeof(KeyObject), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    key_slots,
};

/* ---- pkeys.allow(*keys, write=True) ------------------------------------ */

static PyObject *allow_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames)
{
    Py_ssize_t i;
    int write = 1;
    uint32_t key_bits = 0;
    ScopeObject *made;
    (void)module;
    /* Filled in place: identities of keys not in `keys` are never read
     * (state.c), and the new scope's are zero. */
    if (!(made = new_scope(NULL)))
        return NULL;
    for (i = 0; i < nargs; i++) {
        KeyObject *key = (KeyObject *)args[i];
        int pkey;
        if (!pk_is_key(args[i]) || (pkey = key->pkey) < 0)
            break;  /* a number, or a closed Key: the general path says which */
        key_bits |= 1u << pkey;
        made->scope.identities[pkey] = key->identity;
    }
    made->scope.keys = key_bits;
    if ((kwnames && pk_write_argument(args, nargs, kwnames, nargs, "allow", &write) < 0) ||
        i < nargs || nargs == 0) {
        PyObject *keys;
        Py_DECREF(made);
        if (PyErr_Occurred() || !(keys = PyTuple_New(nargs)))
            return NULL;
        for (i = 0; i < nargs; i++)
            PyTuple_SetItem(keys, i, Py_NewRef(args[i]));
        return PyObject_CallFunction(allow_any, "Ni", keys, write);
    }
    made->scope.kind = write ? PK_GRANT_READ_WRITE : PK_GRANT_READ_ONLY;
    return (PyObject *)made;
}

/* ---- configure() --------------------------------------------------------- */

static PyObject *configure(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"scope_enter", "scope_exit", "thread_serial", "prepare_pins",
                            "raise_failed", "raise_status", "key_closed", "allow_any",
                            "grants_per_process", "key_class", NULL};
    unsigned long long enter, exit, serial, per_process;
    PyObject *callbacks[5], *key_class;
    int i;
    (void)module;
    if (scope_enter)
        return pk_configured_already("configure");
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KKKOOOOOKO!:configure", names, &enter,
                                     &exit, &serial, &callbacks[0], &callbacks[1],
                                     &callbacks[2], &callbacks[3], &callbacks[4], &per_process,
                                     &PyType_Type, &key_class))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)key_class, pk_key_base)) {
        PyErr_SetString(PyExc_TypeError, "configure: key_class must derive from KeyBase");
        return NULL;
    }
    if (!enter || !exit || !serial || !per_process) {
        PyErr_SetString(PyExc_ValueError, "configure: an entry point's address is 0");
        return NULL;
    }
    for (i = 0; i < 5; i++) {
        if (!PyCallable_Check(callbacks[i])) {
            PyErr_SetString(PyExc_TypeError, "configure: the error paths must be callable");
            return NULL;
        }
    }
    {
        /* Configured once (above): every slot is still empty. */
        PyObject **slots[5] = {&prepare_pins, &raise_failed, &raise_status, &key_closed,
                               &allow_any};
        for (i = 0; i < 5; i++)
            *slots[i] = Py_NewRef(callbacks[i]);
    }
    scope_enter = (__typeof__(scope_enter))(uintptr_t)enter;
    scope_exit = (__typeof__(scope_exit))(uintptr_t)exit;
    thread_serial = (__typeof__(thread_serial))(uintptr_t)serial;
    grants_per_process = (__typeof__(grants_per_process))(uintptr_t)per_process;
    pk_key_class = (PyTypeObject *)Py_NewRef(key_class);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("Hand this module the shim's entry points and Python's rare paths "
               "(pkeys._key does, once, at import).")},
    {"allow", (PyCFunction)(void (*)(void))allow_keys, METH_FASTCALL | METH_KEYWORDS,
     PyDoc_STR("allow(*keys, write=True)\n--\n\n"
               "One scope, one register write, for several keys at once.")},
    {"configure_pins", (PyCFunction)(void (*)(void))pk_pins_configure,
     METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("Hand this module pk_pins_owners, pk_pins_vouch and pkeys._state's owners, "
               "for pinning in C (pkeys._state does, once, at import).")},
    {"configure_rights", (PyCFunction)(void (*)(void))pk_fast_configure_rights,
     METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("Hand this module pk_key_get, pk_key_set and pkeys._api's general paths "
               "(pkeys._api does, once, at import).")},
    {"configure_blocks", (PyCFunction)(void (*)(void))pk_block_configure,
     METH_VARARGS | METH_KEYWORDS,
     PyDoc_STR("Hand this module pk_vbuf_enter, pk_vbuf_exit and pkeys._buffer's rare paths "
               "(pkeys._buffer does, once, at import).")},
    {"guard_seen", pk_block_guard_seen, METH_VARARGS,
     PyDoc_STR("guard_seen(faulthandler_enabled, handler): what pkeys._guard.install saw.")},
    {"pkey_get", pk_fast_pkey_get, METH_O,
     PyDoc_STR("pkey_get(pkey)\n--\n\n"
               "This thread's rights for an allocated key (or key 0), as in force now\n"
               "(the process's on the software backend).")},
    {"pkey_set", (PyCFunction)(void (*)(void))pk_fast_pkey_set, METH_FASTCALL | METH_KEYWORDS,
     PyDoc_STR("pkey_set(pkey, access_rights, *, threads='current')\n--\n\n"
               "Set the rights for an allocated key (not key 0) outside scopes: this\n"
               "thread's, or with ``threads=\"all\"`` every thread's at once (active\n"
               "scopes on the key lose their grants; see Key.revoke).  Inside an active\n"
               "scope they take effect when it ends.  The register is written only if\n"
               "the value changes.")},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "pkeys._scope",
    PyDoc_STR("The hot path of pkeys' scopes, in C (see csrc/scope_type.c)."), -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scope(void)
{
    PyObject *module = PyModule_Create(&module_def);
    if (!module)
        return NULL;
    scope_type = (PyTypeObject *)PyType_FromSpec(&scope_spec);
    pk_key_base = (PyTypeObject *)PyType_FromSpec(&key_spec);
    if (!scope_type || !pk_key_base ||
        PyModule_AddObjectRef(module, "Scope", (PyObject *)scope_type) < 0 ||
        PyModule_AddObjectRef(module, "KeyBase", (PyObject *)pk_key_base) < 0 ||
        pk_block_init(module) < 0 || pk_buffer_base_init(module) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
