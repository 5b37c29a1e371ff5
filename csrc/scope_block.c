/*
 * pkeys.Unlocked in C: the block of ProtectedBuffer.unlocked(), whose hot
 * path -- a use and a grant (pk_vbuf_enter), a fresh view, and their end
 * (pk_vbuf_exit) -- runs no Python code and makes no syscall.
 *
 * Escaped views, exactly and without a syscall: each entry makes its view
 * from an exporter of its own (BlockExport, below), which counts the
 * buffer exports it has handed out.  At exit the entry's view is
 * released; an export still counted then, or any reference to the
 * exporter but the entry's, belongs to something made from the view (a
 * slice's or a cast's managed buffer, a numpy array, view.obj) that
 * outlived the block.  Another block's views, in this thread or another,
 * come from other exporters and never count here.  An exporter holds the
 * buffer's pin (the mmap's export), so an escaped view keeps the memory
 * mapped.  Unsafe assumption, written down: reference counts are exact
 * (CPython; the exporter is in no cycle, and is never immortal).
 *
 * The buffer's fault guard stays first in line without a syscall: each
 * entry compares what Python shows of SIGSEGV's handlers with what the
 * last check saw (pkeys/_guard.py has the assumption this rests on) and
 * calls back into Python only when that changed.
 *
 * Everything rare is Python's (pkeys/_buffer.py): preparing the software
 * backend's pins (pk_pins_prepare), a block ended in another thread,
 * errors, recording an escaped view, closing a buffer collected while in
 * use.  The call made again with pins is made here, and recorded before
 * the pins are released: no Python code runs between a grant changing and
 * its entry being recorded or dropped (scope_type.c says why).
 */
#include "scope_type.h"

#include <errno.h>
#include <string.h>

static __typeof__(pk_vbuf_enter) *vbuf_enter;
static __typeof__(pk_vbuf_exit) *vbuf_exit;
static PyObject *enter_failed;      /* (status, errno) -> raises */
static PyObject *exit_failed;       /* (mapping, status, errno) -> None, or raises */
static PyObject *view_escaped;      /* (mapping, exporter) -> None: recorded before the use ends */
static PyObject *use_ended;         /* (mapping) -> None: closes an orphaned buffer */
static PyObject *raise_status;      /* (status) -> raises */
static PyObject *guard_install;     /* () -> None: pkeys._guard.install */
static PyObject *faulthandler_enabled;  /* faulthandler.is_enabled */
static PyObject *python_handler;    /* _signal.getsignal */
static PyObject *sigsegv_args;      /* (SIGSEGV,) */
static PyObject *seen_faulthandler; /* what the last check saw (guard_seen) */
static PyObject *seen_handler;
static PyObject *str_block, *str_orphaned, *str_release;
static PyTypeObject *export_type;
static PyTypeObject *unlocked_type;

/* ---- BlockExport: one entry's exporter ------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *pin;          /* the buffer's export of its data: keeps the mmap */
    void *data;
    Py_ssize_t size;
    int readonly;
    int ended;              /* its block ended: no new export (an escaped
                             * view.obj would open memory outside it) */
    Py_ssize_t exports;     /* buffer exports handed out and not released */
    PyObject *weakrefs;
} ExportObject;

