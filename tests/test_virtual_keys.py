"""Virtual keys: any number of ProtectedBuffers without key=, each readable
only inside its own use, on both backends and under threads."""

from __future__ import annotations

import errno
import mmap
import random
import signal
import threading
import time

import pytest

import pkeys
from pkeys._fault import FaultKind

from ._libc import allocate_until_enospc

pytestmark = pytest.mark.anybackend
HARDWARE = pkeys.backend() == "hardware"


def content(index: int) -> bytes:
    return index.to_bytes(4, "little") * 4


@pytest.fixture
def thousand():
    # Anonymous memory keeps 1,000 buffers cheap (secretmem would work too,
    # but each buffer is its own secret file).
    buffers = [pkeys.ProtectedBuffer(16, label=f"tenant-{i}", secretmem=False)
               for i in range(1000)]
    for index, buffer in enumerate(buffers):
        buffer.write(content(index))
    yield buffers
    for buffer in buffers:
        buffer.close()
    assert pkeys.virtual_key_stats()["keys"] == 0  # every pool key was freed with its buffers


@pytest.fixture
def limit():
    saved = pkeys.virtual_key_limit()
    yield pkeys.virtual_key_limit
    pkeys.virtual_key_limit(saved)


def closed(buffer: pkeys.ProtectedBuffer) -> bool:
    return pkeys.probe(buffer) is not None and pkeys.probe(buffer, write=True) is not None


def test_a_thousand_buffers_each_open_only_in_its_own_use(thousand):
    signal.alarm(300)
    try:
        stats = pkeys.virtual_key_stats()
        assert stats["keys"] <= stats["limit"] and stats["evictions"] > 0
        assert all(closed(buffer) for buffer in thousand)
        picks = random.Random(9).sample(range(1000), 40)
        for index in picks:
            with thousand[index].unlocked() as view:
                assert bytes(view) == content(index)
                assert pkeys.probe(thousand[index]) is None
                # Every other buffer stays closed meanwhile: ones that hold a
                # key (the recently used) and ones closed by PROT_NONE alike.
                for other in picks + list(range(10)):
                    if other != index:
                        assert closed(thousand[other]), other
        out = bytearray(16)
        for index, buffer in enumerate(thousand):
            buffer.readinto(out)
            assert out == content(index)
        assert all(closed(buffer) for buffer in thousand)
    finally:
        signal.alarm(0)


def test_the_pool_keeps_to_its_limit_and_evicts_the_least_recently_used(limit):
    limit(3)
    buffers = [pkeys.ProtectedBuffer(8, secretmem=False) for _ in range(5)]
    try:
        for buffer in buffers[:3]:
            buffer.write(b"12345678")
        assert [b.pkey is not None for b in buffers] == [True, True, True, False, False]
        buffers[0].write(b"abcdefgh")  # now buffers[1] is the least recently used
        buffers[3].write(b"12345678")
        assert buffers[1].pkey is None and buffers[0].pkey is not None
        assert len(pkeys.virtual_key_stats()["pkeys"]) == 3
        # An evicted buffer's pages are PROT_NONE (key 0), as on the software
        # backend: a protection fault, not a key fault.
        fault = pkeys.probe(buffers[1])
        assert fault is not None and fault.kind is FaultKind.PROTECTION
        if HARDWARE:
            from ._libc import smaps_pkey

            assert smaps_pkey(buffers[1].address) == 0
            assert smaps_pkey(buffers[0].address) == buffers[0].pkey
    finally:
        for buffer in buffers:
            buffer.close()


def test_buffers_in_use_are_never_evicted_and_running_out_is_clear(limit):
    limit(1)
    first, second = (pkeys.ProtectedBuffer(8, secretmem=False) for _ in range(2))
    try:
        with first.unlocked(write=True) as view:
            view[:] = b"first!!!"
            with pytest.raises(BufferError, match="virtual keys are held by protected buffers"):
                second.write(b"second!!")
            with pytest.raises(BufferError, match="virtual keys"), second.unlocked():
                pass
            assert bytes(view) == b"first!!!"
        second.write(b"second!!")  # first is idle now: evicted
        out = bytearray(8)
        first.readinto(out)
        assert out == b"first!!!"
    finally:
        first.close()
        second.close()


