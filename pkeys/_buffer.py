"""``ProtectedBuffer``: memory for secrets that the rest of the program
cannot read or overwrite by accident, even from another thread.

The lifecycle, after libsodium's ``sodium_malloc`` and memguard:

Creation
  1. Map ``2 + n`` anonymous *private* pages as one Python ``mmap`` (CPython
     counts the buffer exports of an mmap; that is how ``close()`` knows
     whether a view is still alive).
  2. Make the first and last page ``PROT_NONE`` guards.
  3. Place the data at the very end of the inner pages, so the byte after
     it is in the trailing guard page and an overrun faults at once.  A
     random canary sits just before the data and catches underruns.
  4. ``mlock`` the inner pages so they never reach swap; best effort: when
     ``RLIMIT_MEMLOCK`` refuses, ``locked`` is False and a warning says so.
  5. ``MADV_DONTDUMP`` keeps them out of core dumps, and
     ``MADV_WIPEONFORK`` makes a forked child see zeros.
  6. Tag the inner pages with the buffer's key (its own, allocated with
     access disabled, unless a shared ``key=`` is given).  From here on no
     thread can touch them without opening the key.
  7. Register a label so that an unguarded fault names the buffer.

Access
  ``unlocked()`` opens the key (this thread only, on hardware) for a
  block and yields a memoryview that is released on exit.  ``readinto``
  and ``write`` copy in C with access open only for the copy.  Each of
  them holds one *use* of the buffer (an atomic count in C) while it runs.

Close (also run by the finalizer)
  1. Refuse, with BufferError, while a view is still exported or another
     thread or task is using the buffer; otherwise mark it closed in the
     same atomic step, so that no new use can begin.
  2. Check the canary, remembering a mismatch.
  3. Wipe every inner byte with a write the compiler cannot drop.
  4. ``munlock``, unregister the label, forget the region, unmap.
  5. Free the key if the buffer owns it.
  6. Only then report a canary mismatch, as BufferCorruptedError.

  A buffer collected while a view of it escaped (a numpy array made in
  ``unlocked()`` and kept) is wiped and unlocked at once; the last view
  unmaps the memory when it goes, and the key is freed then.
"""

from __future__ import annotations

import hmac
import mmap
import os
import warnings
import weakref
from types import TracebackType
from typing import Any

from . import _api, _state
from ._binding import ffi, lib
from ._errors import ArgumentError, BufferCorruptedError, MemoryLockWarning
from ._key import Key, scope_handle
from ._rights import PAGE_SIZE, PROT_NONE, PROT_READ, PROT_WRITE
from ._validate import raise_status, require_int

__all__ = ["ProtectedBuffer"]

CANARY_SIZE = 16
MAX_SIZE = 1 << 40
# The kernel's values (asm-generic/mman-common.h, every architecture);
# CPython's mmap module only has the names its build headers had.
MADV_DONTDUMP = getattr(mmap, "MADV_DONTDUMP", 16)
MADV_WIPEONFORK = getattr(mmap, "MADV_WIPEONFORK", 18)
_copy = lib.pk_keyed_copy
_NEED_PINS = _state.NEED_PINS


def _address(memory: object) -> int:
    pin = ffi.from_buffer(memory)
    try:
        return int(ffi.cast("uintptr_t", pin))
    finally:
        ffi.release(pin)


def _check(status: int, function: Any, *args: object) -> None:
    """Raise for a failed keyed operation, pinning foreign owners first when
    the software backend asks for it."""
    if status == _NEED_PINS:
        status = _state.call_pinned(function, *args)
    if status:
        raise_status(status)


