#!/usr/bin/env python3
"""Sharing one secret with worker processes (docs/sharing.md): copies left
in each process, and the time to hand one buffer to 8 workers.

    python bench/share.py [--workers 8] [--rounds 200]

1. Copies: a 32-byte random secret, read from /dev/urandom straight into a
   ``ProtectedBuffer(on_fork="shared")``, goes to the workers of a
   ``multiprocessing.Pool`` initializer with each start method; each worker
   uses it once (an HMAC in ``unlocked()``) and then scans all its writable
   memory for it, as tests/test_cookbook.py does (its scanner, reused).  The
   same is done with the secret's bytes as the initializer's argument, the
   copy-through-a-pipe way, for comparison.
2. Time: ``--workers`` processes, forked before the secret exists and each
   on a Unix socket, receive it per round either as a descriptor
   (``share()``, ``send_fds``, ``from_shared()``) or as its 32 bytes
   (``sendall``, then ``read_from()`` straight into a new buffer); each uses
   it once, closes it and answers.  Medians over ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import hmac
import mmap
import multiprocessing
import os
import pathlib
import socket
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # tests.test_cookbook

import pkeys
from tests.test_cookbook import CHUNK, SIZE, Secret

# -- 1. copies ----------------------------------------------------------------


def _scanner(buffer: pkeys.ProtectedBuffer, mask: bytes, masked: bytes) -> Secret:
    """The cookbook's scanner over ``buffer`` (only the masked form crosses)."""
    scanner = object.__new__(Secret)
    scanner.buffer = buffer
    scanner.scratch = mmap.mmap(-1, mmap.PAGESIZE)
    scanner.chunk = mmap.mmap(-1, CHUNK + SIZE)
    scanner.mask, scanner.masked = mask, masked
    return scanner


_worker_scanner: Secret | None = None


def _keep_buffer(buffer: pkeys.ProtectedBuffer, mask: bytes, masked: bytes) -> None:
    global _worker_scanner
    _worker_scanner = _scanner(buffer, mask, masked)


def _keep_bytes(secret: bytes, mask: bytes, masked: bytes) -> None:
    buffer = pkeys.ProtectedBuffer(len(secret))
    buffer.write(secret)
    _keep_buffer(buffer, mask, masked)


def _copies_in_worker(_task: object) -> tuple[int, int]:
    assert _worker_scanner is not None
    with _worker_scanner.buffer.unlocked() as key:
        hmac.digest(key, b"use", "sha256")
    return os.getpid(), _worker_scanner.copies()


def count_copies(method: str, workers: int, as_bytes: bool) -> tuple[int, list[int]]:
    secret = Secret.__new__(Secret)
    buffer = pkeys.ProtectedBuffer(SIZE, on_fork="shared", label="bench")
    with open("/dev/urandom", "rb", buffering=0) as source:
        buffer.read_from(source.fileno())
    mask = os.urandom(SIZE)
    scanner = _scanner(buffer, mask, b"")
    view = memoryview(scanner.scratch)
    buffer.readinto(view[:SIZE])
    for i in range(SIZE):
        view[i] ^= mask[i]
    scanner.masked = bytes(view[:SIZE])
    view[:SIZE] = bytes(SIZE)
    view.release()
    del secret
    context = multiprocessing.get_context(method)
    if as_bytes:
        payload: bytearray | pkeys.ProtectedBuffer = bytearray(SIZE)
        buffer.readinto(payload)
        initializer, first = _keep_bytes, bytes(payload)
    else:
        initializer, first = _keep_buffer, buffer
    with context.Pool(workers, initializer=initializer, initargs=(first, mask, scanner.masked)) as pool:
        seen = dict(pool.map(_copies_in_worker, range(workers * 4), chunksize=1))
        pool.close()
        pool.join()
    parent = scanner.copies()
    if as_bytes:
        payload[:] = bytes(SIZE)
        del first
    scanner.scratch.close()
    scanner.chunk.close()
    buffer.close()
    return parent, sorted(seen.values())


# -- 2. time ------------------------------------------------------------------


def _worker(sock: socket.socket) -> None:
    while True:
        data, fds, _, _ = socket.recv_fds(sock, 1, 1)  # the command byte alone
        if data == b"S":
            with pkeys.ShareHandle(fds[0], SIZE) as handle:
                buffer = pkeys.ProtectedBuffer.from_shared(handle)
        elif data == b"P":
            buffer = pkeys.ProtectedBuffer(SIZE)
            buffer.read_from(sock.fileno())
        else:
            return
        with buffer.unlocked() as key:
            hmac.digest(key, b"use", "sha256")
        buffer.close()
        sock.sendall(b"k")


def time_hand_over(workers: int, rounds: int) -> dict[str, float]:
    sockets, pids = [], []
    for _ in range(workers):
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            try:
                _worker(child_end)
            finally:
                os._exit(0)
        child_end.close()
        sockets.append(parent_end)
        pids.append(pid)
    buffer = pkeys.ProtectedBuffer(SIZE, on_fork="shared")
    buffer.write(os.urandom(SIZE))
    times: dict[str, list[float]] = {"share": [], "pipe": []}
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            with buffer.share() as handle:
                for sock in sockets:
                    socket.send_fds(sock, [b"S"], [handle.fd])
            for sock in sockets:
                sock.recv(1)
            times["share"].append(time.perf_counter() - start)

            start = time.perf_counter()
            copy = bytearray(SIZE)
            buffer.readinto(copy)
            for sock in sockets:
                sock.sendall(b"P")
                sock.sendall(copy)
            copy[:] = bytes(SIZE)
            for sock in sockets:
                sock.recv(1)
            times["pipe"].append(time.perf_counter() - start)
    finally:
        for sock in sockets:
            sock.sendall(b"Q")
            sock.close()
        for pid in pids:
            os.waitpid(pid, 0)
        buffer.close()
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print(f"pkeys {pkeys.__version__}, backend {pkeys.backend()}, kernel {os.uname().release}")
    print(f"\ncopies of a 32-byte secret found by scanning writable memory "
          f"({args.workers} Pool workers, initializer):")
    for method in ("spawn", "forkserver", "fork"):
        for as_bytes in (False, True):
            parent, seen = count_copies(method, args.workers, as_bytes)
            how = "its bytes as initargs" if as_bytes else "the buffer (descriptor)"
            print(f"  {method:10} {how:24} parent {parent}, workers {seen}")
    medians = time_hand_over(args.workers, args.rounds)
    print(f"\nhanding one buffer to {args.workers} forked workers, median of {args.rounds} "
          "rounds (each worker maps or loads it, uses it once, closes it, answers):")
    print(f"  share() + send_fds + from_shared: {medians['share'] * 1e6:8.0f} us")
    print(f"  bytes through the socket + read_from: {medians['pipe'] * 1e6:8.0f} us")


if __name__ == "__main__":
    main()
