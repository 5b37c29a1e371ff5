"""The software backend: protection keys emulated with ``mprotect``.

For CPUs and kernels without PKU.  The API and the validation are those of
the hardware backend, with three differences (also in the README and in
``pkeys doctor``):

* One emulated PKRU for the whole process, not one per thread: opening a
  key in one thread opens it in all of them.
* Each rights change costs one ``mprotect`` per region of each key whose
  rights changed, instead of one unprivileged instruction.
* A denied access faults with ``SEGV_ACCERR``, not ``SEGV_PKUERR``.

Enforcement: every tagged region is mapped with its requested ``prot``
reduced by its key's rights -- access-disable leaves only ``PROT_EXEC``
(instruction fetch is never governed by keys), write-disable drops
``PROT_WRITE``.  Memory whose owner has released it is never touched; see
:mod:`pkeys._memory` for how.
"""

from __future__ import annotations

import errno

from . import _state
from ._binding import ffi, lib
from ._errors import os_error
from ._memory import Region, check_prot, resolve
from ._rights import (
    INIT_PKRU,
    NUM_KEYS,
    PROT_EXEC,
    PROT_WRITE,
    RIGHTS_BY_VALUE,
    PkeyRights,
)
from ._validate import (
    check_alloc_args,
    check_key_range,
    check_pkru,
    check_rights,
    raise_status,
)

NAME = "software"

_E_NOT_ALLOCATED = lib.PK_E_NOT_ALLOCATED
_E_KEY_ZERO = lib.PK_E_KEY_ZERO
_mprotect = lib.pk_sys_mprotect

# The emulated register and the allocated keys (bit k = key k), both
# process-wide and changed only under _state.lock.
_pkru = INIT_PKRU
_allocated = 0


def effective_prot(prot: int, rights: int) -> int:
    """The ``prot`` that enforces ``rights`` on memory requested as ``prot``."""
    if rights & 1:
        return prot & PROT_EXEC
    if rights & 2:
        return prot & ~PROT_WRITE
    return prot


def pkey_alloc(flags: int = 0, access_rights: int = 0) -> int:
    flags, access_rights = check_alloc_args(flags, access_rights)
    global _allocated
    with _state.lock:
        free = [k for k in range(1, NUM_KEYS) if not _allocated & (1 << k)]
        if not free:
            raise os_error(errno.ENOSPC)
        pkey = free[0]
        _allocated |= 1 << pkey
        # A fresh key guards no region yet, so this only updates the register.
        _apply(_with_rights(_pkru, pkey, access_rights))
    return pkey


def pkey_free(pkey: int) -> None:
    pkey = _check_allocated(pkey)
    if pkey == 0:
        raise_status(_E_KEY_ZERO)
    global _allocated
    with _state.lock:
        if not _allocated & (1 << pkey):
            raise_status(_E_NOT_ALLOCATED, pkey)
        _state.refuse_if_guarding(pkey)
        _allocated &= ~(1 << pkey)
        # As on hardware: a later reuse of the number must inherit nothing.
        _apply(_with_rights(_pkru, pkey, 1))


def pkey_get(pkey: int) -> PkeyRights:
    pkey = _check_allocated(pkey)
    return RIGHTS_BY_VALUE[(_pkru >> (2 * pkey)) & 3]


def pkey_set(pkey: int, access_rights: int) -> None:
    # Fast path for exact ints already valid; anything else (IntFlag, Key,
    # bad values) takes the checked path, which normalises or raises.
    if (
        type(pkey) is int
        and type(access_rights) is int
        and 0 < pkey < NUM_KEYS
        and 0 <= access_rights <= 3
        and (_allocated >> pkey) & 1
    ):
        shift = 2 * pkey
        with _state.lock:
            _apply((_pkru & ~(3 << shift)) | (access_rights << shift))
        return
    pkey = _check_allocated(pkey)
    access_rights = check_rights(access_rights)
    if pkey == 0:
        raise_status(_E_KEY_ZERO)
    with _state.lock:
        _apply(_with_rights(_pkru, pkey, access_rights))


