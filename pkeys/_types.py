"""Type aliases and protocols shared by the public signatures."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Protocol, SupportsIndex, TypeAlias, TypedDict

if TYPE_CHECKING:
    # Anything with the buffer protocol (bytes, bytearray, memoryview, mmap,
    # numpy arrays), and not str.  typing_extensions is only read by the
    # type checker (typeshed ships it), never imported at run time.
    if sys.version_info >= (3, 12):
        from collections.abc import Buffer
    else:
        from typing_extensions import Buffer

    from ._fault import Fault, FaultKind
    from ._key import Key

__all__ = ["Backend", "BackendName", "BufferLike", "BufferOptions", "ExpectFault", "KeyLike",
           "MemoryTarget", "OnFork", "VirtualKeyStats"]

# A protection key number, or anything that converts to one losslessly
# through __index__, as pkeys.Key does.  (int is itself SupportsIndex; it is
# spelt out because it is what most callers pass.)
KeyLike: TypeAlias = int | SupportsIndex

#: Data to copy in or out: anything with the buffer protocol (PEP 688's
#: collections.abc.Buffer; typing_extensions.Buffer before 3.12).
BufferLike: TypeAlias = "Buffer"

#: Memory to tag or probe: an int address, or a buffer over it (mmap.mmap,
#: a memoryview or numpy array of one).  Never a str.
MemoryTarget: TypeAlias = "int | Buffer"

#: What a forked child has of a protected buffer (``ProtectedBuffer(on_fork=)``).
OnFork: TypeAlias = Literal["absent", "zeroed", "shared"]

#: What :func:`pkeys.backend` returns.
BackendName: TypeAlias = Literal["hardware", "software", "simulated"]


class Backend(Protocol):
    """What a backend module (_hardware, _software, _unavailable) provides.

    The operations themselves are the same on every backend (``pkeys._api``;
    the mode is chosen in C), so a backend is its name and its C mode.
    """

    @property
    def NAME(self) -> BackendName: ...  # a module constant: read-only here

    MODE: int


class BufferOptions(TypedDict, total=False):
    """The keyword arguments of :class:`pkeys.ProtectedBuffer` that its
    loaders (``from_file``) pass on."""

    key: Key | None
    label: str
    lock_memory: bool
    secretmem: bool | None
    seal: bool
    on_fork: OnFork | None


class VirtualKeyStats(TypedDict):
    """What :func:`pkeys.virtual_key_stats` returns."""

    limit: int
    keys: int
    held: int
    pkeys: list[int]
    assignments: int
    evictions: int


class ExpectFault(Protocol):
    """The type of the pytest plugin's ``expect_fault`` fixture: call
    ``function`` in a forked child that must die of a fault, and return
    that fault."""

    def __call__(self, function: Callable[[], object], kind: FaultKind | None = None) -> Fault: ...
