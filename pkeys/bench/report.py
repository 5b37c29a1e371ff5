"""The table, the targets and the chart for ``pkeys bench``."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .contention import Sample

NO_PKU = "n/a (no PKU)"
FLOOR = "baseline/noop/cffi"
LOCK = "baseline/lock/with"
SIMULATED_LABEL = "simulated register"

# (description, numerator, denominator, comparison, bound)
TARGETS = [
    ("pkeys.pkey_get <= 1.5x cffi no-op", "pkeys/pkey_get/safe", FLOOR, "<=", 1.5),
    ("pkeys.pkey_set (same value) <= 1.5x cffi no-op", "pkeys/pkey_set/same", FLOOR, "<=", 1.5),
    ("pkeys.pkey_set (toggling) <= 1.5x cffi no-op", "pkeys/pkey_set/toggle", FLOOR, "<=", 1.5),
    ("pkeys.pkey_get(Key) <= 1.5x cffi no-op", "pkeys/pkey_get/key", FLOOR, "<=", 1.5),
    ("pkeys.pkey_set(Key, same) <= 1.5x cffi no-op", "pkeys/pkey_set/key-same", FLOOR, "<=", 1.5),
    ("ctypes pkey_set >= 3x pkeys.pkey_set", "ctypes/pkey_set/glibc", "pkeys/pkey_set/toggle", ">=", 3.0),
    ("software pkey_set (1 region, an mmap) <= 1.3x raw mprotect", "software/pkey_set/1region",
     "software/mprotect/raw", "<=", 1.3),
    ("software pkey_set (1 region, a buffer's) <= 1.3x raw mprotect",
     "software/pkey_set/1region-buffer", "software/mprotect/raw", "<=", 1.3),
    ("software pkey_set (1 region, 11 tagged mmaps) <= 1.3x raw mprotect",
     "software/pkey_set/1region-11mmaps", "software/mprotect/raw", "<=", 1.3),
    ("software pkey_set (1 region, 101 tagged mmaps) <= 1.3x raw mprotect",
     "software/pkey_set/1region-101mmaps", "software/mprotect/raw", "<=", 1.3),
    ("with key.allow(): <= 1.5x with threading.Lock()", "pkeys/allow/key", LOCK, "<=", 1.5),
    ("with pkeys.allow(4 keys): <= 1.2x one key", "pkeys/allow/4keys", "pkeys/allow/key",
     "<=", 1.2),
    ("hot with buf.unlocked() as v: <= 3x with threading.Lock()", "pkeys/unlocked/hot", LOCK,
     "<=", 3.0),
    ("pkey_set(Key, same) <= 2x cffi no-op", "pkeys/pkey_set/key-same", FLOOR, "<=", 2.0),
]

# (description, case, [(case, times) subtracted], bound): the Python-level
# overhead of a round trip beyond the register writes it makes, in no-ops.
OVERHEAD_TARGETS = [
    ("Key.allow() round trip beyond 2 WRPKRU <= 2x cffi no-op", "pkeys/allow/key",
     [("c/wrpkru/alternate", 2)], 2.0),
    ("unlocked() round trip (hot buffer) beyond 2 WRPKRU <= 2x cffi no-op",
     "pkeys/unlocked/hot", [("c/wrpkru/alternate", 2)], 2.0),
]

# The layers against the two floors of a Python call (issue 16's table).
LAYER_CASES = ["baseline/lock/with", "pkeys/pkey_get/key", "pkeys/pkey_set/key-same",
               "pkeys/allow/key", "pkeys/allow/4keys", "pkeys/unlocked/hot"]

# Issue 16's table, which `python -m pkeys.bench.layers` measures (ratios
# per interleaved round) and `pkeys bench` prints for both builds:
# (operation, case, against, bound, where it is measured).  Hardware
# targets are measured on the simulated-register build (or real PKU).
RAW_MPROTECT = "software/mprotect/raw"
HARDWARE_PATH = "the hardware path"
SOFTWARE_BACKEND = "the software backend"
SOFTWARE_MMAPS = (1, 11, 101)


def software_set_case(mmaps: int) -> str:
    """The software pkey_set case with ``mmaps`` tagged mmaps alive."""
    return "software/pkey_set/1region" + ("" if mmaps == 1 else f"-{mmaps}mmaps")


def raw_mprotect_beside(mmaps: int) -> str:
    """The raw mprotect, timed in the same rounds as software_set_case(mmaps)."""
    return f"{RAW_MPROTECT} (beside {mmaps} tagged mmaps)"


ISSUE_TARGETS = [
    ("with key.allow():", "pkeys/allow/key", LOCK, 1.5, HARDWARE_PATH),
    ("with pkeys.allow(k1, k2, k3, k4):", "pkeys/allow/4keys", "pkeys/allow/key", 1.2,
     HARDWARE_PATH),
    ("hot with buf.unlocked() as v:", "pkeys/unlocked/hot", LOCK, 3.0, HARDWARE_PATH),
    ("pkey_get(Key)", "pkeys/pkey_get/key", FLOOR, 1.5, HARDWARE_PATH),
    ("pkey_set(key, same)", "pkeys/pkey_set/key-same", FLOOR, 2.0, HARDWARE_PATH),
    *[(f"software pkey_set, {mmaps} tagged mmap{'s' if mmaps > 1 else ''} alive",
       software_set_case(mmaps), raw_mprotect_beside(mmaps), 1.3, SOFTWARE_BACKEND)
      for mmaps in SOFTWARE_MMAPS],
]
AGAINST = {LOCK: "with Lock", FLOOR: "cffi no-op", "pkeys/allow/key": "one key",
           **{raw_mprotect_beside(mmaps): "raw mprotect" for mmaps in SOFTWARE_MMAPS}}

# syscall / instruction pairs: what the 2016 debate was about
RATIOS = [
    ("null syscall / RDPKRU (C)", "c/null_syscall/getppid", "c/rdpkru/insn"),
    ("null syscall / WRPKRU changing the value (C)", "c/null_syscall/getppid", "c/wrpkru/alternate"),
    ("pkey_mprotect 1 page / WRPKRU changing the value (C)", "c/pkey_mprotect/1page-0threads",
     "c/wrpkru/alternate"),
    ("pkey_mprotect 1 page, 3 idle threads / WRPKRU (C)", "c/pkey_mprotect/1page-3threads",
     "c/wrpkru/alternate"),
    ("glibc pkey_set / WRPKRU (C)", "c/pkey_set/glibc", "c/wrpkru/alternate"),
    ("pkeys.pkey_mprotect / pkeys.pkey_set toggling (Python)", "pkeys/pkey_mprotect/safe",
     "pkeys/pkey_set/toggle"),
    ("software pkey_set / hardware pkey_set (Python)", "software/pkey_set/1region",
     "pkeys/pkey_set/toggle"),
]


@dataclass(frozen=True)
class Timing:
    """One case's pyperf values, in ns per operation: the median and the
    quartiles around it (all three equal for a single value)."""

    median: float
    low: float
    high: float
    values: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        ns = sorted(value * 1e9 for value in seconds)
        if len(ns) == 1:
            return cls(ns[0], ns[0], ns[0], 1)
        low, median, high = statistics.quantiles(ns, n=4, method="inclusive")
        return cls(median, low, high, len(ns))


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator, from the medians, with the range that the
    two cases' quartiles allow at the extremes."""

    value: float
    low: float
    high: float
    single_values: bool  # one value per case: no spread to speak of

    def verdict(self, comparison: str, bound: float) -> str:
        met = self.value <= bound if comparison == "<=" else self.value >= bound
        text = f"{self.value:5.2f}x "
        if not self.single_values:
            text += f"({self.low:.2f}-{self.high:.2f}) "
        text += "met" if met else "MISSED"
        if self.single_values:
            text += " (indicative)"
        elif self.low <= bound <= self.high:
            text += " (the spread crosses the bound)"
        return text