class _Mapping:
    """The resources of one buffer; closed by ProtectedBuffer.close() or
    the finalizer, never both (the usage cell's close is the one way in)."""

    def __init__(self, size: int, key: Key | None, label: str, lock: bool) -> None:
        self.closed = False
        self.size = size
        self.owns_key = key is None
        self.label_slot = -1
        self.locked = False
        self.usage = ffi.new("uint32_t *")
        # Set when the ProtectedBuffer was collected while in use: the last
        # use to end closes it.
        self.orphaned = False
        inner_pages = (size + CANARY_SIZE + PAGE_SIZE - 1) // PAGE_SIZE
        self.inner_length = inner_pages * PAGE_SIZE
        # MAP_PRIVATE, not mmap's default MAP_SHARED: a shared mapping would
        # let a forked child read and write the parent's secret, and the
        # kernel refuses MADV_WIPEONFORK on it.
        self.map: mmap.mmap | None = mmap.mmap(
            -1, self.inner_length + 2 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        self.map_length = len(self.map)
        try:
            self.base = _address(self.map)
            self.inner = self.base + PAGE_SIZE
            self.data = self.inner + self.inner_length - size
            self.data_offset = self.data - self.base
            self.canary_address = self.data - CANARY_SIZE
            self._guard_pages()
            if lock:
                self._lock()
            self._advise()
            self.canary = os.urandom(CANARY_SIZE)
            # Written while the pages are still key 0, before they are tagged.
            ffi.memmove(ffi.cast("void *", self.canary_address), self.canary, CANARY_SIZE)
            self.key = key if key is not None else Key()
            self.pkey = self.key.pkey
            self.identity = self.key.identity
            self.scopes = {
                kind: scope_handle({self.pkey: self.identity}, kind, self.usage)
                for kind in (lib.PK_GRANT_READ_ONLY, lib.PK_GRANT_READ_WRITE)
            }
            _api.tag(self.inner, self.inner_length, PROT_READ | PROT_WRITE, self.pkey,
                     self.identity, owner=lib.PK_OWNER_PACKAGE)
            self.label_slot = lib.pk_label_add(
                self.base, self.base + self.map_length, self.pkey, label.encode()[:63]
            )
        except BaseException:
            self._release(check_canary=False)
            raise

    def _guard_pages(self) -> None:
        for page in (self.base, self.inner + self.inner_length):
            if lib.pk_sys_mprotect(page, PAGE_SIZE, PROT_NONE) != 0:
                raise OSError(ffi.errno, os.strerror(ffi.errno))

    def _lock(self) -> None:
        if lib.pk_mlock(self.inner, self.inner_length) == 0:
            self.locked = True
            return
        err = ffi.errno
        warnings.warn(
            f"could not mlock a protected buffer ({os.strerror(err)}); its pages may "
            "be swapped out. Raise RLIMIT_MEMLOCK (ulimit -l) to lock them.",
            MemoryLockWarning,
            stacklevel=4,
        )

    def _advise(self) -> None:
        self.dontdump = lib.pk_madvise(self.inner, self.inner_length, MADV_DONTDUMP) == 0
        # Kernels before 4.14 lack WIPEONFORK (EINVAL): the rest still holds.
        self.wipeonfork = lib.pk_madvise(self.inner, self.inner_length, MADV_WIPEONFORK) == 0

    def views_exported(self) -> bool:
        # CPython refuses to resize an mmap with live exports; resizing to
        # the same size changes nothing otherwise.
        assert self.map is not None
        try:
            self.map.resize(self.map_length)
        except BufferError:
            return True
        return False

    def copy(self, dst: int, src: int, length: int, kind: int) -> None:
        args = (dst, src, length, self.pkey, self.identity, kind, self.usage)
        _check(_copy(*args, 0), _copy, *args)

    def close(self) -> None:
        """Close everything, or raise and change nothing."""
        if self.closed:
            return
        # The one atomic step from idle to closed: no use can begin after it.
        status = lib.pk_usage_close(self.usage)
        if status == lib.PK_E_CLOSED:
            return
        if status:
            raise_status(status)
        if self.views_exported():
            lib.pk_usage_reopen(self.usage)
            raise BufferError(
                "a view of the protected buffer is still alive (a memoryview or array made "
                "inside unlocked()); release it before close()"
            )
        self._release(check_canary=True)

    def close_when_released(self) -> None:
        """For the finalizer: close now if nothing uses the buffer; if a use
        is under way, its end closes it; if only escaped views remain, wipe
        now and let the last view unmap."""
        try:
            self.close()
            return
        except BufferError:
            pass
        except Exception:  # noqa: BLE001 - a finalizer must not raise
            return
        if lib.pk_usage_close(self.usage):
            self.orphaned = True  # in use: the last use to end closes it
            return
        self._release(check_canary=False, unmap=False)

    def _release(self, check_canary: bool, unmap: bool = True) -> None:
        corrupted = False
        if hasattr(self, "scopes") and not self.key.closed:
            if check_canary:
                seen = ffi.new("char[]", CANARY_SIZE)
                self._keyed(lib.pk_keyed_copy, int(ffi.cast("uintptr_t", seen)),
                            self.canary_address, CANARY_SIZE, lib.PK_GRANT_READ_ONLY)
                corrupted = not hmac.compare_digest(ffi.buffer(seen)[:], self.canary)
            self._keyed(lib.pk_keyed_wipe, self.inner, self.inner_length)
        elif hasattr(self, "inner"):
            lib.pk_wipe(self.inner, self.inner_length)  # never tagged: plain access
        if self.locked:
            lib.pk_munlock(self.inner, self.inner_length)
            self.locked = False
        if self.label_slot >= 0:
            lib.pk_label_remove(self.label_slot)
            self.label_slot = -1
        self.closed = True
        if unmap:
            self._unmap()
        else:
            # Escaped views still hold the mmap: the last one unmaps it, and
            # only then may the region be forgotten and the key freed.
            memory = self.map
            self.map = None
            weakref.finalize(memory, self._unmapped)
            del memory
            return
        if corrupted:
            raise BufferCorruptedError(
                "the canary before the protected buffer's data was overwritten: something "
                "wrote before its start. The buffer was wiped and unmapped all the same."
            )

    def _keyed(self, function: Any, *args: object) -> None:
        full: tuple[object, ...]
        if function is lib.pk_keyed_copy:
            dst, src, length, kind = args
            full = (dst, src, length, self.pkey, self.identity, kind, ffi.NULL)
        else:
            address, length = args
            full = (address, length, self.pkey, self.identity)
        _check(function(*full, 0), function, *full)

    def _unmap(self) -> None:
        if hasattr(self, "inner"):
            lib.pk_region_forget(self.inner, self.inner_length)
        if self.map is not None:
            self.map.close()
            self.map = None
        self._free_key()

    def _unmapped(self) -> None:
        lib.pk_region_forget(self.inner, self.inner_length)
        self._free_key()

    def _free_key(self) -> None:
        if self.owns_key and hasattr(self, "key") and not self.key.closed:
            self.key.close()


def _finalize(mapping: _Mapping) -> None:
    mapping.close_when_released()


class ProtectedBuffer:
    """``size`` bytes of guarded, locked, key-protected memory for a secret.

    ``key``: a shared :class:`Key` (not freed on close); by default the
    buffer allocates its own, so each buffer costs one of the 15 keys.
    ``label`` names the buffer in fault messages.  ``lock_memory=False``
    skips ``mlock``.

    The data sits between two ``PROT_NONE`` guard pages, flush against the
    trailing one, after a random canary; its pages are locked, left out of
    core dumps, zeroed in forked children and tagged with the key.  Only
    :meth:`unlocked`, :meth:`readinto` and :meth:`write` open it, and
    :meth:`close` (or the finalizer) checks the canary, wipes, unlocks,
    unmaps and frees the key.
    """

    __slots__ = ("_mapping", "_label", "_finalizer", "__weakref__")

    def __init__(
        self,
        size: int,
        *,
        key: Key | None = None,
        label: str = "secret",
        lock_memory: bool = True,
    ) -> None:
        size = require_int(size, "size")
        if not 0 < size <= MAX_SIZE:
            raise ArgumentError(f"size must be in 1..2**40 bytes, not {size}")
        if key is not None and not isinstance(key, Key):
            raise TypeError(f"key must be a pkeys.Key, not {type(key).__name__}")
        if not isinstance(label, str):
            raise TypeError(f"label must be a str, not {type(label).__name__}")
        lib.pk_guard_install()
        self._label = label
        self._mapping = _Mapping(size, key, label, bool(lock_memory))
        self._finalizer = weakref.finalize(self, _finalize, self._mapping)

    # -- properties -----------------------------------------------------
    @property
    def size(self) -> int:
        return self._mapping.size

    @property
    def label(self) -> str:
        return self._label

    @property
    def key(self) -> Key:
        return self._open().key

    @property
    def locked(self) -> bool:
        """Whether ``mlock`` succeeded (False when RLIMIT_MEMLOCK refused)."""
        return self._mapping.locked

    @property
    def closed(self) -> bool:
        return self._mapping.closed

    @property
    def address(self) -> int:
        """Address of the first data byte, for native code that runs inside
        :meth:`unlocked`."""
        return self._open().data

    def __len__(self) -> int:
        return self._mapping.size

    # -- access ---------------------------------------------------------
    def unlocked(self, write: bool = False) -> Unlocked:
        """A block with access open (for this thread, on hardware): yields a
        memoryview of the data, read-only unless ``write``.  The view is
        released on exit.  The returned object may be entered again, from
        nested blocks or other tasks; each entry yields its own view."""
        return Unlocked(self._open(), write)

    def readinto(self, dest: Any, offset: int = 0) -> int:
        """Copy ``len(dest)`` bytes from ``offset`` into the writable buffer
        ``dest``; returns the count.  Access is open only for the copy."""
        mapping = self._open()
        try:
            target = ffi.from_buffer(dest, require_writable=True)
        except (TypeError, BufferError):
            raise TypeError(f"dest must be a writable buffer, not {type(dest).__name__}") from None
        try:
            length = len(target)
            offset = self._check_span(offset, length)
            mapping.copy(int(ffi.cast("uintptr_t", target)), mapping.data + offset, length,
                         lib.PK_GRANT_READ_ONLY)
        finally:
            ffi.release(target)
        return length

    def write(self, data: Any, offset: int = 0) -> int:
        """Copy the bytes-like ``data`` in at ``offset``; returns the count."""
        mapping = self._open()
        try:
            source = ffi.from_buffer(data)
        except TypeError:
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}") from None
        try:
            length = len(source)
            offset = self._check_span(offset, length)
            mapping.copy(mapping.data + offset, int(ffi.cast("uintptr_t", source)), length,
                         lib.PK_GRANT_READ_WRITE)
        finally:
            ffi.release(source)
        return length

    def _check_span(self, offset: object, length: int) -> int:
        offset = require_int(offset, "offset")
        if offset < 0 or offset + length > self._mapping.size:
            raise ArgumentError(
                f"{length} bytes at offset {offset} do not fit a {self._mapping.size}-byte buffer"
            )
        return offset

    def _open(self) -> _Mapping:
        if self._mapping.closed:
            raise_status(lib.PK_E_CLOSED)
        return self._mapping

    # -- lifetime -------------------------------------------------------
    def close(self) -> None:
        """Wipe, check the canary, unlock, unmap and free the owned key.
        Idempotent.  Raises BufferError (and changes nothing) while a view
        is alive or another thread or task is using the buffer, and
        BufferCorruptedError after closing if the canary was hit."""
        if self._mapping.closed:
            return
        try:
            self._mapping.close()
        finally:
            if self._mapping.closed:
                self._finalizer.detach()

    def __enter__(self) -> ProtectedBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mapping = self._mapping
        if mapping.closed:
            return f"<ProtectedBuffer {self._label!r} closed>"
        return (
            f"<ProtectedBuffer {self._label!r} size={mapping.size} pkey={mapping.pkey} "
            f"locked={mapping.locked}>"
        )

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError("a ProtectedBuffer cannot be pickled or copied: its contents are secret")

    __reduce__ = __reduce_ex__  # type: ignore[assignment]

    def __copy__(self) -> Any:
        raise TypeError("a ProtectedBuffer cannot be copied")

    def __deepcopy__(self, memo: object) -> Any:
        raise TypeError("a ProtectedBuffer cannot be copied")


