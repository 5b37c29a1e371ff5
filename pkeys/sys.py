"""The kernel's protection-key syscalls, raw.

Each function is one syscall through ``syscall(2)``, so they work with any
libc.  Arguments are checked only for type and C range: the kernel sees
exactly what you pass, and its refusal comes back as ``OSError`` with its
errno.  Nothing here tracks keys or touches PKRU; for that use the
top-level :mod:`pkeys` API.

Without PKU, ``pkey_alloc`` fails (EINVAL on x86 kernels, ENOSPC on some
others) and ``pkey_mprotect(..., pkey=-1)`` behaves like ``mprotect``.
"""

from __future__ import annotations

from ._binding import lib
from ._raw import call

__all__ = ["pkey_alloc", "pkey_free", "pkey_mprotect", "mprotect"]


def pkey_alloc(flags: int, access_rights: int) -> int:
    """``pkey_alloc(2)``: a new key, with ``access_rights`` in this thread."""
    lib.pk_exposure_untracked()  # a key pkeys does not track may open here
    return call(lib.pk_sys_pkey_alloc, flags, access_rights)


def pkey_free(pkey: int) -> None:
    """``pkey_free(2)``.  The kernel accepts key 0 here; the safe layer does not."""
    lib.pk_exposure_untracked()  # a number freed behind pkeys' back
    call(lib.pk_sys_pkey_free, pkey)


def pkey_mprotect(addr: int, length: int, prot: int, pkey: int) -> None:
    """``pkey_mprotect(2)``: ``mprotect`` that also tags the pages with ``pkey``."""
    call(lib.pk_sys_pkey_mprotect, addr, length, prot, pkey)


def mprotect(addr: int, length: int, prot: int) -> None:
    """``mprotect(2)``.  Keeps the pages' key."""
    call(lib.pk_sys_mprotect, addr, length, prot)
