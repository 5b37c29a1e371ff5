"""``python -m pkeys bench [--quick] [-o results.json] [--plot bench.png]``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from .._binding import ffi
from . import contention, machine, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one value per case and short contention runs: checks that every "
                             "case runs; its verdicts are indicative only")
    parser.add_argument("--rigorous", action="store_true", help="pyperf's rigorous mode (slow)")
    parser.add_argument("--processes", type=int, metavar="N",
                        help="pyperf worker processes per case (fewer is faster; each is a new "
                             "interpreter, which costs seconds on an emulated CPU)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="write the pyperf JSON (with the contention results and the machine)")
    parser.add_argument("--plot", metavar="PNG", help="draw the chart (needs matplotlib)")
    parser.add_argument("--allow-emulated", action="store_true",
                        help="write results measured on an emulated CPU anyway")
    parser.add_argument("--contention-seconds", type=float, default=None, metavar="S",
                        help="length of each contention run (default 1, 0.2 with --quick)")
    parser.add_argument("--simulated-build", metavar="DIR",
                        help="where tools/build-simulated.sh put the simulated-register build "
                             "(build/simulated-pku): issue 16's hardware targets are measured "
                             "there when this build has no PKU")


def _direct_cycles(quick: bool) -> tuple[dict[str, float], float | None]:
    """TSC cycles per operation of the suite's C loops, run again in this
    process, and the TSC's rate in GHz: ticks over nanoseconds of those
    same loops (each loop reads both clocks)."""
    from . import suite

    # At least as long as a pyperf value; far longer outside --quick.
    scale = 1 if quick else 20
    result = ffi.new("struct pk_bench *")
    cycles: dict[str, float] = {}
    total_ticks = total_ns = 0
    try:
        for name, (run, minimum) in suite.C_LOOPS.items():
            if not suite.runs_here(name):
                continue
            if run(minimum * scale, result) == 0 and result.iterations and result.cycles:
                cycles[name] = result.cycles / result.iterations
                total_ticks += result.cycles
                total_ns += result.nanoseconds
    finally:
        suite.release_cached()
    return cycles, (total_ticks / total_ns if total_ns else None)


def main(args: argparse.Namespace) -> int:
    try:
        import pyperf
    except ImportError:
        print("pkeys bench needs pyperf: pip install 'pkeys[bench]'", file=sys.stderr)
        return 2
    about = machine.describe()
    if about["emulated"] and args.output and not args.allow_emulated:
        print("pkeys bench: this CPU is emulated (QEMU TCG); its timings are not hardware "
              "numbers. Pass --allow-emulated to write them anyway.", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--plot needs matplotlib: pip install 'pkeys[plot]'", file=sys.stderr)
            return 2

    from .suite import CASES, SIMULATED_CASES

    with tempfile.TemporaryDirectory(prefix="pkeys-bench-") as work:
        raw = os.path.join(work, "suite.json")
        mode = ["--debug-single-value"] if args.quick else (["--rigorous"] if args.rigorous else ["--fast"])
        if args.processes and not args.quick:
            mode += ["--processes", str(args.processes)]
        # pyperf's workers get a clean environment: without these, a
        # PKEYS_BACKEND=software run on a PKU machine measured the hardware
        # backend in its workers and the software cases nowhere.
        command = [sys.executable, "-m", "pkeys.bench.suite", "--quiet", "-o", raw, *mode,
                   "--inherit-environ", "PKEYS_BACKEND,PKEYS_REVOKE_SIGNAL"]
        print("running the pyperf suite (" + ("quick" if args.quick else mode[0].lstrip("-")) + ")...",
              file=sys.stderr, flush=True)
        # pyperf prints a line per case on stdout; keep stdout for the table.
        completed = subprocess.run(command, check=False, stdout=sys.stderr)
        if completed.returncode != 0:
            print("pkeys bench: the pyperf suite failed", file=sys.stderr)
            return 1
        suite = pyperf.BenchmarkSuite.load(raw)

    print("measuring TSC cycles of the C loops and mm-lock contention...", file=sys.stderr, flush=True)
    cycles, tsc_ghz = _direct_cycles(args.quick)
    seconds = args.contention_seconds or (0.2 if args.quick else 1.0)
    samples = contention.run(seconds=seconds)
    results = report.Results(
        machine=about,
        timings={b.get_name(): report.Timing.of(b.get_values()) for b in suite.get_benchmarks()},
        cycles_per_op=cycles,
        contention=samples,
        case_names=list(CASES),
        simulated_cases=SIMULATED_CASES if about["simulated_register"] else frozenset(),
        tsc_ghz=tsc_ghz,
        quick=args.quick,
    )
    print(report.table(results))
    print("\nmeasuring issue 16's targets, interleaved, in each build...", file=sys.stderr,
          flush=True)
    print()
    from . import layers  # times the suite's cases: needs pyperf, like the suite

    print(layers.run_in_builds(args.quick, args.simulated_build))
    if args.output:
        for benchmark in suite.get_benchmarks():
            extra = {
                "pkeys_cpu_model": about["cpu_model"],
                "pkeys_pku": str(about["pku"]),
                "pkeys_emulated": str(about["emulated"]),
                "pkeys_kernel": about["kernel"],
            }
            if benchmark.get_name() in cycles:
                extra["pkeys_tsc_cycles_per_op"] = f"{cycles[benchmark.get_name()]:.1f}"
            if tsc_ghz:
                extra["pkeys_tsc_ghz"] = f"{tsc_ghz:.3f}"
            benchmark.update_metadata(extra)
        for sample in samples:
            run = pyperf.Run(
                [1.0 / sample.faults_per_second],
                metadata={
                    "name": f"contention/fault/{sample.mode}-{sample.workers}workers",
                    "unit": "second",
                    "pkeys_flips_per_second": str(round(sample.flips_per_second)),
                    "pkeys_relative_to_no_flipping": str(sample.relative),
                },
                collect_metadata=False,
            )
            suite.add_benchmark(pyperf.Benchmark([run]))
        if os.path.exists(args.output):
            os.unlink(args.output)
        suite.dump(args.output)
        print(f"\nwrote {args.output} (python -m pyperf compare_to reads it)", file=sys.stderr)
    if args.plot:
        report.plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