class Unlocked:
    """The context manager of :meth:`ProtectedBuffer.unlocked`: each entry
    takes a use of the buffer and a grant on its key, and yields a fresh
    view; its exit releases exactly those."""

    __slots__ = ("_mapping", "_write", "_handle", "_entries")

    def __init__(self, mapping: _Mapping, write: bool) -> None:
        self._mapping = mapping
        self._write = write
        self._handle = mapping.scopes[lib.PK_GRANT_READ_WRITE if write else lib.PK_GRANT_READ_ONLY]
        self._entries: list[tuple[int, memoryview]] = []

    def __enter__(self) -> memoryview:
        mapping = self._mapping
        lib.pk_guard_install()  # stay first in line if a handler was installed since
        token = _enter(self._handle, 0)
        if token < 0:
            if token == _NEED_PINS:
                token = _state.call_pinned(_enter, self._handle)
            if token < 0:
                raise_status(token)
        try:
            assert mapping.map is not None
            view = memoryview(mapping.map)[mapping.data_offset:mapping.data_offset + mapping.size]
            if not self._write:
                readonly = view.toreadonly()
                view.release()
                view = readonly
        except BaseException:
            self._end(token)
            raise
        self._entries.append((token, view))
        return view

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        mapping = self._mapping
        token, view = self._take_entry()
        leaked = False
        try:
            view.release()
        except BufferError:
            leaked = True  # something still holds an export of the view itself
        self._end(token)
        if not leaked and not mapping.usage[0] and mapping.map is not None:
            leaked = mapping.views_exported()  # a slice of the view escaped
        if mapping.orphaned and not mapping.usage[0]:
            mapping.orphaned = False
            mapping.close_when_released()
        if leaked and exc is None:
            raise BufferError(
                "an object made from the unlocked view (a numpy array, a memoryview cast) is "
                "still alive; delete it inside the block: outside it, touching it would fault"
            )

    def _take_entry(self) -> tuple[int, memoryview]:
        entries = self._entries
        if len(entries) > 1:
            serial = lib.pk_thread_serial()
            for index in range(len(entries) - 1, -1, -1):
                if entries[index][0] >> 32 == serial:
                    return entries.pop(index)
        if not entries:
            raise_status(lib.PK_E_UNBALANCED)
        return entries.pop()

    def _end(self, token: int) -> None:
        status = _exit(self._handle, token, 0)
        if status:
            _check(status, _exit, self._handle, token)


_enter = lib.pk_scope_enter
_exit = lib.pk_scope_exit
