"""The 2016 argument, quantified: what flipping access does to page faults
in other threads.

``pkey_mprotect`` (like ``mprotect``) takes the mm lock for write, so while
one thread flips a region's access that way, threads that page-fault (and
take the same lock for read) stall.  ``WRPKRU`` changes only the flipping
thread's register and takes no lock at all.  A revocation (``Key.revoke``)
takes no mm lock either, but interrupts every thread with a signal.  The workers run in C
(pthreads: Python threads would serialise on the GIL): each maps 64 fresh
pages, touches every one, unmaps them, and repeats.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .._binding import ffi, lib
from .._select import hardware_supported

MODES = {
    "none": lib.PK_FLIP_NONE,
    "pkey_mprotect": lib.PK_FLIP_PKEY_MPROTECT,
    "wrpkru": lib.PK_FLIP_WRPKRU,
    "revoke": lib.PK_FLIP_REVOKE,
}


@dataclass(frozen=True)
class Sample:
    workers: int
    mode: str
    faults_per_second: float
    flips_per_second: float
    relative: float | None = None  # throughput / throughput without flipping


def worker_counts() -> list[int]:
    """1, 2, 4, ... up to the core count, then the core count plus one."""
    cores = os.cpu_count() or 1
    counts, n = [], 1
    while n <= cores:
        counts.append(n)
        n *= 2
    if cores not in counts:
        counts.append(cores)
    counts.append(cores + 1)
    return counts


def measure(
    workers: int, mode: str, *, pkey: int = -1, flips_per_second: int = 10_000, seconds: float = 1.0
) -> Sample:
    result = ffi.new("struct pk_contention *")
    # A rate needs at least one fault: on a loaded machine a short run
    # (--quick's 0.2 s) can end before any worker faulted, and the report
    # then divided by zero.  Run again, twice as long, up to 5 times.
    for _ in range(5):
        status = lib.pk_bench_contention(workers, MODES[mode], pkey, flips_per_second, seconds,
                                         result)
        if status:
            raise RuntimeError(f"contention run failed (status {status}, errno {ffi.errno})")
        if result.faults:
            break
        seconds *= 2
    else:
        raise RuntimeError(f"contention run: no page fault in {seconds / 2:.1f} s "
                           f"({workers} workers, {mode}); is the machine that loaded?")
    return Sample(workers, mode, result.faults / result.seconds, result.flips / result.seconds)


def run(*, seconds: float = 1.0, flips_per_second: int = 10_000) -> list[Sample]:
    """Every worker count, each with no flipping, flipping through
    pkey_mprotect, and (with PKU) flipping through WRPKRU.

    Without PKU the pkey_mprotect flips use key -1, which is a plain
    mprotect: the same lock, and the only kind the software backend has.
    """
    import pkeys

    samples: list[Sample] = []
    key = pkeys.Key(rights=0) if hardware_supported() and pkeys.backend() == "hardware" else None
    try:
        pkey = key.pkey if key else -1
        modes = ["none", "pkey_mprotect"] + (["wrpkru", "revoke"] if key else [])
        for workers in worker_counts():
            baseline = None
            for mode in modes:
                sample = measure(workers, mode, pkey=pkey, flips_per_second=flips_per_second,
                                 seconds=seconds)
                if mode == "none":
                    baseline = sample.faults_per_second
                relative = sample.faults_per_second / baseline if baseline else None
                samples.append(Sample(sample.workers, mode, sample.faults_per_second,
                                      sample.flips_per_second, relative))
    finally:
        if key:
            key.close()
    return samples
