"""Keeping the fault guard first in line for SIGSEGV without a syscall on
every use of a buffer.

The guard (``csrc/guard.c``) must be the first SIGSEGV handler, so that a
fault on protected memory is named and probes work; ``pk_guard_install()``
checks that with one ``sigaction(2)`` call and puts it back on top if
something displaced it.  Python code can displace it in two ways that
Python shows without a syscall: ``faulthandler.enable()`` and
``signal.signal(SIGSEGV, ...)``.  :func:`install_if_changed` therefore calls
into C only when one of those changed since the last check.

Unsafe assumption, written down: a SIGSEGV handler installed by C code
(another extension calling ``sigaction`` itself), or faulthandler disabled
and enabled again between two checks, is not seen here.  The next
:class:`pkeys.ProtectedBuffer` made, and every ``pkeys.probe()``, check
with the syscall and put the guard back on top.
"""

from __future__ import annotations

import faulthandler
import importlib
import signal
from collections.abc import Callable

from ._binding import lib

__all__ = ["install", "install_if_changed"]

_faulthandler_enabled = faulthandler.is_enabled
# The C function under signal.getsignal, which wraps its result in an enum
# at about ten times the cost.  Same object for the same handler.
_python_handler: Callable[[int], object] = importlib.import_module("_signal").getsignal
_SIGSEGV = int(signal.SIGSEGV)

# What Python showed at the last check (None before the first).
_seen_faulthandler: bool | None = None
_seen_handler: object = None


def install() -> None:
    """Put the guard on top now (one syscall when it already is)."""
    global _seen_faulthandler, _seen_handler
    # Read first: a change made between this and the call below is seen
    # as a change by the next install_if_changed().
    _seen_faulthandler = _faulthandler_enabled()
    _seen_handler = _python_handler(_SIGSEGV)
    lib.pk_guard_install()


def install_if_changed() -> None:
    """install(), but only if faulthandler or Python's SIGSEGV handler
    changed since the last check."""
    if (_faulthandler_enabled() is not _seen_faulthandler
            or _python_handler(_SIGSEGV) is not _seen_handler):
        install()