def test_threads_each_see_only_their_own_buffer(limit):
    """Eight threads, each with its own 50 buffers: inside a use, its buffer
    is open to it and every other buffer of its own stays closed (nobody else
    opens those, so this holds on the software backend's process-wide rights
    too); contents never mix."""
    limit(8)
    threads_count, per_thread = 8, 50
    groups = [[pkeys.ProtectedBuffer(16, secretmem=False) for _ in range(per_thread)]
              for _ in range(threads_count)]
    for t, group in enumerate(groups):
        for i, buffer in enumerate(group):
            buffer.write(content(t * 1000 + i))
    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = [0] * threads_count

    def worker(t: int) -> None:
        rng = random.Random(t)
        group = groups[t]
        try:
            while not stop.is_set():
                i, j = rng.sample(range(per_thread), 2)
                try:
                    with group[i].unlocked() as view:
                        assert bytes(view) == content(t * 1000 + i)
                        assert pkeys.probe(group[i]) is None
                        assert closed(group[j])
                    out = bytearray(16)
                    group[j].readinto(out)
                    assert out == content(t * 1000 + j)
                except BufferError as exc:
                    # All 8 keys held by the other threads' uses right now.
                    assert "virtual keys" in str(exc)
                    continue
                rounds[t] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_count)]
    for thread in threads:
        thread.start()
    stop.wait(4)
    stop.set()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "deadlock"
    try:
        assert not errors, repr(errors[0])
        assert all(rounds), rounds
        for group in groups:
            assert all(closed(buffer) for buffer in group)
    finally:
        for group in groups:
            for buffer in group:
                buffer.close()


@pytest.mark.pku
def test_a_buffer_open_in_one_thread_stays_closed_to_the_others():
    buffers = [pkeys.ProtectedBuffer(16, secretmem=False) for _ in range(20)]
    for index, buffer in enumerate(buffers):
        buffer.write(content(index))
    go, done = threading.Event(), threading.Event()
    seen: list[object] = []

    def other() -> None:
        go.wait()
        seen.extend(pkeys.probe(buffer) for buffer in buffers)
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    try:
        with buffers[7].unlocked():
            go.set()
            done.wait(30)
            assert pkeys.probe(buffers[7]) is None
        thread.join()
        assert all(fault is not None for fault in seen)
    finally:
        for buffer in buffers:
            buffer.close()


def test_raw_key_exhaustion_says_what_to_do():
    buffer = pkeys.ProtectedBuffer(8, secretmem=False)
    buffer.write(b"holdskey")  # the pool holds one key now
    keys = allocate_until_enospc(pkeys.Key)
    try:
        with pytest.raises(OSError) as exhausted:
            pkeys.Key()
        message = str(exhausted.value)
        assert exhausted.value.errno == errno.ENOSPC
        assert f"all 15 protection keys are in use ({len(keys) + 1} by pkeys" in message
        assert "1 of them shared by ProtectedBuffers" in message and "by other code" in message
        assert "key=k" in message and "virtual keys" in message
        # Buffers still work: they evict among the keys the pool has.
        others = [pkeys.ProtectedBuffer(8, secretmem=False) for _ in range(3)]
        for other in others:
            other.write(b"evicting")
        out = bytearray(8)
        buffer.readinto(out)
        assert out == b"holdskey"
        for other in others:
            other.close()
    finally:
        for key in keys:
            key.close()
        buffer.close()


def test_with_every_key_taken_a_buffer_reports_exhaustion_and_recovers():
    keys = allocate_until_enospc(pkeys.Key)
    buffer = pkeys.ProtectedBuffer(8, secretmem=False)
    try:
        with pytest.raises(OSError, match="all 15 protection keys are in use"):
            buffer.write(b"nokeyyet")
        assert closed(buffer)
        keys.pop().close()
        buffer.write(b"now one!")
        out = bytearray(8)
        buffer.readinto(out)
        assert out == b"now one!"
    finally:
        buffer.close()
        for key in keys:
            key.close()


def test_idle_pool_keys_can_be_given_back(limit):
    from pkeys._buffer import release_idle_virtual_keys

    buffers = [pkeys.ProtectedBuffer(8, secretmem=False) for _ in range(3)]
    for buffer in buffers:
        buffer.write(b"12345678")
    with buffers[0].unlocked():
        assert release_idle_virtual_keys() == 2  # the one in use keeps its key
        assert pkeys.virtual_key_stats()["keys"] == 1
    assert all(buffer.pkey is None for buffer in buffers[1:])
    for buffer in buffers:
        buffer.close()
    with pytest.raises(pkeys.ArgumentError):
        limit(0)
    with pytest.raises(pkeys.ArgumentError):
        limit(16)


