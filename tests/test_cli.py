"""The command line: doctor, demo, and the vm subcommand's argument handling."""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import pathlib
import re
import subprocess
import sys

import pytest

import pkeys

from . import _libc


def run_pkeys(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pkeys", *args], check=False, capture_output=True, text=True,
        timeout=120, **kwargs
    )


def test_doctor_exits_0_whenever_the_backend_works():
    result = run_pkeys("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for heading in ("CPU", "PKU", "OSPKE", "kernel", "glibc", "backend", "PKRU", "allocated keys",
                    "locked memory", "RLIMIT_MEMLOCK", "threads", "emulated PKU VM"):
        assert heading in out, heading
    assert f"the {pkeys.backend()} backend works" in out
    assert pkeys.backend_reason() in out
    if pkeys.backend() == "software":
        assert "process-wide" in out and "SEGV_ACCERR" in out


def test_doctor_require_hardware_exits_1_without_pku():
    result = run_pkeys("doctor", "--require-hardware")
    assert result.returncode == (0 if pkeys.hardware_supported() else 1), result.stderr
    if pkeys.hardware_supported():
        assert result.stderr == ""
    else:  # why it failed, where a script's log shows it
        (line,) = result.stderr.splitlines()
        assert line.startswith("pkeys doctor: exit status 1 (--require-hardware): no hardware")
        assert json.loads(run_pkeys("doctor", "--json").stdout)["hardware_absence_reason"] in line


def test_doctor_exits_1_when_the_requested_backend_cannot_work():
    env = dict(os.environ, PKEYS_BACKEND="no-such-backend")
    result = run_pkeys("doctor", env=env)
    assert result.returncode == 1
    assert "NOT WORKING" in result.stdout and "no-such-backend" in result.stdout
    assert "does NOT work" in result.stdout
    assert result.stderr.startswith("pkeys doctor: exit status 1: the ")
    assert "no-such-backend" in result.stderr


def test_doctor_json_matches_the_library():
    result = run_pkeys("doctor", "--json")
    report = json.loads(result.stdout)
    assert report["hardware_supported"] == pkeys.hardware_supported()
    assert report["backend"]["name"] == pkeys.backend()
    assert report["cpu"]["ospke"] == pkeys.hardware_supported()
    assert set(report["glibc"]["functions"]) == {
        "pkey_alloc", "pkey_free", "pkey_mprotect", "pkey_get", "pkey_set"
    }
    assert int(report["pkru"]["value"], 16) == pkeys.rdpkru()
    assert len(report["pkru"]["keys"]) == 16
    assert "ready" in report["vm"]
    assert report["backend"]["works"] is True and report["backend"]["failure"] is None
    assert report["schema"] == 1 and report["version"] == pkeys.__version__
    verdict = report["verdict"]
    assert verdict["hardware_usable"] is pkeys.hardware_supported()
    assert verdict["backend_works"] is True
    assert verdict["summary"].endswith(f"the {pkeys.backend()} backend works")
    assert verdict["summary"] in run_pkeys("doctor").stdout


def test_every_field_of_doctor_json_is_documented():
    page = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "commands.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", page, re.MULTILINE))
    report = json.loads(run_pkeys("doctor", "--json").stdout)
    assert set(report) == documented


def test_doctor_reports_this_process_locked_memory_limit_and_threads():
    import resource
    import threading

    from pkeys import doctor

    libc = ctypes.CDLL(None, use_errno=True)
    memory = mmap.mmap(-1, 4 * mmap.PAGESIZE)
    span = (ctypes.c_void_p(_libc.address_of(memory)), ctypes.c_size_t(len(memory)))
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    alone = doctor.collect()
    worker.start()
    try:
        before = doctor.collect()
        if libc.mlock(*span) != 0:
            pytest.skip(f"mlock of 4 pages refused: {os.strerror(ctypes.get_errno())}")
        locked = doctor.collect()
        libc.munlock(*span)
    finally:
        stop.set()
        worker.join()
        memory.close()
    assert locked["locked_memory"] - before["locked_memory"] == 4 * mmap.PAGESIZE
    assert before["threads"] == alone["threads"] + 1
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    expected = {"soft": None if soft == resource.RLIM_INFINITY else soft,
                "hard": None if hard == resource.RLIM_INFINITY else hard}
    assert before["rlimit_memlock"] == expected


