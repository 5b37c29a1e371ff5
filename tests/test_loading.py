"""Loading a secret without a Python copy: from_file, read_from, prompt (on a
pty), and probe() of a buffer."""

from __future__ import annotations

import errno
import os
import pty
import signal
import termios
import threading

import pytest

import pkeys
from pkeys import _secretmem

from ._libc import keyed_copy

pytestmark = pytest.mark.anybackend
SECRET = b"-----BEGIN KEY----- 0123456789abcdef -----END KEY-----\n"


def contents(buffer: pkeys.ProtectedBuffer) -> bytes:
    out = bytearray(len(buffer))
    buffer.readinto(out)
    return bytes(out)


def test_from_file_reads_a_path_into_a_buffer_of_its_size(tmp_path):
    path = tmp_path / "key.pem"
    path.write_bytes(SECRET)
    with pkeys.ProtectedBuffer.from_file(path, label="pem") as buffer:
        assert len(buffer) == buffer.size == len(SECRET)
        assert contents(buffer) == SECRET
        assert pkeys.probe(buffer) is not None  # closed again after the read
        # Flush against the trailing guard, as every buffer is.
        assert pkeys.probe(buffer.address + len(SECRET)).kind is pkeys.FaultKind.PROTECTION
        assert buffer.label == "pem"
    with pkeys.ProtectedBuffer.from_file(str(path), size=len(SECRET), secretmem=False) as exact:
        assert exact.backing == "anonymous" and contents(exact) == SECRET


def test_from_file_reads_an_fd_from_its_position_and_leaves_it_open(tmp_path):
    path = tmp_path / "token"
    path.write_bytes(b"HEADER:" + SECRET)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        with pkeys.ProtectedBuffer.from_file(fd) as buffer:
            assert contents(buffer) == SECRET
        os.fstat(fd)  # still open
    finally:
        os.close(fd)


