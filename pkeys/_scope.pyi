# The hot paths in C (csrc/scope_type.c, csrc/scope_rights.c): pkeys.Scope,
# Key's base, pkeys.allow, pkeys.pkey_get and pkeys.pkey_set.
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, final

from ._rights import PkeyRights
from ._types import KeyLike

@final
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

    def __init__(self, identities: dict[int, int], kind: int) -> None: ...
    def __enter__(self) -> Scope: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
    @property
    def active(self) -> int:
        """How many entries of this scope object have not ended yet."""

class KeyBase:
    _pkey: int
    @property
    def _identity(self) -> int: ...
    def _bind(self, pkey: int, identity: int) -> None: ...
    def allow(self, write: bool = True) -> Scope:
        """A scope that lets this thread read, and write unless ``write`` is
        false, memory tagged with this key."""
    def deny(self) -> Scope:
        """A scope that denies this thread all access while it is active,
        whatever allow() scopes are active too."""

@final
class Unlocked:
    """The context manager of :meth:`ProtectedBuffer.unlocked`: each entry
    takes a use of the buffer and a grant on its key, and yields a fresh
    view; its exit releases exactly those."""

    def __enter__(self) -> memoryview: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

@final
class BlockExport:
    """The exporter of one unlocked() block's view."""

class BufferBase:
    def unlocked(self, write: bool = False) -> Unlocked:
        """A block with access open (for this thread, on hardware): yields a
        memoryview of the data, read-only unless ``write``.  The view is
        released on exit.  The returned object may be entered again, from
        nested blocks or other tasks; each entry yields its own view."""

def guard_seen(faulthandler_enabled: bool, handler: object) -> None: ...
def configure_blocks(
    *,
    vbuf_enter: int,
    vbuf_exit: int,
    enter_failed: Callable[[int, int], None],
    exit_failed: Callable[[Any, int, int], None],
    view_escaped: Callable[[Any, object], None],
    use_ended: Callable[[Any], None],
    raise_status: Callable[[int], None],
    guard_install: Callable[[], None],
    faulthandler_enabled: Callable[[], bool],
    python_handler: Callable[[int], object],
    sigsegv: int,
) -> None: ...
def allow(*keys: KeyLike, write: bool = True) -> Scope:
    """One scope, one register write, for several keys at once."""

def pkey_get(pkey: KeyLike) -> PkeyRights:
    """This thread's rights for an allocated key (or key 0), as in force now
    (the process's on the software backend)."""

def pkey_set(pkey: KeyLike, access_rights: int, *, threads: str = "current") -> None:
    """Set the rights for an allocated key (not key 0) outside scopes: this
    thread's, or with ``threads="all"`` every thread's at once (active
    scopes on the key lose their grants; see Key.revoke).  Inside an active
    scope they take effect when it ends.  The register is written only if
    the value changes."""

def configure(
    *,
    scope_enter: int,
    scope_exit: int,
    thread_serial: int,
    prepare_pins: Callable[[], tuple[int, Any]],
    raise_failed: Callable[[int, int], NoReturn],
    raise_status: Callable[[int], NoReturn],
    key_closed: Callable[[], NoReturn],
    allow_any: Callable[[tuple[KeyLike, ...], bool], Scope],
    grants_per_process: int,
    key_class: type[KeyBase],
) -> None: ...
def configure_pins(
    *,
    pins_owners: int,
    pins_vouch: int,
    owners: dict[int, Any],
    owner_class: type,
) -> None: ...
def configure_rights(
    *,
    key_get: int,
    key_set: int,
    get_any: Callable[[KeyLike], PkeyRights],
    set_any: Callable[..., None],
    set_failed: Callable[[int, int, int, int, int], None],
    rights_by_value: tuple[PkeyRights, ...],
) -> None: ...
