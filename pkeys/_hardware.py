"""The hardware backend: the real, per-thread PKRU register.

The validating operations live in C (``csrc/safe.c``) so that ``pkey_get``,
``pkey_set`` and scoped access are each one cffi call.  The functions here
have the same names and signatures as those of :mod:`pkeys._software`.
"""

from __future__ import annotations

from . import _state
from ._binding import ffi, lib
from ._errors import os_error
from ._memory import check_prot, resolve
from ._rights import NUM_KEYS, RIGHTS_BY_VALUE, PkeyRights
from ._validate import (
    check_alloc_args,
    check_key_range,
    check_pkru,
    check_rights,
    raise_status,
)

NAME = "hardware"

_get = lib.pk_hw_get
_set = lib.pk_hw_set
_E_NOT_ALLOCATED = lib.PK_E_NOT_ALLOCATED

# Scoped access (Key.allow, pkeys.allow) calls these directly.
enter = lib.pk_hw_enter
leave = lib.pk_hw_leave


def pkey_alloc(flags: int = 0, access_rights: int = 0) -> int:
    flags, access_rights = check_alloc_args(flags, access_rights)
    with _state.lock:
        pkey = lib.pk_hw_alloc(flags, access_rights)
    if pkey < 0:
        raise_status(pkey)
    return pkey


def pkey_free(pkey: int) -> None:
    pkey = check_key_range(pkey)
    with _state.lock:
        _state.refuse_if_guarding(pkey)
        status = lib.pk_hw_free(pkey)
    if status:
        raise_status(status, pkey)


def pkey_get(pkey: int) -> PkeyRights:
    if type(pkey) is not int:  # bools, floats, Keys: the checked conversion
        pkey = check_key_range(pkey)
    try:
        rights = _get(pkey)
    except OverflowError:
        rights = check_key_range(pkey)  # raises: outside 0..15
    if rights < 0:
        raise_status(rights, pkey)
    return RIGHTS_BY_VALUE[rights]


def pkey_set(pkey: int, access_rights: int) -> None:
    if type(pkey) is not int or type(access_rights) is not int:
        pkey, access_rights = check_key_range(pkey), check_rights(access_rights)
    try:
        status = _set(pkey, access_rights)
    except OverflowError:
        status = _set(check_key_range(pkey), check_rights(access_rights))
    if status:
        raise_status(status, pkey, access_rights)


def pkey_mprotect(target: object, length: int | None, prot: int, pkey: int) -> None:
    prot = check_prot(prot)
    pkey = check_key_range(pkey)
    addr, length, owner, pin = resolve(target, length)
    try:
        with _state.lock:
            if pkey and not is_allocated(pkey):
                raise_status(_E_NOT_ALLOCATED, pkey)
            if lib.pk_sys_pkey_mprotect(addr, length, prot, pkey) != 0:
                raise os_error(ffi.errno)
            _state.regions.tag(addr, length, prot, pkey, owner)
    finally:
        if pin is not None:
            ffi.release(pin)


def rdpkru() -> int:
    value = lib.pk_rdpkru()
    if value < 0:
        raise_status(lib.PK_E_UNSUPPORTED)
    return value


def wrpkru(value: int) -> None:
    status = lib.pk_hw_wrpkru(check_pkru(value))
    if status:
        raise_status(status)


def is_allocated(pkey: int) -> bool:
    return bool(lib.pk_allocated_mask() & (1 << pkey))


def allocated_keys() -> list[int]:
    mask = lib.pk_allocated_mask()
    return [k for k in range(NUM_KEYS) if mask & (1 << k)]


def shadow_pkru() -> int | None:
    """This thread's PKRU as the package last wrote it (None before any write)."""
    value = lib.pk_shadow_pkru()
    return None if value < 0 else value


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
]


def copy(dst: int, src: int, length: int, mask: int, bits: int) -> None:
    """memcpy with the keys under ``mask`` opened to ``bits`` only for the copy."""
    status = lib.pk_hw_copy(dst, src, length, mask, bits)
    if status:
        raise_status(status)


def wipe(address: int, length: int, mask: int, bits: int) -> None:
    """Zero memory that the compiler cannot skip, with the same temporary access."""
    status = lib.pk_hw_wipe(address, length, mask, bits)
    if status:
        raise_status(status)