def pkey_mprotect(target: object, length: int | None, prot: int, pkey: int) -> None:
    prot = check_prot(prot)
    pkey = _check_allocated(pkey)
    addr, length, owner, pin = resolve(target, length)
    try:
        with _state.lock:
            rights = (_pkru >> (2 * pkey)) & 3
            if _mprotect(addr, length, effective_prot(prot, rights)) != 0:
                raise os_error(ffi.errno)
            _state.regions.tag(addr, length, prot, pkey, owner)
    finally:
        if pin is not None:
            ffi.release(pin)


def rdpkru() -> int:
    return _pkru


def wrpkru(value: int) -> None:
    value = check_pkru(value)
    if value & 3:
        raise_status(_E_KEY_ZERO)
    with _state.lock:
        _apply(value)


def enter(mask: int, bits: int) -> int:
    """Replace the bits under ``mask``; the previous value, or a status < 0."""
    if mask & 3:
        return _E_KEY_ZERO
    with _state.lock:
        if mask & ~_allocated_pkru_bits():
            return _E_NOT_ALLOCATED
        saved = _pkru
        _apply((saved & ~mask) | (bits & mask))
    return saved


def leave(mask: int, saved: int) -> int:
    """Restore the bits under ``mask`` from ``saved``, skipping freed keys."""
    with _state.lock:
        mask &= _allocated_pkru_bits()
        _apply((_pkru & ~mask) | (saved & mask))
    return 0


def is_allocated(pkey: int) -> bool:
    return bool(_allocated & (1 << pkey))


def allocated_keys() -> list[int]:
    return [k for k in range(NUM_KEYS) if _allocated & (1 << k)]


def shadow_pkru() -> int | None:
    """The emulated register is its own record."""
    return _pkru


def _check_allocated(pkey: object) -> int:
    pkey = check_key_range(pkey)
    if pkey and not _allocated & (1 << pkey):
        raise_status(_E_NOT_ALLOCATED, pkey)
    return pkey


def _with_rights(pkru: int, pkey: int, rights: int) -> int:
    shift = 2 * pkey
    return (pkru & ~(3 << shift)) | (rights << shift)


def _allocated_pkru_bits() -> int:
    return sum(3 << (2 * k) for k in range(NUM_KEYS) if _allocated & (1 << k))


def _apply(new_pkru: int) -> None:
    """Make ``new_pkru`` the emulated register, re-protecting the regions of
    exactly the keys whose rights change.  The caller holds the lock."""
    global _pkru
    changed = _pkru ^ new_pkru
    if not changed:
        return
    by_key = _state.regions.by_key
    while changed:
        pkey = ((changed & -changed).bit_length() - 1) >> 1  # lowest changed key
        changed &= ~(3 << (2 * pkey))
        regions = by_key.get(pkey)
        if regions:
            rights = (new_pkru >> (2 * pkey)) & 3
            for region in list(regions):
                _reprotect(region, rights)
    _pkru = new_pkru
    lib.pk_sw_mirror_pkru(new_pkru)


def _reprotect(region: Region, rights: int) -> None:
    usable, export = region.pin()
    if not usable:
        _state.regions.drop(region)
        return
    try:
        if _mprotect(region.start, region.end - region.start, effective_prot(region.prot, rights)):
            err = ffi.errno
            if err == errno.ENOMEM:
                # Unmapped behind our back (an int-address region): forget it.
                _state.regions.drop(region)
                return
            raise os_error(err)
    finally:
        if export is not None:
            ffi.release(export)


__all__ = [
    "NAME",
    "enter",
    "leave",
    "pkey_alloc",
    "pkey_free",
    "pkey_get",
    "pkey_set",
    "pkey_mprotect",
    "rdpkru",
    "wrpkru",
    "is_allocated",
    "allocated_keys",
    "shadow_pkru",
    "copy",
    "wipe",
    "effective_prot",
]


def copy(dst: int, src: int, length: int, mask: int, bits: int) -> None:
    """memcpy with the keys under ``mask`` opened to ``bits`` only for the copy.

    The emulated register is process-wide, so the window is open to every
    thread, but no user code runs inside it."""
    saved = enter(mask, bits)
    if saved < 0:
        raise_status(saved)
    try:
        ffi.memmove(ffi.cast("void *", dst), ffi.cast("void *", src), length)
    finally:
        leave(mask, saved)


def wipe(address: int, length: int, mask: int, bits: int) -> None:
    saved = enter(mask, bits)
    if saved < 0:
        raise_status(saved)
    try:
        lib.pk_wipe(address, length)
    finally:
        leave(mask, saved)
