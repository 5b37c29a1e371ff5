"""`pkeys vm`: its parts without a VM, then its manners with one.

The tests that boot a guest (about 3 s each) need `pkeys vm setup` to have
run; they are skipped otherwise, unless PKEYS_REQUIRE_VM=1 (tests/run.sh
sets it) makes that a failure.
"""

from __future__ import annotations

import io
import lzma
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pkeys import vm
from pkeys.vm import (
    cli,
    console,
    debian,
    decompress,
    initramfs,
    kernels,
    modules,
    qemu,
    runner,
)

PKEYS = [sys.executable, "-m", "pkeys"]


def run_pkeys(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 120)
    return subprocess.run([*PKEYS, *args], capture_output=True, text=True, check=False, **kwargs)


# -- the command line ----------------------------------------------------------
@pytest.mark.parametrize("words", [["stup"], ["setup", "now"], ["python", "-c", "1"]])
def test_unknown_words_before_the_separator_are_refused_with_a_hint(words):
    started = time.monotonic()
    result = run_pkeys("vm", *words)
    assert result.returncode == 2
    assert f"pkeys vm -- {' '.join(words)}" in result.stderr
    assert time.monotonic() - started < 20  # refused, not booted


def test_a_typo_of_an_action_is_named():
    assert "did you mean `pkeys vm setup`" in run_pkeys("vm", "stup").stderr