static int export_getbuffer(PyObject *op, Py_buffer *view, int flags)
{
    ExportObject *self = (ExportObject *)op;
    if (self->ended) {
        PyErr_SetString(PyExc_BufferError,
                        "this unlocked() block has ended: its memory is closed again");
        return -1;
    }
    if (PyBuffer_FillInfo(view, op, self->data, self->size, self->readonly, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void export_releasebuffer(PyObject *op, Py_buffer *view)
{
    (void)view;
    ((ExportObject *)op)->exports--;
}

static void export_dealloc(PyObject *op)
{
    ExportObject *self = (ExportObject *)op;
    PyTypeObject *type = Py_TYPE(op);
    freefunc release = (freefunc)PyType_GetSlot(type, Py_tp_free);
    if (self->weakrefs)
        PyObject_ClearWeakRefs(op);
    Py_CLEAR(self->pin);
    release(op);
    Py_DECREF(type);
}

static PyMemberDef export_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(ExportObject, weakrefs), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot export_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("The exporter of one unlocked() block's view.")},
    {Py_tp_dealloc, export_dealloc},
    {Py_tp_members, export_members},
    {Py_bf_getbuffer, export_getbuffer},
    {Py_bf_releasebuffer, export_releasebuffer},
    {0, NULL},
};

static PyType_Spec export_spec = {
    "pkeys._scope.BlockExport", sizeof(ExportObject), 0, Py_TPFLAGS_DEFAULT, export_slots,
};

/* ---- Unlocked --------------------------------------------------------- */

typedef struct {
    int64_t token;
    PyObject *view;
    PyObject *exporter;
} Entry;

#define INLINE_ENTRIES 2

typedef struct {
    PyObject_HEAD
    /* The ProtectedBuffer itself: `with make_secret().unlocked() as v:`
     * holds no other reference to it, and collecting it would close the
     * buffer before the block began. */
    PyObject *owner;
    PyObject *mapping;      /* the buffer's _Mapping */
    PyObject *block;        /* its _block: (vbuf address, pin, data address, size) */
    struct pk_vbuf *vbuf;
    PyObject *pin;
    void *data;
    Py_ssize_t size;
    int kind;               /* PK_GRANT_READ_ONLY or PK_GRANT_READ_WRITE */
    Entry *entries;         /* one per entry not ended yet, latest last */
    Py_ssize_t count;
    Py_ssize_t capacity;
    Entry inline_entries[INLINE_ENTRIES];
} UnlockedObject;

static int unlocked_traverse(PyObject *op, visitproc visit, void *arg)
{
    UnlockedObject *self = (UnlockedObject *)op;
    Py_ssize_t i;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->owner);
    Py_VISIT(self->mapping);
    Py_VISIT(self->block);
    for (i = 0; i < self->count; i++) {
        Py_VISIT(self->entries[i].view);
        Py_VISIT(self->entries[i].exporter);
    }
    return 0;
}

static int unlocked_clear(PyObject *op)
{
    UnlockedObject *self = (UnlockedObject *)op;
    /* Entries still open are left to their grants' rules (a block never
     * ended is a use that stays, as a Python object's would). */
    while (self->count > 0) {
        Entry *entry = &self->entries[--self->count];
        Py_CLEAR(entry->view);
        Py_CLEAR(entry->exporter);
    }
    Py_CLEAR(self->mapping);
    Py_CLEAR(self->block);
    Py_CLEAR(self->owner);
    return 0;
}

static void unlocked_dealloc(PyObject *op)
{
    UnlockedObject *self = (UnlockedObject *)op;
    PyTypeObject *type = Py_TYPE(op);
    freefunc release = (freefunc)PyType_GetSlot(type, Py_tp_free);
    PyObject_GC_UnTrack(op);
    unlocked_clear(op);
    if (self->entries != self->inline_entries)
        PyMem_Free(self->entries);
    release(op);
    Py_DECREF(type);
}

static PyObject *raise_for(int status)
{
    return pk_raise_with(raise_status, status);
}

/* Calls install() when faulthandler or Python's SIGSEGV handler changed
 * since the last check (pkeys/_guard.py). */
static int guard_check(void)
{
    PyObject *enabled = PyObject_CallNoArgs(faulthandler_enabled), *handler;
    int changed;
    if (!enabled)
        return -1;
    handler = PyObject_Call(python_handler, sigsegv_args, NULL);
    if (!handler) {
        Py_DECREF(enabled);
        return -1;
    }
    changed = enabled != seen_faulthandler || handler != seen_handler;
    Py_DECREF(enabled);
    Py_DECREF(handler);
    if (changed) {
        PyObject *result = PyObject_CallNoArgs(guard_install);
        if (!result)
            return -1;
        Py_DECREF(result);
    }
    return 0;
}

