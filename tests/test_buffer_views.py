"""Views handed out by ``unlocked()``: an escaped one is caught exactly
(another block's live view, in this thread or another, is never this
block's leak), and a hot block makes no syscall.

Each block makes its view from an exporter of its own; its exit counts the
references to that exporter (``pkeys/_buffer.py``).  The fault guard is
checked again only when Python shows that it may have been displaced
(``pkeys/_guard.py``).
"""

from __future__ import annotations

import faulthandler
import hashlib
import hmac
import signal
import threading
import time

import pytest

import pkeys
from pkeys import _guard
from pkeys._binding import lib

from ._strace import loop_syscalls

pytestmark = pytest.mark.anybackend

# hashlib releases the GIL for inputs over 2 KiB; a small buffer makes many
# blocks, and so many moments when it is idle (where 0.2's check raced).
SIZE = 4096
BODY = b"m" * 65536  # HMAC over a large input, keyed with the view


def _hold_views_without_the_gil(buffer: pkeys.ProtectedBuffer, threads: int,
                                seconds: float) -> tuple[int, list[BaseException]]:
    """``threads`` threads loop ``with buffer.unlocked() as v:`` over a C
    function that holds ``v`` without the GIL (sha256 of it, or an HMAC of
    64 KiB keyed with it), for ``seconds``.  Returns the blocks run and the errors."""
    start, stop = threading.Barrier(threads), threading.Event()
    errors: list[BaseException] = []
    counts = [0] * threads
    expected = hashlib.sha256(b"k" * SIZE).digest()
    expected_mac = hmac.digest(b"k" * SIZE, BODY, "sha256")

    def work(index: int) -> None:
        try:
            start.wait(30)
            while not stop.is_set():
                with buffer.unlocked() as view:
                    if index % 2:
                        assert hashlib.sha256(view).digest() == expected
                    else:
                        assert hmac.digest(view, BODY, "sha256") == expected_mac
                counts[index] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            stop.set()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join(60)
        assert not worker.is_alive()
    return sum(counts), errors


def test_other_threads_live_views_are_not_a_leak():
    # Issue 17, item 5: 4 threads gave a few spurious BufferErrors ("a numpy
    # array, a memoryview cast") per 100,000 blocks; this loop gave 2 in
    # 173,000 with 0.2's check (a race: no interleaving can be forced there).
    buffer = pkeys.ProtectedBuffer(SIZE, label="signer", secretmem=False, lock_memory=False)
    buffer.write(b"k" * SIZE)
    blocks, errors = _hold_views_without_the_gil(buffer, threads=8, seconds=4)
    assert not errors, f"{len(errors)} errors in {blocks} blocks, first: {errors[0]!r}"
    assert blocks >= 8
    buffer.close()
    assert buffer.closed


def test_a_view_that_escapes_is_caught_while_other_threads_hold_theirs():
    buffer = pkeys.ProtectedBuffer(64, secretmem=False, lock_memory=False)
    inside, leave = threading.Barrier(3), threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with buffer.unlocked() as view:
                inside.wait(30)
                assert leave.wait(30)
                bytes(view)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for holder in holders:
        holder.start()
    inside.wait(30)
    with pytest.raises(BufferError, match="still alive"):
        with buffer.unlocked() as view:
            kept = view.cast("B")[4:8]  # escapes the block
    with pytest.raises(BufferError, match="still alive"):
        with buffer.unlocked() as view:
            pass  # this block leaked nothing; the earlier one's slice is alive
        raise BufferError("still alive: not raised by the clean block")  # pragma: no cover
    leave.set()
    for holder in holders:
        holder.join(30)
    assert not errors, errors
    with pytest.raises(BufferError, match="still alive"):
        buffer.close()  # the escaped slice still holds the memory
    assert not buffer.closed
    kept.release()
    buffer.close()
    assert buffer.closed


