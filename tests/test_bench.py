"""`pkeys bench`: the smoke run (every case runs; timings are never asserted)
and the report's arithmetic on known numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyperf
import pytest

import pkeys
import pkeys._binding
from pkeys.bench import contention, report
from pkeys.bench.contention import Sample
from pkeys.bench.suite import CASES


@pytest.mark.skipif(not pkeys.hardware_supported(), reason="no PKU: the software backend is the only one")
def test_a_software_run_on_a_pku_machine_measures_the_software_backend(tmp_path):
    # pyperf's workers start with a clean environment: PKEYS_BACKEND must
    # reach them, or they measure the hardware backend.
    output = tmp_path / "software.json"
    result = subprocess.run(
        [sys.executable, "-m", "pkeys", "bench", "--quick", "-o", str(output), "--allow-emulated"],
        check=False, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PKEYS_BACKEND": "software"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ran = set(pyperf.BenchmarkSuite.load(str(output)).get_benchmark_names())
    assert "software/pkey_set/1region" in ran
    assert not {name for name, (needs_pku, _) in CASES.items() if needs_pku} & ran


def test_quick_run_executes_every_case(tmp_path):
    output = tmp_path / "quick.json"
    result = subprocess.run(
        [sys.executable, "-m", "pkeys", "bench", "--quick", "-o", str(output), "--allow-emulated"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    suite = pyperf.BenchmarkSuite.load(str(output))
    ran = set(suite.get_benchmark_names())
    hardware = pkeys.hardware_supported() and pkeys.backend() == "hardware"
    for name, (needs_pku, _) in CASES.items():
        if hardware or not needs_pku:
            assert name in ran, f"{name} did not run"
            assert suite.get_benchmark(name).mean() > 0
        else:
            assert name not in ran
            assert f"{name}" in result.stdout and "n/a (no PKU)" in result.stdout
    contention_runs = {n for n in ran if n.startswith("contention/")}
    # With PKU the flips also go through WRPKRU and Key.revoke; without, only
    # the two that need no key (none, and pkey_mprotect as a plain mprotect).
    modes = ["none", "pkey_mprotect"] + (["wrpkru", "revoke"] if hardware else [])
    assert contention_runs == {f"contention/fault/{mode}-{workers}workers"
                               for mode in modes for workers in contention.worker_counts()}
    assert "targets" in result.stdout and "syscall / instruction" in result.stdout
    assert "every verdict is indicative only" in result.stdout
    verdicts = [line for line in result.stdout.splitlines() if line.rstrip().endswith(" met")
                or "met (" in line or "MISSED" in line]
    assert all("(indicative)" in line for line in verdicts), verdicts
    if pkeys._binding.lib.pk_arch_is_x86():
        assert "GHz, measured" in result.stdout
    metadata = suite.get_benchmark("baseline/noop/cffi").get_metadata()
    assert metadata["pkeys_pku"] == str(pkeys.hardware_supported())


def test_worker_counts_go_past_the_core_count():
    import os

    counts = contention.worker_counts()
    assert counts[0] == 1 and counts[-1] == (os.cpu_count() or 1) + 1
    assert counts == sorted(set(counts))


def test_contention_measures_real_faults():
    sample = contention.measure(1, "none", seconds=0.05)
    assert sample.faults_per_second > 1000 and sample.flips_per_second == 0
    flipping = contention.measure(1, "pkey_mprotect", seconds=0.05)
    assert flipping.flips_per_second > 0


def _spread(median: float, values: int = 5, width: float = 0.02) -> report.Timing:
    if values == 1:
        return report.Timing(median, median, median, 1)
    return report.Timing(median, median * (1 - width), median * (1 + width), values)


def _results(emulated: bool = False, with_pku: bool = True, values: int = 5,
             tsc_ghz: float | None = 2.0) -> report.Results:
    ns = {"baseline/noop/cffi": 60.0, "software/pkey_set/1region": 1400.0,
          "software/mprotect/raw": 1000.0, "c/null_syscall/getppid": 160.0}
    if with_pku:
        ns.update({"pkeys/pkey_get/safe": 80.0, "pkeys/pkey_set/same": 85.0,
                   "pkeys/pkey_set/toggle": 100.0, "pkeys/allow/key": 170.0,
                   "ctypes/pkey_set/glibc": 350.0, "c/rdpkru/insn": 0.5,
                   "c/wrpkru/alternate": 8.0})
    machine = {"cpu_model": "Test CPU", "pku": with_pku, "ospke": with_pku, "kernel": "6.1",
               "python": "3.11", "emulated": emulated}
    samples = [Sample(1, "none", 1000.0, 0.0, 1.0), Sample(1, "pkey_mprotect", 500.0, 900.0, 0.5)]
    cycles = {"c/null_syscall/getppid": 320.0}
    if with_pku:
        cycles["c/rdpkru/insn"] = 1.2
    timings = {name: _spread(value, values) for name, value in ns.items()}
    return report.Results(machine, timings, cycles, samples, list(CASES), tsc_ghz=tsc_ghz,
                          quick=values == 1)


def test_timing_is_the_median_and_quartiles_of_the_values():
    timing = report.Timing.of([5e-9, 1e-9, 4e-9, 2e-9, 3e-9])
    assert (timing.median, timing.low, timing.high, timing.values) == pytest.approx((3, 2, 4, 5))
    single = report.Timing.of([2.5e-7])
    assert (single.median, single.low, single.high, single.values) == pytest.approx(
        (250, 250, 250, 1))


def test_report_ratios_and_verdicts_come_from_the_medians_with_their_spread():
    text = report.table(_results())
    # 80/60 = 1.33, and at the extremes of the quartiles 78.4/61.2 and 81.6/58.8
    assert "1.33x (1.28-1.39) met" in text
    # allow: (170 - 2 x 8 for its two WRPKRUs) / 60, the quartiles at opposite extremes
    assert "2.57x (2.46-2.68) MISSED" in text
    assert "3.50x (3.36-3.64) met" in text  # ctypes 350 / pkey_set 100
    assert "1.40x (1.35-1.46) MISSED" in text  # software 1400 / 1000
    assert "indicative" not in text and "crosses" not in text
    assert "320.0x" in text  # null syscall / rdpkru
    assert "0.50 (900/s)" in text
    assert "median of 5-5 pyperf values" in text
    assert "156.8-163.2 ns" in text  # the getppid quartiles
    assert "EMULATED" not in text


def test_a_verdict_whose_spread_crosses_the_bound_says_so():
    results = _results()
    results.timings["pkeys/pkey_get/safe"] = report.Timing(88.0, 80.0, 95.0, 5)  # 1.47x
    line = next(s for s in report.table(results).splitlines() if "pkeys.pkey_get <=" in s)
    assert line.endswith("met (the spread crosses the bound)")


def test_quick_verdicts_are_indicative():
    text = report.table(_results(values=1))
    assert "every verdict is indicative only" in text
    assert "1.33x met (indicative)" in text
    assert "1.40x MISSED (indicative)" in text


def test_tsc_rate_is_printed_and_cycles_that_disagree_with_the_time_are_flagged():
    text = report.table(_results())
    assert "TSC 2.000 GHz, measured" in text
    assert "320.0 !" not in text  # 160 ns x 2 GHz = 320 cycles: consistent
    results = _results(tsc_ghz=0.2)  # 160 ns x 0.2 GHz = 32 cycles, not 320
    flagged = report.table(results)
    assert "320.0 !" in flagged and "differ by more than 2x" in flagged
    assert "GHz" not in report.table(_results(tsc_ghz=None))


def test_report_without_pku_says_so_and_still_reports_the_rest():
    text = report.table(_results(with_pku=False))
    assert text.count("n/a (no PKU)") >= 10
    assert "1.40x (1.35-1.46) MISSED" in text


def test_short_c_loops_are_lengthened_and_scaled_back():
    from pkeys.bench import suite

    asked = []

    def fake_loop(n: int, result) -> int:
        asked.append(n)
        result.nanoseconds = 3 * n  # 3 ns per iteration
        return 0

    time_it = suite._c_loop(fake_loop)
    assert time_it(1) == pytest.approx(3e-9)
    assert time_it(50_000) == pytest.approx(50_000 * 3e-9)
    assert asked == [suite.MIN_C_ITERATIONS, 50_000]


def test_direct_tsc_rate_matches_the_loops_it_came_from():
    from pkeys.bench import cli

    cycles, ghz = cli._direct_cycles(quick=True)
    if not pkeys._binding.lib.pk_arch_is_x86():
        assert ghz is None
        return
    assert ghz is not None and 0.1 < ghz < 10  # a TSC ticks at hundreds of MHz to GHz
    assert "c/null_syscall/getppid" in cycles


def test_emulated_results_are_flagged_and_not_written_without_the_flag(monkeypatch, tmp_path):
    assert "NOT hardware numbers" in report.table(_results(emulated=True))
    from pkeys.bench import cli, machine

    monkeypatch.setattr(machine, "describe", lambda: dict(_results(emulated=True).machine))
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    output = tmp_path / "out.json"
    assert cli.main(parser.parse_args(["-o", str(output)])) == 2
    assert not output.exists()


def test_contention_results_serialise():
    data = json.loads(report.contention_json(_results().contention))
    assert data[1]["mode"] == "pkey_mprotect" and data[1]["relative"] == 0.5


@pytest.mark.anybackend
def test_every_available_case_runs_in_process():
    # The same smoke as `bench --quick`, without a worker process per case
    # (a new interpreter costs seconds on the emulated CPU): each case's
    # timing function runs a few loops here.  On PKU that is every case.
    from pkeys.bench import suite

    hardware = pkeys.hardware_supported() and pkeys.backend() == "hardware"
    expected = [name for name, (needs_pku, _) in CASES.items() if hardware or not needs_pku]
    ran = []
    try:
        for name in expected:
            assert CASES[name][1](4) > 0, name
            ran.append(name)
    finally:
        suite.release_cached()
    assert ran == expected
    if hardware:
        assert len(ran) == len(CASES)


def test_layers_interleaves_the_cases_that_run_here():
    from pkeys.bench import layers, suite

    values = layers.measure(rounds=3, loops=50)
    expected = [n for n in dict.fromkeys([report.FLOOR, *report.LAYER_CASES]) if suite.runs_here(n)]
    if pkeys.backend() == "software":  # pkey_set against mprotect, with 1, 11, 101 mmaps
        expected += [name for mmaps in report.SOFTWARE_MMAPS
                     for name in (report.raw_mprotect_beside(mmaps), report.software_set_case(mmaps))]
    assert list(values) == expected and report.LOCK in values
    assert all(len(v) == 3 and min(v) > 0 for v in values.values())
    text = layers.table(values, 3, 50)
    floor_row = next(line for line in text.splitlines() if line.startswith(report.FLOOR))
    assert "1.00 (1.00-1.00)" in floor_row  # the floor against itself, every round


def test_the_targets_table_gives_every_target_its_ratio_bound_and_verdict():
    # Known per-round values: the ratio of each round, its median and
    # quartiles, the bound, and met or MISSED from the median.
    from pkeys.bench import layers

    rounds = 4
    values = {report.LOCK: [100.0] * rounds, report.FLOOR: [50.0] * rounds,
              "pkeys/allow/key": [130.0, 150.0, 150.0, 170.0],
              "pkeys/allow/4keys": [200.0] * rounds, "pkeys/unlocked/hot": [250.0] * rounds,
              "pkeys/pkey_get/key": [40.0] * rounds, "pkeys/pkey_set/key-same": [110.0] * rounds}
    for mmaps in report.SOFTWARE_MMAPS:
        values[report.software_set_case(mmaps)] = [1000.0 + 10 * mmaps] * rounds
        values[report.raw_mprotect_beside(mmaps)] = [1000.0] * rounds
    rows = {operation: next(line for line in layers.targets_table(values).splitlines()
                            if line[2:].startswith(operation + " "))
            for operation, *_ in report.ISSUE_TARGETS}
    assert len(rows) == len(report.ISSUE_TARGETS) == 8
    allow = rows["with key.allow():"]
    assert "1.50x (1.45-1.55) with Lock" in allow and "<= 1.5x with Lock" in allow
    assert allow.endswith("met (the quartiles cross the bound)")
    four = rows["with pkeys.allow(k1, k2, k3, k4):"]  # 200 over 130, 150, 150, 170
    assert "1.33x (1.29-1.38) one key" in four and four.endswith("<= 1.2x one key  MISSED")
    assert rows["hot with buf.unlocked() as v:"].endswith("met")
    assert rows["pkey_get(Key)"].endswith("met")
    assert "2.20x (2.20-2.20) cffi no-op" in rows["pkey_set(key, same)"]
    assert rows["pkey_set(key, same)"].endswith("MISSED")
    assert rows["software pkey_set, 1 tagged mmap alive"].endswith("met")
    assert "2.01x (2.01-2.01) raw mprotect" in rows["software pkey_set, 101 tagged mmaps alive"]
    assert rows["software pkey_set, 101 tagged mmaps alive"].endswith("MISSED")
    # A case that did not run: n/a, and where it is measured instead.
    del values["pkeys/allow/key"]
    text = layers.targets_table(values)
    row = next(line for line in text.splitlines() if line[2:].startswith("with key.allow(): "))
    assert " n/a " in row and row.rstrip().endswith(")")


def test_a_contention_run_without_a_fault_runs_again_longer(monkeypatch):
    # On a loaded machine a 0.2 s run can end before any worker faulted: the
    # report divided by zero (seen in CI).  A run with no fault is made again.
    calls = []

    class Lib:
        def pk_bench_contention(self, workers, mode, pkey, rate, seconds, result):
            calls.append(seconds)
            result.seconds = seconds
            result.faults = 0 if len(calls) < 3 else 1000
            result.flips = 0
            return 0

    monkeypatch.setattr(contention, "lib", Lib())
    sample = contention.measure(1, "none", seconds=0.2)
    assert calls == [0.2, 0.4, 0.8]
    assert sample.faults_per_second == 1000 / 0.8

    calls.clear()

    class Never(Lib):
        def pk_bench_contention(self, workers, mode, pkey, rate, seconds, result):
            calls.append(seconds)
            result.seconds, result.faults, result.flips = seconds, 0, 0
            return 0

    monkeypatch.setattr(contention, "lib", Never())
    with pytest.raises(RuntimeError, match="no page fault"):
        contention.measure(1, "none", seconds=0.2)
    assert len(calls) == 5
