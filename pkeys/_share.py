"""Protected buffers across processes: what a forked child has
(``ProtectedBuffer(on_fork=)``), and passing a buffer's pages, never its
bytes, to another process (``share()``, ``from_shared()``, and a
``multiprocessing`` reducer).

Why it is safe: a ``memfd_secret`` file's pages are the same physical
pages in every process that maps it, removed from the kernel's direct map
there too, so ``/proc/PID/mem`` and ``process_vm_readv`` cannot read them
in any of them.  What crosses a pipe or socket is a descriptor
(``SCM_RIGHTS``, or inheritance), a size and a label.

The choices of ``on_fork``:

``"absent"``
  ``MADV_DONTFORK``: a forked child has no pages; using the buffer there
  raises PkeysError.  The default for secret memory.
``"zeroed"``
  ``MADV_WIPEONFORK``: a forked child sees zeros.  The default for
  anonymous memory; secret memory refuses it, so it needs
  ``secretmem=False``.
``"shared"``
  Secret memory that stays mapped in a forked child (neither advice), and
  whose file's descriptor the buffer keeps (``O_CLOEXEC``) for
  :func:`share`.  It needs secret memory and never falls back: anonymous
  pages are private to one process, and a copy is what this avoids.
  Every page is populated at creation, so that a process that maps the
  file later never faults a new page in against its own RLIMIT_MEMLOCK.

Each process holds its own ``ProtectedBuffer`` over the shared pages: its
own mapping, descriptor, key (the inherited key number with its rights in
a forked child, a key of its own in a receiver) and usage count.  Closing
in one process unmaps only there, and is never a wipe (other processes
may still use the pages); the kernel zeroes secret pages when the last
mapping and descriptor go.  ``revoke()`` ends access in the threads of the
calling process only: a key is per process.

Writes: allowed in every process, and seen by all of them at once (the
pages are the same).  Nothing orders them across processes; a secret that
several processes write needs the callers' own synchronisation.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from multiprocessing import context, reduction
from typing import TYPE_CHECKING, Any, Self

from . import _secretmem
from ._binding import lib
from ._errors import ArgumentError, ClosedError, UnsupportedError
from ._rights import PAGE_SIZE
from ._validate import check_fd, require_int

if TYPE_CHECKING:
    from ._buffer import ProtectedBuffer
    from ._key import Key

__all__ = ["ShareHandle"]

ON_FORK = ("absent", "zeroed", "shared")
ON_FORK_OF_INHERIT = {
    lib.PK_INHERIT_NONE: "absent",
    lib.PK_INHERIT_ZEROS: "zeroed",
    lib.PK_INHERIT_SHARED: "shared",
    lib.PK_INHERIT_COPY: "copied",
}
_CANARY_SIZE = 16  # _buffer.CANARY_SIZE (not imported: _buffer imports this module)


def check_on_fork(on_fork: object, secretmem: bool | None) -> None:
    """Refuse an ``on_fork`` that is no choice, or that the backing cannot keep."""
    if on_fork is None:
        return
    if not isinstance(on_fork, str):
        raise TypeError(f"on_fork must be a str or None, not {type(on_fork).__name__}")
    if on_fork not in ON_FORK:
        raise ArgumentError(f"on_fork must be one of {', '.join(map(repr, ON_FORK))}, "
                            f"not {on_fork!r}")
    if on_fork == "zeroed" and secretmem is not False:
        raise ArgumentError("on_fork='zeroed' needs anonymous memory (secretmem=False): secret "
                            "memory refuses MADV_WIPEONFORK")
    if on_fork == "shared" and secretmem is False:
        raise ArgumentError("on_fork='shared' needs secret memory: anonymous pages are private "
                            "to one process, and a copy is what sharing avoids")


def _memfd_secret_or_raise(what: str) -> None:
    available, reason = _secretmem.availability()
    if not available:
        raise UnsupportedError(f"{what} needs memfd_secret, which this kernel refuses ({reason}); "
                               "nothing was copied instead")


def map_shared(address: int, length: int, fd: int | None) -> int:
    """Map a secret file over ``[address, address + length)``: a fresh one
    (every page populated), or a duplicate of ``fd``.  Returns the
    descriptor the buffer keeps."""
    if fd is None:
        _memfd_secret_or_raise("on_fork='shared'")
        fd = lib.pk_secretmem_create(length)
        if fd < 0:
            raise UnsupportedError(f"memfd_secret failed: {os.strerror(-fd)}")
        populate = 1
    else:
        fd = os.dup(fd)  # O_CLOEXEC by default (PEP 446)
        populate = lib.PK_POPULATE_EXISTING  # writing: never over the sender's secret
    status = lib.pk_secretmem_map_fd(address, length, fd, populate)
    if status:
        os.close(fd)
        err = -status
        if err == errno.ENODATA:
            raise ArgumentError("the secret file has pages that were never written (a pkeys "
                                "buffer populates every page when it is made): touching them "
                                "here could die of SIGBUS at RLIMIT_MEMLOCK")
        why = os.strerror(err)
        if err in (errno.EAGAIN, errno.ENOMEM, errno.EPERM, errno.EFAULT):
            why += ": secret pages count against RLIMIT_MEMLOCK (ulimit -l) in every process"
        raise OSError(err, f"mapping {length} bytes of shared secret memory: {why}")
    return fd


def shared_file_length(fd: int, size: int) -> int:
    """The length of the secret file ``fd``, which must hold a buffer of
    ``size`` bytes and its canary."""
    length = lib.pk_secretmem_file_size(fd)
    if length == -errno.EINVAL:
        raise ArgumentError("the descriptor is not a memfd_secret file: only secret memory is "
                            "mapped as a shared protected buffer")
    if length < 0:
        raise OSError(-length, os.strerror(-length))
    if length % PAGE_SIZE or length < size + _CANARY_SIZE:
        raise ArgumentError(f"a {length}-byte secret file cannot hold a {size}-byte buffer")
    return int(length)


class ShareHandle:
    """A descriptor of a shared buffer's secret file, with its ``size`` and
    ``label``: what :meth:`ProtectedBuffer.share` returns and
    :meth:`ProtectedBuffer.from_shared` maps.  It holds no byte of the
    secret.  Send :attr:`fd` with ``socket.send_fds`` (and the size beside
    it), or pass the handle itself through ``multiprocessing``.  Close it
    (or use ``with``) once sent: a buffer mapped from it does not need it."""

    __slots__ = ("_fd", "label", "size")

    def __init__(self, fd: int, size: int, label: str = "secret") -> None:
        self._fd = -1  # the descriptor becomes the handle's only once all is valid
        checked = check_fd(fd)
        self.size = require_int(size, "size")
        if self.size <= 0:
            raise ArgumentError(f"size must be positive, not {self.size}")
        if not isinstance(label, str):
            raise TypeError(f"label must be a str, not {type(label).__name__}")
        self.label = label
        self._fd = checked

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ClosedError("the share handle is closed")
        return self._fd

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def detach(self) -> int:
        """The descriptor, now the caller's to close; the handle is closed."""
        fd = self.fd
        self._fd = -1
        return fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<ShareHandle {self.label!r} size={self.size} {state}>"

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError("a ShareHandle is a descriptor: pass it with socket.send_fds or "
                        "through multiprocessing, not pickle")

    __reduce__ = __reduce_ex__  # type: ignore[assignment]