@pytest.mark.parametrize("escape", [
    lambda view: view[1:3],
    lambda view: view.cast("B"),
    lambda view: memoryview(view),
    lambda view: view.obj,
    lambda view: __import__("numpy").frombuffer(view, dtype="uint8"),
    lambda view: __import__("numpy").frombuffer(view[2:], dtype="uint8"),
], ids=["slice", "cast", "memoryview", "obj", "numpy", "numpy-of-slice"])
def test_every_kind_of_escape_is_caught_and_holds_off_close(escape):
    if "numpy" in repr(escape.__code__.co_names):
        pytest.importorskip("numpy")
    buffer = pkeys.ProtectedBuffer(16, secretmem=False, lock_memory=False)
    with pytest.raises(BufferError, match="a numpy array, a memoryview cast"):
        with buffer.unlocked(write=True) as view:
            kept = escape(view)
    with pytest.raises(BufferError, match="still alive"):
        buffer.close()
    assert not buffer.closed
    del kept
    buffer.close()
    assert buffer.closed


def test_a_clean_block_after_an_escape_raises_nothing():
    with pkeys.ProtectedBuffer(16, secretmem=False, lock_memory=False) as buffer:
        with pytest.raises(BufferError):
            with buffer.unlocked() as view:
                kept = view[1:2]
        with buffer.unlocked() as view:  # another block's leak is not this one's
            assert len(view) == 16
        kept.release()


def test_an_escaped_exporter_makes_no_view_once_its_block_ended():
    # view.obj is the block's exporter: a view made from it after the block
    # pointed at closed memory (touching it faulted); now it is refused.
    with pkeys.ProtectedBuffer(16, secretmem=False, lock_memory=False) as buffer:
        with pytest.raises(BufferError, match="still alive"):
            with buffer.unlocked() as view:
                exporter = view.obj
                assert bytes(memoryview(exporter)) == bytes(16)  # inside: allowed
        with pytest.raises(BufferError, match="block has ended"):
            memoryview(exporter)
        with buffer.unlocked() as view:  # a new block has its own exporter
            assert bytes(view) == bytes(16)
        del exporter


def test_a_buffer_keeps_no_record_of_escapes_that_are_gone():
    # Each escape is recorded before its use ends; one record per escape
    # ever made grew without bound (and close() scanned them all).
    with pkeys.ProtectedBuffer(16, secretmem=False, lock_memory=False) as buffer:
        for _ in range(50):
            with pytest.raises(BufferError):
                with buffer.unlocked() as view:
                    kept = view[1:2]
            kept.release()
        assert len(buffer._mapping.escaped) == 1  # the last one, already dead
        with pytest.raises(BufferError):
            with buffer.unlocked() as view:
                kept = view[1:2]
        with pytest.raises(BufferError, match="still alive"):
            buffer.close()  # a live escape is still seen
        kept.release()


def test_an_exception_inside_the_block_is_not_masked_by_an_escape():
    with pkeys.ProtectedBuffer(16, secretmem=False, lock_memory=False) as buffer:
        with pytest.raises(KeyError):
            with buffer.unlocked() as view:
                kept = view[1:2]
                raise KeyError("mine")
        kept.release()


def test_the_guard_is_checked_again_only_when_python_shows_a_change(monkeypatch):
    calls = []
    real = lib.pk_guard_install
    monkeypatch.setattr(_guard, "lib", type("L", (), {
        "pk_guard_install": staticmethod(lambda: calls.append(1) or real())})())
    with pkeys.ProtectedBuffer(16, secretmem=False, lock_memory=False) as buffer:
        calls.clear()
        for _ in range(100):
            with buffer.unlocked():
                pass
        assert calls == []
        was_enabled = faulthandler.is_enabled()
        try:
            faulthandler.disable() if was_enabled else faulthandler.enable()
            with buffer.unlocked():
                pass
            assert calls == [1]
            previous = signal.signal(signal.SIGSEGV, lambda signo, frame: None)
            try:
                with buffer.unlocked():
                    pass
                assert calls == [1, 1]
            finally:
                signal.signal(signal.SIGSEGV, previous)
        finally:
            faulthandler.enable() if was_enabled else faulthandler.disable()
        with buffer.unlocked():
            pass
        assert len(calls) == 3
    assert lib.pk_guard_install() == 0


@pytest.mark.pku
def test_a_hot_unlocked_loop_makes_no_syscall_on_the_emulated_cpu(tmp_path):
    backend, syscalls = loop_syscalls(tmp_path, 1000)
    assert backend == "hardware"
    assert sum(syscalls.values()) == 0, dict(syscalls)
