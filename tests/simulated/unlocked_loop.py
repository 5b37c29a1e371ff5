"""A hot ``unlocked()`` loop between two marker syscalls, for counting the
syscalls it makes under strace (tests/test_simulated.py and the pku tier
in tests/test_buffer_views.py).  argv[1]: round trips (default 1,000)."""

from __future__ import annotations

import os
import sys

import pkeys

BEGIN, END = "/nonexistent/pkeys-loop-begin", "/nonexistent/pkeys-loop-end"


def marker(path: str) -> None:
    try:
        os.stat(path)
    except FileNotFoundError:
        pass


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    buffer = pkeys.ProtectedBuffer(32, label="strace", secretmem=False, lock_memory=False)
    buffer.write(b"x" * 32)
    unlocked = buffer.unlocked
    for _ in range(100):  # warm: the key is held, the allocator's pools exist
        with unlocked() as view:
            view[0]
    marker(BEGIN)
    for _ in range(rounds):
        with unlocked() as view:
            view[0]
    marker(END)
    buffer.close()
    print(pkeys.backend(), rounds)


if __name__ == "__main__":
    main()
