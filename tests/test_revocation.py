"""Rights for every thread at once: ``Key.revoke()``,
``pkey_set(..., threads="all")`` and the revoking ``pkey_free``.

On hardware these signal every thread and edit the PKRU saved in its
signal frame; on the software backend the rights are process-wide already.
The same tests hold on both (``anybackend``); the ones about signals are
``pku`` only.
"""

from __future__ import annotations

import faulthandler
import fcntl
import os
import re
import signal
import threading
import time

import pytest

import pkeys
import pkeys.doctor
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
        with key.allow():  # it had the key: it must answer (a thread that
            pass           # never had it is left out: test_revocation_exemption)
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
    assert lib.pk_revocation_check() == 0
    assert pkeys.doctor.collect()["revocation"]["works"]


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


# -- regressions found by trying to break it --------------------------------
def test_revoking_one_key_leaves_another_key_of_a_later_thread_alone(key, page):
    key.protect(page)
    pkeys.pkey_set(key, 0, threads="all")  # a revocation stamp older than the thread below
    other = pkeys.Key()
    ready, go, seen = threading.Event(), threading.Event(), []

    def worker() -> None:
        pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)  # this thread closes it for itself
        ready.set()
        go.wait(30)
        seen.append((pkeys.pkey_get(key), pkeys.probe(page)))

    thread = threading.Thread(target=worker)
    thread.start()
    ready.wait(30)
    other.revoke()  # an unrelated key
    go.set()
    thread.join(30)
    other.close()
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS, threads="all")
    rights, fault = seen[0]
    assert rights == pkeys.PKEY_DISABLE_ACCESS and fault is not None


@pytest.mark.parametrize("close", ["pkey_set", "wrpkru"])
@pytest.mark.parametrize("write", [True, False], ids=["allow", "read-only"])
def test_a_key_closed_after_a_revocation_stays_closed_when_the_old_scope_ends(key, page,
                                                                            close, write):
    # A scope open across a revocation to "open", then this thread closes the
    # key: the old scope's end re-grants nothing, and the rights set after the
    # revocation stand (its end applied the revocation's rights over them).
    key.protect(page)
    scope = key.allow(write=write)
    with scope:
        pkeys.pkey_set(key, 0, threads="all")
        if close == "pkey_set" or not HARDWARE:
            pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)
        else:
            pkeys.wrpkru(pkeys.rdpkru() | pkeys.PKEY_DISABLE_ACCESS << 2 * key.pkey)
        assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS
    assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS
    fault = pkeys.probe(page)
    assert fault is not None and fault.kind is DENIED_KIND, fault


def test_a_scope_begun_after_a_revocation_survives_other_revocations(key, page):
    key.protect(page)
    key.revoke()

    def reader():
        with key.allow():
            yield
            yield pkeys.probe(page)

    first, second = reader(), reader()
    next(first)
    other = pkeys.Key()
    other.revoke()
    next(second)
    first.close()  # ends first: the second is still inside its block
    assert next(second) is None
    second.close()
    other.close()
    assert pkeys.probe(page) is not None


@pytest.mark.pku
@pytest.mark.parametrize("racer", ["pkey_set", "probe"])
def test_a_revocation_survives_a_racing_register_write(key, page, racer):
    key.protect(page)
    other = pkeys.Key()
    closed = __import__("mmap").mmap(-1, 4096, prot=0)
    stop, registers = threading.Event(), []

    def race() -> None:
        i = 0
        while not stop.is_set():
            if racer == "pkey_set":
                pkeys.pkey_set(other, i & 1)  # reads PKRU, writes it back in C
            else:
                pkeys.probe(closed)  # restores its saved PKRU after the fault
            registers.append(pkeys.rdpkru())
            i += 1

    thread = threading.Thread(target=race)
    thread.start()
    try:
        for _ in range(200 if not pkeys._select.emulated() else 60):
            pkeys.pkey_set(key, 0, threads="all")
            key.revoke()
            mark = len(registers)
            while len(registers) < mark + 3:
                time.sleep(0)
            bits = (registers[-1] >> (2 * key.pkey)) & 3
            assert bits & pkeys.PKEY_DISABLE_ACCESS, f"the racing thread reopened pkey {key.pkey}"
    finally:
        stop.set()
        thread.join(30)
        other.close()
        closed.close()


