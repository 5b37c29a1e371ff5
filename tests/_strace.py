"""Counting the syscalls a hot loop makes: the loop of
tests/simulated/unlocked_loop.py (an ``unlocked()`` block), or of another
script that marks its loop the same way (software_set_loop.py: a software
``pkey_set``), between its two marker syscalls, under ``strace -f``.  strace is installed by ``pkeys vm setup`` (as QEMU is), and
the emulated guest sees the host's /usr over 9p, so a missing strace fails
the test instead of skipping it."""

from __future__ import annotations

import collections
import pathlib
import shutil
import subprocess
import sys

import pytest

LOOP = pathlib.Path(__file__).resolve().parent / "simulated" / "unlocked_loop.py"
BEGIN, END = "pkeys-loop-begin", "pkeys-loop-end"


def loop_syscalls(tmp_path: pathlib.Path, rounds: int = 1000, env: dict[str, str] | None = None,
                  cwd: pathlib.Path | None = None,
                  script: pathlib.Path = LOOP) -> tuple[str, collections.Counter[str]]:
    """The backend the loop ran on, and its syscalls by name."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing: `python -m pkeys vm setup` installs it "
                    "(or: apt-get install strace)")
    trace = tmp_path / "trace.txt"
    # -f: every thread; -qq: no attach/exit notes; one line per call.
    result = subprocess.run([strace, "-f", "-qq", "-o", str(trace), sys.executable, str(script),
                             str(rounds)], cwd=cwd or tmp_path, env=env, check=False,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    backend, ran = result.stdout.split()
    assert int(ran) == rounds
    counts: collections.Counter[str] = collections.Counter()
    markers = 0
    inside = False
    for line in trace.read_text().splitlines():
        if BEGIN in line or END in line:
            markers += 1
            inside = BEGIN in line
            continue
        if inside:
            # "PID  name(args...) = result"; a call split by a signal
            # ("<... name resumed>") counts once, at its start.
            call = line.split(None, 1)[1] if line[:1].isdigit() else line
            if not call.startswith(("<...", "---", "+++")):
                counts[call.split("(", 1)[0]] += 1
    assert markers == 2, f"the markers were not traced: {trace.read_text()[-2000:]}"
    return backend, counts
