"""Threads born inside a block get no access from it.

A new thread copies its creator's PKRU, and with it whatever the creator's
``allow()`` and ``unlocked()`` blocks opened, but none of the grants that
would close it again: those are counted in the creator's thread.  So every
``threading.Thread`` (asyncio's default executor and
``concurrent.futures`` workers included) is born with its creator's rights
*outside* every grant:

* ``Thread.start`` takes a snapshot in the creator (``pk_birth_snapshot``:
  the keys it holds grants on and their base rights; no syscall, and
  nothing to do when it holds none);
* the new thread applies it before anything else runs in it, before
  ``start()`` returns in the creator (``pk_birth_settle``, one register
  write).  A key revoked or freed between the two is left as the
  revocation made it.

The new thread then records which keys its register denies
(``pk_exposure_birth_record``): a revocation of such a key need not wait
for it while it has taken no grant on the key since (csrc/exposure.c), so a
thread that blocks every signal stalls nothing it never had.

Scopes themselves cost nothing more.  Threads that ``threading`` does not
start (``_thread.start_new_thread``, threads of C libraries) are not seen:
the README's "Limits" says so.  On the software backend grants are the
process's, and a block's end closes its memory for every thread anyway.
"""

from __future__ import annotations

import threading
from typing import Any

from ._binding import ffi, lib

__all__ = ["install"]

_installed = False


def install() -> None:
    """Wrap ``threading.Thread.start`` and its bootstrap, once."""
    global _installed
    thread_type: Any = threading.Thread
    if _installed or not hasattr(thread_type, "_bootstrap_inner"):
        return
    original_start = thread_type.start
    original_bootstrap = thread_type._bootstrap_inner

    def start(self: threading.Thread) -> None:
        birth = ffi.new("struct pk_birth *")
        if lib.pk_birth_snapshot(birth):
            self._pkeys_birth = birth  # type: ignore[attr-defined]
        original_start(self)

    def _bootstrap_inner(self: threading.Thread) -> None:
        birth = self.__dict__.pop("_pkeys_birth", None)
        if birth is not None:
            lib.pk_birth_settle(birth)
        lib.pk_exposure_birth_record()
        original_bootstrap(self)

    start.__doc__ = original_start.__doc__
    thread_type.start = start
    thread_type._bootstrap_inner = _bootstrap_inner
    _installed = True