/* ProtectedBuffer.unlocked(write=False): made here, not in Python. */
PyObject *pk_block_new(PyObject *owner, PyObject *mapping, int write)
{
    PyObject *block, *vbuf, *data, *size;
    allocfunc alloc;
    UnlockedObject *self;
    if (!(block = PyObject_GetAttr(mapping, str_block)))
        return NULL;
    if (block == Py_None) {  /* closed */
        Py_DECREF(block);
        return raise_for(PK_E_CLOSED);
    }
    if (!PyTuple_Check(block) || PyTuple_Size(block) != 4) {
        Py_DECREF(block);
        PyErr_SetString(PyExc_SystemError, "pkeys: a buffer's _block is (vbuf, pin, data, size)");
        return NULL;
    }
    alloc = (allocfunc)PyType_GetSlot(unlocked_type, Py_tp_alloc);
    if (!(self = (UnlockedObject *)alloc(unlocked_type, 0))) {
        Py_DECREF(block);
        return NULL;
    }
    vbuf = PyTuple_GetItem(block, 0);
    data = PyTuple_GetItem(block, 2);
    size = PyTuple_GetItem(block, 3);
    self->vbuf = PyLong_AsVoidPtr(vbuf);
    self->pin = PyTuple_GetItem(block, 1);  /* borrowed: the tuple is held */
    self->data = PyLong_AsVoidPtr(data);
    self->size = PyLong_AsSsize_t(size);
    self->owner = Py_NewRef(owner);
    self->mapping = Py_NewRef(mapping);
    self->block = block;
    self->kind = write ? PK_GRANT_READ_WRITE : PK_GRANT_READ_ONLY;
    self->entries = self->inline_entries;
    self->capacity = INLINE_ENTRIES;
    if (PyErr_Occurred()) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* Room for one more entry, made before the grant is taken: once it is,
 * nothing may fail before its entry is recorded. */
static int reserve_entry(UnlockedObject *self)
{
    return pk_reserve_one((void **)&self->entries, self->inline_entries, self->count,
                          &self->capacity, sizeof *self->entries);
}

/* An entry made for a grant that was not taken: its view never left. */
static void drop_unused(Entry *entry)
{
    ((ExportObject *)entry->exporter)->ended = 1;
    Py_XDECREF(entry->view);
    Py_DECREF(entry->exporter);
}

/* The rare path of an entry: the software backend's pins, then the call
 * again, its entry recorded before the pins go; else the exception. */
static PyObject *enter_rare(UnlockedObject *self, Entry entry)
{
    int error = errno;
    struct pk_held held = PK_HELD_EMPTY;
    while (entry.token == PK_E_NEED_PINS) {
        uint64_t nonce;
        pk_pins_release(&held);
        /* prepare_pins ran Python code, which may have entered this block */
        if (pk_pins_prepare(&nonce, &held) < 0 || reserve_entry(self) < 0) {
            pk_pins_release(&held);
            drop_unused(&entry);  /* no grant taken */
            return NULL;
        }
        entry.token = vbuf_enter(self->vbuf, self->kind, nonce);
        error = errno;
    }
    if (entry.token >= 0)
        self->entries[self->count++] = entry;
    pk_pins_release(&held);
    if (entry.token < 0) {
        drop_unused(&entry);
        return pk_raise_failed(enter_failed, (int)entry.token, error);
    }
    return Py_NewRef(entry.view);
}

/* The rest of an exit whose vbuf_exit answered `status`, for an entry
 * taken out of the list: the software backend's pins, then the call
 * again.  Returns the final status, *error its errno; PK_E_NEED_PINS, with
 * an exception set, when the pins could not be prepared: then the grant
 * stays, and the entry is back in the list (its view and exporter the
 * list's, NULL here) for a later exit to end. */
static int end_rare(UnlockedObject *self, Entry *entry, int status, int *error,
                    struct pk_pending_error *pending)
{
    struct pk_held held = PK_HELD_EMPTY;
    *error = errno;
    while (status == PK_E_NEED_PINS) {
        uint64_t nonce;
        pk_pins_release(&held);
        if (pk_pins_prepare_ending(&nonce, &held, pending) < 0) {
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            /* The room it left, unless Python code took it meanwhile.
             * Unsafe assumption, written down: without memory for that
             * either, the grant stays with no entry to end it. */
            if (reserve_entry(self) == 0) {
                self->entries[self->count++] = *entry;
                entry->view = entry->exporter = NULL;
            }
            PyErr_Clear();
            PyErr_Restore(type, value, traceback);
            return PK_E_NEED_PINS;
        }
        status = vbuf_exit(self->vbuf, self->kind, entry->token, nonce);
        *error = errno;
    }
    pk_pins_release(&held);
    return status;
}

/* End the grant of an entry taken out of the list, after a failure whose
 * exception is the one raised. */
static PyObject *end_after_error(UnlockedObject *self, Entry *entry)
{
    PyObject *type, *value, *traceback, *result;
    struct pk_pending_error pending = PK_PENDING_NONE;
    int status, error;
    PyErr_Fetch(&type, &value, &traceback);
    status = vbuf_exit(self->vbuf, self->kind, entry->token, 0);
    if (status)
        status = end_rare(self, entry, status, &error, &pending);
    if (status && status != PK_E_NEED_PINS) {
        result = PyObject_CallFunction(exit_failed, "Oii", self->mapping, status, error);
        Py_XDECREF(result);
    }
    pk_pins_raise_pending(&pending, NULL);
    PyErr_Clear();  /* the first error is the one raised */
    PyErr_Restore(type, value, traceback);
    Py_XDECREF(entry->view);
    Py_XDECREF(entry->exporter);
    return NULL;
}

static PyObject *unlocked_enter(PyObject *op, PyObject *unused)
{
    UnlockedObject *self = (UnlockedObject *)op;
    ExportObject *exporter;
    allocfunc alloc;
    Entry entry;
    (void)unused;
    if (guard_check() < 0)
        return NULL;
    /* The entry is made before its grant is taken: once it is, nothing may
     * fail, and no Python code run, before the entry is recorded. */
    alloc = (allocfunc)PyType_GetSlot(export_type, Py_tp_alloc);
    exporter = (ExportObject *)alloc(export_type, 0);
    if (!exporter)
        return NULL;
    exporter->pin = Py_NewRef(self->pin);
    exporter->data = self->data;
    exporter->size = self->size;
    exporter->readonly = self->kind != PK_GRANT_READ_WRITE;
    entry.exporter = (PyObject *)exporter;
    entry.view = PyMemoryView_FromObject((PyObject *)exporter);
    /* Room last: that allocation may have run finalizers that entered. */
    if (!entry.view || reserve_entry(self) < 0) {
        drop_unused(&entry);
        return NULL;
    }
    entry.token = vbuf_enter(self->vbuf, self->kind, 0);
    if (entry.token < 0)
        return enter_rare(self, entry);
    self->entries[self->count++] = entry;
    return Py_NewRef(entry.view);
}

/* The entry this exit ends: the only one, or this thread's latest, or
 * (another thread's) the latest, which the shim then refuses. */
static int take_entry(UnlockedObject *self, Entry *entry)
{
    Py_ssize_t index;
    if (self->count == 0) {
        raise_for(PK_E_UNBALANCED);
        return -1;
    }
    index = self->count - 1;
    if (self->count > 1) {
        uint32_t serial = pk_scope_thread_serial();
        Py_ssize_t i;
        for (i = self->count - 1; i >= 0; i--)
            if ((uint32_t)((uint64_t)self->entries[i].token >> 32) == serial) {
                index = i;
                break;
            }
    }
    *entry = self->entries[index];
    memmove(&self->entries[index], &self->entries[index + 1],
            (size_t)(self->count - index - 1) * sizeof *self->entries);
    self->count--;
    return 0;
}

/* The exit, but for an interrupt kept while its pins were prepared
 * (*pending), which unlocked_exit raises once the rest is done. */
static PyObject *exit_keeping(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                              struct pk_pending_error *pending)
{
    UnlockedObject *self = (UnlockedObject *)op;
    PyObject *released, *orphaned;
    Entry entry;
    int leaked = 0, status, error, is_orphaned;
    if (take_entry(self, &entry) < 0)
        return NULL;
    ((ExportObject *)entry.exporter)->ended = 1;
    released = PyObject_CallMethodObjArgs(entry.view, str_release, NULL);
    if (released) {
        Py_DECREF(released);
    } else if (PyErr_ExceptionMatches(PyExc_BufferError)) {
        PyErr_Clear();
        leaked = 1;  /* something still holds an export of the view itself */
    } else {
        return end_after_error(self, &entry);
    }
    /* The exporter was this entry's alone (a released view holds it no
     * longer): any other reference to it is a managed buffer still holding
     * an export for a view made from the block's, or the exporter itself
     * (view.obj), which can make views. */
    if (leaked || ((ExportObject *)entry.exporter)->exports > 0 ||
        Py_REFCNT(entry.exporter) > 1) {
        /* Recorded before the use ends, so that a close() that can only
         * follow the end sees it. */
        PyObject *result = PyObject_CallFunctionObjArgs(view_escaped, self->mapping,
                                                        entry.exporter, NULL);
        leaked = 1;
        if (!result)
            return end_after_error(self, &entry);
        Py_DECREF(result);
    }
    status = vbuf_exit(self->vbuf, self->kind, entry.token, 0);
    if (status)
        status = end_rare(self, &entry, status, &error, pending);
    Py_XDECREF(entry.view);
    Py_XDECREF(entry.exporter);
    if (status == PK_E_NEED_PINS)
        return NULL;  /* the grant stays, its entry back in the list */
    if (status) {
        PyObject *result = PyObject_CallFunction(exit_failed, "Oii", self->mapping, status,
                                                 error);
        if (!result)
            return NULL;
        Py_DECREF(result);
    }
    if (!(orphaned = PyObject_GetAttr(self->mapping, str_orphaned)))
        return NULL;
    is_orphaned = PyObject_IsTrue(orphaned);
    Py_DECREF(orphaned);
    if (is_orphaned < 0)
        return NULL;
    if (is_orphaned) {
        PyObject *result = PyObject_CallFunctionObjArgs(use_ended, self->mapping, NULL);
        if (!result)
            return NULL;
        Py_DECREF(result);
    }
    if (leaked && (nargs < 2 || args[1] == Py_None)) {
        PyErr_SetString(PyExc_BufferError,
                        "an object made from the unlocked view (a numpy array, a memoryview "
                        "cast) is still alive; delete it inside the block: outside it, touching "
                        "it would fault");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *unlocked_exit(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    struct pk_pending_error pending = PK_PENDING_NONE;
    return pk_pins_raise_pending(&pending, exit_keeping(op, args, nargs, &pending));
}

static PyMethodDef unlocked_methods[] = {
    {"__enter__", unlocked_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))unlocked_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(unlocked_doc,
"The context manager of :meth:`ProtectedBuffer.unlocked`: each entry\n"
"takes a use of the buffer and a grant on its key, and yields a fresh\n"
"view; its exit releases exactly those.");

static PyType_Slot unlocked_slots[] = {
    {Py_tp_doc, (void *)unlocked_doc},
    {Py_tp_dealloc, unlocked_dealloc},
    {Py_tp_traverse, unlocked_traverse},
    {Py_tp_clear, unlocked_clear},
    {Py_tp_methods, unlocked_methods},
    {0, NULL},
};

static PyType_Spec unlocked_spec = {
    "pkeys.Unlocked", sizeof(UnlockedObject), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    unlocked_slots,
};

/* ---- configuration ---------------------------------------------------- */

PyObject *pk_block_guard_seen(PyObject *module, PyObject *args)
{
    PyObject *enabled, *handler, *old_enabled = seen_faulthandler, *old_handler = seen_handler;
    (void)module;
    if (!PyArg_ParseTuple(args, "OO:guard_seen", &enabled, &handler))
        return NULL;
    seen_faulthandler = Py_NewRef(enabled);
    seen_handler = Py_NewRef(handler);
    Py_XDECREF(old_enabled);
    Py_XDECREF(old_handler);
    Py_RETURN_NONE;
}

PyObject *pk_block_configure(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"vbuf_enter", "vbuf_exit", "enter_failed", "exit_failed",
                            "view_escaped", "use_ended", "raise_status", "guard_install",
                            "faulthandler_enabled", "python_handler", "sigsegv", NULL};
    unsigned long long enter, exit;
    PyObject *given[8];
    PyObject **slots[8] = {&enter_failed, &exit_failed, &view_escaped, &use_ended,
                           &raise_status, &guard_install, &faulthandler_enabled,
                           &python_handler};
    int sigsegv, i;
    (void)module;
    if (vbuf_enter)
        return pk_configured_already("configure_blocks");
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KKOOOOOOOOi:configure_blocks", names,
                                     &enter, &exit, &given[0], &given[1], &given[2], &given[3],
                                     &given[4], &given[5], &given[6], &given[7], &sigsegv))
        return NULL;
    if (!enter || !exit) {
        PyErr_SetString(PyExc_ValueError, "configure_blocks: an entry point's address is 0");
        return NULL;
    }
    for (i = 0; i < 8; i++)
        if (!PyCallable_Check(given[i])) {
            PyErr_SetString(PyExc_TypeError, "configure_blocks: the paths must be callables");
            return NULL;
        }
    /* Configured once (above): every slot is still empty. */
    if (!(sigsegv_args = Py_BuildValue("(i)", sigsegv)))
        return NULL;
    for (i = 0; i < 8; i++)
        *slots[i] = Py_NewRef(given[i]);
    vbuf_enter = (__typeof__(vbuf_enter))(uintptr_t)enter;
    vbuf_exit = (__typeof__(vbuf_exit))(uintptr_t)exit;
    Py_RETURN_NONE;
}