@dataclass
class Results:
    machine: dict[str, Any]
    timings: dict[str, Timing]  # from the pyperf values
    cycles_per_op: dict[str, float]  # direct TSC measurements of the C loops
    contention: list[Sample]
    case_names: list[str]  # every case the suite defines, run or not
    tsc_ghz: float | None = None  # TSC ticks per ns, measured over the C loops
    quick: bool = False
    # Cases that ran on the simulated register (the simulated-register build)
    simulated_cases: frozenset[str] = frozenset()

    @property
    def ns_per_op(self) -> dict[str, float]:
        """The medians."""
        return {name: timing.median for name, timing in self.timings.items()}

    def overhead(self, name: str, subtracted: list[tuple[str, int]]) -> Ratio | None:
        """(name - the subtracted cases) / the cffi no-op, from the medians,
        with the range the quartiles allow."""
        needed = [name, FLOOR, *(case for case, _ in subtracted)]
        if any(case not in self.timings for case in needed):
            return None
        top, floor = self.timings[name], self.timings[FLOOR]
        minus = [(self.timings[case], times) for case, times in subtracted]
        median = top.median - sum(t.median * times for t, times in minus)
        low = top.low - sum(t.high * times for t, times in minus)
        high = top.high - sum(t.low * times for t, times in minus)
        single = any(t.values == 1 for t in (top, floor, *(t for t, _ in minus)))
        return Ratio(median / floor.median, low / floor.high, high / floor.low, single)

    def ratio(self, numerator: str, denominator: str) -> Ratio | None:
        if numerator not in self.timings or denominator not in self.timings:
            return None
        top, bottom = self.timings[numerator], self.timings[denominator]
        return Ratio(top.median / bottom.median, top.low / bottom.high, top.high / bottom.low,
                     top.values == 1 or bottom.values == 1)