def _shared_fd(buffer: ProtectedBuffer) -> int:
    mapping = buffer._open()
    if mapping.fd >= 0:
        return int(mapping.fd)
    if mapping.backing != "secretmem":
        raise ArgumentError(
            "an anonymous-memory buffer cannot be shared with another process without copying "
            "its bytes: use secret memory, ProtectedBuffer(size, on_fork='shared')")
    raise ArgumentError(
        f"this buffer's secret memory stays in this process (on_fork={buffer.on_fork!r}): "
        "make it with on_fork='shared' to share it")


def share(buffer: ProtectedBuffer) -> ShareHandle:
    return ShareHandle(os.dup(_shared_fd(buffer)), buffer.size, buffer.label)


def from_shared(cls: type[ProtectedBuffer], handle: ShareHandle, key: Key | None,
                label: str | None) -> ProtectedBuffer:
    from . import _buffer, _guard
    from ._key import Key

    if not isinstance(handle, ShareHandle):
        raise TypeError(f"handle must be a pkeys.ShareHandle, not {type(handle).__name__}")
    if key is not None and not isinstance(key, Key):
        raise TypeError(f"key must be a pkeys.Key, not {type(key).__name__}")
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label must be a str, not {type(label).__name__}")
    label = handle.label if label is None else label
    _guard.install()
    buffer = cls.__new__(cls)
    buffer._adopt(label, _buffer._Mapping(handle.size, key, label, True, True, False, "shared",
                                          shared_fd=handle.fd))
    return buffer