def test_threads_that_exited_do_not_stall_a_revocation(key):
    for _ in range(10):
        threads = [threading.Thread(target=lambda: None) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        started = time.monotonic()
        key.revoke(timeout=2)
        assert time.monotonic() - started < 1.5


def test_a_forked_child_drops_grants_its_own_record_cannot_vouch_for(key, page):
    key.protect(page)
    scope = key.allow()
    scope.__enter__()
    key.revoke()  # voids this thread's grant...
    scope.__exit__(None, None, None)  # ...so its exit withdraws nothing
    ready, go = threading.Event(), threading.Event()

    def holder() -> None:
        with key.allow():
            ready.set()
            go.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    ready.wait(30)
    try:
        def child() -> None:
            assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS
            assert pkeys.probe(page) is not None

        result = run_in_child(child)
        assert result.exitcode == 0, result.stderr
    finally:
        go.set()
        thread.join(30)


def blocked_signals(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk for thread {tid}")


def wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


class HandlerHeld:
    """A thread T that has ``key`` open (in ``allow()``) and is held inside
    faulthandler's SIGUSR1 handler, which blocks writing its traceback to a
    pipe that is already full.  ``release()`` drains the pipe: the handler
    returns, and its sigreturn restores the register its frame saved.

    ``chain=True`` registers it as ``faulthandler.register(..., chain=True)``
    does: SA_NODEFER and an empty mask, so the handler blocks no signal and
    only its frame on the stack shows that T is inside it (a Python handler
    for SIGUSR1 is installed first, which the chained call then runs)."""

    USR1 = 1 << (signal.SIGUSR1 - 1)

    def __init__(self, key: pkeys.Key, page, chain: bool = False) -> None:
        self.key, self.page, self.chain = key, page, chain
        self.previous = signal.signal(signal.SIGUSR1, lambda signo, frame: None) if chain else None
        self.read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, fcntl.F_SETFL, os.O_NONBLOCK)
        try:
            while True:
                os.write(write_end, b"x" * 4096)
        except BlockingIOError:
            pass
        fcntl.fcntl(write_end, fcntl.F_SETFL, 0)
        fcntl.fcntl(self.read_end, fcntl.F_SETFL, os.O_NONBLOCK)
        self.writer = os.fdopen(write_end, "wb", buffering=0)
        faulthandler.register(signal.SIGUSR1, file=self.writer, all_threads=False, chain=chain)
        self.ready, self.go = threading.Event(), threading.Event()
        self.seen: list[object] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.ready.wait(30)
        self.tid = self.thread.native_id
        assert self.tid is not None
        signal.pthread_kill(self.thread.ident, signal.SIGUSR1)
        wait_for(self.in_handler, "T to enter the handler")

    def in_handler(self) -> bool:
        if not self.chain:
            return bool(blocked_signals(self.tid) & self.USR1)
        # Blocked in write(2) on the full pipe: /proc's syscall file gives
        # the number (1 on x86-64) and the first argument, the descriptor.
        with open(f"/proc/self/task/{self.tid}/syscall", encoding="ascii") as current:
            fields = current.read().split()
        return fields[:2] == ["1", hex(self.writer.fileno())]

    def _run(self) -> None:
        try:
            with self.key.allow():
                assert pkeys.probe(self.page) is None
                self.ready.set()
                assert self.go.wait(60)  # the handler runs inside this wait
                self.seen.append((pkeys.rdpkru(), pkeys.probe(self.page)))
        except BaseException as exc:  # noqa: BLE001 - checked by finish()
            self.errors.append(exc)

    def release(self) -> None:
        def drained() -> bool:
            try:
                while os.read(self.read_end, 65536):
                    pass
            except BlockingIOError:
                pass
            return not self.in_handler()

        wait_for(drained, "the handler to return")

    def finish(self) -> tuple[int, object]:
        self.go.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        faulthandler.unregister(signal.SIGUSR1)
        if self.chain:
            signal.signal(signal.SIGUSR1, self.previous)
        self.writer.close()
        os.close(self.read_end)
        if self.errors:
            raise self.errors[0]
        rights, fault = self.seen[0]
        return rights, fault


@pytest.fixture
def alarm():
    """A test that could hang fails instead, after two minutes."""
    def expired(signo: int, frame: object) -> None:
        raise AssertionError("timed out (SIGALRM)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.pku
@pytest.mark.parametrize("chain", [False, True], ids=["masked", "nodefer"])
def test_a_revocation_of_a_thread_inside_another_handler_fails_closed(key, page, alarm, chain):
    # Issue 15 item 1: the outer handler's sigreturn would restore the open
    # register; the revocation must not report success meanwhile.  With
    # chain=True the handler blocks no signal: only its frame shows it.
    key.protect(page)
    try:
        held = HandlerHeld(key, page, chain=chain)
        try:
            with pytest.raises(pkeys.RevocationError) as info:
                key.revoke(timeout=0.5)
            assert info.value.in_handler == (held.tid,)
            # faulthandler's handler takes no siginfo: its frame has no signal number.
            named = "in a signal handler" if chain else "in a SIGUSR1 handler"
            assert str(held.tid) in str(info.value) and named in str(info.value)
        finally:
            held.release()
        key.revoke(timeout=10)  # outside the handler now: this one holds
        rights, fault = held.finish()
        assert (rights >> (2 * key.pkey)) & pkeys.PKEY_DISABLE_ACCESS
        assert fault is not None and fault.kind is DENIED_KIND
    finally:
        pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)


@pytest.mark.pku
def test_a_key_closed_while_a_thread_is_inside_another_handler_stays_allocated(page, alarm):
    first = pkeys.Key()
    first.protect(page)
    number = first.pkey
    try:
        held = HandlerHeld(first, page)
        try:
            pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
            with pytest.raises(pkeys.RevocationError, match="stays allocated") as info:
                first.close()
            assert info.value.in_handler == (held.tid,)
            assert number in pkeys.allocated_keys()
            second = pkeys.Key()  # cannot get the number T may still hold
            assert second.pkey != number
        finally:
            held.release()
        second.close()  # every revocation fails while T is in the handler
        first.close()
        rights, _ = held.finish()
        assert (rights >> (2 * number)) & pkeys.PKEY_DISABLE_ACCESS
    finally:
        if not first.closed:
            first.close()


@pytest.mark.pku
def test_a_revocation_waits_for_a_handler_that_returns_in_time(key, page, alarm):
    key.protect(page)
    try:
        held = HandlerHeld(key, page)
        # Whether the drain comes before the broadcast or during it, the
        # revocation must hold in T once it returns.
        drainer = threading.Timer(0.2, held.release)
        drainer.start()
        key.revoke(timeout=30)
        drainer.join(30)
        rights, fault = held.finish()
        assert (rights >> (2 * key.pkey)) & pkeys.PKEY_DISABLE_ACCESS
        assert fault is not None and fault.kind is DENIED_KIND
    finally:
        pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)


