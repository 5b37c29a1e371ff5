"""What a ``target`` is, and which regions of memory each key guards.

A target is either an int address, with an explicit length, or a writable
buffer-protocol object over page-aligned memory (``mmap.mmap``, a
:class:`pkeys.ProtectedBuffer`, a memoryview of one).

The region table records every range tagged with a non-zero key through
the package.  It serves two rules:

* A key that still guards tracked memory cannot be freed.
* The software backend re-applies ``mprotect`` to a key's regions when its
  rights change, and must never do so on memory whose owner released it.

How the second rule holds: for a buffer target the table keeps a weak
reference to the object (a strong one if it takes no weak reference).
Before each re-application the owner is pinned by taking a buffer export
(``ffi.from_buffer``), which is held across the ``mprotect`` and released
after it.  An owner that was garbage-collected (dead weak reference) or
closed (``mmap.close()`` makes the export fail) is dropped from the table
instead, and while the export is held ``close()`` cannot unmap the memory
from another thread (it raises ``BufferError``).  An int address has no
owner to check: the caller promises that it stays mapped until it is
re-tagged with key 0.
"""

from __future__ import annotations

import weakref
from typing import Any

from ._binding import ffi
from ._errors import ArgumentError
from ._rights import PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE
from ._validate import require_int

__all__ = ["resolve", "check_prot", "Region", "RegionTable", "page_round_up"]

_PROT_ALL = PROT_READ | PROT_WRITE | PROT_EXEC
# Parsed once: ffi.cast with a type string looks the type up on every call.
_UINTPTR = ffi.typeof("uintptr_t")
_from_buffer = ffi.from_buffer
_cast = ffi.cast
_release = ffi.release
_PAGE_MASK = PAGE_SIZE - 1


def page_round_up(length: int) -> int:
    return (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def check_prot(prot: object) -> int:
    prot = require_int(prot, "prot")
    if prot & ~_PROT_ALL or prot < 0:
        raise ArgumentError(f"prot {prot:#x} is not a combination of PROT_READ|PROT_WRITE|PROT_EXEC")
    return prot


def resolve(target: object, length: object) -> tuple[int, int, object, Any]:
    """``(address, length, owner, pin)`` for a target.

    ``pin`` is a buffer export (or None for an int address) that keeps the
    owner's memory mapped until the caller releases it with
    ``ffi.release``.  Nothing is pinned when an error is raised.
    """
    if isinstance(target, int) and not isinstance(target, bool):
        if target < 0:
            raise ArgumentError(f"address {target:#x} is negative")
        if length is None:
            raise TypeError("length is required when the target is an int address")
        addr, size, owner, pin = target, None, None, None
    else:
        try:
            pin = ffi.from_buffer(target, require_writable=True)
        except (TypeError, BufferError):
            raise TypeError(
                "target must be an int address or a writable buffer over "
                f"page-aligned memory (such as mmap.mmap), not {type(target).__name__}"
            ) from None
        addr, size, owner = int(_cast(_UINTPTR, pin)), len(pin), target
    try:
        if length is None:
            length = size
        else:
            length = require_int(length, "length")
            if size is not None and length > size:
                raise ArgumentError(f"length {length} exceeds the buffer's {size} bytes")
        if length <= 0:  # type: ignore[operator]
            raise ArgumentError(f"length must be positive, not {length}")
        if addr % PAGE_SIZE:
            raise ArgumentError(
                f"address {addr:#x} is not page-aligned ({PAGE_SIZE} bytes); "
                "use mmap.mmap or pkeys.ProtectedBuffer for aligned memory"
            )
        if addr + length > 1 << 64:  # type: ignore[operator]
            raise ArgumentError("address range exceeds the address space")
    except BaseException:
        if pin is not None:
            ffi.release(pin)
        raise
    return addr, length, owner, pin  # type: ignore[return-value]


class Region:
    """A page range tagged with ``pkey`` and mapped with ``prot``."""

    __slots__ = ("start", "end", "prot", "pkey", "_owner", "_weak")

    def __init__(self, start: int, end: int, prot: int, pkey: int, owner: object) -> None:
        self.start, self.end, self.prot, self.pkey = start, end, prot, pkey
        self._weak = False
        self._owner: Any = owner
        if owner is not None:
            try:
                self._owner = weakref.ref(owner)
                self._weak = True
            except TypeError:
                pass  # no weak references: hold it, so it cannot be freed under us

    def split(self, start: int, end: int) -> Region:
        part = Region.__new__(Region)
        part.start, part.end, part.prot, part.pkey = start, end, self.prot, self.pkey
        part._owner, part._weak = self._owner, self._weak
        return part

    def pin(self) -> tuple[bool, Any]:
        """``(usable, export)``: whether the memory is still its owner's,
        with an export to hold while touching it (None for int addresses)."""
        owner = self._owner
        if owner is None:
            return True, None
        if self._weak:
            owner = owner()
            if owner is None:
                return False, None
        try:
            export = _from_buffer(owner)
        except (ValueError, TypeError, BufferError):
            return False, None  # closed or otherwise released
        base = int(_cast(_UINTPTR, export))
        if not (base <= self.start and self.end <= base + ((len(export) + _PAGE_MASK) & ~_PAGE_MASK)):
            _release(export)
            return False, None  # the object now points at other memory
        return True, export

    def __repr__(self) -> str:
        return f"Region({self.start:#x}-{self.end:#x}, prot={self.prot}, pkey={self.pkey})"


class RegionTable:
    """Non-overlapping tagged ranges, indexed by key.  Callers hold the lock."""

    def __init__(self) -> None:
        self.by_key: dict[int, list[Region]] = {}

    def tag(self, start: int, length: int, prot: int, pkey: int, owner: object) -> None:
        """Record that ``[start, start+length)`` now has ``pkey`` and ``prot``;
        key 0 just forgets the range."""
        end = start + page_round_up(length)
        for key, regions in list(self.by_key.items()):
            kept = []
            for region in regions:
                if region.end <= start or region.start >= end:
                    kept.append(region)
                    continue
                if region.start < start:
                    kept.append(region.split(region.start, start))
                if region.end > end:
                    kept.append(region.split(end, region.end))
            if kept:
                self.by_key[key] = kept
            else:
                del self.by_key[key]
        if pkey != 0:
            self.by_key.setdefault(pkey, []).append(Region(start, end, prot, pkey, owner))

    def live(self, pkey: int) -> list[Region]:
        """The regions of ``pkey`` whose owners still hold them; forgets the rest."""
        alive = []
        for region in self.by_key.get(pkey, ()):
            usable, export = region.pin()
            if export is not None:
                ffi.release(export)
            if usable:
                alive.append(region)
        if alive:
            self.by_key[pkey] = alive
        else:
            self.by_key.pop(pkey, None)
        return alive

    def drop(self, region: Region) -> None:
        regions = self.by_key.get(region.pkey, [])
        if region in regions:
            regions.remove(region)
            if not regions:
                del self.by_key[region.pkey]

    def all(self) -> list[Region]:
        return [region for regions in self.by_key.values() for region in regions]
