"""Protected buffers through multiprocessing (docs/sharing.md), with the
spawn, forkserver and fork start methods: a Pool initializer, a task's
argument, and ``ProcessPoolExecutor(initializer=...)``.  Every payload that
multiprocessing pickles or unpickles in this process is recorded and
searched for the secret: only descriptors cross.  ``anybackend``: natively
and on the emulated PKU CPU, 6.1 and 6.12."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import reduction
from typing import Any

import pytest

import pkeys
from pkeys import _secretmem

from . import _sharing
from ._process import fork_while_held
from ._sharing import deadline, fingerprint, holdings

pytestmark = [
    pytest.mark.anybackend,
    pytest.mark.skipif(not _secretmem.availability()[0],
                       reason=f"no secretmem: {_secretmem.availability()[1]}"),
]
METHODS = ["spawn", "forkserver", "fork"]


class Recorder:
    """Keeps every byte that multiprocessing's pickler writes or its
    unpickler reads in this process: spawn's preparation data and process
    object, forkserver's, every task, result and initializer argument."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.crossed = bytearray()
        recorder = self
        original_init = reduction.ForkingPickler.__init__
        original_loads = reduction.ForkingPickler.loads

        class Tee:
            def __init__(self, file: Any) -> None:
                self.file = file

            def write(self, data: Any) -> Any:
                recorder.crossed += data
                return self.file.write(data)

        def recording_init(pickler: Any, file: Any, *args: Any) -> None:
            original_init(pickler, Tee(file), *args)

        def recording_loads(data: Any, *args: Any, **kwargs: Any) -> Any:
            recorder.crossed += data
            return original_loads(data, *args, **kwargs)

        monkeypatch.setattr(reduction.ForkingPickler, "__init__", recording_init)
        monkeypatch.setattr(reduction.ForkingPickler, "loads", recording_loads)

    def holds(self, buffer: pkeys.ProtectedBuffer) -> bool:
        return _sharing.holds_secret(buffer, bytes(self.crossed))


def _secret_fds_settled(expected: int) -> int:
    """multiprocessing's resource sharer (a thread of this process) closes
    its duplicate just after the worker took it: wait for that, bounded."""
    until = time.monotonic() + 10
    while _sharing.secret_fds() > expected and time.monotonic() < until:
        time.sleep(0.01)
    return _sharing.secret_fds()


@pytest.fixture
def secret():
    buffer = pkeys.ProtectedBuffer(32, on_fork="shared", label="mp")
    with open("/dev/urandom", "rb", buffering=0) as source:
        buffer.read_from(source.fileno())
    yield buffer
    buffer.close()


@pytest.mark.parametrize("method", METHODS)
@deadline
def test_a_pool_initializer_and_task_get_the_pages_and_no_byte(method, secret, monkeypatch):
    before = holdings()
    recorder = Recorder(monkeypatch)
    expected = fingerprint(secret)
    context = multiprocessing.get_context(method)
    with context.Pool(2, initializer=_sharing.keep, initargs=(secret,)) as pool:
        kept = pool.map(_sharing.describe_kept, range(4), chunksize=1)
        passed = pool.apply(_sharing.use_and_close, (secret,))
        pool.close()
        pool.join()
    for seen in kept:
        assert seen["fingerprint"] == expected
        assert seen["unreadable"], "a worker's /proc/self/mem read the shared pages"
        assert seen["on_fork"] == "shared"
    assert passed["fingerprint"] == expected and passed["unreadable"]
    # Closing in the worker gave back its mapping and descriptor there.
    assert passed["mappings_freed"] == 1 and passed["fds_freed"] == 1
    assert not recorder.holds(secret)
    assert len(recorder.crossed) > 0 or method == "fork"
    # Nothing of the workers' is left here, and the buffer still works.
    assert _secret_fds_settled(before[1]) == before[1]
    assert holdings() == before
    assert fingerprint(secret) == expected


@pytest.mark.parametrize("method", METHODS)
@deadline
def test_a_process_pool_executor_initializer_gets_the_pages_and_no_byte(method, secret,
                                                                      monkeypatch):
    before = holdings()
    recorder = Recorder(monkeypatch)
    expected = fingerprint(secret)
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(1, mp_context=context, initializer=_sharing.keep,
                             initargs=(secret,)) as executor:
        seen = executor.submit(_sharing.describe_kept).result(timeout=100)
    assert seen["fingerprint"] == expected and seen["unreadable"]
    assert seen["pid"] != os.getpid()
    assert not recorder.holds(secret)
    assert _secret_fds_settled(before[1]) == before[1]
    assert holdings() == before


@deadline
def test_an_anonymous_buffer_never_crosses_multiprocessing():
    with pkeys.ProtectedBuffer(16, secretmem=False) as anonymous:
        with pytest.raises(pkeys.ArgumentError, match="use secret memory"):
            reduction.ForkingPickler.dumps(anonymous)
        process = multiprocessing.get_context("spawn").Process(target=_sharing.keep,
                                                               args=(anonymous,))
        with pytest.raises(pkeys.ArgumentError, match="use secret memory"):
            process.start()
        context = multiprocessing.get_context("fork")
        with (context.Pool(1) as pool,
              pytest.raises(pkeys.ArgumentError, match="use secret memory")):
            pool.apply(_sharing.use_and_close, (anonymous,))
        # Plain pickle refuses every buffer, shared or not.
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(anonymous)


@deadline
def test_the_recorder_finds_the_secret_when_its_bytes_do_cross(secret, monkeypatch):
    recorder = Recorder(monkeypatch)
    copied = bytearray(len(secret))   # the anti-pattern, to show the recorder sees it
    secret.readinto(copied)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(len, (copied,)) == len(secret)
    assert recorder.holds(secret)
    copied[:] = bytes(len(copied))


def _blocked_signals(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/status") as status:
        for line in status:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    raise AssertionError("no SigBlk line")


@deadline
def test_a_task_argument_leaves_revocation_working_in_this_process(secret):
    # A buffer sent outside a process start goes through pkeys' descriptor
    # sharer, not multiprocessing's resource sharer, whose thread blocks
    # every signal and so would stop every later revocation here.
    from multiprocessing import resource_sharer


    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_sharing.use_and_close, (secret,))["fingerprint"] == fingerprint(secret)
    assert resource_sharer._resource_sharer._listener is None
    sharers = [t for t in threading.enumerate() if t.name == "pkeys-descriptor-sharer"]
    assert len(sharers) == 1
    assert _blocked_signals(sharers[0].native_id) == _blocked_signals(threading.get_native_id())
    with pkeys.Key() as key:
        key.revoke()          # reaches every thread, the sharer's included
        with pkeys.allow(key):
            pass


@deadline
def test_a_fork_while_another_thread_offers_leaves_the_child_able_to_offer(secret):
    # Another thread holds the sharer's lock (as offer() does) at the fork:
    # the child, whose copy of that thread never runs, must still offer.
    from pkeys import _share

    reduction.ForkingPickler.loads(reduction.ForkingPickler.dumps(secret)).close()

    def offer() -> None:
        reduction.ForkingPickler.loads(reduction.ForkingPickler.dumps(secret)).close()

    status = fork_while_held(_share._sharer._lock, offer)
    assert status == 0  # not SIGALRM: the child's offer did not hang
