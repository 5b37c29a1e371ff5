"""The validated operations, the same on both backends.

Each is a thin layer over one C entry point in ``csrc/state.c`` or
``csrc/regions.c``; the backend (the hardware register, or the ``mprotect``
emulation) was chosen in C once, at import.  Arguments are checked here
first, so a refused call changes nothing and raises the same exception on
either backend.
"""

from __future__ import annotations

from typing import Any

from . import _scope, _state
from ._binding import entry_point, ffi, lib
from ._collect import collect_garbage
from ._memory import check_prot, resolve
from ._rights import NUM_KEYS, RIGHTS_BY_VALUE, PkeyRights
from ._types import KeyLike, MemoryTarget
from ._errors import ArgumentError, InvalidKeyError, KeyInUseError
from ._revocation import revocation_error
from ._validate import (
    check_alloc_args,
    check_key_range,
    check_pkru,
    check_rights,
    raise_status,
)

__all__ = [
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "pkey_get",
    "pkey_set",
    "rdpkru",
    "wrpkru",
    "allocated_keys",
    "shadow_pkru",
    "regions",
    "caller_key",
    "alloc_key",
    "free_key",
    "tag",
    "key_number",
    "set_all_threads",
]

_get = lib.pk_key_get
_set = lib.pk_key_set
_retry_pinned = _state.retry_pinned
_E_KEY_CLOSED = lib.PK_E_KEY_CLOSED
_E_IN_USE = lib.PK_E_IN_USE
_E_NOSPC = lib.PK_E_NOSPC
_E_BROADCAST = lib.PK_E_BROADCAST

REVOCATION_TIMEOUT = _state.REVOCATION_TIMEOUT

# Set by pkeys._key once Key exists, so that a Key argument takes a fast
# path (a slot read) instead of __index__.
key_type: type = type(None)
# Parsed once (finalizers free keys too): see _binding._realize_every_type.
_BROADCAST_RESULT = ffi.typeof("struct pk_broadcast *")


def key_number(pkey: object) -> int:
    """The key number of an int or a Key, checked to be in 0..15."""
    if isinstance(pkey, key_type):  # a subclass too: its identity must be used
        number: int = pkey._pkey  # type: ignore[attr-defined]
        if number < 0:
            raise_status(_E_KEY_CLOSED)
        return number
    return check_key_range(pkey)


def key_and_identity(pkey: object) -> tuple[int, int]:
    """``(number, identity)`` of a Key: its identity goes with its number,
    so the shim refuses the call once the number is another key's.  Of
    anything else :func:`key_number` takes: identity 0, whatever key has
    the number."""
    number = key_number(pkey)
    return number, pkey._identity if isinstance(pkey, key_type) else 0  # type: ignore[attr-defined]


def caller_key(pkey: object) -> tuple[int, int]:
    """``(number, identity)`` of a key the caller may tag memory with or
    free: a Key, key 0, or an allocated number that is not one of the
    virtual-key pool's.  Those belong to protected buffers, which free them
    when they close; memory the caller tagged with one would keep it."""
    if isinstance(pkey, key_type):
        return key_and_identity(pkey)
    number = check_key_range(pkey)
    if number == 0:
        return 0, 0
    identity = lib.pk_key_identity(number)
    if not identity:
        raise_status(lib.PK_E_NOT_ALLOCATED, number)
    # Read after the identity: the pool allocates and records a key under
    # its own mutex, which pk_vkeys_stats takes, so a pool key with this
    # identity shows here.  A key the pool allocates later has another
    # identity, and the C call that gets this one refuses it.
    stats = ffi.new("struct pk_vkeys_stats *")
    lib.pk_vkeys_stats(stats)
    if stats.mask & (1 << number):
        raise InvalidKeyError(
            f"pkey {number} belongs to the virtual keys that ProtectedBuffers share, not to "
            "the caller: tagging memory with it or freeing it is refused. Use a key of your "
            "own (pkeys.Key(), or pkey_alloc())"
        )
    return number, identity


def alloc_key(flags: object = 0, access_rights: object = 0) -> tuple[int, int]:
    """``(pkey, identity)`` of a newly allocated key."""
    flags, access_rights = check_alloc_args(flags, access_rights)
    identity = ffi.new("uint32_t *")
    pkey = lib.pk_key_alloc(flags, access_rights, identity)
    if pkey == _E_NOSPC:
        # Keys and buffers that are garbage but not yet collected (reference
        # cycles wait for an older generation) still hold keys: free them.
        collect_garbage()
        pkey = lib.pk_key_alloc(flags, access_rights, identity)
    if pkey < 0:
        raise_status(pkey)
    return pkey, identity[0]


