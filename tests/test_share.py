"""Protected buffers across processes (docs/sharing.md): ``on_fork``, and
``share()`` / ``from_shared()`` over a Unix socket, on whichever backend is
active (``anybackend``: natively and on the emulated PKU CPU, 6.1 and 6.12).

The invariants: no byte of the secret crosses a socket (the test records
what crosses and searches it), a receiver's /proc/self/mem cannot read the
shared pages, closing in one process (or one dying) leaves the others
working and leaves no mapping, descriptor or key behind where it closed,
a write in one process is seen by all, and a revocation stays in its own
process.  The multiprocessing start methods are in test_share_mp.py.
"""

from __future__ import annotations

import errno
import hmac
import mmap
import os
import pickle
import signal
import socket
from collections.abc import Callable, Iterator

import pytest

import pkeys
from pkeys import _secretmem
from pkeys._binding import ffi
from pkeys._child import run_in_child

from ._libc import proc_self_mem
from ._sharing import (
    deadline,
    fingerprint,
    holdings,
    holds_secret,
    secret_fds,
    secret_mappings,
)

pytestmark = pytest.mark.anybackend
SECRETMEM, SECRETMEM_REASON = _secretmem.availability()
needs_secretmem = pytest.mark.skipif(not SECRETMEM, reason=f"no secretmem: {SECRETMEM_REASON}")
SIZE = 32


def random_secret(**options: object) -> pkeys.ProtectedBuffer:
    """A buffer of SIZE random bytes read straight into it."""
    buffer = pkeys.ProtectedBuffer(SIZE, **options)  # type: ignore[arg-type]
    with open("/dev/urandom", "rb", buffering=0) as source:
        assert buffer.read_from(source.fileno()) == SIZE
    return buffer


class Events:
    """One-byte messages between a parent and its forked child, to order
    their steps (never timing)."""

    def __init__(self) -> None:
        self.to_child = os.pipe()
        self.to_parent = os.pipe()

    def tell_child(self, byte: bytes = b".") -> None:
        os.write(self.to_child[1], byte)

    def tell_parent(self, byte: bytes = b".") -> None:
        os.write(self.to_parent[1], byte)

    def from_parent(self) -> bytes:
        return os.read(self.to_child[0], 1)

    def from_child(self) -> bytes:
        return os.read(self.to_parent[0], 1)

    def close(self) -> None:
        for fd in (*self.to_child, *self.to_parent):
            os.close(fd)