def test_a_pool_key_is_not_the_callers_to_tag_or_free(page):
    """A pool key tagged onto the caller's memory outlived its buffer: the
    buffer's close could not free it while that memory was tracked."""
    buffer = pkeys.ProtectedBuffer(40, secretmem=False)
    buffer.write(b"x" * 40)
    pool_key = buffer.pkey
    assert pool_key is not None and pool_key in pkeys.virtual_key_stats()["pkeys"]
    keys = pkeys.allocated_keys()
    for call in (lambda: pkeys.pkey_mprotect(page, None, pkeys.PROT_READ, pool_key),
                 lambda: pkeys.pkey_free(pool_key)):
        with pytest.raises(pkeys.InvalidKeyError, match="virtual keys"):
            call()
        assert pkeys.allocated_keys() == keys
        assert pkeys.probe(page, write=True) is None  # untouched: still read-write, key 0
    buffer.close()
    assert pool_key not in pkeys.allocated_keys()
    assert pkeys.virtual_key_stats()["keys"] == 0


def test_a_pool_key_whose_free_was_refused_goes_with_the_memory_that_held_it():
    """What the refusal above prevents, made through the internal layer: the
    pool key stays while the region holds it, and is freed as soon as
    neither the buffer nor the region exists (not when a later buffer
    happens to reuse it)."""
    from pkeys import _api
    from pkeys._binding import lib

    other = mmap.mmap(-1, mmap.PAGESIZE)
    buffer = pkeys.ProtectedBuffer(40, secretmem=False)
    buffer.write(b"x" * 40)
    pool_key = buffer.pkey
    _api.tag(other, None, pkeys.PROT_READ, pool_key, lib.pk_key_identity(pool_key))
    buffer.close()
    assert pool_key in pkeys.allocated_keys()  # the region still holds it
    other.close()
    del other  # the last reference: the region goes with it
    assert pool_key not in pkeys.allocated_keys()
    assert pkeys.virtual_key_stats()["keys"] == 0


def test_a_cold_open_costs_more_than_a_hot_one_but_stays_bounded():
    """Not a benchmark (see `pkeys bench`): a sanity bound that eviction is
    a few syscalls, not a scan of every buffer."""
    buffers = [pkeys.ProtectedBuffer(16, secretmem=False) for _ in range(200)]
    try:
        start = time.perf_counter()
        for buffer in buffers:  # 200 cold opens, each evicting
            with buffer.unlocked():
                pass
        cold = (time.perf_counter() - start) / len(buffers)
        assert cold < 0.05
    finally:
        for buffer in buffers:
            buffer.close()


def test_uses_racing_with_close_get_errors_never_freed_memory():
    """close() from one thread while others keep using the buffer: each use
    either runs, or is refused (BufferError while in use, PkeysError once
    closed); the buffer's record outlives every caller."""
    for _ in range(20):
        buffer = pkeys.ProtectedBuffer(16, secretmem=False)
        buffer.write(content(1))
        outcomes: list[str] = []

        def user(buffer: pkeys.ProtectedBuffer = buffer, outcomes: list[str] = outcomes) -> None:
            out = bytearray(16)
            for _ in range(200):
                try:
                    buffer.readinto(out)
                    assert out == content(1)
                    outcomes.append("read")
                except pkeys.PkeysError as exc:
                    assert "closed" in str(exc)
                    outcomes.append("closed")
                    return

        threads = [threading.Thread(target=user) for _ in range(3)]
        for thread in threads:
            thread.start()
        while True:
            try:
                buffer.close()
                break
            except BufferError:
                continue  # a read was under way: try again
        for thread in threads:
            thread.join(30)
        assert buffer.closed and outcomes


@pytest.mark.pku
def test_a_thread_started_inside_a_block_cannot_read_the_next_holder_of_the_key():
    limit = pkeys.virtual_key_limit()
    buffers = [pkeys.ProtectedBuffer(16, label=f"v{i}", secretmem=False) for i in range(limit + 1)]
    first = buffers[0]
    ready, go, seen = threading.Event(), threading.Event(), []

    def late_reader(address_box: list[int]) -> None:
        ready.set()
        go.wait(30)
        seen.append(pkeys.probe(address_box[0]))

    try:
        with first.unlocked():
            pkey = first.pkey
            box: list[int] = []
            thread = threading.Thread(target=late_reader, args=(box,))
            thread.start()  # copies the open register for pkey
        ready.wait(30)
        # Open the others until the pool hands first's key to another buffer.
        for other in buffers[1:]:
            with other.unlocked():
                if other.pkey == pkey:
                    box.append(other.address)
                    break
        assert box, "the pool never reused the key"
        go.set()
        thread.join(30)
        assert seen[0] is not None, "a thread born in the old holder's block read the new one"
    finally:
        go.set()
        for buffer in buffers:
            buffer.close()
