"""Rights for every thread at once: ``Key.revoke()``,
``pkey_set(..., threads="all")`` and the revoking ``pkey_free``.

On hardware these signal every thread and edit the PKRU saved in its
signal frame; on the software backend the rights are process-wide already.
The same tests hold on both (``anybackend``); the ones about signals are
``pku`` only.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import pkeys
from pkeys._binding import lib
from pkeys._child import run_in_child

pytestmark = pytest.mark.anybackend
HARDWARE = pkeys.backend() == "hardware"
DENIED_KIND = pkeys.FaultKind.PKEY if HARDWARE else pkeys.FaultKind.PROTECTION


class Crowd:
    """``count`` threads parked inside ``block()``; each probes ``target``
    when asked and reports what it saw."""

    def __init__(self, count: int, block, target) -> None:
        self.target = target
        self.inside = threading.Barrier(count + 1)
        self.ask, self.leave = threading.Event(), threading.Event()
        self.answers: dict[int, object] = {}
        self.exited: dict[int, object] = {}
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i, block)) for i in range(count)]
        for thread in self.threads:
            thread.start()
        self.inside.wait(30)

    def _run(self, index: int, block) -> None:
        try:
            with block():
                self.inside.wait(30)
                assert self.ask.wait(30)
                self.answers[index] = pkeys.probe(self.target)
                assert self.leave.wait(30)
            self.exited[index] = pkeys.probe(self.target)
        except BaseException as exc:  # noqa: BLE001 - checked by finish()
            self.errors.append(exc)

    def probe_all(self) -> dict[int, object]:
        self.ask.set()
        deadline = time.monotonic() + 30
        while len(self.answers) + len(self.errors) < len(self.threads):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        return dict(self.answers)

    def finish(self) -> dict[int, object]:
        self.ask.set()
        self.leave.set()
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive()
        if self.errors:
            raise self.errors[0]
        return dict(self.exited)


def test_revoke_reaches_sixteen_threads_inside_allow(key, page):
    key.protect(page)
    crowd = Crowd(16, key.allow, page)
    started = time.monotonic()
    key.revoke(timeout=10)
    elapsed = time.monotonic() - started
    seen = crowd.probe_all()
    assert len(seen) == 16
    assert all(f is not None and f.kind is DENIED_KIND for f in seen.values()), seen
    # Their scopes were open during the revocation: ending them re-grants nothing.
    after = crowd.finish()
    assert all(f is not None for f in after.values())
    assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS
    assert elapsed < 10


def test_a_thread_touching_revoked_memory_dies_of_sigsegv(key, page):
    key.protect(page)

    def child() -> None:
        ready, go = threading.Event(), threading.Event()

        def reader() -> None:
            with key.allow():
                ready.set()
                go.wait(30)
                page[0]  # revoked meanwhile: this access must fault

        thread = threading.Thread(target=reader)
        thread.start()
        ready.wait(30)
        key.revoke()
        go.set()
        thread.join(30)

    result = run_in_child(child)
    assert result.segfaulted, result.describe()


def test_scopes_entered_after_a_revocation_grant_again(key, page):
    key.protect(page)
    with key.allow():
        key.revoke()
        assert pkeys.probe(page) is not None  # this thread's own scope lost its grant
        with key.allow():
            assert pkeys.probe(page, write=True) is None  # a new scope grants
        assert pkeys.probe(page) is not None
    assert pkeys.probe(page) is not None  # and the old one re-granted nothing
    with key.allow():
        assert pkeys.probe(page, write=True) is None


def test_pkey_set_for_all_threads_opens_them_too(key, page):
    key.protect(page)
    ready, go, seen = threading.Event(), threading.Event(), []

    def worker() -> None:
        ready.set()
        go.wait(30)
        seen.append(pkeys.probe(page, write=True))

    thread = threading.Thread(target=worker)
    thread.start()
    ready.wait(30)
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_WRITE, threads="all")
    go.set()
    thread.join(30)
    assert seen[0] is not None and pkeys.probe(page) is None  # read-only everywhere
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS, threads="all")


def test_threads_argument_is_checked(key):
    with pytest.raises(pkeys.ArgumentError, match="threads"):
        pkeys.pkey_set(key, 0, threads="some")
    with pytest.raises(pkeys.InvalidKeyError):
        pkeys.pkey_set(0, 1, threads="all")
    with pytest.raises(pkeys.ArgumentError):
        pkeys.pkey_set(key, 7, threads="all")
    assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS  # nothing changed


def test_a_thread_created_during_the_broadcast_ends_up_revoked(key, page):
    key.protect(page)
    stop, revoked = threading.Event(), threading.Event()
    late_answers: list[object] = []
    spawned: list[threading.Thread] = []

    def child_thread() -> None:
        # Created by a thread that had access: it copied that register.
        revoked.wait(30)
        late_answers.append(pkeys.probe(page))

    def spawner() -> None:
        with key.allow():
            while not stop.is_set():
                thread = threading.Thread(target=child_thread)
                thread.start()
                spawned.append(thread)
                time.sleep(0.0005)

    creator = threading.Thread(target=spawner)
    creator.start()
    while len(spawned) < 3:
        time.sleep(0.001)
    key.revoke(timeout=10)
    revoked.set()
    stop.set()
    creator.join(30)
    for thread in spawned:
        thread.join(30)
    # Every thread that existed when revoke() returned is denied; those made
    # after it copied an already revoked register.
    assert late_answers and all(answer is not None for answer in late_answers)


def test_a_reused_number_inherits_nothing_in_any_thread(page):
    first = pkeys.Key(rights=0)  # every thread made below may use it
    ready, go, seen = threading.Event(), threading.Event(), []

    def worker() -> None:
        ready.set()
        go.wait(30)
        seen.append((pkeys.pkey_get(second.pkey), pkeys.probe(page)))

    thread = threading.Thread(target=worker)
    thread.start()
    ready.wait(30)
    number = first.pkey
    first.close()
    second = pkeys.Key(rights=0)  # open in this thread only
    try:
        assert second.pkey == number
        second.protect(page)
        go.set()
        thread.join(30)
        rights, fault = seen[0]
        if HARDWARE:
            assert rights == pkeys.PKEY_DISABLE_ACCESS and fault is not None
        else:
            assert rights == 0 and fault is None  # process-wide: its creator opened it
    finally:
        pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
        second.close()


@pytest.mark.pku
def test_a_thread_blocking_the_signal_is_named(key):
    signo = lib.pk_revocation_signal()
    ready, go, tid = threading.Event(), threading.Event(), []

    def blocker() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signo})
        tid.append(threading.get_native_id())
        ready.set()
        go.wait(30)
        # Unblocking delivers the pending signal: the change arrives late.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signo})
        tid.append(pkeys.pkey_get(key))

    pkeys.pkey_set(key, 0)
    thread = threading.Thread(target=blocker)
    thread.start()
    ready.wait(30)
    try:
        with pytest.raises(pkeys.RevocationError) as info:
            key.revoke(timeout=0.3)
        assert info.value.unanswered == (tid[0],)
        assert str(tid[0]) in str(info.value)
        assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS  # applied here
    finally:
        go.set()
        thread.join(30)
    assert tid[1] == pkeys.PKEY_DISABLE_ACCESS


@pytest.mark.pku
def test_closing_is_refused_while_a_thread_has_not_answered():
    key = pkeys.Key()
    signo = lib.pk_revocation_signal()
    ready, go = threading.Event(), threading.Event()

    def blocker() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signo})
        ready.set()
        go.wait(30)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signo})

    thread = threading.Thread(target=blocker)
    thread.start()
    ready.wait(30)
    try:
        with pytest.raises(pkeys.RevocationError, match="stays allocated"):
            pkeys._api.free_key(key.pkey, key.identity, timeout=0.3)
        assert key.pkey in pkeys.allocated_keys()
    finally:
        go.set()
        thread.join(30)
    key.close()


@pytest.mark.pku
def test_the_signal_frame_edit_works_on_this_kernel():
    assert lib.pk_revocation_selftest() == 1


def test_revocations_during_blocking_io_lose_nothing(key):
    count = 1000 if not pkeys._select.emulated() else 200
    stop = threading.Event()
    errors: list[BaseException] = []
    received: list[bytes] = []
    read_end, write_end = os.pipe()
    message = bytes(range(256)) * 16

    def reader() -> None:
        try:
            total = b""
            while len(total) < len(message) * 20:
                total += os.read(read_end, 65536)  # blocks; the signal must not break it
            received.append(total)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer() -> None:
        try:
            for _ in range(20):
                time.sleep(0.002)
                os.write(write_end, message)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def sleeper() -> None:
        try:
            while not stop.is_set():
                started = time.monotonic()
                time.sleep(0.01)
                assert time.monotonic() - started >= 0.0099  # not cut short
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    threads += [threading.Thread(target=sleeper) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(count):
            key.revoke(timeout=10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        os.close(read_end)
        os.close(write_end)
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert not errors, repr(errors[0])
    assert received == [message * 20]
