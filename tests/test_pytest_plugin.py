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
