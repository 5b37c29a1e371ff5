"""``Key``: an allocated protection key as an object, and scoped access."""

from __future__ import annotations

import warnings
from types import TracebackType

from ._binding import lib
from ._errors import InvalidKeyError
from ._rights import PKEY_DISABLE_ACCESS, PROT_READ, PROT_WRITE, PkeyRights
from ._select import choose
from ._validate import check_key_range, raise_status

_backend, _reason = choose()
_enter = _backend.enter
_leave = _backend.leave

# Every key's access-disable bit (2k) and write-disable bit (2k+1).
_ACCESS_DISABLE_BITS = 0x55555555
_WRITE_DISABLE_BITS = 0xAAAAAAAA

__all__ = ["Key", "Scope", "allow"]


class Scope:
    """Changes this thread's rights for some keys while the block runs
    (process-wide on the software backend).

    Like PartitionAlloc's ``LiftPkeyRestrictionsScope``: the register is
    saved on entry and written only if the value changes; on exit the
    saved rights of exactly these keys come back, even on an exception,
    while changes to other keys made inside the block are kept.
    """

    __slots__ = ("_mask", "_bits", "_saved")

    def __init__(self, mask: int, bits: int) -> None:
        self._mask = mask
        self._bits = bits

    def __enter__(self) -> Scope:
        saved = _enter(self._mask, self._bits)
        if saved < 0:
            raise_status(saved)
        self._saved = saved
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _leave(self._mask, self._saved)


class Key:
    """A protection key, allocated on creation and freed by :meth:`close`.

    ``rights`` are this thread's initial rights for the key; the default
    denies access, so tagged memory is closed until :meth:`allow`.
    ``int(key)`` is the key number, and a Key can be passed wherever a key
    number is expected.
    """

    __slots__ = ("_pkey", "_mask", "__weakref__")

    def __init__(self, rights: int = PKEY_DISABLE_ACCESS) -> None:
        self._pkey = -1
        self._pkey = _backend.pkey_alloc(0, rights)
        self._mask = 3 << (2 * self._pkey)

    @property
    def pkey(self) -> int:
        """The key number, 1..15."""
        if self._pkey < 0:
            raise InvalidKeyError("this Key has been closed")
        return self._pkey

    def __index__(self) -> int:
        return self.pkey

    __int__ = __index__

    @property
    def closed(self) -> bool:
        return self._pkey < 0

    @property
    def rights(self) -> PkeyRights:
        """This thread's rights for the key."""
        return _backend.pkey_get(self.pkey)

    @rights.setter
    def rights(self, value: int) -> None:
        _backend.pkey_set(self.pkey, value)

    def protect(
        self, target: object, length: int | None = None, prot: int = PROT_READ | PROT_WRITE
    ) -> None:
        """Tag ``target`` (see :func:`pkeys.pkey_mprotect`) with this key."""
        _backend.pkey_mprotect(target, length, prot, self.pkey)

    def allow(self, write: bool = True) -> Scope:
        """A context manager that lets this thread read, and write unless
        ``write`` is false, memory tagged with this key."""
        if self._pkey < 0:
            raise InvalidKeyError("this Key has been closed")
        return Scope(self._mask, 0 if write else self._mask & _WRITE_DISABLE_BITS)

    def deny(self) -> Scope:
        """A context manager that denies this thread all access for the block."""
        if self._pkey < 0:
            raise InvalidKeyError("this Key has been closed")
        return Scope(self._mask, self._mask & _ACCESS_DISABLE_BITS)

    def close(self) -> None:
        """Free the key.  Idempotent.  Refused (KeyInUseError) while it still
        guards tracked memory; this thread's rights for the number are left
        at access-disable."""
        if self._pkey >= 0:
            _backend.pkey_free(self._pkey)
            self._pkey = -1

    def __enter__(self) -> Key:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_pkey", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            try:
                self.close()
            except Exception:
                pass  # still guarding memory: the key stays allocated

    def __repr__(self) -> str:
        if self._pkey < 0:
            return "<pkeys.Key closed>"
        try:
            rights = _backend.pkey_get(self._pkey).name or "UNRESTRICTED"
        except Exception:
            rights = "?"
        return f"<pkeys.Key {self._pkey} rights={rights} backend={_backend.NAME}>"


def allow(*keys: Key | int, write: bool = True) -> Scope:
    """One scope, one register write, for several keys at once."""
    mask = 0
    for key in keys:
        mask |= 3 << (2 * check_key_range(key))
    if mask & 3:
        raise_status(lib.PK_E_KEY_ZERO)
    return Scope(mask, 0 if write else mask & _WRITE_DISABLE_BITS)
