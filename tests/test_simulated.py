"""The simulated-register build (PKEYS_BUILD_SIMULATED_PKU=1), built once
into build/simulated-pku by tools/build-simulated.sh and run in
subprocesses: its API natively, its self-description, and `pkeys bench`
against it (a smoke run: no timing is asserted)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from pkeys.bench.report import HARDWARE_PATH, ISSUE_TARGETS

from ._strace import loop_syscalls

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture(scope="session")
def simulated_build() -> pathlib.Path:
    result = subprocess.run(["bash", str(ROOT / "tools" / "build-simulated.sh")], check=False,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 0, result.stderr[-3000:]
    return pathlib.Path(result.stdout.strip().splitlines()[-1])


def run_simulated(build: pathlib.Path, cwd: pathlib.Path, *args: str,
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """This interpreter with the simulated build first on sys.path, from a
    directory without a pkeys/ of its own."""
    env = dict(os.environ, PYTHONPATH=str(build))
    env.pop("PKEYS_BACKEND", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


def test_the_simulated_build_runs_the_hardware_path_natively(simulated_build, tmp_path):
    result = run_simulated(simulated_build, tmp_path, str(ROOT / "tests" / "simulated" / "api_check.py"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_the_simulated_build_names_itself_in_doctor(simulated_build, tmp_path):
    result = run_simulated(simulated_build, tmp_path, "-m", "pkeys", "doctor", "--json")
    report = json.loads(result.stdout)
    assert report["simulated_register"] is True
    assert report["backend"]["name"] == "simulated"
    assert "PROTECTS NOTHING" in report["backend"]["reason"]
    assert report["hardware_supported"] is False
    assert report["revocation"]["works"] is True
    text = run_simulated(simulated_build, tmp_path, "-m", "pkeys", "doctor").stdout
    assert text.startswith("!! SIMULATED-REGISTER BUILD") and "NOTHING IS PROTECTED" in text


def test_bench_quick_runs_the_layer_cases_on_the_simulated_register(simulated_build, tmp_path):
    from pkeys.bench.suite import SIMULATED_CASES

    output = tmp_path / "quick.json"
    result = run_simulated(simulated_build, tmp_path, "-m", "pkeys", "bench", "--quick",
                           "--contention-seconds", "0.05", "-o", str(output),
                           "--allow-emulated", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    pyperf = pytest.importorskip("pyperf")
    ran = set(pyperf.BenchmarkSuite.load(str(output)).get_benchmark_names())
    assert SIMULATED_CASES <= ran, SIMULATED_CASES - ran
    assert "simulated register" in result.stdout
    for name in SIMULATED_CASES:
        if name.startswith(("pkeys/", "c/")):
            line = next(line for line in result.stdout.splitlines() if line.startswith(name + " "))
            assert "simulated register" in line, line
    # Issue 16's table, for both builds: every target with its measured
    # ratio (median, quartiles) and met or MISSED where it is measured.
    tables = targets_tables(result.stdout)
    assert set(tables) == {"simulated-register", "software"}, result.stdout[-3000:]
    for build, table in tables.items():
        for operation, _, _, bound, where in ISSUE_TARGETS:
            row = table[operation]
            if (where == HARDWARE_PATH) == (build == "simulated-register"):
                assert MEASURED_ROW.search(row), row
                assert f"<= {bound}x" in row, row
            else:
                other = "software" if build == "simulated-register" else "simulated-register"
                assert row.endswith(f"n/a (measured in the {other} build)"), row


MEASURED_ROW = re.compile(r" \d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\) .*  (met|MISSED)( \(.*\))?$")


def targets_tables(stdout: str) -> dict[str, dict[str, str]]:
    """build -> operation -> row, from each "issue 16 targets, <build> build" table."""
    tables: dict[str, dict[str, str]] = {}
    rows: dict[str, str] | None = None
    for line in stdout.splitlines():
        if line.startswith("issue 16 targets, "):
            rows = tables.setdefault(line.removeprefix("issue 16 targets, ").split(" build")[0], {})
        elif rows is not None and line.startswith("  "):
            rows.update((op, line) for op, *_ in ISSUE_TARGETS if line[2:].startswith(op + " "))
        else:
            rows = None
    return tables


def test_a_hot_unlocked_loop_makes_no_syscall_on_the_simulated_register(simulated_build, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(simulated_build), PYTHONWARNINGS="ignore")
    env.pop("PKEYS_BACKEND", None)
    backend, syscalls = loop_syscalls(tmp_path, 1000, env=env)
    assert backend == "simulated"
    assert sum(syscalls.values()) == 0, dict(syscalls)


def test_layers_measures_every_layer_case_on_the_simulated_register(simulated_build, tmp_path):
    from pkeys.bench.report import LAYER_CASES

    result = run_simulated(simulated_build, tmp_path, "-W", "ignore", "-m", "pkeys.bench.layers",
                           "--rounds", "3", "--loops", "100")
    assert result.returncode == 0, result.stderr[-3000:]
    layers_table = result.stdout.split("\n\n")[1]  # then issue 16's targets
    rows = {line.split()[0]: line for line in layers_table.splitlines()[1:]}
    assert set(LAYER_CASES) <= set(rows), result.stdout
    for name in LAYER_CASES:
        if name.startswith("pkeys/"):
            assert rows[name].endswith("simulated register"), rows[name]
