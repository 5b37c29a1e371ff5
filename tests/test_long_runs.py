"""The long-run commands that docs/testing.md publishes keep working: the
native one runs as written (with a small count), and each ``pkeys vm`` one
parses with the real ``pkeys vm`` options and names a test file that reads
the variables it sets.  CI runs both tests on the emulated CPU already."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def long_run_commands() -> list[list[str]]:
    text = (ROOT / "docs" / "testing.md").read_text()
    section = text.split("### Long runs", 1)[1].split("\n### ", 1)[0]
    # Indented code blocks; a trailing backslash continues the command.
    joined = re.sub(r"\\\n\s*", "", section)
    return [shlex.split(line) for line in joined.splitlines() if line.startswith("        ")]


def test_the_section_publishes_a_native_and_an_emulated_command_for_each_test() -> None:
    commands = long_run_commands()
    files = {word for command in commands for word in command if word.startswith("tests/")}
    assert files == {"tests/test_fuzz.py", "tests/test_revocation_stress.py"}
    assert any(command[:3] == ["python", "-m", "pkeys"] for command in commands)
    assert any(command[0].startswith("PKEYS_FUZZ_EXAMPLES=") for command in commands)


def test_each_vm_command_parses_and_its_variables_are_read_by_its_test() -> None:
    import argparse

    from pkeys.vm.cli import add_arguments

    checked = 0
    for command in long_run_commands():
        if command[:4] != ["python", "-m", "pkeys", "vm"]:
            continue
        separator = command.index("--")
        parser = argparse.ArgumentParser(prog="pkeys vm")
        add_arguments(parser)
        parser.parse_args(command[4:separator])  # exits (SystemExit) on a drifted option
        guest = command[separator + 1:]
        assert guest[0] == "env"
        assignments = guest[1:guest.index("python3")]
        variables = [word.split("=", 1)[0] for word in assignments]
        test_file = next(word for word in guest if word.startswith("tests/"))
        source = (ROOT / test_file).read_text()
        assert variables and all(name in source for name in variables), (test_file, variables)
        checked += 1
    assert checked == 2


def test_the_native_fuzz_command_runs_as_written() -> None:
    (command,) = [c for c in long_run_commands() if c[0].startswith("PKEYS_FUZZ_EXAMPLES=")]
    environment = dict(os.environ)
    while "=" in command[0]:
        name, value = command.pop(0).split("=", 1)
        environment[name] = "3" if name == "PKEYS_FUZZ_EXAMPLES" else value
    assert command[0] == "python"
    result = subprocess.run([sys.executable, *command[1:], "-p", "no:cacheprovider", "-q"],
                            cwd=ROOT, env=environment, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
