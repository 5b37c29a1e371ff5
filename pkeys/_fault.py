"""``probe``: try one access under a guard and report the fault, if any.

The access runs in C between ``sigsetjmp`` and a ``SA_SIGINFO`` handler
that ``siglongjmp``s back, so a denied access returns a :class:`Fault`
instead of killing the process.  PKRU is saved and restored around it,
because the kernel runs the handler with its init PKRU and ``siglongjmp``
skips the ``sigreturn`` that would have restored the caller's.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._binding import ffi, lib
from ._errors import ArgumentError, PkeysError
from ._validate import require_int

if TYPE_CHECKING:
    from ._buffer import ProtectedBuffer
    from ._types import MemoryTarget

__all__ = ["Fault", "FaultKind", "probe", "SEGV_MAPERR", "SEGV_ACCERR", "SEGV_PKUERR"]

SEGV_MAPERR = 1
SEGV_ACCERR = 2
SEGV_PKUERR = 4


class FaultKind(enum.Enum):
    PKEY = "pkey"  # SEGV_PKUERR: denied by the thread's PKRU
    PROTECTION = "protection"  # SEGV_ACCERR: denied by the page's prot
    UNMAPPED = "unmapped"  # SEGV_MAPERR: nothing mapped there
    OTHER = "other"


_KINDS = {SEGV_PKUERR: FaultKind.PKEY, SEGV_ACCERR: FaultKind.PROTECTION, SEGV_MAPERR: FaultKind.UNMAPPED}


@dataclass(frozen=True)
class Fault:
    """A fault that a guarded access caught."""

    kind: FaultKind
    si_code: int
    pkey: int | None
    address: int
    signal: int = signal.SIGSEGV
    #: PKRU the C handler ran with: the kernel's init value, not the thread's.
    handler_pkru: int | None = None

    def __str__(self) -> str:
        key = f", pkey {self.pkey}" if self.pkey is not None else ""
        return f"{self.kind.value} fault at {self.address:#x} (si_code {self.si_code}{key})"


def probe(target: MemoryTarget | ProtectedBuffer, write: bool = False, *,
          offset: int = 0) -> Fault | None:
    """Read (or, with ``write``, atomically rewrite) one byte and report.

    ``target`` is an int address, a :class:`ProtectedBuffer` (its data is
    probed), or a buffer; ``offset`` is added to it.
    Returns None when the access succeeds, else the :class:`Fault`.  A write
    probe stores the byte's own value back with one atomic instruction, so
    it never changes memory.  Only SIGSEGV is caught (not SIGBUS).

    A thread that blocks SIGSEGV can probe too: SIGSEGV is unblocked for
    the access and blocked again after it (a blocked synchronous fault
    would otherwise kill the process); a SIGSEGV already pending for the
    thread is then delivered, as on any unblocking.
    """
    from ._buffer import ProtectedBuffer

    offset = require_int(offset, "offset")
    if isinstance(target, ProtectedBuffer):
        # Its data, not the object: the first byte, or `offset` into it.
        if not 0 <= offset < target.size:
            raise ArgumentError(f"offset {offset} is outside the buffer's {target.size} bytes")
        address = target.address + offset
    elif isinstance(target, int) and not isinstance(target, bool):
        if target < 0:
            raise ArgumentError(f"address {target:#x} is negative")
        address = target + offset
    else:
        try:
            pin = ffi.from_buffer(target)
        except TypeError:
            raise TypeError(f"target must be an int address or a buffer, not {type(target).__name__}") from None
        if not 0 <= offset < len(pin):
            ffi.release(pin)
            raise ArgumentError(f"offset {offset} is outside the buffer's {len(pin)} bytes")
        address = int(ffi.cast("uintptr_t", pin)) + offset
        ffi.release(pin)
    if not 0 <= address < 1 << 64:
        raise ArgumentError(f"address {address:#x} is outside the address space")
    fault = ffi.new("struct pk_fault *")
    result = lib.pk_probe(address, 1 if write else 0, fault)
    if result < 0:
        raise PkeysError("could not install the SIGSEGV guard")
    if result == 0:
        return None
    return Fault(
        kind=_KINDS.get(fault.code, FaultKind.OTHER),
        si_code=fault.code,
        pkey=None if fault.pkey < 0 else fault.pkey,
        address=fault.addr,
        signal=fault.signo,
        handler_pkru=None if fault.handler_pkru < 0 else fault.handler_pkru,
    )
