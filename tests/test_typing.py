"""The public API's types, as a user's type checker sees them: a correct
program passes ``mypy --strict``, and each deliberate misuse is caught on
its own line."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROGRAMS = pathlib.Path(__file__).resolve().parent / "typing"
ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<message>.*?)(?:  \[(?P<code>[a-z-]+)\])?$")
EXPECTED = re.compile(r"# E: \[(?P<code>[a-z-]+)\]")

pytestmark = pytest.mark.slow


def mypy_errors(program: pathlib.Path, cache: pathlib.Path) -> dict[int, list[tuple[str, str]]]:
    """mypy --strict's errors in ``program`` (not in the pkeys it imports),
    by line: (code, message)."""
    # MYPYPATH: check against this checkout's pkeys, whatever is installed.
    env = dict(os.environ, MYPYPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--no-pretty",
         "--cache-dir", str(cache), str(program)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    errors: dict[int, list[tuple[str, str]]] = {}
    for line in result.stdout.splitlines():
        match = ERROR.match(line)
        if match and pathlib.Path(match["path"]).resolve() == program:
            errors.setdefault(int(match["line"]), []).append((match["code"] or "", match["message"]))
    return errors


def test_a_correct_program_type_checks_clean(tmp_path):
    errors = mypy_errors(PROGRAMS / "user_program.py", tmp_path)
    assert not errors, "\n".join(f"line {n}: {e}" for n, e in sorted(errors.items()))


def test_the_correct_program_also_runs():
    result = subprocess.run([sys.executable, str(PROGRAMS / "user_program.py")], check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rights while open: <PkeyRights.DISABLE_WRITE: 2>" in result.stdout


def test_each_misuse_is_an_error_on_its_own_line(tmp_path):
    program = PROGRAMS / "misuse.py"
    expected = {
        number: match["code"]
        for number, text in enumerate(program.read_text().splitlines(), start=1)
        if (match := EXPECTED.search(text))
    }
    assert len(expected) >= 37
    errors = mypy_errors(program, tmp_path)
    missed = {n: f"{expected[n]}: {program.read_text().splitlines()[n - 1].strip()}"
              for n in sorted(expected.keys() - errors.keys())}
    unexpected = {n: errors[n] for n in sorted(errors.keys() - expected.keys())}
    wrong_code = {n: (expected[n], errors[n]) for n in sorted(expected.keys() & errors.keys())
                  if expected[n] not in {code for code, _ in errors[n]}}
    assert not missed, f"misuse that type-checks (the API is Any there): {missed}"
    assert not unexpected, f"errors on lines not marked # E: {unexpected}"
    assert not wrong_code, f"a different error than the one marked: {wrong_code}"
