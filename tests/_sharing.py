"""What a process holds of shared protected buffers, and the functions that
multiprocessing workers run (test_share.py, test_share_mp.py, the sharing
recipes' tests).  A module of its own, importing only pkeys: a spawned or
forkserver worker imports it by name."""

from __future__ import annotations

import errno
import functools
import hmac
import mmap
import os
import signal
from collections.abc import Callable
from typing import Any, TypeVar

import pkeys

from ._libc import proc_self_mem

Test = TypeVar("Test", bound=Callable[..., None])


def deadline(test: Test) -> Test:
    """A test that could hang fails after two minutes instead (SIGALRM).
    Around the test's body only, unlike test_revocation's ``alarm``
    fixture: with ``--pkeys-vm`` an ``anybackend`` test's report waits for
    the emulated run before its fixtures end, and would meet the alarm."""

    @functools.wraps(test)
    def bounded(*args: Any, **kwargs: Any) -> None:
        def expired(signo: int, frame: object) -> None:
            raise AssertionError("timed out (SIGALRM)")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.alarm(120)
        try:
            test(*args, **kwargs)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return bounded  # type: ignore[return-value]


def secret_mappings() -> int:
    """Mappings of secret memory in this process (/proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        return sum(line.rstrip().endswith("/secretmem (deleted)") for line in maps)


def secret_fds() -> int:
    """Open descriptors of secret files in this process (/proc/self/fd)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += "secretmem" in os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own descriptor, closed meanwhile
    return count


def holdings() -> tuple[int, int, list[int]]:
    """Secret mappings, secret descriptors, and allocated keys."""
    return secret_mappings(), secret_fds(), pkeys.allocated_keys()


def fingerprint(buffer: pkeys.ProtectedBuffer) -> bytes:
    """An HMAC made with the secret: equal fingerprints, equal secrets."""
    with buffer.unlocked() as key:
        return hmac.digest(key, b"fingerprint", "sha256")


def holds_secret(buffer: pkeys.ProtectedBuffer, recorded: bytes) -> bool:
    """Whether ``recorded`` holds the secret, searched with a needle built
    in a scratch mmap (never a Python bytes object) and wiped after."""
    scratch = mmap.mmap(-1, mmap.PAGESIZE)
    needle = memoryview(scratch)[:len(buffer)]
    try:
        buffer.readinto(needle)
        return recorded.find(needle) >= 0
    finally:
        needle[:] = bytes(len(needle))
        needle.release()
        scratch.close()


# -- run in workers --------------------------------------------------------------

KEPT: pkeys.ProtectedBuffer | None = None


def keep(buffer: pkeys.ProtectedBuffer) -> None:
    """A Pool or ProcessPoolExecutor initializer: keep the buffer."""
    global KEPT
    KEPT = buffer


def describe_kept(_task: object = None) -> dict[str, Any]:
    """What the initializer's buffer is in this worker."""
    assert KEPT is not None, "the initializer did not run"
    return {
        "pid": os.getpid(),
        "fingerprint": fingerprint(KEPT),
        "on_fork": KEPT.on_fork,
        "unreadable": proc_self_mem(KEPT.address, len(KEPT)) == errno.EIO,
    }


def use_and_close(buffer: pkeys.ProtectedBuffer) -> dict[str, Any]:
    """A buffer passed as a task's argument: use it, close it, and say what
    closing gave back in this worker."""
    before = holdings()
    seen = fingerprint(buffer)
    unreadable = proc_self_mem(buffer.address, len(buffer)) == errno.EIO
    buffer.close()
    after = holdings()
    return {
        "fingerprint": seen,
        "unreadable": unreadable,
        "mappings_freed": before[0] - after[0],
        "fds_freed": before[1] - after[1],
        "keys_after": after[2],
    }
