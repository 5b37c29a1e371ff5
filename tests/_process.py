"""What this process holds, counted through psutil: for tests that repeat
create/close cycles and must end where they began."""

from __future__ import annotations

import gc
from dataclasses import dataclass

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