def fork_child(function: Callable[[], object]) -> int:
    """Fork; the child runs ``function`` and exits 0, or 1 with the
    traceback on stderr."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            function()
            status = 0
        except BaseException:  # noqa: BLE001 - reported on stderr, and the exit status
            import traceback

            os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(status)
    return pid


def exit_status(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def events() -> Iterator[Events]:
    made = Events()
    yield made
    made.close()


# -- on_fork -------------------------------------------------------------------

def test_on_fork_defaults_and_refusals():
    before = holdings()
    with pkeys.ProtectedBuffer(16, secretmem=False) as anonymous:
        assert anonymous.on_fork == "zeroed"
    if SECRETMEM:
        with pkeys.ProtectedBuffer(16) as secret:
            assert secret.on_fork == "absent"
    for bad, error in ((1, TypeError), ("copied", pkeys.ArgumentError), ("", ValueError)):
        with pytest.raises(error):
            pkeys.ProtectedBuffer(16, on_fork=bad)  # type: ignore[arg-type]
    # Each choice the backing cannot keep is refused before anything is made.
    with pytest.raises(pkeys.ArgumentError, match="secretmem=False"):
        pkeys.ProtectedBuffer(16, on_fork="zeroed")
    with pytest.raises(pkeys.ArgumentError, match="needs secret memory"):
        pkeys.ProtectedBuffer(16, on_fork="shared", secretmem=False)
    assert holdings() == before


def test_on_fork_absent_anonymous_memory_is_not_in_the_child():
    with pkeys.ProtectedBuffer(SIZE, secretmem=False, on_fork="absent") as buffer:
        buffer.write(b"s" * SIZE)
        assert buffer.on_fork == "absent"

        def child() -> None:
            with pytest.raises(pkeys.PkeysError, match="forked child has none of its pages"):
                buffer.readinto(bytearray(4))
            buffer.close()

        result = run_in_child(child)
        assert result.exitcode == 0, result.stderr
        assert run_in_child(lambda: ffi.cast("volatile char *", buffer.address)[0]).segfaulted


@needs_secretmem
def test_on_fork_absent_secret_memory_is_not_in_the_child():
    with random_secret(on_fork="absent") as buffer:
        result = run_in_child(lambda: buffer.readinto(bytearray(4)))
        assert result.exitcode == 1 and "on_fork='shared'" in result.stderr


def test_on_fork_zeroed_gives_the_child_zeros():
    with pkeys.ProtectedBuffer(SIZE, secretmem=False, on_fork="zeroed") as buffer:
        buffer.write(b"s" * SIZE)

        def child() -> None:
            out = bytearray(b"x" * SIZE)
            buffer.readinto(out)
            assert out == bytes(SIZE)
            buffer.close()  # zeroed canary: not checked

        result = run_in_child(child)
        assert result.exitcode == 0, result.stderr


@needs_secretmem
@deadline
def test_on_fork_shared_the_child_sees_the_same_pages_and_writes_are_seen_by_both(events):
    before = holdings()
    buffer = random_secret(on_fork="shared")
    assert buffer.on_fork == "shared" and buffer.backing == "secretmem"
    expected = fingerprint(buffer)

    def child() -> None:
        assert fingerprint(buffer) == expected
        assert proc_self_mem(buffer.address, SIZE) == errno.EIO
        buffer.write(b"W", 0)          # the decided semantics: writes are shared
        events.tell_parent()
        assert events.from_parent() == b"."
        out = bytearray(1)
        buffer.readinto(out)
        assert out == b"P"             # the parent's write, seen here
        buffer.close()
        assert buffer.closed
        assert secret_mappings() == 0 and secret_fds() == 0

    pid = fork_child(child)
    assert events.from_child() == b"."
    out = bytearray(1)
    buffer.readinto(out)
    assert out == b"W"
    buffer.write(b"P", 0)
    events.tell_child()
    assert exit_status(pid) == 0
    # The child's close unmapped and wiped nothing here.
    buffer.readinto(out)
    assert out == b"P"
    buffer.close()
    assert holdings() == before


@needs_secretmem
@pytest.mark.parametrize("order", ["parent first", "child first", "child dies"])
@deadline
def test_closing_in_any_order_leaves_nothing_behind(order, events):
    before = holdings()
    buffer = random_secret(on_fork="shared")
    expected = fingerprint(buffer)

    def child() -> None:
        if order == "child dies":
            events.tell_parent()
            signal.pause()                 # killed here, holding the buffer
        if order == "parent first":
            assert events.from_parent() == b"."   # the parent has closed its buffer
            assert fingerprint(buffer) == expected
        buffer.close()
        assert secret_mappings() == 0 and secret_fds() == 0
        events.tell_parent()

    pid = fork_child(child)
    if order == "parent first":
        buffer.close()
        assert holdings() == before
        events.tell_child()
        assert events.from_child() == b"."
        assert exit_status(pid) == 0
        return
    assert events.from_child() == b"."
    if order == "child dies":
        os.kill(pid, signal.SIGKILL)
        assert exit_status(pid) == -signal.SIGKILL
    else:
        assert exit_status(pid) == 0
    assert fingerprint(buffer) == expected   # intact, after the other process went
    buffer.close()
    assert holdings() == before


@needs_secretmem
@deadline
def test_revoking_in_one_process_does_not_reach_another(events):
    with random_secret(on_fork="shared") as buffer:
        expected = fingerprint(buffer)

        def child() -> None:
            # Forked inside the parent's block: the block's use is this
            # process's too (it never ends here), and revoking ends its access.
            buffer.revoke()
            events.tell_parent()

        with buffer.unlocked() as key:
            pid = fork_child(child)
            assert events.from_child() == b"."
            assert exit_status(pid) == 0
            # Still open here: a key, and its grants, are per process.
            assert hmac.digest(key, b"fingerprint", "sha256") == expected


# -- share() and from_shared() over a socket -----------------------------------

class RecordingSocket:
    """A socket whose every byte sent and received is kept, for searching."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.crossed = bytearray()

    def send_fds(self, data: bytes, fds: list[int]) -> None:
        self.crossed += data
        socket.send_fds(self.sock, [data], fds)

    def recv_fds(self, length: int) -> tuple[bytes, list[int]]:
        data, fds, _, _ = socket.recv_fds(self.sock, length, 1)
        self.crossed += data
        return data, fds

    def sendall(self, data: bytes) -> None:
        self.crossed += data
        self.sock.sendall(data)

    def recv(self, length: int) -> bytes:
        data = self.sock.recv(length)
        self.crossed += data
        return data