# -- multiprocessing: the descriptor crosses, never the bytes ------------------
#
# While a process starts (Process args, Pool and ProcessPoolExecutor
# initargs under spawn and forkserver), multiprocessing.reduction.DupFd hands
# the descriptor to the starting process itself.  Anywhere else (a task's
# argument, a Queue) DupFd would use multiprocessing's resource sharer, whose
# thread blocks every signal, the revocation signal included: on PKU hardware
# every later revocation in the process would then fail on that thread
# (RevocationError), and keys would stay allocated.  _Sharer does the same
# job with a thread whose signal mask is every Python thread's.

class _FromSharer:
    """What crosses for a descriptor sent outside a process start: the
    sending process's listener address and a one-time number."""

    def __init__(self, address: Any, number: int) -> None:
        self.address = address
        self.number = number

    def detach(self) -> int:
        from multiprocessing import process
        from multiprocessing.connection import Client

        with Client(self.address, authkey=process.current_process().authkey) as connection:
            connection.send((self.number, os.getpid()))
            return int(reduction.recv_handle(connection))


class _Sharer:
    """Duplicates of descriptors waiting for their receiver, one each, and
    the thread that hands them over (multiprocessing.resource_sharer's
    protocol, with its authentication key)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, int] = {}
        self._numbers = itertools.count(1)
        self._listener: Any = None
        os.register_at_fork(after_in_child=self._forget)

    def offer(self, fd: int) -> _FromSharer:
        from multiprocessing import process
        from multiprocessing.connection import Listener

        with self._lock:
            if self._listener is None:
                self._listener = Listener(authkey=process.current_process().authkey,
                                          backlog=128)
                threading.Thread(target=self._serve, args=(self._listener,), daemon=True,
                                 name="pkeys-descriptor-sharer").start()
            number = next(self._numbers)
            self._waiting[number] = os.dup(fd)
            return _FromSharer(self._listener.address, number)

    def _serve(self, listener: Any) -> None:
        # Its signal mask stays as every Python thread's: a revocation must
        # reach it, and pkeys' revocation takes a thread that blocks a
        # handled signal (SIGINT) for one inside a handler, and fails.
        while True:
            try:
                connection = listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                number, pid = connection.recv()
                with self._lock:
                    fd = self._waiting.pop(number)
                try:
                    reduction.send_handle(connection, fd, pid)
                finally:
                    os.close(fd)
            except Exception:  # noqa: BLE001, S110 - one bad request must not end the service
                pass
            finally:
                connection.close()

    def _forget(self) -> None:
        """In a forked child: the parent's waiting duplicates and listener
        are not this process's to serve, and its lock is new: another
        thread of the parent may have held it at the fork, and no thread
        of the child would ever release it (the child's next offer hung)."""
        self._lock = threading.Lock()
        for fd in self._waiting.values():
            os.close(fd)
        self._waiting.clear()
        if self._listener is not None:
            self._listener.close()  # in a child: its socket file is not unlinked
            self._listener = None


_sharer = _Sharer()


def _crossing(fd: int) -> Any:
    """What carries ``fd`` to the process that unpickles it."""
    if context.get_spawning_popen() is not None:
        return reduction.DupFd(fd)
    return _sharer.offer(fd)


def _rebuild_handle(dup: Any, size: int, label: str) -> ShareHandle:
    return ShareHandle(dup.detach(), size, label)


def _rebuild_buffer(dup: Any, size: int, label: str) -> ProtectedBuffer:
    from ._buffer import ProtectedBuffer

    with _rebuild_handle(dup, size, label) as handle:
        return ProtectedBuffer.from_shared(handle)


def _reduce_handle(handle: ShareHandle) -> tuple[Any, tuple[Any, int, str]]:
    return _rebuild_handle, (_crossing(handle.fd), handle.size, handle.label)


def _reduce_buffer(buffer: ProtectedBuffer) -> tuple[Any, tuple[Any, int, str]]:
    # The buffer's own descriptor: while a Process starts, spawn and
    # forkserver keep the number (not a duplicate) until the child has it.
    return _rebuild_buffer, (_crossing(_shared_fd(buffer)), buffer.size, buffer.label)


def register_reducers(buffer_type: type[ProtectedBuffer]) -> None:
    reduction.ForkingPickler.register(buffer_type, _reduce_buffer)
    reduction.ForkingPickler.register(ShareHandle, _reduce_handle)