@pytest.mark.parametrize("action", ["setup", "selftest"])
def test_help_of_an_action_is_its_own_and_boots_nothing(action):
    result = run_pkeys("vm", action, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: pkeys vm {action} [--kernel SERIES]")
    assert "--kernel" in result.stdout and "-- CMD" not in result.stdout
    assert run_pkeys("vm", action, "--kernel", "6.1", "-h").stdout == result.stdout


def test_selftest_says_what_it_downloads_before_it_does():
    assert "140 MB" in run_pkeys("vm", "selftest", "--help").stdout
    assert "140 MB" in run_pkeys("vm", "--help").stdout


@pytest.mark.parametrize("option, value", [("--smp", "0"), ("--smp", "-1"), ("--mem", "64"),
                                           ("--mem", "lots"), ("--timeout", "0")])
def test_bad_machine_options_are_usage_errors(option, value):
    result = run_pkeys("vm", option, value, "--", "true")
    assert result.returncode == 2
    assert option in result.stderr


def test_an_action_takes_no_command_and_other_commands_take_no_separator():
    assert run_pkeys("vm", "setup", "--", "true").returncode == 2
    result = run_pkeys("doctor", "--", "x")
    assert result.returncode == 2 and "are for `pkeys vm`" in result.stderr


def test_the_guest_command_is_untouched_after_the_separator(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_run", lambda args, command: seen.setdefault("command", command) and 0)
    from pkeys.__main__ import main

    main(["vm", "--kernel", "6.1", "--", "python", "-m", "pytest", "--", "-x", "setup"])
    assert seen["command"] == ["python", "-m", "pytest", "--", "-x", "setup"]


def test_runner_validates_what_the_api_is_given():
    for options in (runner.Options(mem=64), runner.Options(smp=0), runner.Options(timeout=0)):
        with pytest.raises(vm.VMError):
            runner.validate(options)
    runner.validate(runner.Options())


# -- the QEMU command and the guest script ---------------------------------------
def test_qemu_command_uses_tcg_cpu_max_and_the_shares(tmp_path):
    command = vm.qemu_command(tmp_path / "vmlinux", tmp_path / "initrd", tmp_path / "ctl", "/work/x",
                              stderr_path="/dev/fd/9", smp=2, mem=512)
    text = " ".join(command)
    assert command[0] == "qemu-system-x86_64"
    assert "-accel tcg" in text and "-cpu max" in text and "-enable-kvm" not in text
    assert "-smp 2" in text and "-m 512" in text
    assert f"-kernel {tmp_path / 'vmlinux'}" in text
    assert "secretmem.enable=1" in command[command.index("-append") + 1]
    assert "file,id=stderr,path=/dev/fd/9" in command
    fsdevs = [command[i + 1] for i, arg in enumerate(command) if arg == "-fsdev"]
    root = next(f for f in fsdevs if "id=hostroot" in f)
    work = next(f for f in fsdevs if "id=work" in f)
    assert "path=/," in root and "readonly=on" in root and "multidevs=remap" in root
    assert "path=/work/x," in work and "readonly" not in work


def test_commas_in_paths_are_escaped_for_qemu_options(tmp_path):
    command = vm.qemu_command(tmp_path / "k", tmp_path / "i", Path("/t/c,d"), "/w/a,b,c",
                              stderr_path="/e,f")
    assert any("path=/w/a,,b,,c,security_model" in arg for arg in command)
    assert any("path=/t/c,,d,security_model" in arg for arg in command)
    assert "file,id=stderr,path=/e,,f" in command


def test_qemu_command_has_no_work_share_for_the_root_directory(tmp_path):
    command = vm.qemu_command(tmp_path / "k", tmp_path / "i", tmp_path / "c", "/", stderr_path="x")
    assert not any("id=work" in arg for arg in command)


def test_verbose_keeps_the_boot_messages():
    assert "quiet" in qemu.kernel_append(False) and "quiet" not in qemu.kernel_append(True)
    assert qemu.kernel_append(False, "foo=1").endswith(" foo=1")


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


def test_guest_script_passes_variables_whose_names_are_not_shell_identifiers():
    environ = {"PATH": os.environ["PATH"], "A-B": "dash", "BASH_FUNC_f%%": "() {  echo hi\n}",
               "1ST": "digit", "-LEADING": "dash first"}
    script = vm.guest_script(
        ["python3", "-c", "import os, sys; print(sorted(k for k in sys.argv[1:] if k in os.environ))",
         *environ], "/", environ)
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout == f"{sorted(environ)}\n"


def test_guest_script_puts_the_real_interpreter_first_on_path():
    script = vm.guest_script(["true"], "/", {"PATH": "/root/.pyenv/shims:/usr/bin"})
    assert f"PATH={os.path.dirname(sys.executable)}:/root/.pyenv/shims" in script


def test_guest_script_fails_with_125_when_the_directory_is_missing(tmp_path):
    script = vm.guest_script(["true"], str(tmp_path / "absent"), {"PATH": os.environ["PATH"]})
    assert subprocess.run(["sh", "-c", script], capture_output=True, check=False).returncode == 125


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_guest_script_drops_to_the_identity_with_the_hosts_memlock_limit():
    identity = vm.Identity(65534, 65534, (65534,))
    script = vm.guest_script(["sh", "-c", "id -u; id -g; id -G; ulimit -l"], "/",
                             {"PATH": os.environ["PATH"]}, identity)
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft // 1024)
    assert result.stdout.split("\n") == ["65534", "65534", "65534", limit, ""]


def test_the_current_identity_is_the_callers():
    me = vm.Identity.current()
    assert (me.uid, me.gid) == (os.getuid(), os.getgid())


# -- kernels: decompression, modules, the cache ----------------------------------
def bzimage(payload: bytes) -> bytes:
    """A minimal bzImage: setup sectors, the boot header, the payload and
    the 4-byte size the kernel build appends."""
    setup_sectors = 1
    image = bytearray(b"MZ" + b"\0" * ((setup_sectors + 1) * 512 - 2))
    image[0x1F1] = setup_sectors
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)
    struct.pack_into("<II", image, 0x248, 0x100, len(payload) + 4)
    image += b"\0" * 0x100 + payload + struct.pack("<I", 12345) + b"tail"
    return bytes(image)


def test_extract_vmlinux_finds_the_elf_inside_an_xz_payload():
    elf = b"\x7fELF" + os.urandom(1000)
    decoy = lzma.compress(b"not an elf", format=lzma.FORMAT_XZ)
    image = b"MZ setup code" + decoy + b"\0" * 64 + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"tail"
    assert vm.extract_vmlinux(image) == elf
    assert vm.extract_vmlinux(elf) == elf
    assert vm.extract_vmlinux(bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ))) == elf
    with pytest.raises(vm.VMError):
        vm.extract_vmlinux(b"MZ" + decoy)


