"""The pkeys pytest plugin, used from a throwaway project as a user would.

Its ``--pkeys-vm`` path is exercised by this project's own ``pku`` tier
(tests/run.sh runs it on two kernels); here: the marker, the skip and its
reason, PKEYS_REQUIRE_PKU, and the fixtures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import pkeys
from pkeys import _secretmem

HARDWARE = pkeys.hardware_supported() and pkeys.backend() == "hardware"


def pkeys_secretmem_available() -> bool:
    return _secretmem.availability()[0]


def run_pytest(tmp_path, source: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_user.py").write_text(textwrap.dedent(source))
    environ = {k: v for k, v in os.environ.items() if k not in ("PKEYS_REQUIRE_PKU", "PYTEST_ADDOPTS")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--strict-markers", "-rs",
         "-p", "pkeys.pytest_plugin", *args, str(tmp_path / "test_user.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env={**environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **env})


MARKED = """
    import pytest

    @pytest.mark.pku
    def test_needs_keys():
        pass
"""


@pytest.mark.skipif(HARDWARE, reason="this machine has PKU: marked tests run natively")
def test_marked_tests_skip_with_a_reason_naming_the_option(tmp_path):
    result = run_pytest(tmp_path, MARKED)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "run `pytest --pkeys-vm`" in result.stdout


@pytest.mark.skipif(HARDWARE, reason="this machine has PKU: nothing to refuse")
def test_require_pku_turns_the_skip_into_an_error(tmp_path):
    result = run_pytest(tmp_path, MARKED, PKEYS_REQUIRE_PKU="1")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "PKEYS_REQUIRE_PKU=1" in result.stderr


def test_the_options_are_registered(tmp_path):
    result = run_pytest(tmp_path, MARKED, "--help")
    assert "--pkeys-vm " in result.stdout and "--pkeys-vm-kernel=SERIES" in result.stdout


def test_expect_fault_returns_the_fault_and_pkey_gives_a_fresh_key(tmp_path):
    result = run_pytest(tmp_path, """
        import ctypes, mmap
        import pkeys

        def test_an_unmapped_fault(expect_fault):
            fault = expect_fault(lambda: ctypes.string_at(8, 1), kind=pkeys.FaultKind.UNMAPPED)
            assert fault.address == 8 and fault.signal == 11 and fault.pkey is None

        def test_a_key_fault(expect_fault, pkey):
            page = mmap.mmap(-1, mmap.PAGESIZE)
            pkey.protect(page)
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            fault = expect_fault(lambda: ctypes.string_at(address, 1))
            assert fault.kind in (pkeys.FaultKind.PKEY, pkeys.FaultKind.PROTECTION)
            assert fault.address == address
            if fault.kind is pkeys.FaultKind.PKEY:
                assert fault.pkey == pkey.pkey
            pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)

        def test_pkey_is_fresh(pkey):
            assert not pkey.closed and pkey.pkey in pkeys.allocated_keys()

        def test_no_fault_fails(expect_fault):
            expect_fault(lambda: None)

        def test_a_python_error_fails(expect_fault):
            expect_fault(lambda: 1 / 0)
    """)
    out = result.stdout
    assert "2 failed, 3 passed" in out, out + result.stderr
    assert "expected a fault, but the child exited with status 0" in out
    assert "ZeroDivisionError" in out


class _Terminal:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write_line(self, line: str) -> None:
        self.lines.append(line)


class _Config:
    """What the plugin's host side reads from pytest's config."""

    def __init__(self, terminal: _Terminal, verbose: int) -> None:
        self.verbose = verbose
        self.pluginmanager = self
        self.terminal = terminal

    def get_plugin(self, name: str) -> _Terminal | None:
        return self.terminal if name == "terminalreporter" else None

    def getini(self, name: str) -> list[str]:
        return []

    def getoption(self, name: str) -> object:
        return {"verbose": self.verbose, "pkeys_vm_kernel": ["6.1", "6.12"]}[name]


def _phases(nodeid: str, outcome: str = "passed") -> str:
    import json

    return "".join(json.dumps({"nodeid": nodeid, "when": when, "outcome": o}) + "\n"
                   for when, o in (("setup", "passed"), ("call", outcome), ("teardown", "passed")))


@pytest.mark.parametrize("verbose", [0, 1])
def test_progress_while_the_vms_run(tmp_path, verbose):
    """Finished VM items are counted per kernel as the guests write them
    (complete lines only, at most every PROGRESS_SECONDS unless the VMs are
    done); -v shows each result as it arrives."""
    from pkeys import pytest_plugin

    terminal = _Terminal()
    host = pytest_plugin._Host(_Config(terminal, verbose))
    host.exchange = tmp_path
    host.items = [object(), object(), object()]
    old, new = (pytest_plugin._Session(k, tmp_path / f"{k}.log", items=3) for k in host.kernels)
    host.sessions = [old, new]
    old.release, new.release = "6.1.0-57-amd64", "6.12.118+deb12-amd64"
    host._progress()
    assert terminal.lines == []  # nothing written yet

    first = _phases("t.py::test_a") + _phases("t.py::test_b", "failed")
    (tmp_path / f"results-{old.release}.jsonl").write_text(first + '{"nodeid": "t.py::te')
    (tmp_path / f"results-{new.release}.jsonl").write_text(_phases("t.py::test_a"))
    host.last_progress -= pytest_plugin.PROGRESS_SECONDS
    host._progress()
    count = "pkeys vm: items finished: 6.1.0-57-amd64 2/3, 6.12.118+deb12-amd64 1/3"
    results = ["pkeys vm (6.1.0-57-amd64): t.py::test_a PASSED",
               "pkeys vm (6.1.0-57-amd64): t.py::test_b FAILED",
               "pkeys vm (6.12.118+deb12-amd64): t.py::test_a PASSED"]
    assert terminal.lines == ([*results, count] if verbose else [count])

    # More arrives within PROGRESS_SECONDS: no new count until the VMs are done.
    terminal.lines.clear()
    with open(tmp_path / f"results-{old.release}.jsonl", "a") as results_file:
        results_file.write('st_c", "when": "setup", "outcome": "skipped"}\n')
        results_file.write('{"nodeid": "t.py::test_c", "when": "teardown", "outcome": "passed"}\n')
    host._progress()
    skipped = "pkeys vm (6.1.0-57-amd64): t.py::test_c SKIPPED (in setup)"
    assert terminal.lines == ([skipped] if verbose else [])
    (tmp_path / f"results-{new.release}.jsonl").write_text(
        _phases("t.py::test_a") + _phases("t.py::test_b") + _phases("t.py::test_c"))
    host.done.set()
    terminal.lines.clear()
    host._wait()
    assert terminal.lines[-1] == "pkeys vm: items finished: 6.1.0-57-amd64 3/3, 6.12.118+deb12-amd64 3/3"
    assert len(terminal.lines) == (3 if verbose else 1)
    host._wait()  # nothing new: nothing printed again
    assert len(terminal.lines) == (3 if verbose else 1)


class _Item:
    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self.path = nodeid.split("::")[0]


def test_also_kernels_run_the_also_tests_on_those_kernels_only(tmp_path):
    """pkeys_vm_also_kernels: every marked test on each kernel, the
    pkeys_vm_also ones only where named, in each guest's node-id file and
    its file arguments, and in the counts the progress line divides by."""
    from pkeys import pytest_plugin

    class Config(_Config):
        rootpath, inipath = tmp_path, None

        def getini(self, name: str) -> list[str]:
            return {"pkeys_vm_also": ["anybackend"], "pkeys_vm_also_kernels": ["6.12"]}.get(name, [])

    host = pytest_plugin._Host(Config(_Terminal(), 0))
    host.exchange = tmp_path
    host.items = [_Item("a.py::test_marked"), _Item("b.py::test_also")]
    host.only_vm, host.twice = {"a.py::test_marked"}, {"b.py::test_also"}
    host._plan_sessions()
    old, new = host.sessions
    assert (old.kernel, old.runs_also, old.items) == ("6.1", False, 1)
    assert (new.kernel, new.runs_also, new.items) == ("6.12", True, 2)
    assert (tmp_path / "nodeids-0.txt").read_text() == "a.py::test_marked\n"
    assert (tmp_path / "nodeids-1.txt").read_text() == "a.py::test_marked\nb.py::test_also\n"
    assert "b.py" not in host._guest_argv(old) and "b.py" in host._guest_argv(new)


def test_the_guest_never_inherits_pkeys_backend(tmp_path, monkeypatch):
    """PKEYS_BACKEND=software makes a PKU machine delegate like one without
    PKU; the guests must still run the hardware backend they exist for."""
    from pkeys import pytest_plugin

    monkeypatch.setenv("PKEYS_BACKEND", "software")
    host = pytest_plugin._Host(_Config(_Terminal(), 0))
    host.exchange = tmp_path
    env = host._guest_env(1)
    assert "PKEYS_BACKEND" not in env
    assert env[pytest_plugin.NODEIDS_ENV] == "nodeids-1.txt"
    assert env[pytest_plugin.REQUIRE_ENV] == "1"


def test_a_kernel_named_twice_runs_once(tmp_path):
    # Two guests of one release wrote into one results file (INTERNALERROR).
    from pkeys import pytest_plugin

    class Config(_Config):
        def getoption(self, name: str) -> object:
            return {"verbose": 0, "pkeys_vm_kernel": ["6.12", "6.1", "6.12"]}[name]

    assert pytest_plugin._Host(Config(_Terminal(), 0)).kernels == ["6.12", "6.1"]


def test_also_kernels_must_name_a_kernel_that_runs(tmp_path):
    from pkeys import pytest_plugin

    class Config(_Config):
        def getini(self, name: str) -> list[str]:
            return ["6.6"] if name == "pkeys_vm_also_kernels" else []

    with pytest.raises(pytest.UsageError, match="6.6"):
        pytest_plugin._Host(Config(_Terminal(), 0))


@pytest.mark.anybackend
@pytest.mark.skipif(not pkeys_secretmem_available(), reason="no secret memory here")
def test_expect_fault_refuses_a_fault_that_only_secret_memory_missing_in_the_child_caused(
        tmp_path):
    """A forked child has no secret-memory pages: reading one faults
    'unmapped' whatever the key says.  The fixture used to return that
    fault, and a test that only checked "it faults" passed."""
    result = run_pytest(tmp_path, """
        import ctypes
        import pkeys

        def test_default_buffer(expect_fault, pkey):
            with pkeys.ProtectedBuffer(32, key=pkey) as secret:
                assert secret.backing == "secretmem"
                expect_fault(lambda: ctypes.string_at(secret.address, 1))

        def test_unmapped_asked_for(expect_fault):
            secret = pkeys.ProtectedBuffer(32)
            fault = expect_fault(lambda: ctypes.string_at(secret.address, 1),
                                 kind=pkeys.FaultKind.UNMAPPED)
            assert fault.kind is pkeys.FaultKind.UNMAPPED

        def test_the_readmes_example(expect_fault, pkey):
            secret = pkeys.ProtectedBuffer(32, key=pkey, secretmem=False)
            fault = expect_fault(lambda: ctypes.string_at(secret.address, 1))
            if pkeys.backend() == "hardware":
                assert fault.kind.value == "pkey" and fault.pkey == pkey.pkey
            else:
                assert fault.kind.value == "protection"
            secret.close()
    """)
    out = result.stdout
    assert "1 failed, 2 passed" in out, out + result.stderr
    assert "test_default_buffer" in out
    assert "in secret memory (memfd_secret) that a forked child does not have" in out
    assert "secretmem=False" in out
