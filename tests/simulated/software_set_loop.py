"""A hot software ``pkey_set`` loop between two marker syscalls, for
counting the syscalls it makes under strace (tests/test_pins_in_c.py): the
key guards one region of a caller's mmap, so every change pins its owner
(in C) and re-protects the page.  argv[1]: changes (default 1,000, even).
Run with PKEYS_BACKEND=software."""

from __future__ import annotations

import mmap
import sys

import pkeys

from unlocked_loop import BEGIN, END, marker


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    memory = mmap.mmap(-1, mmap.PAGESIZE)
    key = pkeys.Key()
    key.protect(memory)
    pkey_set = pkeys.pkey_set
    for _ in range(100):  # warm
        pkey_set(key, 0)
        pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)
    marker(BEGIN)
    for _ in range(rounds // 2):
        pkey_set(key, 0)
        pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)
    marker(END)
    pkeys.pkey_mprotect(memory, mmap.PAGESIZE, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
    key.close()
    memory.close()
    print(pkeys.backend(), rounds)


if __name__ == "__main__":
    main()