@pytest.mark.skipif(decompress.zstd_backend() is None, reason="no zstd decoder (module or tool)")
def test_extract_vmlinux_reads_a_zstd_payload_through_the_boot_header():
    elf = b"\x7fELF" + os.urandom(5000) * 3
    if shutil.which("zstd"):
        payload = subprocess.run(["zstd", "-q", "-c"], input=elf, capture_output=True, check=True).stdout
    else:
        import zstandard

        payload = zstandard.ZstdCompressor().compress(elf)
    assert decompress.compression_of(payload) == "zstd"
    assert vm.extract_vmlinux(bzimage(payload)) == elf


def test_modules_are_named_and_decompressed_by_suffix():
    assert decompress.module_name("9pnet-virtio.ko.xz") == ("9pnet_virtio", ".ko.xz")
    assert decompress.module_name("netfs.ko") == ("netfs", ".ko")
    assert decompress.module_name("modules.dep") is None
    data = b"\x7fELF module"
    assert decompress.decompress_module(lzma.compress(data), ".ko.xz") == data


def test_load_order_puts_dependencies_first_and_skips_builtins():
    graph = {"9p": ["9pnet", "netfs"], "9pnet_virtio": ["9pnet", "virtio_ring"], "9pnet": ["netfs"],
             "netfs": [], "virtio_ring": [], "overlay": []}
    order = modules.load_order(["9pnet_virtio", "9p", "overlay"], graph.__getitem__,
                               has=graph.__contains__, builtin={"virtio_ring"})
    assert order == ["netfs", "9pnet", "9pnet_virtio", "9p", "overlay"]
    with pytest.raises(vm.VMError, match="neither a module nor built in"):
        modules.load_order(["absent"], graph.__getitem__, has=graph.__contains__)


def test_modules_dep_is_parsed_into_names():
    text = ("kernel/fs/9p/9p.ko.xz: kernel/fs/netfs/netfs.ko.xz kernel/net/9p/9pnet.ko.xz\n"
            "kernel/fs/netfs/netfs.ko.xz:\n")
    assert modules.parse_modules_dep(text) == {"9p": ["netfs", "9pnet"], "netfs": []}


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_modinfo_depends_is_read_from_the_elf_section(tmp_path):
    source = tmp_path / "m.c"
    source.write_text('__attribute__((section(".modinfo"), used)) static const char info[] = '
                      '"license=GPL\\0depends=netfs,9pnet\\0name=9p";\n')
    subprocess.run(["cc", "-c", str(source), "-o", str(tmp_path / "9p.ko")], check=True)
    (tmp_path / "netfs.ko").write_bytes((tmp_path / "9p.ko").read_bytes())
    info = modules.modinfo((tmp_path / "9p.ko").read_bytes())
    assert info["depends"] == "netfs,9pnet" and info["name"] == "9p"
    tree = modules.ModuleTree(tmp_path)
    assert tree.depends("9p") == ["netfs", "9pnet"]


def test_series_match_releases_not_their_prefixes():
    assert debian.matches_series("6.1.0-56-amd64", "6.1")
    assert not debian.matches_series("6.12.117+deb12-amd64", "6.1")
    assert debian.matches_series("6.12.117+deb12-amd64", "6.12")
    assert debian.series_of("6.12.117+deb12-amd64") == (6, 12)
    with pytest.raises(vm.VMError):
        debian.series_of("latest")


