"""Argument checks shared by every layer, so all of them refuse alike.

Each check raises before anything reaches the kernel or the register, so a
refused call changes nothing.
"""

from __future__ import annotations

import errno
import operator
import os
from typing import NoReturn

from . import _select
from ._binding import ffi, lib
from ._errors import (
    ArgumentError,
    InvalidKeyError,
    ClosedError,
    KeyInUseError,
    ScopeError,
    UnsupportedError,
    os_error,
)
from ._revocation import no_revocation_error, revocation_error, signal_taken_error
from ._rights import NUM_KEYS, PKRU_MAX

FD_MAX = 2**31 - 1  # a C int

__all__ = [
    "require_int",
    "check_fd",
    "check_pkru",
    "check_key_range",
    "check_rights",
    "check_alloc_args",
    "raise_status",
]


def require_int(value: object, name: str) -> int:
    """``value`` as an int: ints and objects with ``__index__`` (such as
    :class:`pkeys.Key`); bools and everything else are a TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None


def check_fd(fd: object) -> int:
    """A file descriptor: an int in the kernel's range (a C int, not
    negative), else OSError(EBADF) as the kernel gives for a closed one.
    Checked first: a number beyond a C int would otherwise reach os.fstat
    or cffi as an OverflowError, after a buffer was made."""
    fd = require_int(fd, "fd")
    if not 0 <= fd <= FD_MAX:
        raise OSError(errno.EBADF, f"{os.strerror(errno.EBADF)}: fd {fd} is outside 0..2**31-1")
    return fd


def check_pkru(value: object) -> int:
    value = require_int(value, "PKRU value")
    if not 0 <= value <= PKRU_MAX:
        raise ArgumentError(f"PKRU value {value:#x} is outside 0..0xffffffff")
    return value


def check_key_range(pkey: object) -> int:
    pkey = require_int(pkey, "pkey")
    if not 0 <= pkey < NUM_KEYS:
        raise InvalidKeyError(f"pkey {pkey} is outside 0..15")
    return pkey


def check_rights(rights: object) -> int:
    rights = require_int(rights, "access rights")
    if not 0 <= rights <= 3:
        raise ArgumentError(
            f"access rights {rights} are outside 0..3 "
            "(PKEY_DISABLE_ACCESS=1 | PKEY_DISABLE_WRITE=2)"
        )
    return rights


def check_alloc_args(flags: object, access_rights: object) -> tuple[int, int]:
    flags = require_int(flags, "flags")
    if flags != 0:
        raise ArgumentError(f"flags must be 0 (the kernel defines none), not {flags}")
    return flags, check_rights(access_rights)


UNSUPPORTED_MESSAGE = (
    "hardware protection keys are not available: the CPU lacks PKU or the OS "
    "has not enabled it (CPUID.7.0:ECX.OSPKE is 0); run `pkeys doctor`"
)

_KEY_ZERO_MESSAGE = (
    "the rights of key 0 never change: it tags all ordinary memory, the "
    "interpreter's included, and it is never freed"
)


_STATUS_MESSAGES = {
    lib.PK_E_KEY_CLOSED: (InvalidKeyError, "this Key has been closed: its key was freed"),
    lib.PK_E_IN_USE: (KeyInUseError, "the key still guards tracked memory"),
    lib.PK_E_BUSY: (BufferError, "the protected buffer is in use: a block of unlocked(), or a "
                    "readinto() or write(), has not ended yet (here, or in another thread or "
                    "task)"),
    lib.PK_E_CLOSED: (ClosedError, "the protected buffer is closed"),
    lib.PK_E_WRONG_THREAD: (ScopeError, "a scope must end in the thread that entered it; on "
                            "hardware the entering thread keeps its access until it ends "
                            "the scope itself, or key.revoke() ends it in every thread"),
    lib.PK_E_UNBALANCED: (ScopeError, "this scope was ended more often than it was entered"),
}


def raise_status(status: int, pkey: object = None, rights: object = None) -> NoReturn:
    """Raise the exception for a negative ``PK_E_*`` status from the shim."""
    if status == lib.PK_E_ERRNO:
        raise os_error(ffi.errno)
    if status == lib.PK_E_NOSPC:
        raise exhausted_error()
    if status == lib.PK_E_UNSUPPORTED:
        raise UnsupportedError(_select.chosen().unsupported_reason or UNSUPPORTED_MESSAGE)
    if status == lib.PK_E_KEY_ZERO:
        raise InvalidKeyError(_KEY_ZERO_MESSAGE)
    if status == lib.PK_E_RIGHTS:
        check_rights(rights)
    if status == lib.PK_E_KEY_RANGE:
        check_key_range(pkey)
    if status == lib.PK_E_NOT_ALLOCATED:
        raise InvalidKeyError(
            f"pkey {pkey} is not allocated: never allocated through pkeys, or already freed"
        )
    if status == lib.PK_E_BROADCAST:
        raise revocation_error(pkey, "")
    if status == lib.PK_E_NO_REVOCATION:
        raise no_revocation_error()
    if status == lib.PK_E_SIGNAL_TAKEN:
        raise signal_taken_error()
    if status in _STATUS_MESSAGES:
        cls, message = _STATUS_MESSAGES[status]
        raise cls(message)
    raise InvalidKeyError(f"pkey {pkey!r} refused (status {status})")


def exhausted_error() -> OSError:
    """ENOSPC from pkey_alloc, said in words that lead somewhere."""
    stats = ffi.new("struct pk_vkeys_stats *")
    lib.pk_vkeys_stats(stats)
    mine = bin(lib.pk_allocated_mask() & ~1).count("1")
    others = max(0, NUM_KEYS - 1 - mine)
    pool = f", {stats.keys} of them shared by ProtectedBuffers" if stats.keys else ""
    error = OSError(
        errno.ENOSPC,
        f"all 15 protection keys are in use ({mine} by pkeys{pool}, {others} by other code, "
        "the kernel's execute-only key included). Ways out: share one Key between "
        "buffers with ProtectedBuffer(..., key=k); make ProtectedBuffers without key=, "
        "which share a pool of virtual keys (any number of buffers, "
        "pkeys.virtual_key_limit() keys); or close keys you no longer need",
    )
    return error