def free_key(pkey: int, identity: int, timeout: float = REVOCATION_TIMEOUT,
             freed_already_ok: bool = False) -> None:
    """Free ``pkey`` if it still has ``identity`` (0: whatever it has),
    after revoking it in every thread.  ``freed_already_ok``: a key of
    ``identity`` freed already (the number unallocated, or another key's
    now) is no error."""
    result = ffi.new(_BROADCAST_RESULT)
    status = lib.pk_key_free(pkey, identity, timeout, result, 0)
    if status == _E_IN_USE:
        _state.prune_owners()  # owners collected or closed since they were tagged
        status = lib.pk_key_free(pkey, identity, timeout, result, 0)
    if freed_already_ok and identity and status in (lib.PK_E_NOT_ALLOCATED, lib.PK_E_KEY_CLOSED):
        return
    if status == _E_IN_USE:
        raise_in_use(pkey)
    if status == _E_BROADCAST:
        raise revocation_error(pkey, "the key stays allocated, so its number is not "
                               "handed out again", result)
    if status:
        raise_status(status, pkey)


def set_all_threads(pkey: int, identity: int, access_rights: int,
                    timeout: float = REVOCATION_TIMEOUT) -> None:
    """``access_rights`` for ``pkey`` in every thread of the process, and
    every active grant on it voided; returns once every thread has them."""
    result = ffi.new(_BROADCAST_RESULT)
    status = _state.call(lib.pk_key_set_all, pkey, identity, access_rights, timeout, result)
    if status == _E_BROADCAST:
        raise revocation_error(pkey, "", result)
    if status:
        raise_status(status, pkey, access_rights)


def raise_in_use(pkey: int) -> None:
    spans = regions(pkey)
    shown = ", ".join(f"{start:#x}-{end:#x}" for start, end, _, _ in spans[:3])
    raise KeyInUseError(
        f"pkey {pkey} still guards {len(spans)} tracked region(s) ({shown}); "
        "re-tag them with key 0 or release their memory first"
    )


def pkey_alloc(flags: int = 0, access_rights: int = 0) -> int:
    """Allocate a protection key; ``access_rights`` become this thread's
    rights for it.  ``flags`` must be 0.  OSError(ENOSPC) when none is left."""
    return alloc_key(flags, access_rights)[0]


def pkey_free(pkey: KeyLike) -> None:
    """Free a key allocated through pkeys.  Key 0, unallocated keys, double
    frees and keys still guarding tracked memory are refused (ValueError
    subclasses).  The key is first revoked in every thread, so a later key
    that gets the number inherits no thread's rights."""
    number, identity = caller_key(pkey)
    if number == 0:
        raise_status(lib.PK_E_KEY_ZERO)
    free_key(number, identity)


def _pkey_get_any(pkey: KeyLike) -> PkeyRights:
    """pkey_get for what its C fast path (csrc/scope_rights.c: an int or
    an open Key, rights in 0..3) leaves: conversions, checks, errors."""
    identity = 0
    if type(pkey) is not int:
        pkey, identity = key_and_identity(pkey)
    try:
        rights = _get(pkey, identity)
    except OverflowError:
        rights = check_key_range(pkey)  # raises: outside 0..15
    if rights < 0:
        raise_status(rights, pkey)
    return RIGHTS_BY_VALUE[rights]


def _pkey_set_any(pkey: KeyLike, access_rights: int, *, threads: str = "current") -> None:
    """pkey_set for what its C fast path leaves: ``threads``, conversions,
    checks, errors."""
    if threads != "current":
        return _set_for(pkey, access_rights, threads)
    identity = 0
    if type(pkey) is not int:
        pkey, identity = key_and_identity(pkey)
    if type(access_rights) is not int:
        access_rights = check_rights(access_rights)
    try:
        status = _set(pkey, identity, access_rights, 0)
    except OverflowError:
        status = _set(check_key_range(pkey), identity, check_rights(access_rights), 0)
    if status:
        _set_failed(pkey, identity, access_rights, status, ffi.errno)
    return None


