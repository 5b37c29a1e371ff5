"""The command line: doctor, demo, and the vm subcommand's argument handling."""

from __future__ import annotations

import json
import subprocess
import sys

import pkeys


def run_pkeys(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pkeys", *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_doctor_reports_backend_and_exit_status():
    result = run_pkeys("doctor")
    expected = 0 if pkeys.hardware_supported() else 1
    assert result.returncode == expected, result.stderr
    out = result.stdout
    for heading in ("CPU", "PKU", "OSPKE", "kernel", "glibc", "backend", "PKRU", "allocated keys",
                    "RLIMIT_MEMLOCK", "emulated PKU VM"):
        assert heading in out, heading
    assert pkeys.backend_reason() in out
    if pkeys.backend() == "software":
        assert "process-wide" in out and "SEGV_ACCERR" in out


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


def test_doctor_honours_the_backend_variable():
    import os

    env = dict(os.environ, PKEYS_BACKEND="software")
    report = json.loads(run_pkeys("doctor", "--json", env=env).stdout)
    assert report["backend"]["name"] == "software"
    assert "PKEYS_BACKEND=software" in report["backend"]["reason"]


def test_hardware_backend_requested_without_pku_fails_clearly_at_first_use():
    import os

    if pkeys.hardware_supported():
        return
    env = dict(os.environ, PKEYS_BACKEND="hardware")
    code = "import pkeys\ntry:\n    pkeys.pkey_alloc()\nexcept pkeys.UnsupportedError as e:\n    print(e)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
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