def fake_kernel(cache: Path, release: str, package: str | None = "linux-image-x") -> None:
    folder = cache / "kernels" / release
    (folder / "modules").mkdir(parents=True)
    (folder / "vmlinux").write_bytes(b"\x7fELF")
    (folder / "modules.order").write_text("")
    import json

    (folder / "kernel.json").write_text(json.dumps({"release": release, "origin": "test",
                                                    "package": package, "version": "1"}))


def test_cached_kernels_are_found_by_series_release_and_default(tmp_path):
    for release in ("6.1.0-50-amd64", "6.1.0-56-amd64", "6.12.117+deb12-amd64"):
        fake_kernel(tmp_path, release)
    assert [k.release for k in kernels.cached(tmp_path)] == [
        "6.1.0-50-amd64", "6.1.0-56-amd64", "6.12.117+deb12-amd64"]
    assert kernels.find("6.1", tmp_path).release == "6.1.0-56-amd64"  # the newest of the series
    assert kernels.find("6.12", tmp_path).release == "6.12.117+deb12-amd64"
    assert kernels.find("6.1.0-50-amd64", tmp_path).release == "6.1.0-50-amd64"
    assert kernels.find("6.6", tmp_path) is None
    assert kernels.find(None, tmp_path) is None  # several, none chosen as default
    kernels.set_default(kernels.find("6.12", tmp_path), tmp_path)
    assert kernels.find(None, tmp_path).release == "6.12.117+deb12-amd64"
    with pytest.raises(vm.VMError, match="pkeys vm setup --kernel 6.6"):
        kernels.require("6.6", tmp_path)


def test_list_shows_the_cached_kernels(tmp_path):
    fake_kernel(tmp_path / "pkeys" / "vm", "6.1.0-56-amd64")
    result = run_pkeys("vm", "--list", env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path)))
    assert result.returncode == 0 and "6.1.0-56-amd64" in result.stdout
    empty = run_pkeys("vm", "--list", env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "none")))
    assert "no kernels cached" in empty.stdout


def test_release_of_an_image_comes_from_its_header():
    image = bytearray(bzimage(b"x" * 16))
    version = b"6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP\0"
    image[0x400:0x400 + len(version)] = version
    struct.pack_into("<H", image, 0x20E, 0x200)
    assert kernels.release_of_image(bytes(image)) == "6.1.0-56-amd64"
    assert kernels.release_of_image(b"\x7fELF...Linux version 6.12.1-test (x) #1") == "6.12.1-test"


# -- the initramfs and the console ------------------------------------------------
def test_newc_archive_lists_back_with_cpio(tmp_path):
    archive = initramfs.newc([("bin", initramfs.MODE_DIR, b""), ("bin/x", initramfs.MODE_EXEC, b"12345"),
                              ("init", initramfs.MODE_EXEC, b"#!/bin/sh\n")])
    assert archive.startswith(b"070701") and b"TRAILER!!!" in archive and len(archive) % 4 == 0
    lister = shutil.which("cpio") or (initramfs.busybox() and [initramfs.busybox(), "cpio"])
    if not lister:
        pytest.skip("no cpio to read it back")
    command = [lister] if isinstance(lister, str) else lister
    listing = subprocess.run([*command, "-t"], input=archive, capture_output=True, check=True).stdout
    assert listing.split() == [b"bin", b"bin/x", b"init"]


def test_init_script_is_package_data():
    script = initramfs.init_script()
    assert script.startswith(b"#!/bin/busybox sh")
    assert b"/ctl/status" in script and b"poweroff -f" in script


def test_console_drops_boot_noise_crs_and_kernel_lines():
    out = io.BytesIO()
    feed = console.Console(out)
    feed.feed(b"SeaBIOS...\r\n[    0.1] boot\r\n@@pkeys-vm-")
    feed.feed(b"start@@\r\nhello\r\n[   1.234567] random: crng\r\nwor")
    feed.feed(b"ld\r\nno newline")
    feed.close()
    assert out.getvalue() == b"hello\nworld\nno newline"
    assert feed.started and feed.last_boot_lines() == ["SeaBIOS...", "[    0.1] boot"]