int pk_block_init(PyObject *module)
{
    str_block = PyUnicode_InternFromString("_block");
    str_orphaned = PyUnicode_InternFromString("orphaned");
    str_release = PyUnicode_InternFromString("release");
    seen_faulthandler = Py_NewRef(Py_None);  /* nothing seen: the first entry checks */
    seen_handler = Py_NewRef(Py_None);
    export_type = (PyTypeObject *)PyType_FromSpec(&export_spec);
    unlocked_type = (PyTypeObject *)PyType_FromSpec(&unlocked_spec);
    if (!str_block || !str_orphaned || !str_release || !export_type ||
        !unlocked_type)
        return -1;
    if (PyModule_AddObjectRef(module, "Unlocked", (PyObject *)unlocked_type) < 0 ||
        PyModule_AddObjectRef(module, "BlockExport", (PyObject *)export_type) < 0)
        return -1;
    return 0;
}

/* ---- BufferBase: what ProtectedBuffer.unlocked() reads ---------------- */

typedef struct {
    PyObject_HEAD
    PyObject *mapping;      /* ProtectedBuffer._mapping */
} BufferObject;

static int buffer_traverse(PyObject *op, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(((BufferObject *)op)->mapping);
    return 0;
}

static int buffer_clear(PyObject *op)
{
    Py_CLEAR(((BufferObject *)op)->mapping);
    return 0;
}

