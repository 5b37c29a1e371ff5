"""Linux memory protection keys (x86 PKU/MPK) for Python.

The functions here validate their arguments, track the keys this process
allocated through them, and run on the backend chosen once at import: the
hardware (per-thread PKRU register) where the OS has enabled PKU, or a
process-wide ``mprotect`` emulation elsewhere.  Signatures and behaviour
are identical on both.  ``PKEYS_BACKEND`` in the
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
    ClosedError,
    InvalidKeyError,
    KeyInUseError,
    MemoryLockWarning,
    PkeysError,
    PkeysWarning,
    RevocationError,
    ScopeError,
    SimulatedRegisterWarning,
    UnsupportedError,
)
from ._fault import Fault, FaultKind, probe
from ._api import (
    allocated_keys,
    pkey_alloc,
    pkey_free,
    pkey_get,
    pkey_mprotect,
    pkey_set,
    rdpkru,
    wrpkru,
)
from ._key import Key, Scope, allow
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
from . import _select
from ._select import hardware_supported
from ._share import ShareHandle
from ._types import BackendName, BufferOptions, ExpectFault, KeyLike, OnFork, VirtualKeyStats

__version__ = "0.2.0"

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
    "KeyLike",
    "BackendName",
    "BufferOptions",
    "VirtualKeyStats",
    "OnFork",
    "ExpectFault",
    "Scope",
    "ProtectedBuffer",
    "Unlocked",
    "ShareHandle",
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
    "RevocationError",
    "BufferCorruptedError",
    "ClosedError",
    "PkeysWarning",
    "MemoryLockWarning",
    "SimulatedRegisterWarning",
]

def backend() -> BackendName:
    """``"hardware"`` or ``"software"``: the backend chosen at import
    (``"simulated"`` in the simulated-register build, which protects nothing)."""
    return _select.chosen().backend.NAME


def backend_reason() -> str:
    """Why that backend was chosen, in one sentence."""
    return _select.chosen().reason


# The one place the backend is chosen and C is given its mode (importing
# the modules above chooses nothing).
_select.select()
