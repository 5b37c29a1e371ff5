"""Process-wide bookkeeping shared by the backends."""

from __future__ import annotations

import os
import threading

from ._errors import KeyInUseError
from ._memory import RegionTable

__all__ = ["lock", "regions", "refuse_if_guarding", "forget"]

# Serialises allocation, freeing, tagging and (software backend) rights
# changes.  The hot hardware paths (get, set, scopes) do not take it: their
# state is the per-thread register and an atomic bitmap in C.
lock = threading.Lock()
regions = RegionTable()


def _reset_lock_in_child() -> None:
    # Another thread may have held the lock at fork(); it does not exist in
    # the child, so the child would otherwise deadlock on its first call.
    global lock
    lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


def refuse_if_guarding(pkey: int) -> None:
    """Raise KeyInUseError if ``pkey`` still guards live tracked memory.
    The caller holds the lock."""
    live = regions.live(pkey)
    if live:
        spans = ", ".join(f"{r.start:#x}-{r.end:#x}" for r in live[:3])
        raise KeyInUseError(
            f"pkey {pkey} still guards {len(live)} tracked region(s) ({spans}); "
            "re-tag them with key 0 or release their memory first"
        )


def forget(start: int, length: int) -> None:
    """Drop the tracking of a range its owner is about to unmap."""
    with lock:
        regions.tag(start, length, 0, 0, None)
