"""Linux memory protection keys (x86 PKU/MPK) for Python.

The functions here validate their arguments, track the keys this process
allocated through them, and dispatch to the backend chosen at import: the
hardware (per-thread PKRU register) where the OS has enabled PKU, or a
process-wide ``mprotect`` emulation elsewhere.  ``PKEYS_BACKEND`` in the
environment (``auto``, ``hardware``, ``software``) overrides the choice.

Raw layers without validation: :mod:`pkeys.sys` (the syscalls),
:mod:`pkeys.glibc` (glibc's functions), :mod:`pkeys.pkru` (the register).
"""

from __future__ import annotations

# The raw layers, as attributes (not in __all__: `import *` must not shadow `sys`).
from . import glibc as glibc
from . import pkru as pkru
from . import sys as sys
from ._buffer import ProtectedBuffer, Unlocked, virtual_key_limit, virtual_key_stats
from ._errors import (
    ArgumentError,
    BufferCorruptedError,
    InvalidKeyError,
    KeyInUseError,
    MemoryLockWarning,
    PkeysError,
    PkeysWarning,
    ScopeError,
    UnsupportedError,
)
from ._fault import Fault, FaultKind, probe
from ._key import Key, Scope, _backend, _reason, allow
from ._prompt import prompt
from ._rights import (
    PKEY_DISABLE_ACCESS,
    PKEY_DISABLE_WRITE,
    PKEY_UNRESTRICTED,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    PkeyRights,
)
from ._select import hardware_supported

__version__ = "0.1.0"

__all__ = [
    "PKEY_UNRESTRICTED",
    "PKEY_DISABLE_ACCESS",
    "PKEY_DISABLE_WRITE",
    "PkeyRights",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "PROT_EXEC",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "pkey_get",
    "pkey_set",
    "rdpkru",
    "wrpkru",
    "allocated_keys",
    "hardware_supported",
    "backend",
    "backend_reason",
    "Key",
    "Scope",
    "ProtectedBuffer",
    "Unlocked",
    "prompt",
    "virtual_key_limit",
    "virtual_key_stats",
    "allow",
    "probe",
    "Fault",
    "FaultKind",
    "PkeysError",
    "UnsupportedError",
    "ArgumentError",
    "InvalidKeyError",
    "KeyInUseError",
    "ScopeError",
    "BufferCorruptedError",
    "PkeysWarning",
    "MemoryLockWarning",
]

# The backend's functions themselves, not wrappers: dispatch costs nothing
# per call.  Signatures and behaviour are identical on every backend.
pkey_alloc = _backend.pkey_alloc
pkey_alloc.__doc__ = """pkey_alloc(flags=0, access_rights=0) -> int

Allocate a protection key; ``access_rights`` become this thread's rights
for it.  ``flags`` must be 0.  OSError(ENOSPC) when none is left."""

pkey_free = _backend.pkey_free
pkey_free.__doc__ = """pkey_free(pkey)

Free a key allocated through pkeys.  Key 0, unallocated keys, double
frees and keys still guarding tracked memory are refused (ValueError
subclasses).  This thread's rights for the number are left at
access-disable, so a later reuse inherits nothing."""

pkey_mprotect = _backend.pkey_mprotect
pkey_mprotect.__doc__ = """pkey_mprotect(target, length, prot, pkey)

Set ``prot`` on memory and tag it with ``pkey``.  ``target`` is a
page-aligned int address, or a writable buffer over page-aligned memory
(``mmap.mmap``); ``length=None`` means the whole buffer."""

pkey_get = _backend.pkey_get
pkey_get.__doc__ = """pkey_get(pkey) -> PkeyRights

This thread's rights for an allocated key (or key 0)."""

pkey_set = _backend.pkey_set
pkey_set.__doc__ = """pkey_set(pkey, rights)

Set this thread's rights for an allocated key (not key 0).  The register
is written only if the value changes."""

rdpkru = _backend.rdpkru
rdpkru.__doc__ = """rdpkru() -> int

This thread's PKRU (the emulated, process-wide one on the software backend)."""

wrpkru = _backend.wrpkru
wrpkru.__doc__ = """wrpkru(value)

Write this thread's PKRU; a value that would deny key 0 is refused."""

allocated_keys = _backend.allocated_keys
allocated_keys.__doc__ = "The keys allocated through pkeys in this process, ascending."


def backend() -> str:
    """``"hardware"`` or ``"software"``: the backend chosen at import."""
    return _backend.NAME


def backend_reason() -> str:
    """Why that backend was chosen, in one sentence."""
    return _reason