static void buffer_dealloc(PyObject *op)
{
    PyTypeObject *type = Py_TYPE(op);
    freefunc release = (freefunc)PyType_GetSlot(type, Py_tp_free);
    PyObject_GC_UnTrack(op);
    buffer_clear(op);
    release(op);
    Py_DECREF(type);
}

static PyObject *buffer_unlocked(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    BufferObject *self = (BufferObject *)op;
    int write = 0;
    if ((nargs || kwnames) && pk_write_argument(args, nargs, kwnames, 0, "unlocked", &write) < 0)
        return NULL;
    if (!self->mapping) {
        PyErr_SetString(PyExc_AttributeError, "_mapping");
        return NULL;
    }
    return pk_block_new(op, self->mapping, write);
}

static PyMethodDef buffer_methods[] = {
    {"unlocked", (PyCFunction)(void (*)(void))buffer_unlocked, METH_FASTCALL | METH_KEYWORDS,
     PyDoc_STR("unlocked(write=False)\n--\n\n"
               "A block with access open (for this thread, on hardware): yields a\n"
               "memoryview of the data, read-only unless ``write``.  The view is\n"
               "released on exit.  The returned object may be entered again, from\n"
               "nested blocks or other tasks; each entry yields its own view.")},
    {NULL, NULL, 0, NULL},
};