def test_from_file_reads_a_pipe_given_a_size():
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, SECRET)
        os.close(write_end)
        write_end = -1
        with pytest.raises(pkeys.ArgumentError, match="size is needed"):
            pkeys.ProtectedBuffer.from_file(read_end)
        with pkeys.ProtectedBuffer.from_file(read_end, size=4096) as buffer:
            assert len(buffer) == len(SECRET) and contents(buffer) == SECRET
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_from_file_refusals_leave_nothing_behind(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(SECRET)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    keys = pkeys.allocated_keys()
    with pytest.raises(pkeys.ArgumentError, match="more than size=10"):
        pkeys.ProtectedBuffer.from_file(path, size=10)
    with pytest.raises(pkeys.ArgumentError, match="empty"):
        pkeys.ProtectedBuffer.from_file(empty)
    with pytest.raises(FileNotFoundError):
        pkeys.ProtectedBuffer.from_file(tmp_path / "missing")
    with pytest.raises(TypeError):
        pkeys.ProtectedBuffer.from_file(1.5)
    with pytest.raises(OSError):
        pkeys.ProtectedBuffer.from_file(999_999, size=8)  # EBADF
    assert pkeys.allocated_keys() == keys
    assert pkeys.virtual_key_stats()["keys"] == 0


def test_read_from_fills_an_existing_buffer(tmp_path):
    path = tmp_path / "part"
    path.write_bytes(b"abcdef")
    with pkeys.ProtectedBuffer(10) as buffer, open(path, "rb") as source:
        assert buffer.read_from(source.fileno(), offset=2) == 6
        assert contents(buffer) == b"\0\0abcdef\0\0"
        assert buffer.read_from(source.fileno()) == 0  # end of file
        with pytest.raises(pkeys.ArgumentError):
            buffer.read_from(source.fileno(), offset=11)
        with pytest.raises(OSError):
            buffer.read_from(-1)
        assert pkeys.probe(buffer) is not None


@pytest.mark.parametrize("fd", [2**31, 2**63, -1, -2**31 - 1])
def test_a_descriptor_beyond_a_c_int_is_ebadf_before_any_buffer_is_made(fd, monkeypatch):
    """It was a bare OverflowError (os.fstat, or cffi after the buffer was made)."""
    with pkeys.ProtectedBuffer(8) as buffer:
        def no_buffer(*args, **kwargs):
            raise AssertionError("a buffer was made for a refused descriptor")

        monkeypatch.setattr(pkeys._buffer, "_Mapping", no_buffer)
        for call in (lambda: pkeys.ProtectedBuffer.from_file(fd),
                     lambda: pkeys.ProtectedBuffer.from_file(fd, size=8),
                     lambda: buffer.read_from(fd)):
            with pytest.raises(OSError) as raised:
                call()
            assert raised.value.errno == errno.EBADF
            assert pkeys.probe(buffer) is not None
    assert pkeys.virtual_key_stats()["keys"] == 0


def test_probe_takes_a_buffer():
    with pkeys.ProtectedBuffer(16) as buffer:
        fault = pkeys.probe(buffer)
        assert fault is not None and fault.address == buffer.address
        assert pkeys.probe(buffer, write=True, offset=15).address == buffer.address + 15
        with buffer.unlocked(write=True):
            assert pkeys.probe(buffer, write=True) is None
        with pytest.raises(pkeys.ArgumentError):
            pkeys.probe(buffer, offset=16)
    with pytest.raises(pkeys.PkeysError, match="closed"):
        pkeys.probe(buffer)


# -- prompt --------------------------------------------------------------------

def _prompt_on_a_pty(typed: bytes, **options):
    """Run pkeys.prompt on a fresh pty while a thread types ``typed``; returns
    (result or exception, what the terminal showed, echo flag after)."""
    master, slave = pty.openpty()
    shown = bytearray()
    result: list[object] = []

    def typist() -> None:
        # Wait for the prompt, which is written before echo goes off... and
        # for echo to be off before typing.
        while b": " not in shown:
            shown.extend(os.read(master, 1024))
        for _ in range(200):
            if not termios.tcgetattr(slave)[3] & termios.ECHO:
                break
            threading.Event().wait(0.01)
        os.write(master, typed)

    thread = threading.Thread(target=typist)
    thread.start()
    signal.alarm(30)
    try:
        try:
            result.append(pkeys.prompt("Passphrase: ", tty=slave, **options))
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            result.append(exc)
        thread.join(10)
        os.set_blocking(master, False)
        try:
            while chunk := os.read(master, 1024):
                shown.extend(chunk)
        except (BlockingIOError, OSError):
            pass
        echo = bool(termios.tcgetattr(slave)[3] & termios.ECHO)
    finally:
        signal.alarm(0)
        os.close(master)
        os.close(slave)
    return result[0], bytes(shown), echo


def test_prompt_reads_a_line_into_a_buffer_with_echo_off():
    buffer, shown, echo = _prompt_on_a_pty(b"correct horse battery\n", size=64)
    assert isinstance(buffer, pkeys.ProtectedBuffer), buffer
    try:
        assert contents(buffer) == b"correct horse battery"  # the newline is not kept
        assert len(buffer) == 21 and buffer.label == "prompt"
        assert b"Passphrase: " in shown
        assert b"correct" not in shown  # never echoed
        assert echo  # restored
    finally:
        buffer.close()


def test_prompt_refuses_a_long_line_and_end_of_input():
    error, _, echo = _prompt_on_a_pty(b"far too long for eight\n", size=8)
    assert isinstance(error, pkeys.ArgumentError) and "longer than size=8" in str(error)
    assert echo
    error, _, echo = _prompt_on_a_pty(b"\x04")  # Ctrl-D at the start of a line
    assert isinstance(error, EOFError) and echo
    error, _, _ = _prompt_on_a_pty(b"\n")
    assert isinstance(error, pkeys.ArgumentError) and "empty" in str(error)
    assert pkeys.virtual_key_stats()["keys"] == 0


def test_a_prompt_without_a_terminal_is_an_oserror_that_says_so():
    keys = pkeys.allocated_keys()
    with pytest.raises(OSError, match="needs a terminal") as info:
        pkeys.prompt(tty="/dev/null")
    assert info.value.errno == errno.ENOTTY
    assert pkeys.allocated_keys() == keys


def test_from_file_of_a_directory_names_the_directory():
    for size in (None, 64):
        with pytest.raises(IsADirectoryError, match="a directory") as info:
            pkeys.ProtectedBuffer.from_file("/", size)
        assert info.value.filename == "/"
    assert pkeys.virtual_key_stats()["keys"] == 0


def _inner_pages(buffer: pkeys.ProtectedBuffer) -> bytes:
    """Every byte of the buffer's inner pages: canary, data and what lies before."""
    from pkeys._binding import ffi as pkeys_ffi

    mapping = buffer._mapping
    copy = pkeys_ffi.new("char[]", mapping.inner_length)
    keyed_copy(mapping, int(pkeys_ffi.cast("uintptr_t", copy)), mapping.inner,
               mapping.inner_length)
    return pkeys_ffi.buffer(copy)[:]


@pytest.mark.parametrize("secret", [b"tok_0123456789", b"t" * 3000], ids=["short", "long"])
def test_from_file_can_strip_the_final_newline_and_keeps_no_copy_of_it(tmp_path, secret):
    path = tmp_path / "token"
    path.write_bytes(secret + b"\n")  # echo "$TOKEN" > token
    with pkeys.ProtectedBuffer.from_file(path, strip_newline=True) as buffer:
        assert len(buffer) == len(secret) and contents(buffer) == secret
        inner = _inner_pages(buffer)
        mapping = buffer._mapping
        before_canary = mapping.canary_address - mapping.inner
        assert inner[before_canary + 16:] == secret  # the data, flush against the guard
        assert inner[:before_canary] == bytes(before_canary)  # the rest was wiped
    with pkeys.ProtectedBuffer.from_file(path) as kept:
        assert contents(kept) == secret + b"\n"  # off by default
    path.write_bytes(secret)
    with pkeys.ProtectedBuffer.from_file(path, strip_newline=True) as unchanged:
        assert contents(unchanged) == secret
    path.write_bytes(b"\n")
    with pytest.raises(pkeys.ArgumentError, match="empty"):
        pkeys.ProtectedBuffer.from_file(path, strip_newline=True)
    with pytest.raises(TypeError, match="strip_newline"):
        pkeys.ProtectedBuffer.from_file(path, strip_newline="yes")  # type: ignore[arg-type]
    assert pkeys.virtual_key_stats()["keys"] == 0


def _file_system_of(path: str) -> str:
    """The type of the file system holding ``path`` (longest mount point)."""
    best, kind = "", ""
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            point, fs_type = fields[4], fields[fields.index("-") + 1]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, fs_type
    return kind


@pytest.mark.parametrize("size", [100, 5000], ids=["small", "over-2000-bytes"])
def test_loading_from_the_tree_pkeys_vm_shares_over_9p(size):
    """The guest sees this tree over 9p, which pins the pages it reads into,
    and secret memory cannot be pinned: EFAULT on 6.1 from about 2,000
    bytes, on 6.12 at every size.  A bounce page takes over."""
    path = os.path.realpath(__file__)
    if os.environ.get("PKEYS_REQUIRE_PKU") == "1":  # the emulated tier, in pkeys vm
        assert _file_system_of(path) == "9p"
    with open(path, "rb") as source:
        expected = source.read(size)
    assert len(expected) == size
    with pkeys.ProtectedBuffer.from_file(path, size=os.path.getsize(path)) as whole:
        assert contents(whole)[:size] == expected
    with pkeys.ProtectedBuffer(size) as buffer, open(path, "rb") as source:
        assert buffer.backing == ("secretmem" if _secretmem.availability()[0] else "anonymous")
        assert buffer.read_from(source.fileno()) == size
        assert contents(buffer) == expected


@pytest.mark.skipif(not _secretmem.availability()[0], reason="no secret memory here")
def test_an_o_direct_read_into_secret_memory_goes_through_a_wiped_bounce_page(tmp_path):
    """O_DIRECT pins the destination too (natively, on ext4): EFAULT before."""
    path = tmp_path / "direct"
    path.write_bytes(bytes(range(256)) * 16)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"no O_DIRECT on {_file_system_of(str(tmp_path))}: {exc}")
    maps_before = len(open("/proc/self/maps").readlines())
    try:
        with pkeys.ProtectedBuffer(4096) as buffer:  # page-aligned data, as O_DIRECT needs
            assert buffer.backing == "secretmem" and buffer.address % 4096 == 0
            assert buffer.read_from(fd) == 4096
            assert contents(buffer) == bytes(range(256)) * 16
    finally:
        os.close(fd)
    assert len(open("/proc/self/maps").readlines()) == maps_before  # the bounce page is gone


@pytest.mark.parametrize("tty", ["file", os.devnull, 2**31, -1])
def test_prompt_on_something_that_is_not_a_terminal_is_an_oserror(tty, tmp_path):
    """Not a terminal was a bare termios.error (no OSError); a descriptor
    beyond a C int an OverflowError."""
    path = tmp_path / "not-a-tty"
    path.write_bytes(b"typed\n")
    fd = os.open(path, os.O_RDONLY) if tty == "file" else None
    try:
        with pytest.raises(OSError) as raised:
            pkeys.prompt(tty=fd if fd is not None else tty)
        assert raised.value.errno in (errno.ENOTTY, errno.EBADF)
    finally:
        if fd is not None:
            os.close(fd)
    assert pkeys.virtual_key_stats()["keys"] == 0
