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
  such memory gets ``PK_E_NEED_PINS`` from C; the live foreign owners of
  the keys it changes are pinned (a buffer export: ``close()`` and
  collection must wait for it), and the call is made again: by
  :func:`retry_pinned`, or by ``pkeys._scope`` (``pkey_set``, and the types
  of scopes and blocks, which record a grant's change before the pins go).
  ``pkeys._scope`` pins the common case itself, in C, reading
  :data:`_owners`; :func:`prepare_pins` is the general path, for owners
  gone, closed, moved or many.  Pins are taken and released outside the C
  mutex.
* **Orphaned keys.**  A ``Key`` collected while it still guards foreign
  memory cannot be freed then; it is freed as soon as that memory goes.
* **fork().**  C holds its mutex across the fork; after it, the child
  drops the grants of threads it does not have (software backend).
"""

from __future__ import annotations

import itertools
import mmap
import os
import sys
import weakref
from collections.abc import Callable
from typing import Any

from . import _scope
from ._binding import entry_point, ffi, lib

__all__ = [
    "call",
    "retry_pinned",
    "prepare_pins",
    "release_pins",
    "REVOCATION_TIMEOUT",
    "register_owner",
    "owner_tagged",
    "prune_owners",
    "adopt_orphan",
    "add_package_span",
    "remove_package_span",
    "package_memory",
    "exporter_of",
]

_NEED_PINS = lib.PK_E_NEED_PINS
# How long a change for every thread waits for them all to answer (the one
# constant, csrc/revoke.c's, which the virtual-key pool uses too).
REVOCATION_TIMEOUT: float = lib.pk_revocation_timeout
_UINTPTR = ffi.typeof("uintptr_t")
_TOKENS = ffi.typeof("uint64_t[]")
_PINS = ffi.typeof("struct pk_pin[]")
# Why freeing a key may have to wait: it still guards memory, or it could
# not be revoked in every thread (the number must not be handed out again).
KEEP_ALLOCATED = (lib.PK_E_IN_USE, lib.PK_E_BROADCAST, lib.PK_E_NO_REVOCATION,
                  lib.PK_E_SIGNAL_TAKEN)


class _Owner:
    """A foreign exporter and the span it had when its memory was tagged."""

    __slots__ = ("token", "ref", "base", "size", "lost")

    def __init__(self, token: int, ref: Callable[[], object], base: int, size: int) -> None:
        self.token, self.ref, self.base, self.size = token, ref, base, size
        self.lost = False  # moved or shrank: its regions are frozen in C

    def pin(self) -> Any:
        """A buffer export that keeps the memory mapped; None if the owner
        was collected or closed; ``MOVED`` if it now exports other memory
        (``mmap.resize``), whose pages may still carry the key.  An mmap's
        regions follow it instead (mremap carries the pages' protection)."""
        owner = self.ref()
        if owner is None:
            return None
        try:
            export = ffi.from_buffer(owner)
        except (TypeError, ValueError, BufferError):
            return None
        base, size = int(ffi.cast(_UINTPTR, export)), len(export)
        if base == self.base and size == self.size:
            return export
        if isinstance(owner, mmap.mmap):
            lib.pk_owner_moved(self.token, self.base, self.size, base, size)
            self.base, self.size = base, size
            return export
        if size >= self.size and base == self.base:
            return export
        ffi.release(export)
        return MOVED


MOVED = object()
_owners: dict[int, _Owner] = {}
_tokens = itertools.count(2)  # 0 and 1 are PK_OWNER_CALLER and PK_OWNER_PACKAGE
# Owners registered for a tag that has not returned yet: they own no region
# so far, and another thread's prune_owners must not drop them for that.
_tagging: set[int] = set()
# start -> end of every protected buffer's mapping (see add_package_span).
_package_spans: dict[int, int] = {}
# Keys whose Key object was collected while they still guarded memory.
_orphans: dict[int, int] = {}


def exporter_of(target: object) -> object:
    """The object that owns the memory behind ``target``: through
    memoryviews (``.obj``), numpy arrays (``.base``) and ctypes arrays made
    with ``from_buffer`` (the memoryview they keep) to the exporter."""
    for _ in range(64):
        inner: object = None
        if isinstance(target, memoryview):
            inner = target.obj
        else:
            base = getattr(target, "base", None)
            if base is not None and _exports_buffer(base):
                inner = base
            else:
                kept = getattr(target, "_objects", None)  # ctypes
                if isinstance(kept, dict):
                    inner = next((v for v in kept.values() if isinstance(v, memoryview)), None)
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
    """A fresh owner token for a foreign exporter.  An ``mmap`` is held
    weakly, and its regions go when it is closed or collected; any other
    exporter is held for as long as its regions are tracked, because its
    memory may outlive it (a view of memory someone else owns) or be freed
    without being unmapped (an allocator's)."""
    export = ffi.from_buffer(exporter)
    try:
        base, size = int(ffi.cast(_UINTPTR, export)), len(export)
    finally:
        ffi.release(export)
    token = next(_tokens)
    ref: Callable[[], object]
    if isinstance(exporter, mmap.mmap):
        ref = weakref.ref(exporter, lambda _: _owner_died(token))
    else:
        ref = (lambda held: lambda: held)(exporter)
    _tagging.add(token)
    _owners[token] = _Owner(token, ref, base, size)
    return token


def owner_tagged(token: int) -> None:
    """The tag that registered ``token`` returned (its region is in C's
    table, or it failed and the owner owns nothing)."""
    _tagging.discard(token)


def _owner_died(token: int) -> None:
    _owners.pop(token, None)
    lib.pk_owner_gone(token)
    _free_orphans()


def _check_owner(token: int, owner: _Owner) -> Any:
    """The owner's pin, after dropping it if it is gone and freezing its
    regions if it moved; None unless it can be pinned."""
    export = owner.pin()
    if export is None:
        _owner_died(token)
        return None
    if export is MOVED:
        if not owner.lost:
            owner.lost = True
            lib.pk_owner_lost(token)
        return None
    return export


def prune_owners() -> None:
    """Forget owners that are dead or no longer own any region."""
    for token, owner in list(_owners.items()):
        export = _check_owner(token, owner)
        if export is not None:
            ffi.release(export)
        if token in _owners and token not in _tagging and not lib.pk_owner_regions(token):
            _owners.pop(token, None)
    _free_orphans()


def add_package_span(start: int, end: int) -> None:
    """Memory of a protected buffer (its guard pages included), from its
    mapping until its unmapping: the caller's tags never reach it."""
    _package_spans[start] = end


def remove_package_span(start: int) -> None:
    _package_spans.pop(start, None)


def package_memory(start: int, end: int) -> bool:
    """Whether ``[start, end)`` overlaps a protected buffer's memory."""
    return any(span_start < end and start < span_end
               for span_start, span_end in list(_package_spans.items()))


def adopt_orphan(pkey: int, identity: int) -> None:
    _orphans[pkey] = identity


def _free_orphans() -> None:
    for pkey, identity in list(_orphans.items()):
        status = lib.pk_key_free(pkey, identity, REVOCATION_TIMEOUT, ffi.NULL, 0)
        if status not in KEEP_ALLOCATED:
            _orphans.pop(pkey, None)
    # The virtual-key pool's orphans: keys whose buffer closed while their
    # free was refused.
    lib.pk_vkeys_free_unheld()


def call(function: Callable[..., int], *args: object) -> int:
    """``function(*args, pins)``: first without pins, which is all the
    hardware backend and memory without foreign owners ever need, then
    through :func:`retry_pinned`."""
    return retry_pinned(function(*args, 0), function, *args)


def retry_pinned(status: int, function: Callable[..., int], *args: object) -> int:
    """The retry of calls made from Python (rights, regions): ``status`` is
    what ``function(*args, 0)`` returned.  While it asks for pins
    (``PK_E_NEED_PINS``, only the software backend does), call
    ``function(*args, nonce)`` with :func:`prepare_pins`' pins held.  Any
    other status is returned as it is.  Only for calls whose change is
    complete when C returns: a scope's grant is recorded by its C type
    before the pins go (csrc/scope_type.c, scope_block.c), so no Python
    code runs between the two."""
    while status == _NEED_PINS:
        nonce, held = prepare_pins()
        try:
            status = function(*args, nonce)
        finally:
            release_pins(held)
    return status


def prepare_pins() -> tuple[int, list[Any]]:
    """The one place that knows how to pin, for the call that just answered
    ``PK_E_NEED_PINS`` in this thread: pin the live foreign owners of the
    regions of the keys it was changing (no others: tagged memory of other
    keys costs nothing), tell C each export's address and length, and
    return the nonce to call again with and what it holds (the array C
    reads and the exports), which must stay alive until that call returns.
    Changes no grant or rights: an exception here leaves all as it was.
    The held objects release their exports when released
    (:func:`release_pins`) or deallocated, as the C types do."""
    capacity = 8
    while True:
        tokens = ffi.new(_TOKENS, capacity)
        count = lib.pk_pins_owners(tokens, capacity)
        if count <= capacity:
            break
        capacity = count
    held: list[Any] = []
    try:
        described = []
        for token in tokens[0:count]:
            owner = _owners.get(token)
            if owner is None:  # not ours to vouch for: C must forget it
                lib.pk_owner_gone(token)
                continue
            export = _check_owner(token, owner)  # dead or moved: C's table changed
            if export is None:
                continue
            held.append(export)
            described.append((token, ffi.cast(_UINTPTR, export), len(export)))
        array = ffi.new(_PINS, described) if described else ffi.NULL
        if described:
            held.append(array)
        return lib.pk_pins_vouch(array, len(described)), held
    except BaseException:
        release_pins(held)
        raise


# The common case of prepare_pins -- every owner asked for alive, at the
# span it had, and few of them -- is pinned in C without calling it
# (csrc/scope_type.c, pin_in_c), for pkey_set and the scope types; C reads
# _owners (so it is never rebound) and each _Owner's ref, base and size,
# and calls prepare_pins for anything else.
_scope.configure_pins(
    pins_owners=entry_point("pk_pins_owners"),
    pins_vouch=entry_point("pk_pins_vouch"),
    owners=_owners,
    owner_class=_Owner,
)


def release_pins(held: list[Any]) -> None:
    """Release what :func:`prepare_pins` held, once the call it was for
    has returned."""
    for export in held:
        ffi.release(export)


def _after_fork_in_child() -> None:
    status = call(lib.pk_after_fork_in_child)
    if status != 0:  # pragma: no cover - needs an mprotect failure in the child
        os.write(2, f"pkeys: could not drop other threads' grants after fork ({status})\n".encode())
        sys.stderr.flush()


os.register_at_fork(after_in_child=_after_fork_in_child)
