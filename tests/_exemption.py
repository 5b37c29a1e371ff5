"""Scenarios for tests/test_revocation_exemption.py, each run in a fresh
interpreter (``python -c "from tests._exemption import NAME; NAME()"``):
whether a thread may be left out of a revocation depends on the whole
history of the process (a raw-layer write anywhere turns exemption off for
good), so none may inherit the test runner's.

Each blocking thread blocks every signal, as faulthandler's watchdog does:
if it were signalled, the revocation could only fail.  A scenario raises
(exit status 1) when the behaviour is wrong.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time

import pkeys
from pkeys._binding import lib

SIGNO = lib.pk_revocation_signal()
EVERY_SIGNAL = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}


def _status_field(tid: int, name: str) -> int:
    with open(f"/proc/self/task/{tid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1], 16)
    raise AssertionError(f"no {name} for thread {tid}")


def _signalled(tid: int) -> bool:
    """The revocation signal is pending for thread ``tid`` (it blocks it)."""
    return bool(_status_field(tid, "SigPnd") >> (SIGNO - 1) & 1)


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _wait_for_the_watchdogs_mask(tid: int) -> None:
    """Until faulthandler's watchdog has blocked every signal itself.  A new
    thread starts with every signal blocked, glibc's own two (32 and 33)
    included, until glibc gives it its creator's mask: a revocation sent
    then would be answered.  faulthandler's mask leaves glibc's two out."""
    def blocked_by_faulthandler() -> bool:
        mask = _status_field(tid, "SigBlk")
        return bool(mask >> (SIGNO - 1) & 1) and not mask >> (32 - 1) & 1
    _wait_for(blocked_by_faulthandler, "the watchdog to block signals")


def _wait_for_a_later_tick(tid: int) -> None:
    """Until the clock tick in which thread ``tid`` started is over: the
    kernel gives a thread's start in ticks, and exposure.c counts a thread
    as born before an allocation only if it started in an earlier tick."""
    tick_ns = 10**9 // os.sysconf("SC_CLK_TCK")
    with open(f"/proc/self/task/{tid}/stat", encoding="ascii") as stat:
        started = int(stat.read().rsplit(")", 1)[1].split()[19])
    _wait_for(lambda: time.clock_gettime_ns(time.CLOCK_BOOTTIME) // tick_ns > started,
              "a later clock tick")


class Blocker:
    """A thread that runs ``before()``, then blocks every signal and waits."""

    def __init__(self, before=lambda: None) -> None:
        self.ready, self.leave = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(before,), name="blocker",
                                       daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the blocker did not start"
        assert not self.errors, self.errors

    def _run(self, before) -> None:
        try:
            before()
            signal.pthread_sigmask(signal.SIG_BLOCK, EVERY_SIGNAL)
        except BaseException as error:  # noqa: BLE001 - reported by __init__
            self.errors.append(error)
        self.ready.set()
        # Until finish(): a scenario's own work can take minutes on a slow
        # emulated CPU (4,200 thread births took 75 s), and a blocker gone
        # early is a scenario that proves nothing.  A daemon: never waited for.
        self.leave.wait(600)

    @property
    def tid(self) -> int:
        assert self.thread.native_id is not None
        return self.thread.native_id

    def finish(self) -> None:
        self.leave.set()
        self.thread.join(30)


def _revoke_and_close_without_it(key: pkeys.Key, blocker_tid: int) -> None:
    key.revoke(timeout=5)
    assert not _signalled(blocker_tid), "a thread that never had the key was signalled"
    assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS
    number = key.pkey
    key.close()
    assert number not in pkeys.allocated_keys()


# ---- threads that never had the key: left out ------------------------------

def born_before_the_key() -> None:
    blocker = Blocker()
    _wait_for_a_later_tick(blocker.tid)
    key = pkeys.Key()
    with key.allow():  # this thread has it; the blocker never did
        pass
    _revoke_and_close_without_it(key, blocker.tid)
    blocker.finish()


def born_after_the_key() -> None:
    key = pkeys.Key()
    blocker = Blocker()  # a threading.Thread: it records its register at birth
    _revoke_and_close_without_it(key, blocker.tid)
    blocker.finish()


def born_inside_a_block() -> None:
    key = pkeys.Key()
    with key.allow():  # the new thread gets no access from this block
        blocker = Blocker()
    _revoke_and_close_without_it(key, blocker.tid)
    blocker.finish()


def faulthandler_watchdog_started_before_the_key() -> None:
    before = set(os.listdir("/proc/self/task"))
    faulthandler.dump_traceback_later(600)
    try:
        watchdog = int((set(os.listdir("/proc/self/task")) - before).pop())
        _wait_for_the_watchdogs_mask(watchdog)
        _wait_for_a_later_tick(watchdog)
        key = pkeys.Key()
        _revoke_and_close_without_it(key, watchdog)
        buffer = pkeys.ProtectedBuffer(64)
        buffer.write(b"secret")
        buffer.revoke()
        buffer.close()
    finally:
        faulthandler.cancel_dump_traceback_later()


def after_more_thread_births_than_records() -> None:
    """Each threading thread takes a record at birth; the 4096 records must
    not run out between broadcasts (they did, and exemption ended)."""
    blocker = Blocker()
    for _ in range(4200):
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
    _wait_for_a_later_tick(blocker.tid)
    key = pkeys.Key()
    with key.allow():
        pass
    _revoke_and_close_without_it(key, blocker.tid)
    blocker.finish()


# ---- threads that had, or may have had, the key: they must answer -----------

def _must_answer(key: pkeys.Key, blocker_tid: int) -> None:
    try:
        key.revoke(timeout=0.3)
    except pkeys.RevocationError as error:
        assert error.unanswered == (blocker_tid,), error
    else:
        raise AssertionError("a thread that may have had the key was left out")
    try:
        key.close()
    except pkeys.RevocationError as error:
        assert "stays allocated" in str(error), error
    else:
        raise AssertionError("a key was freed with a thread that may have it unrevoked")


def _blocker_then(before) -> None:
    key = pkeys.Key()
    blocker = Blocker(lambda: before(key))
    _must_answer(key, blocker.tid)
    blocker.finish()
    key.close()


def took_a_grant() -> None:
    def scope(key: pkeys.Key) -> None:
        with key.allow():
            pass
    _blocker_then(scope)


def set_its_own_rights() -> None:
    _blocker_then(lambda key: pkeys.pkey_set(key, 0))


def took_a_grant_though_born_before() -> None:
    holder: list[pkeys.Key] = []
    go, ready, leave = threading.Event(), threading.Event(), threading.Event()

    def run() -> None:
        assert go.wait(30)
        with holder[0].allow():
            pass
        signal.pthread_sigmask(signal.SIG_BLOCK, EVERY_SIGNAL)
        ready.set()
        leave.wait(600)  # until the scenario sets it, as Blocker

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _wait_for(lambda: thread.native_id is not None, "the thread to start")
    _wait_for_a_later_tick(thread.native_id)
    holder.append(pkeys.Key())
    go.set()
    assert ready.wait(30)
    _must_answer(holder[0], thread.native_id)
    leave.set()
    thread.join(30)
    holder[0].close()


def allocated_it_open() -> None:
    made: list[pkeys.Key] = []
    blocker = Blocker(lambda: made.append(pkeys.Key(0)))
    _must_answer(made[0], blocker.tid)
    blocker.finish()
    made[0].close()


def born_with_it_open() -> None:
    key = pkeys.Key()
    pkeys.pkey_set(key, 0)  # its creator's own rights, outside any block: copied
    blocker = Blocker()
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)
    _must_answer(key, blocker.tid)
    blocker.finish()
    key.close()


def faulthandler_watchdog_started_after_the_key() -> None:
    key = pkeys.Key()
    before = set(os.listdir("/proc/self/task"))
    faulthandler.dump_traceback_later(600)
    try:
        watchdog = int((set(os.listdir("/proc/self/task")) - before).pop())
        _wait_for_the_watchdogs_mask(watchdog)
        _must_answer(key, watchdog)
    finally:
        faulthandler.cancel_dump_traceback_later()
    key.close()


def opened_for_every_thread() -> None:
    blocker = Blocker()
    _wait_for_a_later_tick(blocker.tid)
    key = pkeys.Key()
    # The blocker gets the open rights when it next handles the signal: so
    # from now on it may have the key.
    try:
        pkeys._api.set_all_threads(key.pkey, key.identity, 0, 0.3)
    except pkeys.RevocationError:
        pass
    else:
        raise AssertionError("a thread that blocks every signal answered")
    _must_answer(key, blocker.tid)
    blocker.finish()
    key.close()


def after_a_raw_register_write() -> None:
    blocker = Blocker()
    _wait_for_a_later_tick(blocker.tid)
    pkeys.pkru.write(pkeys.pkru.read())  # pkeys can prove nothing about threads now
    key = pkeys.Key()
    _must_answer(key, blocker.tid)
    blocker.finish()
    key.close()


# ---- a grant racing with a revocation that left its thread out -------------

def a_grant_during_the_revocation_is_revoked_too() -> None:
    """Thread T, born before the key and with no grant on it, is left out of
    the revocation that closing the key makes; then, while that revocation
    still waits for another thread, T enters a scope on the key.  T must
    apply the revocation itself: had its grant gone on, it would have
    outlived the close (nothing revoked it), and a later key given the same
    number would be open in T."""
    go, inside, closed = threading.Event(), threading.Event(), threading.Event()
    seen: list[object] = []
    holder: list[pkeys.Key] = []

    def latecomer() -> None:
        assert go.wait(30)
        number = holder[0].pkey
        try:
            with holder[0].allow():
                inside.set()
                assert closed.wait(30)
                seen.append(pkeys.pkru.rights_of(pkeys.pkru.read(), number))
        except pkeys.PkeysError as error:  # refused: as good
            seen.append(error)
            inside.set()
        seen.append(pkeys.pkru.rights_of(pkeys.pkru.read(), number))

    late = threading.Thread(target=latecomer, daemon=True)
    late.start()  # listed, and so decided, before the blocker below
    _wait_for(lambda: late.native_id is not None, "the thread to start")
    _wait_for_a_later_tick(late.native_id)
    key = pkeys.Key()
    holder.append(key)

    def scope() -> None:
        with key.allow():
            pass
    blocker = Blocker(scope)  # had the key: the revocation waits for it

    def release_the_latecomer() -> None:
        _wait_for(lambda: _signalled(blocker.tid), "the blocker to be signalled")
        go.set()  # the revocation is under way, and waits for the blocker
        assert inside.wait(30)
        blocker.finish()  # it exits, and so counts as answered: the close goes on

    trigger = threading.Thread(target=release_the_latecomer, daemon=True)
    trigger.start()
    number = key.pkey
    key.close()  # waits for the blocker, which the trigger lets go
    closed.set()
    trigger.join(30)
    late.join(30)
    assert number not in pkeys.allocated_keys()
    # In its scope after the close, and after its scope: no access.
    assert all(isinstance(rights, pkeys.PkeysError)
               or rights & pkeys.PkeyRights.DISABLE_ACCESS for rights in seen), seen
