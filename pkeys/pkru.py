"""The PKRU register, and pure arithmetic on PKRU values.

PKRU holds two bits for each of the 16 protection keys::

     31 30 29 28                     5  4  3  2  1  0
    +-----+-----+-------- ... ------+-----+-----+-----+
    |WD AD|WD AD|                   |WD AD|WD AD|WD AD|
    +-----+-----+-------- ... ------+-----+-----+-----+
     key 15 key 14                   key 2 key 1 key 0

    AD (bit 2k)   access-disable: no data reads or writes with key k
    WD (bit 2k+1) write-disable: reads allowed, writes fault

Instruction fetches are never checked.  The register is per thread; a new
thread copies its creator's value, a new process starts from the kernel's
init value ``0x55555554`` (AD for keys 1..15), and so does every signal
handler.

:func:`read` and :func:`write` touch the register itself, with no
validation beyond the value's range, and raise :class:`UnsupportedError`
where the OS has not enabled PKU (the instructions would raise SIGILL).
The helpers below only compute values.  Wherever they take a key, a
:class:`pkeys.Key` will do as well as its number (:data:`KeyLike`).
"""

from __future__ import annotations

from collections.abc import Iterable

from ._binding import lib
from ._errors import UnsupportedError
from ._rights import INIT_PKRU, NUM_KEYS, RIGHTS_BY_VALUE, PkeyRights
from ._types import KeyLike
from ._validate import UNSUPPORTED_MESSAGE, check_key_range, check_pkru, check_rights

__all__ = [
    "INIT_PKRU",
    "KeyLike",
    "read",
    "write",
    "rights_of",
    "with_rights",
    "granting",
    "decode",
]


def read() -> int:
    """This thread's PKRU register."""
    value = lib.pk_rdpkru()
    if value < 0:
        raise UnsupportedError(UNSUPPORTED_MESSAGE)
    return value


def write(value: int) -> None:
    """Write this thread's PKRU register, unchecked.

    Setting bit 0 or 1 denies key 0, the key of all ordinary memory; the
    interpreter dies at its next memory access.  The safe
    :func:`pkeys.wrpkru` refuses that.
    """
    value = check_pkru(value)
    lib.pk_exposure_untracked()  # the register changes behind pkeys' back
    if lib.pk_wrpkru(value) < 0:
        raise UnsupportedError(UNSUPPORTED_MESSAGE)


def rights_of(pkru: int, pkey: KeyLike) -> PkeyRights:
    """The rights that ``pkru`` gives key ``pkey``."""
    pkru = check_pkru(pkru)
    pkey = check_key_range(pkey)
    return RIGHTS_BY_VALUE[(pkru >> (2 * pkey)) & 3]


def with_rights(pkru: int, pkey: KeyLike, rights: int) -> int:
    """``pkru`` with key ``pkey``'s rights replaced by ``rights``."""
    pkru = check_pkru(pkru)
    pkey = check_key_range(pkey)
    rights = check_rights(rights)
    shift = 2 * pkey
    return (pkru & ~(3 << shift)) | (int(rights) << shift)


def granting(pkru: int, pkeys: Iterable[KeyLike], *, write: bool = True) -> int:
    """``pkru`` with every key in ``pkeys`` opened for reading, and for
    writing too unless ``write`` is false."""
    pkru = check_pkru(pkru)
    rights = 0 if write else 2
    for pkey in pkeys:
        pkru = with_rights(pkru, pkey, rights)
    return pkru


def decode(pkru: int) -> list[PkeyRights]:
    """The rights of keys 0..15 in ``pkru``, indexed by key."""
    pkru = check_pkru(pkru)
    return [RIGHTS_BY_VALUE[(pkru >> (2 * k)) & 3] for k in range(NUM_KEYS)]
