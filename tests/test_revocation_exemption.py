"""A thread that provably never had a key need not answer its revocation
(csrc/exposure.c): so a thread that blocks every signal, such as
faulthandler's watchdog, stalls no revocation of a key it never had, and
every thread that had, or may have had, the key must still answer.

Each scenario (tests/_exemption.py) runs in a fresh interpreter: a
raw-layer register write anywhere in the process turns exemption off for
good, and the test runner's process has made some.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.pku

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_scenario(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"from tests._exemption import {name}; {name}()"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{name}: exit {result.returncode}\n{result.stderr}"


@pytest.mark.parametrize("scenario", [
    "born_before_the_key",
    "born_after_the_key",
    "born_inside_a_block",
    "faulthandler_watchdog_started_before_the_key",
    "after_more_thread_births_than_records",
])
def test_a_thread_that_never_had_the_key_is_left_out(scenario):
    run_scenario(scenario)


@pytest.mark.parametrize("scenario", [
    "took_a_grant",
    "set_its_own_rights",
    "took_a_grant_though_born_before",
    "allocated_it_open",
    "born_with_it_open",
    "faulthandler_watchdog_started_after_the_key",
    "opened_for_every_thread",
    "after_a_raw_register_write",
])
def test_a_thread_that_may_have_had_the_key_must_answer(scenario):
    run_scenario(scenario)


def test_a_grant_racing_with_a_revocation_that_left_its_thread_out_is_revoked_too():
    run_scenario("a_grant_during_the_revocation_is_revoked_too")

