"""The GitHub Actions workflow runs what the suite runs: it calls tests/run.sh
(the one list of extras, kernels and host packages) and repeats none of it,
so the two cannot drift apart again."""

from __future__ import annotations

import pathlib
import re
import shlex

import yaml

import pkeys.vm.tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
RUN_SH = ROOT / "tests" / "run.sh"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps() -> list[dict]:
    (job,) = workflow()["jobs"].values()
    return job["steps"]


def run_lines() -> list[str]:
    return [line for step in steps() if "run" in step for line in step["run"].splitlines()]


def shell_array(name: str) -> list[str]:
    """A bash array assigned in tests/run.sh, e.g. kernels=(6.1 6.12)."""
    match = re.search(rf"^{name}=\((?P<items>[^)]*)\)$", RUN_SH.read_text(), re.MULTILINE)
    assert match, f"tests/run.sh assigns no {name}=(...)"
    return shlex.split(match["items"])


def apt_packages(line: str) -> list[str]:
    words = shlex.split(line.split("apt-get install", 1)[1].split("&&")[0])
    return [word for word in words if not word.startswith("-")]


def test_the_workflow_runs_the_test_script_and_installs_nothing_of_its_own():
    lines = run_lines()
    assert "bash .ci/run" in lines or "bash tests/run.sh" in lines
    assert "exec bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()
    repeated = [line for line in lines if re.search(r"\bpip\b|\bpytest\b|pkeys vm setup|mkdocs", line)]
    assert not repeated, f"the workflow repeats what tests/run.sh does: {repeated}"


def test_the_script_installs_the_extras_the_suite_needs_from_one_list():
    text = RUN_SH.read_text()
    (extras,) = re.findall(r"^extras=(\S+)$", text, re.MULTILINE)
    assert set(extras.split(",")) >= {"test", "bench", "docs"}
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs == [line for line in installs if '-e ".[$extras]"' in line] and len(installs) == 1
    (docs,) = [line for line in text.splitlines() if "mkdocs build" in line]
    # --quiet would hide the warnings from strict mode as well as from the terminal.
    assert "--strict" in docs and "--quiet" not in docs


def test_the_workflow_installs_the_host_packages_the_script_names():
    (line,) = [line for line in run_lines() if "apt-get install" in line]
    assert apt_packages(line) == shell_array("host_packages")
    # ...which are those `pkeys vm setup` installs, and the Debian keyring it reads.
    assert set(shell_array("host_packages")) == {*pkeys.vm.tools.PACKAGES.values(), "debian-archive-keyring"}


def test_the_workflow_is_contained_and_covers_both_python_versions():
    flow = workflow()
    assert flow["permissions"] == {"contents": "read"}
    (job,) = flow["jobs"].values()
    assert 0 < job["timeout-minutes"] <= 120
    assert job["strategy"]["matrix"]["python-version"] == ["3.11", "3.13"]
    (setup,) = [step for step in job["steps"] if step.get("uses", "").startswith("actions/setup-python")]
    assert setup["with"]["python-version"] == "${{ matrix.python-version }}"


def test_the_kernel_cache_key_changes_with_the_kernels():
    (cache,) = [step for step in steps() if step.get("uses", "").startswith("actions/cache")]
    key = cache["with"]["key"]
    # The kernel series are listed in tests/run.sh, the download code in pkeys/vm/.
    assert "hashFiles('tests/run.sh', 'pkeys/vm/**')" in key
    assert shell_array("kernels") == ["6.1", "6.12"]
    # Debian's newer packages of a series: the key changes every week, and no
    # restore-keys bring an older kernel back.
    assert "steps.week.outputs.week" in key
    assert "restore-keys" not in cache["with"]