@pytest.mark.parametrize("split", range(1, 6))
def test_console_drops_the_markers_newline_wherever_the_reads_split(split):
    stream = b"boot\n@@pkeys-vm-start@@\n\nblank line first\n"
    out = io.BytesIO()
    feed = console.Console(out)
    cut = stream.index(b"@@\n") + split - 2
    feed.feed(stream[:cut])
    feed.feed(stream[cut:])
    feed.close()
    assert out.getvalue() == b"\nblank line first\n"


def test_console_notices_a_panic_before_the_command():
    feed = console.Console(io.BytesIO(), boot_log=(shown := io.BytesIO()))
    feed.feed(b"Kernel panic - not syncing: VFS: Unable to mount root fs\n")
    assert feed.failed_boot and not feed.started
    assert b"Kernel panic" in shown.getvalue()  # --verbose shows the boot live


def test_status_of_an_empty_cache_lists_what_is_missing(tmp_path):
    status = vm.status(cache=tmp_path)
    assert not status.ready and "kernel" in status.missing()


def test_run_refuses_clearly_when_not_ready(tmp_path):
    result = run_pkeys("vm", "--", "true", env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path)))
    assert result.returncode == 125 and "pkeys vm setup" in result.stderr


@pytest.mark.skipif(initramfs.busybox() is None, reason="needs busybox-static")
def test_setup_builds_an_initramfs_per_kernel_and_is_idempotent(tmp_path, monkeypatch):
    fake_kernel(tmp_path, "6.1.0-56-amd64")
    folder = tmp_path / "kernels" / "6.1.0-56-amd64"
    (folder / "modules" / "9p.ko").write_bytes(b"module")
    (folder / "modules.order").write_text("9p\n")
    monkeypatch.setattr("pkeys.vm.tools.install_packages", lambda names: pytest.fail(f"installed {names}"))
    monkeypatch.setattr(kernels, "fetch_debian", lambda *a: pytest.fail("fetched a kernel"))
    monkeypatch.setattr("pkeys.vm.tools.qemu", lambda: "/usr/bin/qemu-system-x86_64")
    [first] = vm.setup(["6.1"], tmp_path)
    assert first.ready and first.initramfs.parent == folder
    archive = first.initramfs.read_bytes()
    for member in (b"init", b"bin/busybox", b"lib/modules/9p.ko", b"modules.order"):
        assert member in archive
    stamp = first.initramfs.stat().st_mtime_ns
    assert vm.setup(["6.1"], tmp_path)[0].initramfs.stat().st_mtime_ns == stamp  # nothing rebuilt


