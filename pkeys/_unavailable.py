"""Stand-in backend for ``PKEYS_BACKEND=hardware`` (or a misspelt value)
where it cannot be honoured.  Importing pkeys still works, and so does
``pkeys doctor``; every operation raises UnsupportedError with the reason.
The signatures are those of the other backends."""

from __future__ import annotations

from typing import NoReturn

from ._errors import UnsupportedError
from ._rights import PkeyRights

NAME = "hardware"
reason = "hardware protection keys are not available"


def _refuse() -> NoReturn:
    raise UnsupportedError(reason)


def pkey_alloc(flags: int = 0, access_rights: int = 0) -> int:
    _refuse()


def pkey_free(pkey: int) -> None:
    _refuse()


def pkey_get(pkey: int) -> PkeyRights:
    _refuse()


def pkey_set(pkey: int, access_rights: int) -> None:
    _refuse()


def pkey_mprotect(target: object, length: int | None, prot: int, pkey: int) -> None:
    _refuse()


def rdpkru() -> int:
    _refuse()


def wrpkru(value: int) -> None:
    _refuse()


def enter(mask: int, bits: int) -> int:
    _refuse()


def leave(mask: int, saved: int) -> int:
    _refuse()


def is_allocated(pkey: int) -> bool:
    return False


def allocated_keys() -> list[int]:
    return []


def shadow_pkru() -> int | None:
    return None


def copy(dst: int, src: int, length: int, mask: int, bits: int) -> None:
    _refuse()


def wipe(address: int, length: int, mask: int, bits: int) -> None:
    _refuse()
