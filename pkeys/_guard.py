"""Keeping the fault guard first in line for SIGSEGV without a syscall on
every use of a buffer.

The guard (``csrc/guard.c``) must be the first SIGSEGV handler, so that a
fault on protected memory is named and probes work; ``pk_guard_install()``
checks that with one ``sigaction(2)`` call and puts it back on top if
something displaced it.  Python code can displace it in two ways that
Python shows without a syscall: ``faulthandler.enable()`` and
``signal.signal(SIGSEGV, ...)``.  Each ``unlocked()`` entry
(``csrc/scope_block.c``) therefore compares those two with what
:func:`install` saw last, and calls it only when one of them changed.

Unsafe assumption, written down: a SIGSEGV handler installed by C code
(another extension calling ``sigaction`` itself), faulthandler disabled
and enabled again between two checks, or ``signal.signal(SIGSEGV, h)``
with the handler Python already shows (``SIG_DFL`` as a rule: the guard
sits below Python's view, and the saved-and-restored
``signal.signal(SIGSEGV, signal.getsignal(SIGSEGV))`` is one such call),
is not seen here.  The next
:class:`pkeys.ProtectedBuffer` made, and every ``pkeys.probe()``, check
with the syscall and put the guard back on top.
"""

from __future__ import annotations

import faulthandler
import importlib
import signal
from collections.abc import Callable

from . import _scope
from ._binding import lib

__all__ = ["install", "faulthandler_enabled", "python_handler", "SIGSEGV"]

faulthandler_enabled = faulthandler.is_enabled
# The C function under signal.getsignal, which wraps its result in an enum
# at about ten times the cost.  Same object for the same handler.
python_handler: Callable[[int], object] = importlib.import_module("_signal").getsignal
SIGSEGV = int(signal.SIGSEGV)


def install() -> None:
    """Put the guard on top now (one syscall when it already is)."""
    # Read first: a change made between this and the call below is seen
    # as a change by the next check.
    _scope.guard_seen(faulthandler_enabled(), python_handler(SIGSEGV))
    lib.pk_guard_install()