@pytest.fixture
def broken_frame_edit():
    """The self-check made to fail, as on a kernel whose signal path does
    not install an edited PKRU; checked again afterwards."""
    lib.pk_test_force_revocation_check(0)
    yield
    lib.pk_test_force_revocation_check(-1)
    assert lib.pk_revocation_check() == 0


@pytest.fixture
def another_thread():
    """A thread that a revocation has to reach."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(60,))
    thread.start()
    yield thread
    stop.set()
    thread.join(30)


@pytest.mark.pku
def test_every_revocation_path_refuses_where_the_frame_edit_fails(key, broken_frame_edit,
                                                                   another_thread):
    release = re.escape(os.uname().release)
    with pytest.raises(pkeys.UnsupportedError, match=f"this kernel \\({release}\\)"):
        key.revoke()
    with pytest.raises(pkeys.UnsupportedError, match=release):
        pkeys.pkey_set(key, pkeys.PKEY_DISABLE_WRITE, threads="all")
    other = pkeys.Key()
    with pytest.raises(pkeys.UnsupportedError, match=release):
        other.close()
    assert other.pkey in pkeys.allocated_keys()  # not handed out again
    report = pkeys.doctor._revocation_status()
    assert not report["works"] and os.uname().release in report["reason"]
    lib.pk_test_force_revocation_check(-1)
    other.close()


@pytest.mark.pku
def test_a_pool_key_is_not_reused_where_the_frame_edit_fails(limit_one, broken_frame_edit,
                                                             another_thread):
    first, second = limit_one
    with pytest.raises(pkeys.UnsupportedError, match=re.escape(os.uname().release)):
        second.write(b"second!!")  # would give first's key, used before, to second
    lib.pk_test_force_revocation_check(-1)
    second.write(b"second!!")


@pytest.fixture
def limit_one():
    """A virtual-key pool of one key, already given to (and used by) a first
    buffer: the next buffer's use evicts it and revokes the key first."""
    saved = pkeys.virtual_key_limit()
    pkeys.virtual_key_limit(1)
    first, second = (pkeys.ProtectedBuffer(8, secretmem=False) for _ in range(2))
    first.write(b"first!!!")
    yield first, second
    first.close()
    second.close()
    pkeys.virtual_key_limit(saved)


