"""`pkeys bench`: the smoke run (every case runs; timings are never asserted)
and the report's arithmetic on known numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import pkeys
from pkeys.bench import contention, report
from pkeys.bench.contention import Sample
from pkeys.bench.suite import CASES

pyperf = pytest.importorskip("pyperf")


def test_quick_run_executes_every_case(tmp_path):
    output = tmp_path / "quick.json"
    result = subprocess.run(
        [sys.executable, "-m", "pkeys", "bench", "--quick", "-o", str(output), "--allow-emulated"],
        capture_output=True, text=True, timeout=600,
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
    contention_runs = [n for n in ran if n.startswith("contention/")]
    assert len(contention_runs) == len(contention.worker_counts()) * (3 if hardware else 2)
    assert "targets" in result.stdout and "syscall / instruction" in result.stdout
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


def _results(emulated: bool = False, with_pku: bool = True) -> report.Results:
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
    return report.Results(machine, ns, {"c/rdpkru/insn": 1.2}, samples, list(CASES))


def test_report_ratios_and_verdicts():
    text = report.table(_results())
    assert "1.33x  met" in text  # pkey_get 80 / 60
    assert "2.83x  met" in text  # allow 170 / 60
    assert "3.50x  met" in text  # ctypes 350 / pkey_set 100
    assert "1.40x  MISSED" in text  # software 1400 / 1000
    assert "320.0x" in text  # null syscall / rdpkru
    assert "0.50 (900/s)" in text
    assert "EMULATED" not in text


def test_report_without_pku_says_so_and_still_reports_the_rest():
    text = report.table(_results(with_pku=False))
    assert text.count("n/a (no PKU)") >= 10
    assert "1.40x  MISSED" in text


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
