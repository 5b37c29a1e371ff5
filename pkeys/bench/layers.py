"""The layers against the floors, interleaved in one process:
``python -m pkeys.bench.layers [--rounds N] [--loops N]``.

pyperf times each case in its own workers, one case after another, so on a
shared or loaded machine two cases can see different loads.  Here every
round times each case once (``--loops`` operations), in turn, with the
suite's own time functions; each round gives a ratio to the cffi no-op and
to ``with threading.Lock():``, and the table gives the median and the
quartiles of those ratios.  Each value is the thread's CPU time
(``CLOCK_THREAD_CPUTIME_ID``, user and kernel) over the case's time
function, not the wall clock: on a shared machine a round that is
preempted would otherwise count the other processes' time.  On the simulated-register build this is the
hardware path without the cost of the instructions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pkeys

from . import suite
from .report import FLOOR, LAYER_CASES, LOCK, SIMULATED_LABEL


def measure(rounds: int, loops: int) -> dict[str, list[float]]:
    """CPU ns per operation of each case that runs here, one value per round."""
    names = [name for name in dict.fromkeys([FLOOR, *LAYER_CASES]) if suite.runs_here(name)]
    values: dict[str, list[float]] = {name: [] for name in names}
    try:
        for name in names:
            suite.CASES[name][1](loops)  # set up and warm
        for _ in range(rounds):
            for name in names:
                started = time.thread_time_ns()
                suite.CASES[name][1](loops)
                values[name].append((time.thread_time_ns() - started) / loops)
    finally:
        suite.release_cached()
    return values


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return median, low, high


def table(values: dict[str, list[float]], rounds: int, loops: int) -> str:
    simulated = pkeys.backend() == "simulated"
    lines = [
        f"layers, interleaved: {rounds} rounds of {loops:,} operations per case, backend "
        f"{pkeys.backend()}" + (f" ({SIMULATED_LABEL}: nothing is protected)" if simulated else ""),
        "median (quartiles) of the per-round values; ns/op is the thread's CPU time",
        "",
        f"{'case':<28} {'CPU ns/op':>22} {'x cffi no-op':>22} {'x with Lock':>22}",
    ]
    for name, ns in values.items():
        cells = [ns]
        for floor in (FLOOR, LOCK):
            if floor in values:
                cells.append([a / b for a, b in zip(ns, values[floor])])
        text = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in map(_quartiles, cells)]
        label = f"  {SIMULATED_LABEL}" if simulated and name in suite.SIMULATED_CASES else ""
        lines.append(f"{name:<28} " + " ".join(f"{t:>22}" for t in text) + label)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pkeys.bench.layers", description=__doc__)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--loops", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.loops < 1:
        parser.error("--rounds must be at least 2 and --loops at least 1")
    print(table(measure(args.rounds, args.loops), args.rounds, args.loops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