@pytest.mark.pku
def test_a_pool_eviction_names_a_thread_that_blocks_the_signal(limit_one):
    first, second = limit_one
    signo = lib.pk_revocation_signal()
    ready, go = threading.Event(), threading.Event()

    def blocker() -> None:
        with first.unlocked():  # it had the pool key: it must answer
            pass
        signal.pthread_sigmask(signal.SIG_BLOCK, {signo})
        ready.set()
        go.wait(60)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signo})

    thread = threading.Thread(target=blocker, name="blocker")
    thread.start()
    ready.wait(30)
    try:
        with pytest.raises(pkeys.RevocationError) as info:
            second.write(b"second!!")
        assert info.value.unanswered == (thread.native_id,)
        assert f"{thread.native_id} (" in str(info.value)
        assert "dump_traceback_later" in str(info.value)
    finally:
        go.set()
        thread.join(30)
    second.write(b"second!!")
    out = bytearray(8)
    first.readinto(out)
    assert out == b"first!!!"


@pytest.mark.pku
def test_faulthandlers_watchdog_is_named_as_the_likely_cause(key):
    before = {thread for thread in os.listdir("/proc/self/task")}
    faulthandler.dump_traceback_later(600)
    try:
        watchdog = int(({thread for thread in os.listdir("/proc/self/task")} - before).pop())
        # It blocks every signal as its first step: wait for that step.  Not
        # just for the signal to show as blocked: a new thread starts with
        # every signal blocked, glibc's internal ones (32 and 33) included,
        # until glibc gives it its creator's mask, and a revocation sent in
        # that window is answered as soon as that happens (this test failed
        # half the time on a PKU host so).  faulthandler's mask
        # (pthread_sigmask of a full set) leaves glibc's two out.
        signo = lib.pk_revocation_signal()

        def watchdog_blocks_the_signal() -> bool:
            mask = blocked_signals(watchdog)
            return bool(mask >> (signo - 1) & 1) and not mask >> (32 - 1) & 1

        wait_for(watchdog_blocks_the_signal, "the watchdog to block signals")
        with pytest.raises(pkeys.RevocationError, match="dump_traceback_later") as info:
            key.revoke(timeout=0.3)
        assert info.value.unanswered == (watchdog,)
        assert "block it" in str(info.value)
    finally:
        faulthandler.cancel_dump_traceback_later()
    key.revoke()


def _handler_replaced(action: object) -> None:
    key = pkeys.Key()
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, args=(30,))
    other.start()
    try:
        key.revoke()  # installs pkeys' handler
        signal.signal(lib.pk_revocation_signal(), action)  # type: ignore[arg-type]
        try:
            key.revoke()
        except pkeys.RevocationError as error:
            assert "PKEYS_REVOKE_SIGNAL" in str(error), error
            assert signal_name_of(lib.pk_revocation_signal()) in str(error), error
        else:
            raise AssertionError("a revocation over a replaced handler reported success")
    finally:
        stop.set()
        other.join(30)


def signal_name_of(signo: int) -> str:
    return f"SIGRTMIN+{signo - signal.SIGRTMIN}"


@pytest.mark.pku
@pytest.mark.parametrize("action", ["default", "python"])
def test_a_replaced_revocation_handler_is_a_clear_error(action):
    replacement = signal.SIG_DFL if action == "default" else (lambda *_: None)
    result = run_in_child(lambda: _handler_replaced(replacement))
    assert result.signal is None and result.exitcode == 0, result.describe() + result.stderr