static PyObject *buffer_get_mapping(PyObject *op, void *closure)
{
    PyObject *mapping = ((BufferObject *)op)->mapping;
    (void)closure;
    if (!mapping) {
        PyErr_SetString(PyExc_AttributeError, "_mapping");
        return NULL;
    }
    return Py_NewRef(mapping);
}

/* Set once, by __init__: unlocked() takes raw addresses from the mapping's
 * _block, so Python code must not swap in another object (a forged _block
 * crashed; another buffer's mapping was closed twice). */
static int buffer_set_mapping(PyObject *op, PyObject *value, void *closure)
{
    BufferObject *self = (BufferObject *)op;
    (void)closure;
    if (!value || self->mapping) {
        PyErr_SetString(PyExc_AttributeError,
                        "a ProtectedBuffer's _mapping is set once, by __init__");
        return -1;
    }
    self->mapping = Py_NewRef(value);
    return 0;
}

static PyGetSetDef buffer_getset[] = {
    {"_mapping", buffer_get_mapping, buffer_set_mapping,
     PyDoc_STR("The buffer's _Mapping (set once, by __init__)."), NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot buffer_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("The C part of pkeys.ProtectedBuffer: unlocked().")},
    {Py_tp_dealloc, buffer_dealloc},
    {Py_tp_traverse, buffer_traverse},
    {Py_tp_clear, buffer_clear},
    {Py_tp_methods, buffer_methods},
    {Py_tp_getset, buffer_getset},
    {0, NULL},
};

static PyType_Spec buffer_spec = {
    "pkeys._scope.BufferBase", sizeof(BufferObject), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, buffer_slots,
};

int pk_buffer_base_init(PyObject *module)
{
    PyObject *type = PyType_FromSpec(&buffer_spec);
    if (!type)
        return -1;
    if (PyModule_AddObjectRef(module, "BufferBase", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    Py_DECREF(type);
    return 0;
}
