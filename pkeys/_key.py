"""``Key``: an allocated protection key as an object, and scoped access.

A scope adds one *grant* to its keys when entered and withdraws exactly
that grant when it ends (see ``csrc/state.c`` for the rules), so scopes may
end in any order and one scope object may be entered again while it is
active: in nested blocks, from several asyncio tasks, or from generators.
"""

from __future__ import annotations

import warnings
from types import TracebackType
from typing import Any, NoReturn

from . import _api, _state
from ._binding import ffi, lib
from ._errors import InvalidKeyError
from ._rights import PKEY_DISABLE_ACCESS, PROT_READ, PROT_WRITE, PkeyRights
from ._select import chosen
from ._types import KeyLike, MemoryTarget
from ._validate import check_key_range, raise_status

_enter = lib.pk_scope_enter
_exit = lib.pk_scope_exit
_NULL = ffi.NULL
_WRONG_THREAD = lib.PK_E_WRONG_THREAD
READ_WRITE = lib.PK_GRANT_READ_WRITE
READ_ONLY = lib.PK_GRANT_READ_ONLY
DENY = lib.PK_GRANT_DENY

__all__ = ["Key", "Scope", "allow", "scope_handle"]


def scope_handle(identities: dict[int, int], kind: int) -> Any:
    """The C description of a scope: which keys (by number and identity),
    and which kind of grant."""
    handle = ffi.new("struct pk_scope *")
    for number, identity in identities.items():
        handle.keys |= 1 << number
        handle.identities[number] = identity
    handle.kind = kind
    return handle


class Scope:
    """While active, grants this thread (the whole process on the software
    backend) access to some keys: read-write, read-only, or none (deny).

    Each entry adds one grant and each exit withdraws one.  One scope object
    may be entered again inside its own block (exits then come in reverse
    order); blocks that can end in any order -- asyncio tasks, generators,
    threads -- each take their own scope from ``key.allow()``, which is
    cheap.  A scope must end in the thread that entered it (ScopeError).
    Several active scopes on one key combine as: any deny wins, then any
    read-write grant, then any read-only grant; when the last one ends the
    key has the rights it had before the first began (or those given by
    ``pkey_set`` meanwhile).
    """

    __slots__ = ("_handle", "_tokens")

    def __init__(self, handle: Any) -> None:
        self._handle = handle  # a struct pk_scope, see scope_handle()
        self._tokens: list[int] = []

    def __enter__(self) -> Scope:
        token = _enter(self._handle, 0)
        if token < 0:
            token = self._enter_slow(token)
        self._tokens.append(token)
        return self

    def _enter_slow(self, status: int) -> int:
        status = _state.retry_pinned(status, _enter, self._handle)
        if status < 0:
            raise_status(status)
        return status

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tokens = self._tokens
        token = tokens.pop() if len(tokens) == 1 else self._own_token()
        status = _exit(self._handle, token, 0)
        if status:
            self._exit_failed(status, token)

    def _own_token(self) -> int:
        """The latest entry made by this thread, taken out of the list."""
        tokens = self._tokens
        if not tokens:
            raise_status(lib.PK_E_UNBALANCED)
        serial = lib.pk_thread_serial()
        for index in range(len(tokens) - 1, -1, -1):
            if tokens[index] >> 32 == serial:
                return tokens.pop(index)
        return tokens.pop()  # another thread's: C refuses it below

    def _exit_failed(self, status: int, token: int) -> None:
        status = _state.retry_pinned(status, _exit, self._handle, token)
        if not status:
            return
        if status == _WRONG_THREAD and chosen().backend.MODE == lib.PK_MODE_HARDWARE:
            self._tokens.append(token)  # still active in the thread that entered it
        raise_status(status)

    @property
    def active(self) -> int:
        """How many entries of this scope object have not ended yet."""
        return len(self._tokens)


class Key:
    """A protection key, allocated on creation and freed by :meth:`close`.

    ``rights`` are this thread's initial rights for the key; the default
    denies access, so tagged memory is closed until :meth:`allow`.
    ``int(key)`` is the key number, and a Key can be passed wherever a key
    number is expected.  A Key is its key's only owner: it cannot be
    copied or pickled.
    """

    __slots__ = ("_pkey", "_identity", "_handles", "__weakref__")

    def __init__(self, rights: int = PKEY_DISABLE_ACCESS) -> None:
        self._pkey = -1
        pkey, identity = _api.alloc_key(0, rights)
        self._identity = identity
        # The C side of every scope of this key, made once.
        self._handles = tuple(scope_handle({pkey: identity}, kind)
                              for kind in (READ_WRITE, READ_ONLY, DENY))
        self._pkey = pkey

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
    def identity(self) -> int:
        """Which allocation of the number this is: never the same twice."""
        return self._identity

    @property
    def closed(self) -> bool:
        return self._pkey < 0

    @property
    def rights(self) -> PkeyRights:
        """This thread's rights for the key (the process's on the software backend)."""
        return _api.pkey_get(self.pkey)

    @rights.setter
    def rights(self, value: int) -> None:
        _api.pkey_set(self.pkey, value)

    def protect(
        self, target: MemoryTarget, length: int | None = None, prot: int = PROT_READ | PROT_WRITE
    ) -> None:
        """Tag ``target`` (see :func:`pkeys.pkey_mprotect`) with this key."""
        _api.tag(target, length, prot, self.pkey, self._identity)

    def allow(self, write: bool = True) -> Scope:
        """A scope that lets this thread read, and write unless ``write`` is
        false, memory tagged with this key."""
        if self._pkey < 0:
            raise InvalidKeyError("this Key has been closed")
        return Scope(self._handles[0 if write else 1])

    def deny(self) -> Scope:
        """A scope that denies this thread all access while it is active,
        whatever allow() scopes are active too."""
        if self._pkey < 0:
            raise InvalidKeyError("this Key has been closed")
        return Scope(self._handles[2])

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
            # Freed through its number already (pkey_free(int(key)) or
            # pkey_free(key)): nothing of this Key is left to free.
            if lib.pk_key_identity(self._pkey) == self._identity:
                _api.free_key(self._pkey, self._identity)
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


def allow(*keys: KeyLike, write: bool = True) -> Scope:
    """One scope, one register write, for several keys at once."""
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
    return Scope(scope_handle(identities, READ_WRITE if write else READ_ONLY))