@pytest.mark.pku
def test_a_revocation_signal_taken_before_import_is_a_clear_error():
    import subprocess
    import sys

    script = (
        "import signal, sys\n"
        "signo = signal.SIGRTMAX - 3\n"
        "signal.signal(signo, lambda *_: None)\n"
        "import pkeys\n"
        "key = pkeys.Key()\n"
        "try:\n"
        "    key.revoke()\n"
        "except pkeys.RevocationError as error:\n"
        "    print(error)\n"
        "    sys.exit(0 if 'PKEYS_REVOKE_SIGNAL' in str(error) else 2)\n"
        "sys.exit(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PKEYS_REVOKE_SIGNAL"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SIGRTMIN+" in done.stdout and "EBUSY" not in done.stdout


@pytest.mark.pku
def test_signal_pause_returns_after_a_revocation_as_documented(key, alarm):
    # The README lists signal.pause() among the calls a revocation ends,
    # as any handled signal does: revoke until it has returned.
    returned = threading.Event()

    def revoker() -> None:
        while not returned.is_set():
            key.revoke(timeout=30)
            time.sleep(0.05)

    thread = threading.Thread(target=revoker)
    thread.start()
    try:
        signal.pause()
    finally:
        returned.set()
        thread.join(60)


@pytest.mark.pku
def test_a_scope_begun_before_the_signal_arrives_reopens_nothing_when_it_ends(key, page):
    """Issue 15, item 2, forced with a blocked signal instead of luck: the
    revocation is stamped while this thread is inside scope X; X ends (its
    grant is void, the register keeps the key open until the signal comes),
    scope Y begins with that open register, then the signal arrives and
    closes the key inside Y.  Y's end must not open it again: Y's base is
    the revocation's rights, not the register it began with."""
    signo = lib.pk_revocation_signal()
    key.protect(page)
    revoked, errors, after = threading.Event(), [], []

    def revoker() -> None:
        try:
            key.revoke(timeout=30)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)
        revoked.set()

    def victim() -> None:
        first = key.allow()
        first.__enter__()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signo})
        try:
            racer = threading.Thread(target=revoker)
            racer.start()
            deadline = time.monotonic() + 30
            while signo not in signal.sigpending():  # stamped, and signalled
                assert time.monotonic() < deadline
                time.sleep(0.001)
            first.__exit__(None, None, None)
            with key.allow():
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signo})  # the handler runs here
                assert revoked.wait(30)
            after.append(pkeys.pkey_get(key))
            after.append(pkeys.probe(page))
            racer.join(30)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signo})

    thread = threading.Thread(target=victim)
    thread.start()
    thread.join(60)
    assert not thread.is_alive() and not errors
    assert after[0] == pkeys.PKEY_DISABLE_ACCESS, "the scope's end reopened a revoked key"
    assert after[1] is not None and after[1].kind == DENIED_KIND


@pytest.mark.pku
def test_scopes_racing_with_revocations_leave_no_key_open_outside_them(key):
    """Issue 15, item 2, as reported: two threads loop over scopes while
    revocations come.  Outside its scopes, at a moment when no revocation is
    in flight, no thread may find the key open (pkey_get alone)."""
    stop, started, completed = threading.Event(), [0], [0]
    violations: list[tuple[int, int]] = []
    scopes = [0, 0]

    def loop(index: int) -> None:
        while not stop.is_set():
            with key.allow():
                pass
            scopes[index] += 1
            before, done = started[0], completed[0]
            rights = pkeys.pkey_get(key)
            if rights == 0 and before == done == started[0]:
                violations.append((index, done))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(40 if pkeys._select.emulated() else 200):
            time.sleep(0.02)
            started[0] += 1
            key.revoke(timeout=30)
            completed[0] += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert min(scopes) > 0
    assert not violations, f"key open outside every scope after revocations: {violations[:5]}"



# A trivial SA_ONSTACK handler on a guarded alternate stack of `size` bytes:
# the smallest size it survives is what the kernel's frame takes here.
TRIVIAL_ONSTACK_C = r"""
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
static void trivial(int signo) { (void)signo; }
int trivial_onstack(unsigned long size)
{
    char *base = mmap(0, size + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    stack_t stack = {.ss_sp = base + 4096, .ss_size = size, .ss_flags = 0};
    struct sigaction action;
    mprotect(base, 4096, PROT_NONE);
    sigaltstack(&stack, 0);
    memset(&action, 0, sizeof action);
    action.sa_handler = trivial;
    action.sa_flags = SA_ONSTACK;
    sigaction(SIGUSR2, &action, 0);
    raise(SIGUSR2);
    return 0;
}
"""

