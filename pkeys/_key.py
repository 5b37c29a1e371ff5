"""``Key``: an allocated protection key as an object, and scoped access.

A scope adds one *grant* to its keys when entered and withdraws exactly
that grant when it ends (see ``csrc/state.c`` for the rules), so scopes may
end in any order and one scope object may be entered again while it is
active: in nested blocks, from several asyncio tasks, or from generators.
"""

from __future__ import annotations

import warnings
from typing import NoReturn

from . import _api, _scope, _state
from ._binding import entry_point, ffi, lib
from ._scope import Scope
from ._errors import InvalidKeyError
from ._rights import PKEY_DISABLE_ACCESS, PROT_READ, PROT_WRITE, PkeyRights
from ._select import chosen
from ._types import KeyLike, MemoryTarget
from ._validate import check_key_range, raise_status

_NULL = ffi.NULL
READ_WRITE = lib.PK_GRANT_READ_WRITE
READ_ONLY = lib.PK_GRANT_READ_ONLY

__all__ = ["Key", "Scope", "allow"]


def _raise_failed(status: int, error: int) -> NoReturn:
    """A scope's entry or exit refused by C (``pkeys.Scope``,
    csrc/scope_type.c, which takes the software backend's pins itself):
    the exception, with the call's ``errno``."""
    ffi.errno = error
    raise_status(status)


def _key_closed() -> NoReturn:
    raise InvalidKeyError("this Key has been closed")


class Key(_scope.KeyBase):
    """A protection key, allocated on creation and freed by :meth:`close`.

    ``rights`` are this thread's initial rights for the key; the default
    denies access, so tagged memory is closed until :meth:`allow`.
    ``int(key)`` is the key number, and a Key can be passed wherever a key
    number is expected.  A Key is its key's only owner: it cannot be
    copied or pickled.
    """

    # _pkey (-1 once closed), _identity, and the C side of every scope of
    # the key, made once, live in the C base (csrc/scope_type.c), whose
    # allow() and deny() hand out pkeys.Scope objects.
    __slots__ = ("__weakref__",)

    def __init__(self, rights: int = PKEY_DISABLE_ACCESS) -> None:
        pkey, identity = _api.alloc_key(0, rights)
        self._bind(pkey, identity)

    @property
    def pkey(self) -> int:
        """The key number, 1..15."""
        if self._pkey < 0:
            _key_closed()
        return self._pkey

    def __index__(self) -> int:
        return self.pkey

    __int__ = __index__

    @property
    def identity(self) -> int:
        """Which allocation of the number this is: never the same twice."""
        return self._identity

    @property
    def closed(self) -> bool:
        return self._pkey < 0

    @property
    def rights(self) -> PkeyRights:
        """This thread's rights for the key (the process's on the software backend)."""
        return _api.pkey_get(self)  # the Key, not its number: see pkey_set

    @rights.setter
    def rights(self, value: int) -> None:
        # The Key itself, so that its identity goes with its number: a close
        # and a new allocation in between (another thread, a signal
        # handler) must not set the new key's rights.
        _api.pkey_set(self, value)

    def protect(
        self, target: MemoryTarget, length: int | None = None, prot: int = PROT_READ | PROT_WRITE
    ) -> None:
        """Tag ``target`` (see :func:`pkeys.pkey_mprotect`) with this key."""
        _api.tag(target, length, prot, self.pkey, self._identity)

    def revoke(self, timeout: float = _api.REVOCATION_TIMEOUT) -> None:
        """Deny access to this key in every thread of the process, now.

        Returns once every thread has applied it (RevocationError names
        those that did not answer within ``timeout`` seconds).  Scopes that
        are active on the key lose their access, and re-grant nothing when
        they end.  Same as ``pkey_set(key, PKEY_DISABLE_ACCESS,
        threads="all")``."""
        _api.set_all_threads(self.pkey, self._identity, PKEY_DISABLE_ACCESS, timeout)

    def close(self) -> None:
        """Free the key.  Idempotent.  Refused (KeyInUseError) while it still
        guards tracked memory.  The key is first revoked in every thread, so
        a later key that gets the same number inherits no thread's rights
        (RevocationError, and the key stays allocated, if a thread did not
        answer)."""
        if self._pkey >= 0:
            # The shim decides whether the key is still this Key's, under its
            # mutex and so after any free of the number in flight elsewhere
            # (another close(), pkey_free(key) or pkey_free(int(key)), a
            # signal handler's close()).  Freed already: nothing is left to
            # free.  A failed free raises and leaves the Key open.
            _api.free_key(self._pkey, self._identity, freed_already_ok=True)
            self._pkey = -1

    def __enter__(self) -> Key:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_pkey", -1) < 0:
            return
        warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
        status = lib.pk_key_free(self._pkey, self._identity, _api.REVOCATION_TIMEOUT, _NULL, 0)
        if status in _state.KEEP_ALLOCATED:
            # Still guarding memory, or some thread still has to answer:
            # freed as soon as that memory goes.
            _state.adopt_orphan(self._pkey, self._identity)
        self._pkey = -1

    def __repr__(self) -> str:
        if self._pkey < 0:
            return "<pkeys.Key closed>"
        try:
            rights = _api.pkey_get(self._pkey).name or "UNRESTRICTED"
        except Exception:
            rights = "?"
        return f"<pkeys.Key {self._pkey} rights={rights} backend={chosen().backend.NAME}>"

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a pkeys.Key cannot be pickled or copied: it is its key's only owner")

    __reduce__ = __reduce_ex__  # type: ignore[assignment]

    def __copy__(self) -> NoReturn:
        raise TypeError("a pkeys.Key cannot be copied: it is its key's only owner")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("a pkeys.Key cannot be copied: it is its key's only owner")


_api.key_type = Key


def _allow_any(keys: tuple[KeyLike, ...], write: bool) -> Scope:
    """pkeys.allow() for what its C fast path (open Keys) leaves: key
    numbers, closed Keys, no key at all."""
    identities: dict[int, int] = {}
    for key in keys:
        if isinstance(key, Key):
            number, identity = key.pkey, key.identity
        else:
            number = check_key_range(key)
            identity = lib.pk_key_identity(number)
        if number == 0:
            raise_status(lib.PK_E_KEY_ZERO)
        if identity == 0:
            raise_status(lib.PK_E_NOT_ALLOCATED, number)
        identities[number] = identity
    if not identities:
        raise TypeError("allow() needs at least one key")
    return Scope(identities, READ_WRITE if write else READ_ONLY)


# One scope, one register write, for several keys at once (in C).
allow = _scope.allow

_scope.configure(
    scope_enter=entry_point("pk_scope_enter"),
    scope_exit=entry_point("pk_scope_exit"),
    thread_serial=entry_point("pk_thread_serial"),
    prepare_pins=_state.prepare_pins,
    raise_failed=_raise_failed,
    raise_status=raise_status,
    key_closed=_key_closed,
    allow_any=_allow_any,
    grants_per_process=entry_point("pk_grants_per_process"),
    key_class=Key,
)
