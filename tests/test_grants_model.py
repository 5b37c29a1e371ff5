"""The grants core checked exhaustively (issue 15, point 4).

``tests/model/grants_model.c`` (test only) includes ``csrc/grants.c``, the
core with no lock, register or mprotect, and explores every interleaving of threads running scopes on one key with a
revoker revoking it, and of each revocation's handler with their steps,
driving the real grant functions.  No reachable state may leave a thread
with the key open outside its scopes once a revocation has returned.  A
mutant that takes a first grant's base from the register, as the code did
before issue 15's item 2 was fixed, must be caught.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "model" / "grants_model.c"

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def compile_checker(source: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
    """A test-only C program over csrc/grants.c, warning-free as the shim is."""
    binary = directory / source.stem
    subprocess.run(["cc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror",
                    f"-I{ROOT / 'csrc'}", str(source), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    return binary


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return compile_checker(MODEL, tmp_path_factory.mktemp("model"))


def explore(model, *args: str) -> tuple[dict[str, int], str]:
    env = dict(os.environ, GRANTS_MODEL_TABLE_LOG2="21")
    done = subprocess.run([str(model), *args], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode in (0, 1), done.stderr
    words = done.stdout.split()
    return {words[i]: int(words[i + 1]) for i in (0, 2, 4)}, done.stdout


@pytest.mark.parametrize("threads, program, revocations", [
    ("2", "EX", "2"),      # two threads, one scope each, two revocations
    ("2", "EXEX", "1"),    # two scopes in turn / nested (the second thread), one revocation
])
def test_no_reachable_state_leaves_the_key_open_after_a_revocation(model, threads, program,
                                                                   revocations):
    counts, output = explore(model, threads, program, revocations)
    assert counts["states"] > 10_000, output  # it explored, not a trivial run
    assert counts["violations"] == 0, output


def test_the_exploration_finds_the_old_base_from_the_register(model):
    counts, output = explore(model, "2", "EXEX", "1", "base-from-register")
    assert counts["violations"] > 0, output


FUSED = ROOT / "tests" / "model" / "grants_fused.c"


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    return compile_checker(FUSED, tmp_path_factory.mktemp("fused"))


def run_fused(binary, *args: str) -> tuple[dict[str, int], str]:
    done = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    words = done.stdout.split()[-4:]
    return {words[0]: int(words[1]), words[2]: int(words[3])}, done.stdout


def test_the_one_pass_scope_functions_are_the_sequences_they_replace(fused):
    # The hardware backend's hot path walks a scope's keys once per step
    # (pk_grants_enter, _exit_check, _withdraw); the exploration above
    # checks the functions they are made of, this checks the making.
    counts, output = run_fused(fused)
    assert counts["cases"] > 1_000_000, output
    assert counts["mismatches"] == 0, output


def test_a_token_epoch_read_before_counting_is_found(fused):
    counts, output = run_fused(fused, "epoch-before-count")
    assert counts["mismatches"] > 0, output
