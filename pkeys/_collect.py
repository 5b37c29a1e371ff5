"""Collect garbage before retrying, with other threads collecting too.

``gc.collect()`` returns at once, having freed nothing, while another
thread is collecting: that thread's finalizers (``Key`` objects in
reference cycles, whose keys a retry is waiting for) have not run yet.
So a retry after :func:`collect_garbage` also waits for a collection
under way in another thread to end.
"""

from __future__ import annotations

import gc
import threading
import time

__all__ = ["collect_garbage"]

# The thread running a collection now, if any.  Set by a gc callback with a
# plain assignment: nothing there may block or take a lock, since it runs
# inside whatever allocation started the collection.
_collecting_thread: int | None = None


def _track(phase: str, info: dict[str, int]) -> None:
    global _collecting_thread
    _collecting_thread = threading.get_ident() if phase == "start" else None


gc.callbacks.append(_track)


def collect_garbage(timeout: float = 5.0) -> None:
    """``gc.collect()``, then wait until no other thread is collecting, for
    at most ``timeout`` seconds: a finalizer there may be waiting for
    something this thread holds, and the caller then reports what it finds."""
    gc.collect()
    me = threading.get_ident()
    deadline = time.monotonic() + timeout
    while _collecting_thread not in (None, me) and time.monotonic() < deadline:
        time.sleep(0.001)  # lets the collecting thread run its finalizers
