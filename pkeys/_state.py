"""Python's side of the one state kept in C (``csrc/state.c``, ``regions.c``).

All of the state -- allocation, key identities, grants, the emulated
register and the region table -- lives in C behind one mutex that no Python
code ever runs under.  What stays here is what only Python can do:

* **Foreign owners.**  A region tagged through a Python buffer (an
  ``mmap``, or a view or numpy array over one) is tracked by the object
  that *exports* the memory, not by the view that named it.  The table
  keeps a weak reference to that exporter; when it is collected the region
  is forgotten.  Whether it is still open and still at the same address can
  only be asked in Python, so a software rights change that would touch
  such memory gets ``PK_E_NEED_PINS`` from C; :func:`call_pinned` then pins
  every live foreign owner (a buffer export: ``close()`` and collection
  must wait for it) and calls again.  Pins are taken and released outside
  the C mutex.
* **Orphaned keys.**  A ``Key`` collected while it still guards foreign
  memory cannot be freed then; it is freed as soon as that memory goes.
* **fork().**  C holds its mutex across the fork; after it, the child
  drops the grants of threads it does not have (software backend).
"""

from __future__ import annotations

import itertools
import os
import sys
import weakref
from collections.abc import Callable
from typing import Any

from ._binding import ffi, lib

__all__ = [
    "NEED_PINS",
    "call_pinned",
    "register_owner",
    "prune_owners",
    "adopt_orphan",
    "exporter_of",
]

NEED_PINS = lib.PK_E_NEED_PINS
_UINTPTR = ffi.typeof("uintptr_t")


class _Owner:
    """A foreign exporter and the span it had when its memory was tagged."""

    __slots__ = ("ref", "base", "size")

    def __init__(self, ref: Callable[[], object], base: int, size: int) -> None:
        self.ref, self.base, self.size = ref, base, size

    def pin(self) -> Any:
        """A buffer export that keeps the memory mapped, or None if the
        owner was collected, closed, or moved (``mmap.resize``)."""
        owner = self.ref()
        if owner is None:
            return None
        try:
            export = ffi.from_buffer(owner)
        except (TypeError, ValueError, BufferError):
            return None
        if int(ffi.cast(_UINTPTR, export)) != self.base or len(export) < self.size:
            ffi.release(export)
            return None
        return export


_owners: dict[int, _Owner] = {}
_tokens = itertools.count(2)  # 0 and 1 are PK_OWNER_CALLER and PK_OWNER_PACKAGE
# Keys whose Key object was collected while they still guarded memory.
_orphans: dict[int, int] = {}


def exporter_of(target: object) -> object:
    """The object that owns the memory behind ``target``: through
    memoryviews (``.obj``) and numpy arrays (``.base``) to the exporter."""
    seen = 0
    while seen < 64:
        seen += 1
        inner: object
        if isinstance(target, memoryview):
            inner = target.obj
        else:
            inner = getattr(target, "base", None)
            if inner is None or not _exports_buffer(inner):
                return target
        if inner is None:
            return target
        target = inner
    return target


def _exports_buffer(candidate: object) -> bool:
    try:
        memoryview(candidate).release()  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def register_owner(exporter: object) -> int:
    """A fresh owner token for a foreign exporter; its regions are dropped
    when it is collected, closed or moved."""
    export = ffi.from_buffer(exporter)
    try:
        base, size = int(ffi.cast(_UINTPTR, export)), len(export)
    finally:
        ffi.release(export)
    token = next(_tokens)
    try:
        ref: Callable[[], object] = weakref.ref(exporter, lambda _: _owner_died(token))
    except TypeError:
        # No weak references (bytearray): hold it, so it cannot go under us.
        ref = (lambda held: lambda: held)(exporter)
    _owners[token] = _Owner(ref, base, size)
    return token


def _owner_died(token: int) -> None:
    _owners.pop(token, None)
    lib.pk_owner_gone(token)
    _free_orphans()


def prune_owners() -> None:
    """Forget owners that are dead or no longer own any region."""
    for token, owner in list(_owners.items()):
        export = owner.pin()
        if export is None:
            _owner_died(token)
            continue
        ffi.release(export)
        if not lib.pk_owner_regions(token):
            _owners.pop(token, None)
    _free_orphans()


def adopt_orphan(pkey: int, identity: int) -> None:
    _orphans[pkey] = identity


def _free_orphans() -> None:
    for pkey, identity in list(_orphans.items()):
        status = lib.pk_key_free(pkey, identity, 5.0, ffi.NULL, 0)
        if status not in (lib.PK_E_IN_USE, lib.PK_E_BROADCAST):
            _orphans.pop(pkey, None)


def call_pinned(function: Callable[..., int], *args: object) -> int:
    """``function(*args, pins)`` for a C entry point that may answer
    ``PK_E_NEED_PINS``: pin every live foreign owner and call again."""
    while True:
        version = lib.pk_foreign_version()
        pins = []
        try:
            for token, owner in list(_owners.items()):
                export = owner.pin()
                if export is None:
                    _owner_died(token)  # moves the version: the call below would refuse
                    continue
                pins.append(export)
            status = function(*args, version)
            if status != NEED_PINS:
                return status
        finally:
            for export in pins:
                ffi.release(export)


def _after_fork_in_child() -> None:
    status = call_pinned(lib.pk_after_fork_in_child)
    if status != 0:  # pragma: no cover - needs an mprotect failure in the child
        os.write(2, f"pkeys: could not drop other threads' grants after fork ({status})\n".encode())
        sys.stderr.flush()


os.register_at_fork(after_in_child=_after_fork_in_child)
