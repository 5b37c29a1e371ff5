"""What this process holds, counted through psutil: for tests that repeat
create/close cycles and must end where they began; and a fork made while
another thread holds a lock."""

from __future__ import annotations

import gc
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable

import psutil


@dataclass(frozen=True)
class Holdings:
    mappings: int  # VMAs in /proc/self/smaps
    open_fds: int
    locked_bytes: int  # VmLck: what mlock has pinned
    threads: int

    def growth_since(self, earlier: Holdings) -> Holdings:
        return Holdings(
            self.mappings - earlier.mappings,
            self.open_fds - earlier.open_fds,
            self.locked_bytes - earlier.locked_bytes,
            self.threads - earlier.threads,
        )


def _locked_bytes() -> int:
    # psutil has no field for VmLck.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmLck line in /proc/self/status")


def holdings() -> Holdings:
    """This process's holdings now, after a full collection (so that what
    only the garbage collector would release does not count)."""
    gc.collect()
    process = psutil.Process()
    return Holdings(
        mappings=len(process.memory_maps(grouped=False)),
        open_fds=process.num_fds(),
        locked_bytes=_locked_bytes(),
        threads=process.num_threads(),
    )


def fork_while_held(lock: Any, in_child: Callable[[], object]) -> int:
    """Fork while another thread holds ``lock``, run ``in_child`` in the
    child (which must not wait for the lock for good: only the forking
    thread exists there), and return the child's wait status: 0 when it
    returned, SIGALRM's after 60 s, 1 when it raised."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(30)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            signal.alarm(60)
            status = 1
            try:
                in_child()
                status = 0
            finally:
                os._exit(status)
    finally:
        release.set()
        holder.join()
    return os.waitpid(pid, 0)[1]