def _ns(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:,.1f} us"
    return f"{value:,.1f} ns"


def _ns_range(low: float, high: float) -> str:
    if high >= 10_000:
        return f"{low / 1000:,.1f}-{high / 1000:,.1f} us"
    return f"{low:,.1f}-{high:,.1f} ns"


def table(results: Results) -> str:
    m = results.machine
    cpu = (f"PKU {'yes' if m['pku'] else 'no'}, OSPKE {'yes' if m['ospke'] else 'no'}"
           if not m.get("simulated_register") else
           f"{SIMULATED_LABEL}: PKU and OSPKE read as present")
    lines = [
        f"pkeys bench on {m['cpu_model']} ({cpu}), Linux {m['kernel']}, Python {m['python']}",
    ]
    if m["emulated"]:
        lines.append(
            "!! EMULATED CPU (QEMU TCG): these timings are NOT hardware numbers; "
            "only the semantics are real."
        )
    if results.simulated_cases:
        lines.append(
            "!! SIMULATED-REGISTER BUILD: the cases marked 'simulated register' ran with "
            "RDPKRU/WRPKRU acting on a thread-local variable: they measure pkeys' layers, "
            "not the instructions, and nothing was protected."
        )
    if results.tsc_ghz:
        lines.append(
            f"TSC {results.tsc_ghz:.3f} GHz, measured (ticks per ns over the C loops): the "
            "cycles column counts these constant-rate ticks, not core clock cycles"
        )
    counts = sorted({timing.values for timing in results.timings.values()})
    if results.quick or counts == [1]:
        lines.append("--quick: one value per case, so no spread; every verdict is indicative only")
    elif counts:
        lines.append(f"time/op: median of {'-'.join(map(str, (counts[0], counts[-1])))} pyperf "
                     "values per case; IQR: the middle half of them")
    floor = results.timings.get(FLOOR)
    lines.append("")
    lines.append(f"{'case':<40} {'time/op':>12} {'IQR':>19} {'x cffi no-op':>13} "
                 f"{'TSC cycles/op':>14}")
    disagreeing = []
    for name in results.case_names:
        timing = results.timings.get(name)
        if timing is None:
            lines.append(f"{name:<40} {NO_PKU:>12}")
            continue
        relative = f"{timing.median / floor.median:,.2f}x" if floor else "-"
        spread = _ns_range(timing.low, timing.high) if timing.values > 1 else ""
        cycles = results.cycles_per_op.get(name)
        cycles_text = f"{cycles:,.1f}" if cycles is not None else ""
        if cycles is not None and results.tsc_ghz and not (
            0.5 <= cycles / (timing.median * results.tsc_ghz) <= 2.0
        ):
            cycles_text += " !"
            disagreeing.append(name)
        label = f"  {SIMULATED_LABEL}" if name in results.simulated_cases else ""
        lines.append(
            f"{name:<40} {_ns(timing.median):>12} {spread:>19} {relative:>13} {cycles_text:>14}"
            + label
        )
    if disagreeing:
        lines.append(
            "  ! cycles/op and time/op x TSC GHz differ by more than 2x: they come from "
            "separate runs (the cycles from this process, the time from pyperf's workers), "
            "and one of them was disturbed; run again"
        )
    lines.append("")
    lines.append("syscall / instruction")
    for label, numerator, denominator in RATIOS:
        ratio = results.ratio(numerator, denominator)
        simulated = {numerator, denominator} & results.simulated_cases
        lines.append(f"  {label:<58} {f'{ratio.value:,.1f}x' if ratio else NO_PKU:>12}"
                     + (f"  {SIMULATED_LABEL}: not the instruction" if ratio and simulated else ""))
    lines.append("")
    lines.append("layers against the floors (median ratios, with the range the quartiles allow)")
    lines.append(f"  {'case':<40} {'x cffi no-op':>22} {'x with Lock':>22}")
    for name in LAYER_CASES:
        to_floor, to_lock = results.ratio(name, FLOOR), results.ratio(name, LOCK)
        if to_floor is None or to_lock is None:
            lines.append(f"  {name:<40} {NO_PKU:>22}")
            continue
        cells = [f"{r.value:.2f} ({r.low:.2f}-{r.high:.2f})" if not r.single_values
                 else f"{r.value:.2f}" for r in (to_floor, to_lock)]
        label = f"  {SIMULATED_LABEL}" if name in results.simulated_cases else ""
        lines.append(f"  {name:<40} {cells[0]:>22} {cells[1]:>22}{label}")
    lines.append("")
    lines.append("targets (median ratios measured side by side in this run, with the range "
                 "the quartiles allow)")
    for label, numerator, denominator, comparison, bound in TARGETS:
        ratio = results.ratio(numerator, denominator)
        verdict = NO_PKU if ratio is None else ratio.verdict(comparison, bound)
        lines.append(f"  {label:<58} {verdict:>12}")
    for label, name, subtracted, bound in OVERHEAD_TARGETS:
        overhead = results.overhead(name, subtracted)
        verdict = NO_PKU if overhead is None else overhead.verdict("<=", bound)
        lines.append(f"  {label:<58} {verdict:>12}")
    revocations = [(threads, results.timings.get(f"c/revoke/{threads}threads"),
                    results.timings.get(f"c/pkey_mprotect/1page-{threads}threads"))
                   for threads in (1, 2, 4, 8, 16, 64)]
    if any(revoke for _, revoke, _ in revocations):
        lines.append("")
        lines.append("rights for every thread: Key.revoke() vs re-tagging one page with "
                     "pkey_mprotect (C, medians)")
        lines.append(f"  {'threads':>7} {'revoke':>12} {'pkey_mprotect':>14} {'revoke/mprotect':>16}")
        for threads, revoke, retag in revocations:
            if revoke and retag:
                lines.append(f"  {threads:>7} {_ns(revoke.median):>12} {_ns(retag.median):>14} "
                             f"{revoke.median / retag.median:>15.1f}x")
    if results.contention:
        lines.append("")
        lines.append("page-fault throughput while one thread flips access "
                     "(relative to no flipping)")
        modes = sorted({s.mode for s in results.contention} - {"none"}, reverse=True)
        header = f"  {'workers':>7} {'faults/s, no flips':>20}" + "".join(
            f" {mode + ' (flips/s)':>30}" for mode in modes)
        if "wrpkru" not in modes:
            header += f" {'wrpkru':>30}"
        lines.append(header)
        for workers in sorted({s.workers for s in results.contention}):
            row = {s.mode: s for s in results.contention if s.workers == workers}
            line = f"  {workers:>7} {row['none'].faults_per_second:>20,.0f}"
            for mode in modes:
                s = row[mode]
                # No fault at all without flipping (a very short run on a busy
                # machine) leaves nothing to compare with.
                relative = "-" if s.relative is None else f"{s.relative:.2f}"
                line += f" {f'{relative} ({s.flips_per_second:,.0f}/s)':>30}"
            if "wrpkru" not in modes:
                line += f" {NO_PKU:>30}"
            lines.append(line)
        if "wrpkru" not in modes:
            lines.append("  (without PKU only flipping through the mm lock exists: the pkey_mprotect "
                         "flips use key -1, a plain mprotect)")
    return "\n".join(lines)


