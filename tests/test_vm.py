"""The `pkeys vm` runner, tested where no VM is needed."""

from __future__ import annotations

import io
import lzma
import os
import shutil
import subprocess

import pytest

from pkeys import vm


def test_qemu_command_uses_tcg_cpu_max_and_the_shares(tmp_path):
    command = vm.qemu_command(tmp_path / "vmlinux", tmp_path / "initrd", tmp_path / "ctl", "/work/x",
                              smp=2, mem=512)
    text = " ".join(command)
    assert command[0] == "qemu-system-x86_64"
    assert "-accel tcg" in text and "-cpu max" in text and "-enable-kvm" not in text
    assert "-smp 2" in text and "-m 512" in text
    assert f"-kernel {tmp_path / 'vmlinux'}" in text
    fsdevs = [command[i + 1] for i, arg in enumerate(command) if arg == "-fsdev"]
    root = next(f for f in fsdevs if "id=hostroot" in f)
    work = next(f for f in fsdevs if "id=work" in f)
    assert "path=/," in root and "readonly=on" in root and "multidevs=remap" in root
    assert "path=/work/x," in work and "readonly" not in work
    assert "security_model=none" in root


def test_qemu_command_has_no_work_share_for_the_root_directory(tmp_path):
    command = vm.qemu_command(tmp_path / "k", tmp_path / "i", tmp_path / "c", "/")
    assert not any("id=work" in arg for arg in command)


@pytest.mark.parametrize(
    "status, timed_out, expected",
    [("0\n", False, 0), ("3", False, 3), ("255", False, 255), (None, False, 125),
     ("garbage", False, 125), ("300", False, 125), ("0", True, 124), (None, True, 124)],
)
def test_exit_code_mapping(status, timed_out, expected):
    assert vm.exit_code(status, timed_out) == expected


def test_guest_script_reproduces_argv_environment_and_directory(tmp_path):
    argv = ["python3", "-c", "import os, sys; print(sys.argv[1:], os.getcwd(), os.environ['ODD'])",
            "a b", "it's", "$HOME", ""]
    environ = {"PATH": os.environ["PATH"], "ODD": "line1\nline2 'q' \"dq\" $x"}
    script = vm.guest_script(argv, str(tmp_path), environ)
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout == f"['a b', \"it's\", '$HOME', ''] {tmp_path} line1\nline2 'q' \"dq\" $x\n"


def test_guest_script_puts_the_real_interpreter_first_on_path(tmp_path):
    import sys

    script = vm.guest_script(["true"], "/", {"PATH": "/root/.pyenv/shims:/usr/bin"})
    assert f"PATH={os.path.dirname(sys.executable)}:/root/.pyenv/shims" in script


def test_guest_script_fails_with_125_when_the_directory_is_missing(tmp_path):
    script = vm.guest_script(["true"], str(tmp_path / "absent"), {"PATH": os.environ["PATH"]})
    assert subprocess.run(["sh", "-c", script], capture_output=True).returncode == 125


def test_extract_vmlinux_finds_the_elf_inside_an_xz_payload():
    elf = b"\x7fELF" + os.urandom(1000)
    decoy = lzma.compress(b"not an elf", format=lzma.FORMAT_XZ)
    image = b"MZ setup code" + decoy + b"\0" * 64 + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"tail"
    assert vm.extract_vmlinux(image) == elf
    assert vm.extract_vmlinux(elf) == elf
    with pytest.raises(vm.VMError):
        vm.extract_vmlinux(b"MZ" + decoy)


def test_console_filter_drops_boot_noise_crs_and_kernel_lines():
    out = io.BytesIO()
    console = vm._ConsoleFilter(out)
    console.feed(b"SeaBIOS...\r\n[    0.1] boot\r\n@@pkeys-vm-")
    console.feed(b"start@@\r\nhello\r\n[   1.234567] random: crng\r\nwor")
    console.feed(b"ld\r\nno newline")
    console.close()
    assert out.getvalue() == b"hello\nworld\nno newline"


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert vm.cache_dir() == tmp_path / "pkeys" / "vm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert vm.cache_dir() == tmp_path / ".cache" / "pkeys" / "vm"


def test_status_of_an_empty_cache_lists_what_is_missing(tmp_path):
    status = vm.status(tmp_path)
    assert not status.ready
    assert {"kernel", "initramfs"} <= set(status.missing())


def test_run_refuses_clearly_when_not_ready(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(vm.VMError, match="pkeys vm setup"):
        vm.run(["true"])


@pytest.mark.skipif(not (vm._busybox() and shutil.which("cpio")), reason="needs busybox-static and cpio")
def test_setup_builds_the_initramfs_from_a_cached_kernel_and_is_idempotent(tmp_path, monkeypatch):
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF fake")
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "9p.ko").write_bytes(b"module")
    monkeypatch.setattr(vm, "_install_packages", lambda names: pytest.fail(f"installed {names}"))
    monkeypatch.setattr(vm, "_fetch_kernel", lambda cache: pytest.fail("fetched a kernel"))
    first = vm.setup(tmp_path)
    assert first.ready and first.initramfs.exists()
    archive = first.initramfs.read_bytes()
    for member in (b"init", b"bin/busybox", b"lib/modules/9p.ko", b"modules.order"):
        assert member in archive
    stamp = first.initramfs.stat().st_mtime_ns
    assert vm.setup(tmp_path).initramfs.stat().st_mtime_ns == stamp  # nothing rebuilt


def test_init_script_is_package_data():
    script = vm._init_script()
    assert script.startswith(b"#!/bin/busybox sh")
    assert b"/ctl/status" in script and b"poweroff -f" in script
