"""What a ``target`` is: an int address with a length, or a writable
buffer-protocol object over page-aligned memory (``mmap.mmap``, a memoryview
or numpy array over one).

Which memory each key guards is tracked in C (``csrc/regions.c``); a buffer
target is tracked by the object that exports its memory (see
:mod:`pkeys._state`), so a temporary view can be dropped at once.
"""

from __future__ import annotations

from typing import Any

from ._binding import ffi
from ._errors import ArgumentError
from ._rights import PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE
from ._state import exporter_of
from ._validate import require_int

__all__ = ["resolve", "check_prot"]

_PROT_ALL = PROT_READ | PROT_WRITE | PROT_EXEC
# Parsed once: ffi.cast with a type string looks the type up on every call.
_UINTPTR = ffi.typeof("uintptr_t")
_cast = ffi.cast


def check_prot(prot: object) -> int:
    prot = require_int(prot, "prot")
    if prot & ~_PROT_ALL or prot < 0:
        raise ArgumentError(f"prot {prot:#x} is not a combination of PROT_READ|PROT_WRITE|PROT_EXEC")
    return prot


def resolve(target: object, length: object) -> tuple[int, int, object, Any]:
    """``(address, length, exporter, pin)`` for a target.

    ``exporter`` owns the memory (None for an int address); ``pin`` is a
    buffer export that keeps it mapped until the caller releases it with
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
        addr, size, owner = int(_cast(_UINTPTR, pin)), len(pin), exporter_of(target)
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
