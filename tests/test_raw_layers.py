"""The raw layers (pkeys.sys, pkeys.glibc, pkeys.pkru) and the promise that
no call ever dies of SIGILL on a CPU without PKU."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import pkeys
from pkeys._child import run_in_child

no_pku = pytest.mark.skipif(pkeys.hardware_supported(), reason="checks the behaviour without PKU")


@no_pku
def test_register_and_glibc_register_functions_refuse_instead_of_sigill():
    def child() -> None:
        for call in (pkeys.pkru.read, lambda: pkeys.pkru.write(0x55555554),
                     lambda: pkeys.glibc.pkey_get(1), lambda: pkeys.glibc.pkey_set(1, 0),
                     lambda: pkeys.glibc.pkey_get(99)):
            with pytest.raises(pkeys.UnsupportedError, match="OSPKE") as info:
                call()
            assert info.value.errno == errno.EOPNOTSUPP

    # In a child: were any of them to execute RDPKRU/WRPKRU, it would die of SIGILL.
    result = run_in_child(child)
    assert result.exitcode == 0, (result.describe(), result.stderr)


@no_pku
def test_kernel_refuses_pkey_alloc_without_pku():
    with pytest.raises(OSError) as info:
        pkeys.sys.pkey_alloc(0, 0)
    assert info.value.errno in (errno.EINVAL, errno.ENOSPC)


def test_pkey_mprotect_with_key_minus_one_is_plain_mprotect(page):
    address = int(pkeys._binding.ffi.cast("uintptr_t", pkeys._binding.ffi.from_buffer(page)))
    pkeys.sys.pkey_mprotect(address, len(page), pkeys.PROT_READ, -1)
    assert pkeys.probe(page) is None and pkeys.probe(page, write=True) is not None
    pkeys.sys.mprotect(address, len(page), pkeys.PROT_READ | pkeys.PROT_WRITE)
    assert pkeys.probe(page, write=True) is None


@pytest.mark.parametrize("call", [
    lambda: pkeys.sys.pkey_free(2**40),
    lambda: pkeys.sys.pkey_alloc(-1, 0),
    lambda: pkeys.sys.pkey_mprotect(-4096, 4096, 0, 0),
    lambda: pkeys.sys.mprotect(0, -1, 0),
    lambda: pkeys.glibc.pkey_free(2**63),
])
def test_raw_layers_turn_c_range_errors_into_value_errors(call):
    with pytest.raises(pkeys.ArgumentError, match="out of range for the C call"):
        call()


@pytest.mark.parametrize("bad", [1.0, "1", None, True])
def test_raw_layers_refuse_non_integers(bad):
    with pytest.raises(TypeError):
        pkeys.sys.pkey_free(bad)
    with pytest.raises(TypeError):
        pkeys.glibc.pkey_free(bad)


def test_raw_kernel_errors_keep_their_errno():
    with pytest.raises(OSError) as info:
        pkeys.sys.pkey_free(15 if 15 not in pkeys.allocated_keys() else 14)
    assert info.value.errno == errno.EINVAL
    assert type(info.value) is OSError


def test_glibc_reports_what_it_has():
    found = pkeys.glibc.available()
    assert set(found) == {"pkey_alloc", "pkey_free", "pkey_mprotect", "pkey_get", "pkey_set"}
    assert pkeys.glibc.version() == os.confstr("CS_GNU_LIBC_VERSION").split()[-1]


@pytest.mark.parametrize("value", [0, 0x55555554, 0xFFFFFFFC, 0xFFFFFFFF])
def test_pure_pkru_helpers_agree_with_each_other(value):
    decoded = pkeys.pkru.decode(value)
    assert len(decoded) == 16
    for key in range(16):
        assert decoded[key] == pkeys.pkru.rights_of(value, key)
        assert pkeys.pkru.with_rights(value, key, decoded[key]) == value
    opened = pkeys.pkru.granting(value, range(1, 16))
    assert opened == value & 3


def test_pure_pkru_helpers_validate():
    with pytest.raises(pkeys.ArgumentError):
        pkeys.pkru.rights_of(2**32, 1)
    with pytest.raises(pkeys.InvalidKeyError):
        pkeys.pkru.with_rights(0, 16, 0)
    with pytest.raises(pkeys.ArgumentError):
        pkeys.pkru.with_rights(0, 1, 4)
    with pytest.raises(TypeError):
        pkeys.pkru.decode("0")


def test_a_misspelt_backend_is_a_clear_error_at_first_use():
    code = ("import pkeys\nprint(pkeys.backend())\n"
            "try:\n    pkeys.Key()\nexcept pkeys.UnsupportedError as e:\n    print(e)")
    env = dict(os.environ, PKEYS_BACKEND="hardwre")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert "PKEYS_BACKEND='hardwre' is not one of auto, hardware, software" in out


def test_a_fork_without_a_backend_has_nothing_to_drop():
    # No backend chosen: the child's after-fork step finds no grant and says nothing.
    code = ("import os, pkeys\npid = os.fork()\nif pid == 0:\n    os._exit(0)\n"
            "print(os.waitpid(pid, 0)[1])")
    env = dict(os.environ, PKEYS_BACKEND="hardwre")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True, timeout=60)
    assert done.stdout.strip() == "0"
    assert "could not drop" not in done.stderr, done.stderr


def test_vm_setup_without_root_names_the_packages(monkeypatch):
    from pkeys import vm

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(vm.VMError, match="qemu-system-x86 busybox-static"):
        vm._install_packages(["qemu-system-x86", "busybox-static"])
