"""``ProtectedBuffer``: memory for secrets that the rest of the program
cannot read or overwrite by accident, even from another thread, and that
the kernel's remote accesses cannot read either where it offers secret
memory.

The lifecycle, after libsodium's ``sodium_malloc`` and memguard:

Creation
  1. Reserve ``2 + n`` anonymous *private* pages as one Python ``mmap``.
     The buffer holds one export of its data (``_Mapping.pin``) until it
     closes; every view ``unlocked()`` hands out is made from it, so the
     mmap, and its pages, live as long as the last view does.
  2. Back the inner ``n`` pages with ``memfd_secret`` where the kernel
     offers it (``secretmem=None``, the default, or ``True``): a fresh
     secret file mapped over them, ``MAP_SHARED | MAP_FIXED``, so that they
     sit exactly between the guards.  Those pages leave the kernel's direct
     map: ``/proc/PID/mem`` and ``process_vm_readv`` cannot read them.
     When RLIMIT_MEMLOCK refuses them, the pages stay anonymous and a
     ``MemoryLockWarning`` says so (``secretmem=True`` raises instead).
  3. Make the first and last page ``PROT_NONE`` guards.
  4. Place the data at the very end of the inner pages, so the byte after
     it is in the trailing guard page and an overrun faults at once.  A
     random canary sits just before the data and catches underruns.
  5. Lock the inner pages so they never reach swap: secretmem pages are
     locked by the kernel; anonymous ones with ``mlock2(MLOCK_ONFAULT)``,
     which locks each page when it is first touched and so never commits
     untouched ones.  Best effort: when RLIMIT_MEMLOCK refuses, ``memory_locked``
     is False and a warning says so.
  6. ``MADV_DONTDUMP`` keeps them out of core dumps.  ``on_fork`` says what
     a forked child has (``pkeys/_share.py``): by default anonymous pages
     get ``MADV_WIPEONFORK`` (``"zeroed"``: a forked child sees zeros), and
     secretmem pages, which refuse it, ``MADV_DONTFORK`` (``"absent"``: a
     forked child has none; using the buffer there raises PkeysError).
     ``"shared"`` secretmem pages get neither: a child maps the same pages,
     and the buffer keeps its file's descriptor for :meth:`share`.
  7. Give the buffer its key.  With ``key=`` (or ``seal=True``) the inner
     pages are tagged with that key, whose access is disabled.  Otherwise
     the buffer has a *virtual key* (``csrc/virtual.c``): its pages are
     ``PROT_NONE`` until it is used, and each use borrows one of a pool of
     hardware keys, evicting the least recently used idle buffer.  From
     here on no thread can touch the pages without opening the buffer.
  8. Register a label so that an unguarded fault names the buffer.
  9. With ``seal=True``, ``mseal`` the whole range: nobody can re-key,
     ``mprotect``, move or unmap it again, the buffer included.

Access
  ``unlocked()`` opens the buffer (this thread only, on hardware) for a
  block and yields a memoryview that is released on exit.  Each block makes
  its view from an exporter of its own (a fresh ``ffi.buffer`` over the
  pin), so its exit can tell, exactly and with no syscall, whether a view
  made from its view (a slice, a cast, an array) is still alive: another
  block's views, in this thread or another, are never its leak.  ``readinto``,
  ``write`` and ``read_from`` copy in C with access open only for the
  copy.  Each of them holds one *use* of the buffer (an atomic count in C)
  while it runs; a buffer in use keeps its key.

Close (also run by the finalizer)
  1. Refuse, with BufferError, while a view is still exported or another
     thread or task is using the buffer; otherwise mark it closed in the
     same atomic step, so that no new use can begin.
  2. Check the canary (in C, in constant time), remembering a mismatch.
     In a forked child it is skipped: WIPEONFORK zeroed it, or the pages
     were never inherited.
  3. Wipe every page that was ever touched (``pk_wipe_touched``), with a
     write the compiler cannot drop.  Untouched pages hold nothing, and
     writing them would commit them (1 GiB for a 1 GiB buffer).  Shared
     pages are not wiped: other processes may still use them, and the
     kernel zeroes secret pages when the last mapping and descriptor go.
  4. ``munlock``, unregister the label, give back the virtual key (pages
     ``PROT_NONE``, key freed) or forget the region, unmap.
  5. Free the key if the buffer owns it.
  6. Only then report a canary mismatch, as BufferCorruptedError.

  A buffer collected while a view of it escaped (a numpy array made in
  ``unlocked()`` and kept) is wiped at once; the last view unmaps the
  memory when it goes.  A sealed buffer is wiped and stays mapped, with
  its key, for the rest of the process.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Unpack

from . import _api, _guard, _scope, _secretmem, _share, _state
from ._binding import entry_point, ffi, lib
from ._revocation import revocation_error
from ._errors import (
    ArgumentError,
    BufferCorruptedError,
    MemoryLockWarning,
    PkeysError,
    UnsupportedError,
)
from ._key import Key
from ._rights import PAGE_SIZE, PROT_NONE, PROT_READ, PROT_WRITE
from ._scope import Unlocked
from ._select import chosen
from ._types import BufferOptions, OnFork, VirtualKeyStats
from ._validate import check_fd, raise_status, require_int

if TYPE_CHECKING:
    from ._types import BufferLike

__all__ = ["ProtectedBuffer", "Unlocked", "virtual_key_limit", "virtual_key_stats"]

CANARY_SIZE = 16
MAX_SIZE = 1 << 40
# The kernel's values (asm-generic/mman-common.h, every architecture);
# CPython's mmap module only has the names its build headers had.
MADV_DONTFORK = getattr(mmap, "MADV_DONTFORK", 10)
MADV_DONTDUMP = getattr(mmap, "MADV_DONTDUMP", 16)
MADV_WIPEONFORK = getattr(mmap, "MADV_WIPEONFORK", 18)
_WRONG_THREAD = lib.PK_E_WRONG_THREAD
_READ_ONLY = lib.PK_GRANT_READ_ONLY
_READ_WRITE = lib.PK_GRANT_READ_WRITE
_UINTPTR = ffi.typeof("uintptr_t")
# Parsed once: the finalizer closes buffers through _call.
_VBUF_OP = ffi.typeof("struct pk_vbuf_op *")
_exporter_of = ffi.buffer
_weak = weakref.ref


def _address(memory: object) -> int:
    pin = ffi.from_buffer(memory)
    try:
        return int(ffi.cast(_UINTPTR, pin))
    finally:
        ffi.release(pin)


def _raise(status: int) -> None:
    """Raise for a negative status from a ``pk_vbuf_*`` call."""
    if status == lib.PK_E_NOT_INHERITED:
        raise PkeysError(
            "this protected buffer's memory stays in the process that made it: a forked "
            "child has none of its pages (on_fork='absent', MADV_DONTFORK). Close it in the "
            "child, make the buffer after the fork, or make it with on_fork='shared'"
        )
    if status == lib.PK_E_ALL_KEYS_BUSY:
        stats = virtual_key_stats()
        raise BufferError(
            f"all {stats['keys']} virtual keys are held by protected buffers in use right now "
            "(open blocks of unlocked(), here or in other threads); end some first, raise "
            "the pool's limit with pkeys.virtual_key_limit(n) (at most 15), or give buffers "
            "that are used together a shared key="
        )
    raise_status(status)


def _call(function: Any, *args: object) -> int:
    """One ``pk_vbuf_*`` operation, pinning foreign owners when the software
    backend asks (only a shared ``key=`` can guard foreign memory); a retry
    after the work was done only ends its grant.  Returns its result."""
    op = ffi.new(_VBUF_OP, {"token": -1})
    status = _state.call(function, *args, op)
    if status < 0:
        _raise(status)
    return int(op.result)


class _Mapping:
    """The resources of one buffer; closed by ProtectedBuffer.close() or
    the finalizer, never both (the usage cell's close is the one way in)."""

    def __init__(self, size: int, key: Key | None, label: str, lock: bool,
                 secretmem: bool | None, seal: bool, on_fork: str | None,
                 shared_fd: int | None = None) -> None:
        self.closed = False
        self.size = size
        self.key: Key | None = None
        self.owns_key = False
        self.label_slot = -1
        self.locked = False
        self.backing = "anonymous"
        self.inherit = lib.PK_INHERIT_COPY
        # A shared buffer's secret file, kept for share(); -1 otherwise.
        self.fd = -1
        self.sealed = False
        self.tagged = False
        self.vbuf: Any = ffi.NULL
        # The one export of the data (see _pin_data), and the exporters of
        # blocks whose views outlived them (weak: they go with the views).
        self.data_view: memoryview | None = None
        self.pin: Any = None
        self.escaped: list[weakref.ref[Any]] = []
        self._block: tuple[int, Any, int, int] | None = None
        # Set when the ProtectedBuffer was collected while in use: the last
        # use to end closes it.
        self.orphaned = False
        inner_pages = (size + CANARY_SIZE + PAGE_SIZE - 1) // PAGE_SIZE
        self.inner_length = inner_pages * PAGE_SIZE
        if shared_fd is not None:  # the sender's layout: the whole file
            self.inner_length = _share.shared_file_length(shared_fd, size)
        # 1. The reservation.  MAP_PRIVATE, not mmap's default MAP_SHARED: a
        # shared mapping would let a forked child read and write the
        # parent's secret, and the kernel refuses MADV_WIPEONFORK on it.
        self.map: mmap.mmap | None = mmap.mmap(
            -1, self.inner_length + 2 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        self.map_length = len(self.map)
        try:
            self.base = _address(self.map)
            _state.add_package_span(self.base, self.base + self.map_length)
            self.inner = self.base + PAGE_SIZE
            self._place(size)
            if on_fork == "shared":               # 2
                self.fd = _share.map_shared(self.inner, self.inner_length, shared_fd)
                self.backing = "secretmem"
            else:
                self._back(secretmem)
            self._guard_pages()                   # 3
            if lock:                              # 5
                self._lock()
            self._advise(on_fork)                 # 6
            if shared_fd is not None:             # 4: the sender's canary
                self.canary = ffi.buffer(ffi.cast("char *", self.canary_address), CANARY_SIZE)[:]
            else:                                 # 4, while the pages are key 0
                self.canary = os.urandom(CANARY_SIZE)
                ffi.memmove(ffi.cast("void *", self.canary_address), self.canary, CANARY_SIZE)
            self._give_key(key, seal)             # 7
            self.label_slot = lib.pk_label_add(   # 8
                self.base, self.base + self.map_length,
                self.key.pkey if self.key is not None else -1, label.encode()[:63]
            )
            if seal:                              # 9
                self._seal()
        except BaseException:
            self._release(check_canary=False)
            raise

    def _place(self, size: int) -> None:
        """Data flush against the trailing guard page, canary before it."""
        self.size = size
        self.data = self.inner + self.inner_length - size
        self.data_offset = self.data - self.base
        self.canary_address = self.data - CANARY_SIZE
        self._pin_data()

    def _pin_data(self) -> None:
        """Hold one export of exactly the data, from now until close; the
        views unlocked() hands out are made from it.  Only while no view
        exists (creation, trim)."""
        self._unpin()
        assert self.map is not None
        self.data_view = memoryview(self.map)[self.data_offset:self.data_offset + self.size]
        self.pin = ffi.from_buffer(self.data_view)
        self._set_block()

    def _set_block(self) -> None:
        """What an unlocked() block reads (csrc/scope_block.c): the record's
        address, the pin its views are made from, the data's address and
        size; None once closed."""
        vbuf = 0 if self.vbuf == ffi.NULL else int(ffi.cast(_UINTPTR, self.vbuf))
        self._block = (vbuf, self.pin, self.data, self.size)

    def _unpin(self) -> None:
        """Give the export back; only when no view made from it is alive."""
        if self.pin is not None:
            ffi.release(self.pin)
            self.pin = None
        if self.data_view is not None:
            self.data_view.release()
            self.data_view = None

    def _back(self, secretmem: bool | None) -> None:
        if secretmem is False:
            return
        available, reason = _secretmem.availability()
        if not available:
            if secretmem:
                raise UnsupportedError(f"secretmem=True, but secret memory is unavailable: {reason}")
            return
        budget = _secretmem.memlock_budget()
        if budget is not None and budget < self.inner_length:
            status = -errno.EAGAIN
        else:
            # Under the limit, populate now: a page refused later would SIGBUS.
            status = lib.pk_secretmem_map(self.inner, self.inner_length, int(budget is not None))
        if status == 0:
            self.backing = "secretmem"
            return
        err = -status
        # EFAULT/ENOMEM: a page was refused when populated (see pk_secretmem_map).
        if err in (errno.EAGAIN, errno.ENOMEM, errno.EPERM, errno.EFAULT):
            why = (f"the kernel refused {self.inner_length} bytes of secret memory "
                   f"({os.strerror(err)}): they count against RLIMIT_MEMLOCK (ulimit -l)")
        else:
            why = f"memfd_secret mapping failed: {os.strerror(err)}"
        if secretmem:
            raise UnsupportedError(f"secretmem=True, but {why}")
        warnings.warn(
            f"{why}; this buffer uses anonymous memory instead, which /proc/PID/mem and "
            "process_vm_readv can read",
            MemoryLockWarning,
            stacklevel=5,
        )

    def _guard_pages(self) -> None:
        for page in (self.base, self.inner + self.inner_length):
            if lib.pk_sys_mprotect(page, PAGE_SIZE, PROT_NONE) != 0:
                raise OSError(ffi.errno, os.strerror(ffi.errno))

    def _lock(self) -> None:
        if self.backing == "secretmem":
            self.locked = True  # the kernel locks secret memory itself
            return
        if lib.pk_mlock_onfault(self.inner, self.inner_length) == 0:
            self.locked = True
            return
        err = ffi.errno
        warnings.warn(
            f"could not mlock a protected buffer ({os.strerror(err)}); its pages may "
            "be swapped out. Raise RLIMIT_MEMLOCK (ulimit -l) to lock them.",
            MemoryLockWarning,
            stacklevel=5,
        )

    def _advise(self, on_fork: str | None) -> None:
        self.dontdump = lib.pk_madvise(self.inner, self.inner_length, MADV_DONTDUMP) == 0
        if on_fork == "shared":
            self.inherit = lib.PK_INHERIT_SHARED  # a child keeps the same pages
            return
        if self.backing == "secretmem" or on_fork == "absent":
            # secretmem refuses WIPEONFORK; without DONTFORK a child would
            # share the MAP_SHARED pages, so this one must hold.
            if lib.pk_madvise(self.inner, self.inner_length, MADV_DONTFORK) != 0:
                raise OSError(ffi.errno, "MADV_DONTFORK: " + os.strerror(ffi.errno))
            self.inherit = lib.PK_INHERIT_NONE
            return
        # Kernels before 4.14 lack WIPEONFORK (EINVAL): the child then sees a copy.
        if lib.pk_madvise(self.inner, self.inner_length, MADV_WIPEONFORK) == 0:
            self.inherit = lib.PK_INHERIT_ZEROS

    def _give_key(self, key: Key | None, seal: bool) -> None:
        if key is None and seal:
            # A sealed range can never be re-keyed: no virtual key for it.
            key = Key()
            self.owns_key = True
        self.key = key
        pkey, identity = (key.pkey, key.identity) if key is not None else (0, 0)
        record = lib.pk_vbuf_new(self.inner, self.inner_length, pkey, identity, self.inherit)
        if record == ffi.NULL:
            raise MemoryError("could not allocate a protected buffer's record")
        # Freed with the last Python reference, not at close: a thread that
        # raced with close() may still call in, and must find it closed.
        self.vbuf = ffi.gc(record, lib.pk_vbuf_destroy)
        self._set_block()
        if key is not None:
            _api.tag(self.inner, self.inner_length, PROT_READ | PROT_WRITE, pkey, identity,
                     owner=lib.PK_OWNER_PACKAGE)
            self.tagged = True
        elif lib.pk_sys_mprotect(self.inner, self.inner_length, PROT_NONE) != 0:
            # Virtual: closed by page protection until its first use.
            raise OSError(ffi.errno, os.strerror(ffi.errno))

    def _seal(self) -> None:
        status = lib.pk_mseal(self.base, self.map_length)
        if status:
            raise OSError(-status, "mseal: " + os.strerror(-status))
        self.sealed = True

    def views_exported(self) -> bool:
        """Whether a view made in unlocked() is still alive: its block
        recorded its exporter as it ended (before its use ended, so that a
        close() that follows the use sees it)."""
        return any(exporter() is not None for exporter in self.escaped)

    def copy(self, dst: int, src: int, length: int, kind: int, internal: int = 0) -> None:
        _call(lib.pk_vbuf_copy, self.vbuf, dst, src, length, kind, internal)

    def read(self, fd: int, dst: int, length: int, stop_at_newline: bool) -> int:
        return _call(lib.pk_vbuf_read, self.vbuf, fd, dst, length, int(stop_at_newline))

    def equal(self, address: int, expected: bytes) -> bool:
        return _call(lib.pk_vbuf_equal, self.vbuf, address, expected, len(expected)) == 1

    def trim(self, length: int) -> None:
        """Keep the first ``length`` bytes as the whole buffer, moved flush
        against the trailing guard again; the bytes left behind are wiped
        and the canary rewritten before the new start.  Only for a buffer
        nobody else has seen yet (from_file, prompt)."""
        old_data, old_canary = self.data, self.canary_address
        new_data = self.inner + self.inner_length - length
        if new_data == old_data:
            return
        self.copy(new_data, old_data, length, _READ_WRITE)
        _call(lib.pk_vbuf_wipe, self.vbuf, old_canary, new_data - old_canary, 0)
        self._place(length)
        canary = ffi.from_buffer(self.canary)
        try:
            self.copy(self.canary_address, int(ffi.cast(_UINTPTR, canary)), CANARY_SIZE,
                      _READ_WRITE)
        finally:
            ffi.release(canary)

    def close(self) -> None:
        """Close everything, or raise and change nothing."""
        if self.closed:
            return
        # The one atomic step from idle to closed: no use can begin after it.
        status = lib.pk_vbuf_close(self.vbuf)
        if status == lib.PK_E_CLOSED:
            return
        if status:
            raise_status(status)
        if self.views_exported():
            lib.pk_vbuf_reopen(self.vbuf)
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
        if lib.pk_vbuf_close(self.vbuf):
            self.orphaned = True  # in use: the last use to end closes it
            return
        self._release(check_canary=False, unmap=False)

    def _release(self, check_canary: bool, unmap: bool = True) -> None:
        corrupted = False
        if self.vbuf != ffi.NULL:
            forked = lib.pk_vbuf_forked(self.vbuf)
            # In a forked child secretmem pages are absent, and WIPEONFORK
            # zeroed anonymous ones, canary included: neither is checked.
            # Shared pages are never wiped (other processes may use them).
            if not (forked and self.inherit == lib.PK_INHERIT_NONE):
                if check_canary and not (forked and self.inherit == lib.PK_INHERIT_ZEROS):
                    corrupted = not self.equal(self.canary_address, self.canary)
                if self.inherit != lib.PK_INHERIT_SHARED:
                    _call(lib.pk_vbuf_wipe, self.vbuf, self.inner, self.inner_length, 1)
        elif hasattr(self, "inner"):
            lib.pk_wipe_touched(self.inner, self.inner_length)  # never keyed: plain access
        if self.locked and self.backing == "anonymous":
            lib.pk_munlock(self.inner, self.inner_length)
        self.locked = False
        if self.label_slot >= 0:
            lib.pk_label_remove(self.label_slot)
            self.label_slot = -1
        self.closed = True
        self._block = None  # what unlocked() reads: closed
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.sealed:
            self._keep_sealed()
        elif unmap:
            self._unmap()
        else:
            # Escaped views still hold the mmap: the last one unmaps it.  A
            # virtual key goes now (the pages become PROT_NONE); a fixed
            # key's region is forgotten, and an owned key freed, only then.
            if self.key is None:
                self._free_record()
            memory = self.map
            # Dropped, not released: the escaped views hold the export, and
            # through it the mmap, until the last of them goes.
            self.pin = self.data_view = None
            self.map = None
            weakref.finalize(memory, self._unmapped)
            del memory
            return
        if corrupted:
            raise BufferCorruptedError(
                "the canary before the protected buffer's data was overwritten: something "
                "wrote before its start. The buffer was wiped and unmapped all the same."
            )

    def _free_record(self) -> None:
        if self.vbuf != ffi.NULL:
            lib.pk_vbuf_detach(self.vbuf)  # a virtual key goes back to the pool, freed

    def _keep_sealed(self) -> None:
        """A sealed range cannot be untagged or unmapped: it stays, wiped,
        with its key (whose number therefore stays allocated) and region."""
        self._free_record()
        # Dropped, not released: escaped views may still use the export.
        self.pin = self.data_view = None
        self.map = None  # its munmap would be refused (EPERM) anyway

    def _unmap(self) -> None:
        if self.tagged:
            lib.pk_region_forget(self.inner, self.inner_length)
        self._free_record()  # a virtual key's pages become PROT_NONE, key 0, first
        self._unpin()
        if self.map is not None:
            self.map.close()
            self.map = None
            _state.remove_package_span(self.base)
        self._free_key()

    def _unmapped(self) -> None:
        _state.remove_package_span(self.base)
        if self.tagged:
            lib.pk_region_forget(self.inner, self.inner_length)
        self._free_record()
        self._free_key()

    def _free_key(self) -> None:
        if self.owns_key and self.key is not None and not self.key.closed:
            self.key.close()


def _finalize(mapping: _Mapping) -> None:
    mapping.close_when_released()


class ProtectedBuffer(_scope.BufferBase):
    """``size`` bytes of guarded, locked, key-protected memory for a secret.

    ``key``: a shared :class:`Key` (not freed on close).  By default the
    buffer has a *virtual key*: it holds one of a pool of hardware keys
    only while in use or recently used, so any number of buffers can
    exist.  ``label`` names the buffer in fault messages.
    ``lock_memory=False`` skips ``mlock``.  ``secretmem``: ``None`` uses
    ``memfd_secret`` pages where the kernel offers them, ``True`` requires
    them, ``False`` never uses them (see :attr:`backing`).  ``seal=True``
    seals the mapping with ``mseal`` for the rest of the process (hardware
    backend, Linux 6.10+).  ``on_fork``: what a forked child has,
    ``"absent"`` (the default for secret memory), ``"zeroed"`` (the default
    for anonymous memory) or ``"shared"`` (the same secret pages, which
    :meth:`share` also passes to other processes; docs/sharing.md).

    The data sits between two ``PROT_NONE`` guard pages, flush against the
    trailing one, after a random canary; its pages are locked, left out of
    core dumps and kept from forked children (zeroed, or for secret memory
    absent), and closed by its key or by ``PROT_NONE``.  Only
    :meth:`unlocked`, :meth:`readinto`, :meth:`write` and :meth:`read_from`
    open it, and :meth:`close` (or the finalizer) checks the canary, wipes
    the touched pages, unlocks, gives back its key and unmaps.  The module
    documentation has every step.
    """

    # _mapping lives in the C base (csrc/scope_block.c), whose unlocked()
    # hands out pkeys.Unlocked blocks without Python code.
    __slots__ = ("_label", "_finalizer", "__weakref__")
    _mapping: _Mapping

    def __init__(
        self,
        size: int,
        *,
        key: Key | None = None,
        label: str = "secret",
        lock_memory: bool = True,
        secretmem: bool | None = None,
        seal: bool = False,
        on_fork: OnFork | None = None,
    ) -> None:
        size = require_int(size, "size")
        if not 0 < size <= MAX_SIZE:
            raise ArgumentError(f"size must be in 1..2**40 bytes, not {size}")
        if key is not None and not isinstance(key, Key):
            raise TypeError(f"key must be a pkeys.Key, not {type(key).__name__}")
        if not isinstance(label, str):
            raise TypeError(f"label must be a str, not {type(label).__name__}")
        if secretmem is not None and not isinstance(secretmem, bool):
            raise TypeError(f"secretmem must be None, True or False, not {type(secretmem).__name__}")
        if not isinstance(seal, bool):
            raise TypeError(f"seal must be a bool, not {type(seal).__name__}")
        _share.check_on_fork(on_fork, secretmem)
        if seal:
            _check_seal()
        _guard.install()
        self._adopt(label, _Mapping(size, key, label, bool(lock_memory), secretmem, seal, on_fork))

    def _adopt(self, label: str, mapping: _Mapping) -> None:
        self._label = label
        self._mapping = mapping
        self._finalizer = weakref.finalize(self, _finalize, self._mapping)

    # -- other processes (pkeys/_share.py) ------------------------------
    def share(self) -> _share.ShareHandle:
        """A handle holding a new descriptor of this buffer's secret file,
        for another process (``socket.send_fds``) to map with
        :meth:`from_shared`: the pages, never their bytes, cross.  Only
        for a buffer made with ``on_fork="shared"``."""
        return _share.share(self)

    @classmethod
    def from_shared(cls, handle: _share.ShareHandle, *, key: Key | None = None,
                    label: str | None = None) -> ProtectedBuffer:
        """The buffer whose handle :meth:`share` made, in another process,
        mapped under a key of this one and closed until :meth:`unlocked`.
        The handle stays the caller's to close."""
        return _share.from_shared(cls, handle, key, label)

    @property
    def on_fork(self) -> str:
        """What a forked child has: ``"absent"``, ``"zeroed"``, ``"shared"``
        (or ``"copied"`` on kernels before 4.14 without WIPEONFORK)."""
        return _share.ON_FORK_OF_INHERIT[self._mapping.inherit]

    # -- loading without a Python copy ----------------------------------
    @classmethod
    def from_file(cls, path_or_fd: str | os.PathLike[str] | int, size: int | None = None,
                  *, strip_newline: bool = False,
                  **options: Unpack[BufferOptions]) -> ProtectedBuffer:
        """A buffer holding a file's contents, read with ``read(2)`` straight
        into it (access open only for the call): no Python object ever holds
        the secret.  ``path_or_fd`` is a path, or an open descriptor read
        from its current position (and left open).  ``size`` is the most
        bytes to read; by default the rest of a regular file.  The buffer's
        size is the count read; more than ``size`` bytes is an error.
        ``strip_newline=True`` leaves out one final ``\n`` (a token file
        written by ``echo``); the byte is wiped, not copied.
        ``options`` are ProtectedBuffer's (``label``, ``secretmem``, ...)."""
        if not isinstance(strip_newline, bool):
            raise TypeError(f"strip_newline must be a bool, not {type(strip_newline).__name__}")
        if isinstance(path_or_fd, bool) or not isinstance(path_or_fd, (int, str, bytes, os.PathLike)):
            raise TypeError(f"path_or_fd must be a path or a file descriptor, not "
                            f"{type(path_or_fd).__name__}")
        if size is not None:
            size = require_int(size, "size")
            if not 0 < size < MAX_SIZE:
                raise ArgumentError(f"size must be in 1..2**40-1 bytes, not {size}")
        own = not isinstance(path_or_fd, int)
        fd: int = (check_fd(path_or_fd) if isinstance(path_or_fd, int)
                   else os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC))
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(errno.EISDIR, "a directory holds no secret to load",
                                        f"fd {fd}" if isinstance(path_or_fd, int)
                                        else os.fsdecode(path_or_fd))
            if size is None:
                if not stat.S_ISREG(info.st_mode):
                    raise ArgumentError("size is needed to read from a pipe, socket or terminal")
                size = info.st_size - (0 if own else os.lseek(fd, 0, os.SEEK_CUR))
                if size <= 0:
                    raise ArgumentError("the file is empty: nothing to load")
            # One byte more than allowed tells a file longer than `size`.
            buffer = cls(size + 1, **options)
            try:
                got = buffer._mapping.read(fd, buffer._mapping.data, size + 1, False)
                if got > size:
                    raise ArgumentError(f"the file holds more than size={size} bytes")
                if strip_newline and got and buffer._mapping.equal(
                        buffer._mapping.data + got - 1, b"\n"):
                    got -= 1  # trim() wipes the byte left behind
                if got == 0:
                    raise ArgumentError("the file is empty: nothing to load")
                buffer._mapping.trim(got)
            except BaseException:
                buffer.close()
                raise
            return buffer
        finally:
            if own:
                os.close(fd)

    def read_from(self, fd: int, offset: int = 0) -> int:
        """``read(2)`` from ``fd`` straight into the buffer at ``offset``,
        until it is full or the file ends; returns the bytes read.  Write
        access is open (to this thread, on hardware) only for the call."""
        mapping = self._open()
        fd = check_fd(fd)
        offset = self._check_span(offset, 0)
        return mapping.read(fd, mapping.data + offset, mapping.size - offset, False)

    # -- properties -----------------------------------------------------
    @property
    def size(self) -> int:
        return self._mapping.size

    @property
    def label(self) -> str:
        return self._label

    @property
    def key(self) -> Key | None:
        """The shared ``key=`` given (or a sealed buffer's own key); None
        for a buffer with a virtual key (see :attr:`pkey`)."""
        return self._open().key

    @property
    def pkey(self) -> int | None:
        """The hardware key number guarding the data now, or None while a
        virtual-key buffer holds none (its pages are PROT_NONE then)."""
        pkey = lib.pk_vbuf_pkey(self._open().vbuf)
        return None if pkey < 0 else pkey

    @property
    def backing(self) -> str:
        """``"secretmem"`` (memfd_secret pages) or ``"anonymous"``."""
        return self._mapping.backing

    @property
    def sealed(self) -> bool:
        return self._mapping.sealed

    @property
    def memory_locked(self) -> bool:
        """Whether the pages are locked in memory, so never swapped (False
        when RLIMIT_MEMLOCK refused ``mlock``).  Nothing to do with access:
        that is :meth:`unlocked`."""
        return self._mapping.locked

    @property
    def locked(self) -> bool:
        """Deprecated since 0.2.0, removed in 0.3.0: :attr:`memory_locked`.
        The old name read as the opposite of :meth:`unlocked`."""
        warnings.warn("ProtectedBuffer.locked is deprecated: it is memory_locked (mlock), "
                      "not access; the old name goes in 0.3.0", DeprecationWarning, stacklevel=2)
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
        """The size: every byte of the buffer is the secret's.  Loaders
        (``from_file``, ``prompt``) size the buffer to what they read."""
        return self._mapping.size

    # -- access ---------------------------------------------------------
    def revoke(self, timeout: float = _api.REVOCATION_TIMEOUT) -> None:
        """End access to this buffer in every thread, now: every grant on
        the key it holds ends, including those of blocks that are still
        open (here or in other threads, in suspended generators or tasks)
        and the access that a thread started inside a block copied from its
        creator.  Those blocks re-grant nothing when they end; a new block
        opens it again.  A buffer made with ``key=`` shares that key, so
        every buffer the key guards is revoked with it.  RevocationError
        names the threads that did not answer within ``timeout`` seconds."""
        mapping = self._open()
        result = ffi.new(_api._BROADCAST_RESULT)
        status = _state.call(lib.pk_vbuf_revoke, mapping.vbuf, timeout, result)
        if status == lib.PK_E_BROADCAST:
            raise revocation_error(lib.pk_vbuf_pkey(mapping.vbuf), "", result)
        if status:
            _raise(status)

    def readinto(self, dest: BufferLike, offset: int = 0) -> int:
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
            mapping.copy(int(ffi.cast(_UINTPTR, target)), mapping.data + offset, length,
                         _READ_ONLY)
        finally:
            ffi.release(target)
        return length

    def write(self, data: BufferLike, offset: int = 0) -> int:
        """Copy the bytes-like ``data`` in at ``offset``; returns the count."""
        mapping = self._open()
        try:
            source = ffi.from_buffer(data)
        except TypeError:
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}") from None
        try:
            length = len(source)
            offset = self._check_span(offset, length)
            mapping.copy(mapping.data + offset, int(ffi.cast(_UINTPTR, source)), length,
                         _READ_WRITE)
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
        BufferCorruptedError after closing if the canary was hit.  A sealed
        buffer is wiped but stays mapped (the kernel refuses to unmap it)."""
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
        key = "virtual" if mapping.key is None else str(mapping.key.pkey)
        return (
            f"<ProtectedBuffer {self._label!r} size={mapping.size} pkey={key} "
            f"backing={mapping.backing} memory_locked={mapping.locked}>"
        )

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError("a ProtectedBuffer cannot be pickled or copied: its contents are secret")

    __reduce__ = __reduce_ex__  # type: ignore[assignment]

    def __copy__(self) -> Any:
        raise TypeError("a ProtectedBuffer cannot be copied")

    def __deepcopy__(self, memo: object) -> Any:
        raise TypeError("a ProtectedBuffer cannot be copied")


def _check_seal() -> None:
    if chosen().backend.MODE != lib.PK_MODE_HARDWARE:
        raise UnsupportedError(
            "seal=True needs hardware protection keys: the software backend opens and closes "
            "a buffer with mprotect, which a sealed mapping refuses for good"
        )
    available, reason = _secretmem.seal_availability()
    if not available:
        raise UnsupportedError(f"seal=True, but mseal is unavailable: {reason}")


def _block_enter_failed(status: int, error: int) -> None:
    """An unlocked() entry refused by C (``pkeys.Unlocked``,
    csrc/scope_block.c, which takes the software backend's pins itself),
    ``errno`` as the call left it: the exception."""
    ffi.errno = error
    _raise(status)


def _block_exit_failed(mapping: _Mapping, status: int, error: int) -> None:
    """An unlocked() exit refused by C, its outcome recorded there: a block
    ended in another thread; else the exception."""
    ffi.errno = error
    if status == _WRONG_THREAD:
        # Software: state.c ended the process-wide grant already.
        status = _end_elsewhere(mapping) if chosen().backend.MODE == lib.PK_MODE_HARDWARE else 0
    if status:
        _raise(status)


def _end_elsewhere(mapping: _Mapping) -> int:
    """A block ended in a thread other than the one that entered it (a
    generator or coroutine suspended inside it, closed by another thread or
    by the garbage collector there).  The grant lives in the other thread's
    register, which only a revocation reaches: the key the buffer holds is
    revoked in every thread, then the use ends, so the buffer can be
    closed."""
    result = ffi.new(_api._BROADCAST_RESULT)
    status = lib.pk_vbuf_end_elsewhere(mapping.vbuf, _api.REVOCATION_TIMEOUT, result)
    if status == lib.PK_E_BROADCAST:
        raise revocation_error(lib.pk_vbuf_pkey(mapping.vbuf),
                               "the block's use of the buffer stays", result)
    return int(status)


def _view_escaped(mapping: _Mapping, exporter: object) -> None:
    """A block's view outlived it (a slice, a cast, an array of one): its
    exporter lives as long as they do.  Recorded before the use ends;
    exporters already gone are dropped, so a buffer whose blocks keep
    raising BufferError (caught) holds only the escapes still alive."""
    escaped = mapping.escaped
    escaped.append(_weak(exporter))
    # In place, dead ones only: a record appended meanwhile (a finalizer
    # ending another block) is never lost.
    for ref in [ref for ref in escaped if ref() is None]:
        escaped.remove(ref)


def _use_ended(mapping: _Mapping) -> None:
    """A block of a buffer collected while in use ended: the last use to
    end closes it."""
    if mapping.orphaned and not lib.pk_vbuf_users(mapping.vbuf):
        mapping.orphaned = False
        mapping.close_when_released()


_scope.configure_blocks(
    vbuf_enter=entry_point("pk_vbuf_enter"),
    vbuf_exit=entry_point("pk_vbuf_exit"),
    enter_failed=_block_enter_failed,
    exit_failed=_block_exit_failed,
    view_escaped=_view_escaped,
    use_ended=_use_ended,
    raise_status=_raise,
    guard_install=_guard.install,
    faulthandler_enabled=_guard.faulthandler_enabled,
    python_handler=_guard.python_handler,
    sigsegv=_guard.SIGSEGV,
)


# -- the virtual-key pool ----------------------------------------------------

def virtual_key_limit(limit: int | None = None) -> int:
    """The most hardware keys that buffers without ``key=`` share (default
    8, leaving the rest to :class:`Key` and other code); with ``limit``
    (1..15), set it and return the previous one."""
    if limit is None:
        return lib.pk_vkeys_limit(0)
    limit = require_int(limit, "limit")
    if not 1 <= limit <= 15:
        raise ArgumentError(f"the virtual-key limit must be in 1..15, not {limit}")
    return lib.pk_vkeys_limit(limit)


def virtual_key_stats() -> VirtualKeyStats:
    """The pool: ``limit``, ``keys`` it holds, ``held`` by a buffer now,
    the key numbers, and counts of ``assignments`` (cold opens) and
    ``evictions``."""
    out = ffi.new("struct pk_vkeys_stats *")
    lib.pk_vkeys_stats(out)
    return {
        "limit": out.limit,
        "keys": out.keys,
        "held": out.held,
        "pkeys": [k for k in range(16) if out.mask & (1 << k)],
        "assignments": out.assignments,
        "evictions": out.evictions,
    }


def release_idle_virtual_keys() -> int:
    """Evict every buffer nobody is using and free the pool's idle keys,
    for code that needs raw keys; returns how many were freed."""
    return lib.pk_vkeys_release_idle()


# A ProtectedBuffer crosses multiprocessing as its descriptor (pkeys/_share.py).
_share.register_reducers(ProtectedBuffer)