SMALL_ALTSTACK_THREAD = """
import ctypes, mmap, sys, threading, pkeys

libc = ctypes.CDLL(None, use_errno=True)


class StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


size = int(sys.argv[1])
area = mmap.mmap(-1, 4096 + size)
base = ctypes.addressof(ctypes.c_char.from_buffer(area))
assert libc.mprotect(ctypes.c_void_p(base), 4096, 0) == 0  # a guard page below it
ready, done = threading.Event(), threading.Event()


def parked() -> None:
    stack = StackT(base + 4096, 0, size)
    assert libc.sigaltstack(ctypes.byref(stack), None) == 0
    ready.set()
    done.wait()
    assert libc.sigaltstack(ctypes.byref(StackT(None, 2, 0)), None) == 0  # SS_DISABLE


thread = threading.Thread(target=parked)
thread.start()
ready.wait()
key = pkeys.Key()
for _ in range(20):
    key.revoke()
done.set()
thread.join()
key.close()
print("survived")
"""


@pytest.mark.pku
def test_a_thread_on_a_small_alternate_stack_survives_revocations(tmp_path):
    # The handler runs on the thread's alternate stack (SA_ONSTACK), where
    # the kernel's frame takes most of the room.  A buffer of the handler's
    # own (its stack scan's) needed 1.7 KiB there, and with less to spare
    # the process died of SIGSEGV; it needs about 400 bytes.  Measured
    # against what a trivial handler needs on this kernel and CPU, each try
    # in a child, since a failure kills the process.
    import shutil
    import subprocess
    import sys

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler for the reference handler")
    (tmp_path / "trivial.c").write_text(TRIVIAL_ONSTACK_C)
    library = tmp_path / "trivial.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(library),
                    str(tmp_path / "trivial.c")], check=True)

    def trivial_survives(size: int) -> bool:
        code = f"import ctypes; ctypes.CDLL({str(library)!r}).trivial_onstack({size})"
        return subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0

    low, high = 1024, 32768  # a trivial handler dies at `low`, survives at `high`
    assert trivial_survives(high)
    while high - low > 64:
        middle = (low + high) // 2 // 16 * 16
        low, high = (low, middle) if trivial_survives(middle) else (middle, high)
    size = high + 1024
    result = subprocess.run([sys.executable, "-c", SMALL_ALTSTACK_THREAD, str(size)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "survived" in result.stdout, (
        size, result.returncode, result.stderr[-2000:])


@pytest.mark.pku
@pytest.mark.parametrize("action", ["scope", "pkey_set"])
def test_a_thread_that_answered_a_close_cannot_reopen_the_key_before_it_is_freed(action, alarm):
    """Thread T answers the revocation that ``Key.close()`` makes, then opens
    the key while the close still waits for another thread.  Once the close
    returns, T must not have the key open: the number is free, and the next
    key to get it would be open in T.  (The key's identity used to be
    retired only after the broadcast, and T's scope kept the key open.)"""
    from tests._exemption import Blocker, _signalled, _wait_for

    key = pkeys.Key()
    number = key.pkey
    go, opened, closed = threading.Event(), threading.Event(), threading.Event()
    seen: list[object] = []

    def open_it() -> None:
        if action == "scope":
            with key.allow():
                opened.set()
                assert closed.wait(30)
                seen.append(pkeys.pkru.rights_of(pkeys.pkru.read(), number))
        else:
            pkeys.pkey_set(key, pkeys.PKEY_UNRESTRICTED)
            opened.set()

    def user() -> None:
        with key.allow():  # it has had the key: it is signalled, and answers
            pass
        assert go.wait(30)
        try:
            open_it()
        except pkeys.PkeysError as error:  # refused: as good
            seen.append(error)
            opened.set()
        assert closed.wait(30)
        seen.append(pkeys.pkru.rights_of(pkeys.pkru.read(), number))

    def scope() -> None:
        with key.allow():
            pass

    thread = threading.Thread(target=user, daemon=True)
    thread.start()
    blocker = Blocker(scope)  # had the key too: the close waits for it

    def release() -> None:
        _wait_for(lambda: _signalled(blocker.tid), "the blocker to be signalled")
        go.set()  # the close is under way, and waits for the blocker
        assert opened.wait(30)
        blocker.finish()  # it exits, and so counts as answered

    releaser = threading.Thread(target=release, daemon=True)
    releaser.start()
    key.close()
    closed.set()
    releaser.join(30)
    thread.join(30)
    assert number not in pkeys.allocated_keys()
    assert seen and all(isinstance(rights, pkeys.PkeysError)
                        or rights & pkeys.PkeyRights.DISABLE_ACCESS for rights in seen), seen


@pytest.mark.pku
@pytest.mark.parametrize("first_free", ["close", "pkey_free(key)", "pkey_free(int)"])
def test_a_close_racing_a_failing_free_leaves_the_key_open_and_closable(first_free, monkeypatch,
                                                                        alarm):
    """A thread frees a Key's key while a thread that had the key does not
    answer, and the main thread closes the Key.  The first free retires the
    key's identity, then fails and keeps the key.  The close, made while
    the first waits, used to see the identity gone, take it for a free
    already done and mark the Key closed: the key stayed allocated with
    nothing left to free it.  Now the close waits for the first free (the
    shim's mutex), and each fails; once the thread answers, the Key closes."""
    import functools

    from tests._exemption import Blocker, _signalled, _wait_for

    monkeypatch.setattr(pkeys._api, "free_key",
                        functools.partial(pkeys._api.free_key, timeout=0.5))
    key = pkeys.Key()
    number = key.pkey

    def scope() -> None:
        with key.allow():  # it had the key: a close must wait for its answer
            pass

    blocker = Blocker(scope)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            if first_free == "close":
                key.close()
            else:
                pkeys.pkey_free(key if first_free == "pkey_free(key)" else number)
        except BaseException as error:  # noqa: BLE001 - checked below
            errors.append(error)

    closer = threading.Thread(target=first, daemon=True)
    try:
        closer.start()
        _wait_for(lambda: _signalled(blocker.tid), "the first close to be under way")
        with pytest.raises(pkeys.RevocationError, match="stays allocated"):
            key.close()
        closer.join(30)
        assert len(errors) == 1 and isinstance(errors[0], pkeys.RevocationError), errors
        assert not key.closed and number in pkeys.allocated_keys()
    finally:
        blocker.finish()
    key.close()
    assert key.closed and number not in pkeys.allocated_keys()


@pytest.mark.pku
def test_a_refused_entry_leaves_a_pending_revocation_to_its_signal(alarm):
    """A scope on k1 and a closed key, entered while a revocation of k1 is
    stamped but not yet delivered to this thread, is refused, and must leave
    this thread's record of k1 as it was.  It used to count k1 before it
    found the closed key (taking in the revocation, but not applying it to
    the register) and withdraw it again: the next scope on k1 then took the
    still open register as k1's base, the signal closed k1 inside that
    scope, and its exit opened k1 again after revoke() had returned.  The
    thread blocks the signal only to hold the window open; it unblocks it
    inside the scope, well before the revocation's timeout."""
    k1, k2 = pkeys.Key(), pkeys.Key()
    if k2.pkey < k1.pkey:
        k1, k2 = k2, k1  # k1 is counted first: the keys go in number order
    refused = pkeys.allow(k1, k2)
    k2.close()
    signo = lib.pk_revocation_signal()
    # Open in every thread once: no thread is exempt from k1's revocations
    # after this, so only the signal brings them (csrc/exposure.c).
    pkeys.pkey_set(k1, pkeys.PKEY_UNRESTRICTED, threads="all")
    blocked = threading.Event()
    seen: dict[str, object] = {}

    def user() -> None:
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signo})
            blocked.set()
            deadline = time.monotonic() + 30
            while signo not in signal.sigpending():  # the revocation is stamped, and sent
                assert time.monotonic() < deadline, "the revocation never came"
                time.sleep(0.001)
            try:
                refused.__enter__()
            except pkeys.PkeysError as error:
                seen["refused"] = error
            with k1.allow():
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signo})  # it lands in here
            seen["after"] = pkeys.pkey_get(k1)
        except BaseException as error:  # noqa: BLE001 - reported below
            seen["error"] = error

    thread = threading.Thread(target=user)
    thread.start()
    assert blocked.wait(30)
    k1.revoke(timeout=30)
    thread.join(30)
    assert "error" not in seen, seen
    assert isinstance(seen.get("refused"), pkeys.InvalidKeyError), seen
    assert seen["after"] == pkeys.PKEY_DISABLE_ACCESS, seen
    k1.close()
