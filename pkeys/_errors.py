"""The package's exceptions.

Each one also subclasses the builtin it resembles, so callers that do not
know pkeys can still catch ``ValueError`` or ``OSError``.  Failures reported
by the kernel or libc are plain ``OSError`` (its constructor picks the
subclass from errno), never wrapped.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "PkeysError",
    "UnsupportedError",
    "ArgumentError",
    "InvalidKeyError",
    "KeyInUseError",
    "BufferCorruptedError",
    "ClosedError",
    "ScopeError",
    "RevocationError",
    "PkeysWarning",
    "MemoryLockWarning",
    "SimulatedRegisterWarning",
    "os_error",
]


class PkeysError(Exception):
    """Base class of every error raised by pkeys itself."""


class UnsupportedError(PkeysError, OSError):
    """The operation needs protection keys that this CPU, OS or libc lacks."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EOPNOTSUPP, message)

    def __str__(self) -> str:
        return str(self.strerror)


class ArgumentError(PkeysError, ValueError):
    """An argument was refused before any call reached the kernel."""


class InvalidKeyError(ArgumentError):
    """A key outside 0..15, not allocated, already freed, or key 0 misused."""


class KeyInUseError(InvalidKeyError):
    """The key still guards memory that the package tracks."""


class BufferCorruptedError(PkeysError, RuntimeError):
    """A protected buffer's canary was overwritten: something wrote before
    its start.  The buffer has been wiped and unmapped all the same."""


class ClosedError(PkeysError, ValueError):
    """An operation on a closed ProtectedBuffer (a ValueError, as for a
    closed file)."""


class ScopeError(PkeysError, RuntimeError):
    """A scope was ended where it cannot be: in a thread other than the one
    that entered it, or more often than it was entered."""


class RevocationError(PkeysError, TimeoutError):
    """A change of rights for every thread did not reach every thread, and
    the call says so rather than return: some thread did not answer the
    revocation signal in time (it blocks it, or is stuck outside Python),
    its signal frame could not be edited, or it was running another signal
    handler each time (whose return would undo the change); or the signal
    itself has another handler.  ``threads`` other threads were found,
    ``answered`` applied the change, ``exempt`` needed nothing (they
    provably never had the key, and were not signalled); ``unanswered``,
    ``refused`` and ``in_handler`` are the thread ids of the others.  The calling thread and every thread that
    answered have the new rights; an unanswered thread applies them when it
    handles the signal, one in a handler keeps its rights until a later
    revocation reaches it."""

    def __init__(self, message: str, *, threads: int = 0, answered: int = 0,
                 unanswered: tuple[int, ...] = (), refused: tuple[int, ...] = (),
                 in_handler: tuple[int, ...] = (), exempt: int = 0) -> None:
        super().__init__(message)
        self.exempt = exempt
        self.threads = threads
        self.answered = answered
        self.unanswered = unanswered
        self.refused = refused
        self.in_handler = in_handler


class PkeysWarning(UserWarning):
    """Base class of the package's warnings."""


class MemoryLockWarning(PkeysWarning):
    """A protected buffer could not be locked in memory (RLIMIT_MEMLOCK)."""


class SimulatedRegisterWarning(PkeysWarning):
    """This pkeys is the simulated-register build (PKEYS_BUILD_SIMULATED_PKU=1):
    its register is a thread-local variable and it protects nothing.  Made
    to measure the hardware path; never for real use."""


# Tracebacks and reprs name them where users import them from
# (pkeys.InvalidKeyError, not pkeys._errors.InvalidKeyError); pickle finds
# them there too.
for _public in (PkeysError, UnsupportedError, ArgumentError, InvalidKeyError, KeyInUseError,
                BufferCorruptedError, ClosedError, ScopeError, RevocationError, PkeysWarning,
                MemoryLockWarning, SimulatedRegisterWarning):
    _public.__module__ = "pkeys"
del _public


def os_error(err: int) -> OSError:
    """The exception for a failed kernel or libc call with this errno."""
    return OSError(err, os.strerror(err))