def _receive_and_use(sock: RecordingSocket) -> None:
    """In a process forked before the buffer existed: receive the handle's
    descriptor and size, map it, and answer with what it found."""
    data, fds = sock.recv_fds(64)
    size = int(data.decode())
    with pkeys.ShareHandle(fds[0], size, "received") as handle:
        before_map = secret_mappings()
        buffer = pkeys.ProtectedBuffer.from_shared(handle)
    assert buffer.label == "received" and buffer.on_fork == "shared" and len(buffer) == size
    assert secret_mappings() == before_map + 1 and secret_fds() == 1  # its own, kept
    # Closed until its own unlocked(): a touch outside it faults.
    assert run_in_child(lambda: ffi.cast("volatile char *", buffer.address)[0]).segfaulted
    unreadable = proc_self_mem(buffer.address, size)
    with buffer.unlocked():
        unreadable_inside = proc_self_mem(buffer.address, size)
    assert unreadable == unreadable_inside == errno.EIO
    sock.sendall(fingerprint(buffer))
    buffer.close()
    assert secret_mappings() == 0 and secret_fds() == 0


@needs_secretmem
@pytest.mark.parametrize("loaded", ["written", "from_file"])
@deadline
def test_a_handle_over_a_unix_socket_carries_the_pages_and_no_byte_of_the_secret(
        loaded, tmp_path):
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    receiver = RecordingSocket(child_end)
    pid = fork_child(lambda: _receive_and_use(receiver))   # before the secret exists
    child_end.close()
    sender = RecordingSocket(parent_end)
    try:
        before = holdings()
        if loaded == "written":
            buffer = random_secret(on_fork="shared")
        else:  # a loaded buffer is trimmed to its size: the layout must follow
            path = tmp_path / "token"
            path.write_bytes(os.urandom(SIZE - 5) + b"\n")
            buffer = pkeys.ProtectedBuffer.from_file(path, strip_newline=True, on_fork="shared")
            path.unlink()
        with buffer.share() as handle:
            assert handle.size == len(buffer) and handle.fileno() == handle.fd
            sender.send_fds(str(handle.size).encode(), [handle.fd])
        answer = sender.recv(32)
        assert exit_status(pid) == 0
        assert answer == fingerprint(buffer)
        assert not holds_secret(buffer, bytes(sender.crossed))
        buffer.close()
        assert holdings() == before
    finally:
        parent_end.close()