def contention_json(samples: list[Sample]) -> str:
    return json.dumps([s.__dict__ for s in samples])


def plot(results: Results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = results.ns_per_op
    names = [n for n in results.case_names if n in medians]
    values = [medians[n] for n in names]
    colors = {"c": "#4c72b0", "baseline": "#8c8c8c", "pkeys": "#55a868", "glibc": "#c44e52",
              "ctypes": "#dd8452", "software": "#8172b3"}
    figure, (bars, lines) = plt.subplots(
        1, 2, figsize=(14, max(5, 0.32 * len(names))), gridspec_kw={"width_ratios": [3, 2]})
    bars.barh(names, values, color=[colors.get(n.split("/")[0], "#999999") for n in names])
    bars.set_xscale("log")
    bars.invert_yaxis()
    bars.set_xlabel("time per operation (ns, log scale)")
    title = f"{results.machine['cpu_model']}"
    if results.machine["emulated"]:
        title += " - EMULATED, not hardware timings"
    bars.set_title(title, fontsize=9)
    bars.tick_params(axis="y", labelsize=7)
    for mode, style in (("pkey_mprotect", "o-"), ("wrpkru", "s-"), ("revoke", "^-")):
        points = sorted((s.workers, s.relative) for s in results.contention if s.mode == mode)
        if points:
            lines.plot([p[0] for p in points], [p[1] for p in points], style,
                       label=f"flipping via {mode}")
    lines.axhline(1.0, color="#8c8c8c", linewidth=0.8)
    lines.set_xlabel("page-faulting worker threads")
    lines.set_ylabel("fault throughput relative to no flipping")
    lines.set_title("mm-lock contention", fontsize=9)
    lines.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