def test_doctor_honours_the_backend_variable():
    env = dict(os.environ, PKEYS_BACKEND="software")
    report = json.loads(run_pkeys("doctor", "--json", env=env).stdout)
    assert report["backend"]["name"] == "software"
    assert "PKEYS_BACKEND=software" in report["backend"]["reason"]


def test_hardware_backend_requested_without_pku_fails_clearly_at_first_use():
    if pkeys.hardware_supported():
        return
    env = dict(os.environ, PKEYS_BACKEND="hardware")
    code = "import pkeys\ntry:\n    pkeys.pkey_alloc()\nexcept pkeys.UnsupportedError as e:\n    print(e)"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "PKEYS_BACKEND=hardware" in result.stdout and "unset it" in result.stdout


def test_demo_shows_denied_then_allowed():
    result = run_pkeys("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("DENIED") >= 3
    assert "allowed: b'correct horse battery staple'" in out
    assert "finished" in out
    assert out.index("DENIED") < out.index("allowed")


def test_vm_without_a_command_is_a_usage_error():
    result = run_pkeys("vm")
    assert result.returncode == 2
    assert "give a command" in result.stderr


def test_unknown_command_is_a_usage_error():
    assert run_pkeys("frobnicate").returncode == 2


def test_version_is_the_package_version():
    from importlib.metadata import version

    result = run_pkeys("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"pkeys {pkeys.__version__}\n"
    # pyproject.toml reads its version from pkeys.__version__: one source.
    assert version("pkeys") == pkeys.__version__


def test_every_subcommand_has_a_description():
    from pkeys.__main__ import _parser

    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"doctor", "demo", "vm", "bench"}
    for name in commands.choices:
        result = run_pkeys(name, "--help")
        assert result.returncode == 0, result.stderr
        # usage, a blank line, then the description (not straight to the options)
        paragraphs = result.stdout.split("\n\n")
        assert len(paragraphs) >= 3, result.stdout
        description = paragraphs[1]
        assert not description.startswith(("options:", "positional arguments:")), name
        assert len(description.split()) >= 5, (name, description)


def test_bench_help_points_to_the_docs_that_ship():
    result = run_pkeys("bench", "--help")
    assert result.returncode == 0
    assert "docs/benchmarks-method.md" in result.stdout and "bench/README.md" not in result.stdout
    docs = pathlib.Path(__file__).resolve().parent.parent / "docs"
    assert (docs / "benchmarks.md").is_file() and (docs / "benchmarks-method.md").is_file()


def test_a_reader_that_goes_away_early_gets_no_traceback():
    """`pkeys doctor | head -1`: the reader is gone when doctor writes (here
    before it starts, so the write fails every time)."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "pkeys", "doctor"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, cwd="/")
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 128 + 13


# A plain `pip install .` has no extras: the README's main command must work
# without them, and `pkeys bench` must say what to install.
_WITHOUT_EXTRAS = (
    "import sys\n"
    "class Refuse:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('pyperf', 'matplotlib', 'numpy', 'hypothesis'):\n"
    "            raise ImportError(f'{name} is not installed (test)')\n"
    "sys.meta_path.insert(0, Refuse())\n"
    "from pkeys.__main__ import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("command", [["doctor"], ["demo"], ["--version"]])
def test_the_main_commands_work_without_the_optional_extras(command):
    result = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, *command],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_bench_without_pyperf_says_what_to_install():
    result = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, "bench", "--quick"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "pip install 'pkeys[bench]'" in result.stderr
    assert "Traceback" not in result.stderr
