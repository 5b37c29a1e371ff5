"""``pkeys demo``: protection keys at work, in plain words.

Every denied access happens in a forked child, so the demo itself never
faults; the parent reports how the child died.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable

import pkeys

from ._binding import ffi
from ._child import run_in_child

__all__ = ["main"]

SECRET = b"correct horse battery staple"


def _read_first_byte(page: mmap.mmap) -> int:
    byte: int = ffi.cast("volatile unsigned char *", ffi.from_buffer(page))[0]
    return byte


def _attempt(what: str, action: Callable[[], object]) -> bool:
    """Run ``action`` in a child; print and return whether it was allowed."""
    result = run_in_child(action)
    allowed = result.exitcode == 0
    verdict = "allowed" if allowed else f"DENIED (the child was {result.describe()})"
    print(f"  {what:<52} {verdict}")
    return allowed


def main() -> int:
    print(f"backend: {pkeys.backend()} ({pkeys.backend_reason()})")
    page = mmap.mmap(-1, mmap.PAGESIZE)
    page[: len(SECRET)] = SECRET
    ok = True
    with pkeys.Key() as key:
        key.protect(page)
        print(f"allocated protection key {key.pkey} and tagged one page holding a secret")
        print("the key starts with access disabled for this thread:")
        ok &= not _attempt("read the page", lambda: _read_first_byte(page))
        with key.allow(write=False):
            print("inside `with key.allow(write=False):`")
            print(f"  {'read the page':<52} allowed: {bytes(page[: len(SECRET)])!r}")
            ok &= not _attempt("write the page", lambda: page.__setitem__(0, 0))
        with key.allow():
            print("inside `with key.allow():`")
            page[0:7] = b"CORRECT"
            print(f"  {'write the page':<52} allowed: {bytes(page[: len(SECRET)])!r}")
            if pkeys.backend() == "hardware":
                ok &= not _attempt(
                    "read from a thread started before the block",
                    lambda: _read_in_waiting_thread(key, page),
                )
        print("after the block:")
        ok &= not _attempt("read the page", lambda: _read_first_byte(page))
        # Unmapping the page releases the key's claim on it, so the key can be freed.
        page.close()
    if pkeys.backend() == "software":
        print("note: the software backend is process-wide; on PKU hardware rights are per thread")
    print("demo " + ("finished: every access was allowed or denied as expected" if ok else "FAILED"))
    return 0 if ok else 1


def _read_in_waiting_thread(key: pkeys.Key, page: mmap.mmap) -> None:
    """In the child: a thread created while access was closed stays closed,
    even while the creating thread holds access."""
    go = threading.Event()
    worker = threading.Thread(target=lambda: (go.wait(), _read_first_byte(page)))
    with key.deny():
        worker.start()
    go.set()
    worker.join()