# -- with a guest -----------------------------------------------------------------
def _ready_kernel(spec: str | None = None) -> kernels.Kernel:
    found = kernels.find(spec)
    if vm.status().qemu and found is not None and initramfs.busybox():
        return found
    message = f"pkeys vm is not set up for kernel {spec or '(default)'}: run `pkeys vm setup`"
    if os.environ.get("PKEYS_REQUIRE_VM") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def comma_dir():
    """A working directory with a comma in its name that any user can enter."""
    path = Path(tempfile.mkdtemp(prefix="pkeys vm,test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_command_keeps_its_streams_user_directory_and_status(comma_dir, tmp_path):
    """One boot of the 6.1 kernel checks: stdin from a file, stdout and
    stderr apart, the invoking identity (here: nobody) with the host's
    RLIMIT_MEMLOCK, a working directory with a comma, the exit status, and
    memfd_secret (secretmem.enable=1 on 6.1's command line)."""
    kernel = _ready_kernel("6.1")
    stdin = tmp_path / "stdin"
    stdin.write_bytes(b"from stdin\n")
    out, err = io.BytesIO(), io.BytesIO()
    script = ("cat; pwd; id -u; id -g; ulimit -l; echo to-stderr >&2; "
              "python3 -c 'import ctypes; print(\"secret\", ctypes.CDLL(None).syscall(447, 0) >= 0)'; "
              "exit 3")
    with open(stdin, "rb") as source:
        code = runner.run(["sh", "-c", script], kernel=kernel.vmlinux, initramfs=initramfs.require(kernel),
                          options=runner.Options(timeout=120), cwd=str(comma_dir),
                          stdin=source, out=out, err=err,
                          identity=vm.Identity(65534, 65534, (65534,)))
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft // 1024)
    assert err.getvalue() == b"to-stderr\n"
    assert out.getvalue().decode().split("\n") == [
        "from stdin", str(comma_dir), "65534", "65534", limit, "secret True", ""]
    assert code == 3


def test_stdin_from_a_pipe_reaches_the_command():
    _ready_kernel()
    result = subprocess.run(
        [*PKEYS, "vm", "--", "sh", "-c", "wc -l; tr a-z A-Z"], input="abc\n" * 1000 + "tail",
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0].strip() == "1000"


@pytest.mark.parametrize("signo, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_reaches_the_guest_command_and_leaves_no_emulator(signo, expected):
    _ready_kernel()
    name = signal.Signals(signo).name.removeprefix("SIG")
    script = f'trap "echo caught {name}; exit 9" {name}; echo ready; while :; do sleep 1; done'
    process = subprocess.Popen([*PKEYS, "vm", "--", "sh", "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        emulators = [p for p in psutil.Process(process.pid).children(recursive=True)
                     if "qemu" in p.name()]
        assert emulators
        process.send_signal(signo)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert out == f"caught {name}\n"
    assert process.returncode == expected
    assert "Traceback" not in err
    for emulator in emulators:
        assert not emulator.is_running() or emulator.status() == psutil.STATUS_ZOMBIE


def test_a_closed_stdout_ends_the_run_quietly():
    _ready_kernel()
    pipeline = f"{sys.executable} -m pkeys vm -- yes | head -2; echo status ${{PIPESTATUS[0]}} >&2"
    result = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.stdout == "y\ny\n"
    assert result.stderr.strip() == "status 141", result.stderr


@pytest.mark.parametrize("append, boot_timeout, expected", [
    # A guest that hangs: the boot timeout ends it.
    ("rdinit=/bin/busybox -- sleep 600", 8, "did not reach the command within 8 s"),
    # A guest that panics ends at once (panic=-1, -no-reboot), panic shown.
    ("rdinit=/nonexistent", 50, "Kernel panic"),
])
def test_a_guest_that_never_reaches_the_command_fails_fast_with_its_boot_log(
        append, boot_timeout, expected):
    _ready_kernel()
    started = time.monotonic()
    result = run_pkeys("vm", "--boot-timeout", str(boot_timeout), "--append", append, "--", "true")
    assert result.returncode == 125
    assert expected in result.stderr
    assert time.monotonic() - started < 45


# -- the kernel's own selftest ----------------------------------------------------
def test_selftest_verdict_counts_distinct_passes_and_needs_the_done_line():
    from pkeys.vm import selftest

    output = ("test  0 PASSED (iteration 1)\ntest  1 PASSED (iteration 1)\n"
              "test  0 PASSED (iteration 1)\n"  # repeated by a fork's unflushed buffer
              "has pkeys: 1\ndone (all tests OK)\n")
    assert selftest.count(output) == (2, True)
    assert selftest.count("test  0 PASSED (iteration 1)\n") == (1, False)
    assert not selftest.Result("protection_keys_64", "6.1", 462, False, 0).ok
    assert selftest.Result("protection_keys_64", "6.1", 462, True, 0).ok
