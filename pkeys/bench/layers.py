"""The layers against the floors, interleaved in one process, and issue
16's targets: ``python -m pkeys.bench.layers [--rounds N] [--loops N]
[--targets-only]``.

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

The software backend's ``pkey_set`` is timed against the raw ``mprotect``
it issues in phases, with 1, then 11, then 101 tagged mmaps alive (a
process cannot hold all three counts at once); within a phase the two
alternate, round by round.

The targets table gives each of issue 16's targets as measured in this
build: hardware targets where the hardware path runs (the
simulated-register build, or PKU), software ones on the software backend.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import pkeys

from . import suite
from .report import (
    AGAINST,
    FLOOR,
    HARDWARE_PATH,
    ISSUE_TARGETS,
    LAYER_CASES,
    LOCK,
    RAW_MPROTECT,
    SIMULATED_LABEL,
    SOFTWARE_BACKEND,
    SOFTWARE_MMAPS,
    raw_mprotect_beside,
    software_set_case,
)


QUICK_ROUNDS = 3


def _interleave(names: Sequence[str], rounds: int, loops: int,
                values: dict[str, list[float]], labels: Sequence[str] | None = None) -> None:
    """Time each case once per round, in turn, into values[label]."""
    labels = labels or names
    for name, label in zip(names, labels):
        suite.CASES[name][1](loops)  # set up and warm
        values[label] = []
    for _ in range(rounds):
        for name, label in zip(names, labels):
            started = time.thread_time_ns()
            suite.CASES[name][1](loops)
            values[label].append((time.thread_time_ns() - started) / loops)


def measure(rounds: int, loops: int) -> dict[str, list[float]]:
    """CPU ns per operation of each case that runs here, one value per round."""
    names = [name for name in dict.fromkeys([FLOOR, *LAYER_CASES]) if suite.runs_here(name)]
    values: dict[str, list[float]] = {}
    try:
        _interleave(names, rounds, loops, values)
        if pkeys.backend() == "software":
            # 1, 11, then 101 tagged mmaps: each phase's cases set up the
            # mmaps it adds, which stay alive for the next.
            for mmaps in SOFTWARE_MMAPS:
                _interleave([RAW_MPROTECT, software_set_case(mmaps)], rounds, loops, values,
                            [raw_mprotect_beside(mmaps), software_set_case(mmaps)])
    finally:
        suite.release_cached()
    return values


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return median, low, high


def build_name() -> str:
    """Which build and backend this process measures."""
    if pkeys.backend() == "simulated":
        return f"simulated-register build ({SIMULATED_LABEL}: nothing is protected)"
    return f"{pkeys.backend()} build" if pkeys.backend() != "software" else "software build"


def table(values: dict[str, list[float]], rounds: int, loops: int) -> str:
    simulated = pkeys.backend() == "simulated"
    lines = [
        f"layers, interleaved: {rounds} rounds of {loops:,} operations per case, backend "
        f"{pkeys.backend()}" + (f" ({SIMULATED_LABEL}: nothing is protected)" if simulated else ""),
        "median (quartiles) of the per-round values; ns/op is the thread's CPU time",
        "",
        f"{'case':<28} {'CPU ns/op':>22} {'x cffi no-op':>22} {'x with Lock':>22}",
    ]
    for name in dict.fromkeys([FLOOR, *LAYER_CASES]):
        if name not in values:
            continue
        ns = values[name]
        cells = [ns]
        for floor in (FLOOR, LOCK):
            if floor in values:
                cells.append([a / b for a, b in zip(ns, values[floor])])
        text = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in map(_quartiles, cells)]
        label = f"  {SIMULATED_LABEL}" if simulated and name in suite.SIMULATED_CASES else ""
        lines.append(f"{name:<28} " + " ".join(f"{t:>22}" for t in text) + label)
    return "\n".join(lines)


def targets_table(values: dict[str, list[float]], quick: bool = False) -> str:
    """Issue 16's targets as measured here: the median of the per-round
    ratios with their quartiles, the bound, and met or MISSED (from the
    median; indicative only after a --quick run); rows measured in the
    other build say so."""
    here = SOFTWARE_BACKEND if pkeys.backend() == "software" else HARDWARE_PATH
    lines = [
        f"issue 16 targets, {build_name()}: median (quartiles) of the per-round ratios",
        f"  {'operation':<42} {'measured':>34} {'target':>20}  verdict",
    ]
    for operation, name, against, bound, where in ISSUE_TARGETS:
        target = f"<= {bound}x {AGAINST[against]}"
        if name not in values or against not in values:
            other = ("the simulated-register build" if where == HARDWARE_PATH
                     else "the software build")
            why = "measured in " + other if where != here else "did not run here"
            lines.append(f"  {operation:<42} {'n/a':>34} {target:>20}  n/a ({why})")
            continue
        median, low, high = _quartiles([a / b for a, b in zip(values[name], values[against])])
        measured = f"{median:.2f}x ({low:.2f}-{high:.2f}) {AGAINST[against]}"
        verdict = "met" if median <= bound else "MISSED"
        if quick:
            verdict += " (indicative)"
        elif low <= bound <= high:
            verdict += " (the quartiles cross the bound)"
        lines.append(f"  {operation:<42} {measured:>34} {target:>20}  {verdict}")
    return "\n".join(lines)


def run_in_builds(quick: bool, simulated_build: str | None) -> str:
    """The targets tables of both builds, each measured in a child process:
    the hardware path (this build if it has one, else ``simulated_build``,
    a directory tools/build-simulated.sh made) and the software build
    (this build with PKEYS_BACKEND=software)."""
    arguments = ["-W", "ignore::UserWarning", "-m", "pkeys.bench.layers", "--targets-only",
                 *(["--quick"] if quick else [])]
    runs: list[tuple[str, dict[str, str]]] = []
    if pkeys.backend() in ("hardware", "simulated"):
        runs.append(("hardware path", dict(os.environ)))
    elif simulated_build:
        path = os.pathsep.join(filter(None, [os.path.abspath(simulated_build),
                                             os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path)
        env.pop("PKEYS_BACKEND", None)
        runs.append(("hardware path", env))
    runs.append(("software backend", dict(os.environ, PKEYS_BACKEND="software")))
    out = []
    if len(runs) == 1:
        out.append("issue 16 targets on the hardware path: not measured here (no PKU): build "
                   "the simulated-register build (bash tools/build-simulated.sh) and pass "
                   "--simulated-build build/simulated-pku")
    for what, env in runs:
        # From an empty directory: the current one comes first on sys.path.
        with tempfile.TemporaryDirectory(prefix="pkeys-layers-") as empty:
            result = subprocess.run([sys.executable, *arguments], check=False, env=env,
                                    cwd=empty, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            out.append(f"issue 16 targets on the {what}: the run failed\n{result.stderr[-2000:]}")
        else:
            out.append(result.stdout.rstrip())
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pkeys.bench.layers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--loops", type=int, default=2000)
    parser.add_argument("--targets-only", action="store_true",
                        help="print issue 16's targets table only")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_ROUNDS} rounds: checks that every case runs; its verdicts "
                             "are indicative only")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = QUICK_ROUNDS
    if args.rounds < 2 or args.loops < 1:
        parser.error("--rounds must be at least 2 and --loops at least 1")
    values = measure(args.rounds, args.loops)
    if not args.targets_only:
        print(table(values, args.rounds, args.loops))
        print()
    print(targets_table(values, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