@needs_secretmem
def test_from_shared_in_the_same_process_maps_the_same_pages_under_another_key():
    before = holdings()
    with random_secret(on_fork="shared", label="original") as buffer, buffer.share() as handle:
        with pkeys.ProtectedBuffer.from_shared(handle, label="copy-free") as again:
            assert again.address != buffer.address and again.label == "copy-free"
            again.write(b"Z", 3)
            out = bytearray(1)
            buffer.readinto(out, 3)
            assert out == b"Z"
        with pkeys.Key() as key, pkeys.ProtectedBuffer.from_shared(handle, key=key) as keyed:
            assert keyed.key is key
            assert fingerprint(keyed) == fingerprint(buffer)
    assert holdings() == before


def test_anonymous_or_unshared_buffers_refuse_to_share():
    with (pkeys.ProtectedBuffer(16, secretmem=False) as anonymous,
          pytest.raises(pkeys.ArgumentError, match="use secret memory")):
        anonymous.share()
    if SECRETMEM:
        with (pkeys.ProtectedBuffer(16) as private,
              pytest.raises(pkeys.ArgumentError, match="on_fork='shared'")):
            private.share()
    closed = pkeys.ProtectedBuffer(16, secretmem=False)
    closed.close()
    with pytest.raises(pkeys.ClosedError):
        closed.share()


def test_without_memfd_secret_sharing_fails_clearly_and_copies_nothing(monkeypatch):
    monkeypatch.setattr(_secretmem, "availability", lambda: (False, "a reason from the kernel"))
    before = holdings()
    with pytest.raises(pkeys.UnsupportedError, match="a reason from the kernel") as refused:
        pkeys.ProtectedBuffer(16, on_fork="shared")
    assert "nothing was copied" in str(refused.value)
    assert holdings() == before


def test_from_shared_refuses_what_is_not_a_secret_file():
    before = holdings()
    with pytest.raises(TypeError):
        pkeys.ProtectedBuffer.from_shared(3)  # type: ignore[arg-type]
    plain = os.memfd_create("not-secret")
    os.ftruncate(plain, mmap.PAGESIZE)
    with (pkeys.ShareHandle(plain, 16) as handle,
          pytest.raises(pkeys.ArgumentError, match="not a memfd_secret file")):
        pkeys.ProtectedBuffer.from_shared(handle)
    assert holdings() == before


@needs_secretmem
def test_from_shared_refuses_a_size_the_file_cannot_hold():
    with random_secret(on_fork="shared") as buffer, buffer.share() as handle:
        before = holdings()
        with (pkeys.ShareHandle(os.dup(handle.fd), 1 << 20) as wrong,
              pytest.raises(pkeys.ArgumentError, match="cannot hold")):
            pkeys.ProtectedBuffer.from_shared(wrong)
        assert holdings() == before


@needs_secretmem
def test_from_shared_refuses_a_secret_file_whose_pages_were_never_written():
    # Sized by someone else and never touched: on 6.1 and 6.12 the first
    # touch here would allocate the page and, near RLIMIT_MEMLOCK, kill
    # this process with SIGBUS (seen as an unprivileged user).  Refused
    # before any touch, leaving nothing behind.
    from pkeys._binding import lib

    before = holdings()
    fd = lib.pk_secretmem_create(2 * mmap.PAGESIZE)
    assert fd >= 0, os.strerror(-fd)
    with (pkeys.ShareHandle(fd, SIZE) as handle,
          pytest.raises(pkeys.ArgumentError, match="never written")):
        pkeys.ProtectedBuffer.from_shared(handle)
    assert holdings() == before


def test_a_share_handle_is_a_descriptor_not_a_pickle():
    fd = os.memfd_create("handle")
    handle = pkeys.ShareHandle(fd, 8, "h")
    assert repr(handle) == f"<ShareHandle 'h' size=8 fd={fd}>"
    with pytest.raises(TypeError, match="not pickle"):
        pickle.dumps(handle)
    with pytest.raises(pkeys.ArgumentError):
        pkeys.ShareHandle(fd, 0)
    assert handle.detach() == fd and handle.closed
    with pytest.raises(pkeys.ClosedError):
        handle.fileno()
    handle.close()  # idempotent
    os.close(fd)