def _set_failed(pkey: int, identity: int, access_rights: int, status: int, error: int) -> None:
    """A refused pk_key_set (``errno`` as it left it): the software
    backend's pins, then again; else the exception."""
    ffi.errno = error
    status = _retry_pinned(status, _set, pkey, identity, access_rights)
    if status:
        raise_status(status, pkey, access_rights)


# The two calls people time against the instructions: in C for an int or
# an open Key (csrc/scope_rights.c), the functions above for the rest.
pkey_get = _scope.pkey_get
pkey_set = _scope.pkey_set
_scope.configure_rights(
    key_get=entry_point("pk_key_get"),
    key_set=entry_point("pk_key_set"),
    get_any=_pkey_get_any,
    set_any=_pkey_set_any,
    set_failed=_set_failed,
    rights_by_value=RIGHTS_BY_VALUE,
)


def _set_for(pkey: object, access_rights: object, threads: object) -> None:
    if threads != "all":
        raise ArgumentError(f'threads must be "current" or "all", not {threads!r}')
    number, identity = key_and_identity(pkey)
    if number == 0:
        raise_status(lib.PK_E_KEY_ZERO)
    set_all_threads(number, identity, check_rights(access_rights))


def tag(target: object, length: object, prot: object, pkey: int, identity: int,
        owner: int | None = None) -> None:
    """Tag memory with a key of known identity (0: whatever it has).
    ``owner`` overrides how the region's memory is kept mapped."""
    prot = check_prot(prot)
    addr, size, exporter, pin = resolve(target, length)
    registered: int | None = None
    try:
        if owner is None and _state.package_memory(addr, addr + size):
            # Re-tagging it would open a secret (key 0) or strand the
            # buffer's key: its pages are the buffer's to tag.
            raise ArgumentError(
                f"{addr:#x}-{addr + size:#x} is memory of a ProtectedBuffer: only the "
                "buffer tags it (use its unlocked() block to read or write it)"
            )
        if owner is None:
            owner = registered = (lib.PK_OWNER_CALLER if exporter is None
                                  else _state.register_owner(exporter))
        status = lib.pk_region_tag(addr, size, prot, pkey, identity, owner, 0)
        if status:
            raise_status(status, pkey)
    finally:
        if registered:
            _state.owner_tagged(registered)
        if pin is not None:
            ffi.release(pin)
        _state.prune_owners()


def pkey_mprotect(target: MemoryTarget, length: int | None, prot: int, pkey: KeyLike) -> None:
    """Set ``prot`` on memory and tag it with ``pkey``.  ``target`` is a
    page-aligned int address, or a writable buffer over page-aligned memory
    (an ``mmap.mmap``, or a view or numpy array over one); ``length=None``
    means the whole buffer.  The region is tracked by the object that owns
    the memory, not by the view."""
    tag(target, length, prot, *caller_key(pkey))


def rdpkru() -> int:
    """This thread's PKRU (the emulated, process-wide one on the software
    backend)."""
    value = lib.pk_pkru_read()
    if value < 0:
        raise_status(value)
    return value


def wrpkru(value: int) -> None:
    """Write this thread's PKRU, as the rights outside scopes (keys with
    active scopes keep them until they end); a value that would deny key 0
    is refused."""
    value = check_pkru(value)
    status = _state.call(lib.pk_pkru_write, value)
    if status:
        raise_status(status)


def allocated_keys() -> list[int]:
    """The keys allocated through pkeys in this process, ascending."""
    mask = lib.pk_allocated_mask()
    return [k for k in range(NUM_KEYS) if mask & (1 << k)]


def shadow_pkru() -> int | None:
    """The PKRU the package last wrote in this thread (the emulated register
    on the software backend); None before any write."""
    value = lib.pk_shadow_pkru()
    return None if value < 0 else value


def regions(pkey: int = -1) -> list[tuple[int, int, int, int]]:
    """``(start, end, prot, pkey)`` of the tracked regions of ``pkey`` (all
    keys with -1), as the memory is now: owners collected or closed since
    are dropped first, and resized mmaps followed."""
    _state.prune_owners()
    count = lib.pk_regions_list(pkey, ffi.NULL, 0)
    while True:
        out: Any = ffi.new("struct pk_region[]", max(count, 1))
        total = lib.pk_regions_list(pkey, out, count)
        if total <= count:
            return [(r.start, r.end, r.prot, r.pkey) for r in out[0:total]]
        count = total
