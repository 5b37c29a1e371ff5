"""``pkeys vm``: run a command on an emulated PKU CPU.

QEMU's full-system software emulation (TCG) with ``-cpu max`` advertises
PKU and OSPKE, and a stock Linux kernel enables them, so protection keys
behave there as on hardware (only timings differ).  The guest sees the
host's root filesystem read-only over virtio-9p, the current directory
writable at the same path, and a throwaway /tmp.  The command runs in the
current directory with the host's environment; its exit status is ours.

``pkeys vm setup`` prepares everything once, under the user cache
directory: the packages (apt-get when root on Debian/Ubuntu), a Debian
kernel with its 9p modules (downloaded and unpacked, never installed into
/boot), the kernel's uncompressed ELF image, and a busybox initramfs.

KVM is not used: it would not expose PKU to a stock guest on the machines
this was built for, and TCG boots the kernel in about 2.5 s.
"""

from __future__ import annotations

import glob
import hashlib
import lzma
import os
import re
import selectors
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = [
    "EXIT_TIMEOUT",
    "EXIT_VM_FAILED",
    "VMError",
    "cache_dir",
    "status",
    "setup",
    "run",
    "qemu_command",
    "exit_code",
    "extract_vmlinux",
]

EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125
START_MARKER = b"@@pkeys-vm-start@@"

PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static", "cpio": "cpio"}

# Loaded in this order with insmod (no modprobe in the initramfs).
MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "9pnet",
    "9pnet_virtio",
    "netfs",
    "fscache",
    "9p",
    "overlay",
]

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"


class VMError(Exception):
    """The emulated machine could not be prepared or started."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pkeys" / "vm"


def _init_script() -> bytes:
    return resources.files("pkeys").joinpath("vm_init.sh").read_bytes()


def _initramfs_path(cache: Path) -> Path:
    digest = hashlib.sha256(_init_script() + "\n".join(MODULES).encode()).hexdigest()[:12]
    return cache / f"initramfs-{digest}.cpio"


@dataclass
class Status:
    qemu: str | None
    busybox: str | None
    cpio: str | None
    kernel: Path | None
    initramfs: Path | None

    @property
    def ready(self) -> bool:
        return bool(self.qemu and self.kernel and self.initramfs)

    def missing(self) -> list[str]:
        items = [name for name in ("qemu", "busybox", "cpio") if not getattr(self, name)]
        if not self.kernel:
            items.append("kernel")
        if not self.initramfs:
            items.append("initramfs")
        return items


def _busybox() -> str | None:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(candidate) and _is_static(candidate):
            return candidate
    found = shutil.which("busybox")
    return found if found and _is_static(found) else None


def _is_static(path: str) -> bool:
    try:
        with open(path, "rb") as binary:
            return b"/ld-linux" not in binary.read(4096 * 4)
    except OSError:
        return False


def status(cache: Path | None = None) -> Status:
    """What is ready for ``pkeys vm``, without changing anything."""
    cache = cache or cache_dir()
    kernel = cache / "vmlinux"
    initramfs = _initramfs_path(cache)
    return Status(
        qemu=shutil.which("qemu-system-x86_64"),
        busybox=_busybox(),
        cpio=shutil.which("cpio"),
        kernel=kernel if kernel.exists() else None,
        initramfs=initramfs if initramfs.exists() else None,
    )


def _log(message: str) -> None:
    print(f"pkeys vm setup: {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def _install_packages(names: list[str]) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise VMError(
            "missing tools; install the packages " + " ".join(names)
            + " (for example: sudo apt-get install " + " ".join(names) + ")"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *names]
    _log("installing " + " ".join(names))
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise VMError(f"apt-get install failed:\n{result.stderr[-2000:]}")


def _kernel_package() -> str:
    """The versioned image package that Debian's linux-image-amd64 depends on."""
    def depends() -> str:
        return subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
        ).stdout

    text = depends()
    if "Depends:" not in text and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True)
        text = depends()
    for match in re.finditer(r"Depends:\s*(linux-image-\S+)", text):
        name = match.group(1)
        if "cloud" not in name and "rt" not in name.split("-"):
            return name
    raise VMError(
        "cannot find Debian's linux-image-amd64 package (not a Debian/Ubuntu apt system?); "
        "pass --kernel with a kernel that has virtio-9p"
    )


def _fetch_kernel(cache: Path) -> None:
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise VMError("getting a kernel needs apt-get and dpkg; pass --kernel PATH instead")
    package = _kernel_package()
    _log(f"downloading {package}")
    with tempfile.TemporaryDirectory(prefix="pkeys-kernel-") as work:
        result = subprocess.run(
            ["apt-get", "download", package], cwd=work, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise VMError(f"apt-get download {package} failed:\n{result.stderr[-2000:]}")
        deb = next(Path(work).glob("*.deb"))
        tree = Path(work) / "tree"
        _run(["dpkg", "-x", str(deb), str(tree)])
        images = sorted(tree.glob("boot/vmlinuz-*"))
        if not images:
            raise VMError(f"{package} has no /boot/vmlinuz")
        vmlinux = extract_vmlinux(images[0].read_bytes())
        modules = cache / "modules"
        shutil.rmtree(modules, ignore_errors=True)
        modules.mkdir(parents=True)
        for name in MODULES:
            found = _find_module(tree, name)
            if found is None:
                continue  # built into this kernel
            data = found.read_bytes()
            if found.suffix == ".xz":
                data = lzma.decompress(data)
            (modules / f"{name}.ko").write_bytes(data)
        (cache / "vmlinux.tmp").write_bytes(vmlinux)
        os.replace(cache / "vmlinux.tmp", cache / "vmlinux")
        (cache / "kernel-package").write_text(package + "\n")


def _find_module(tree: Path, name: str) -> Path | None:
    for suffix in (".ko", ".ko.xz"):
        hits = glob.glob(str(tree / "lib/modules/*/kernel/**" / f"{name}{suffix}"), recursive=True)
        hits += glob.glob(str(tree / "usr/lib/modules/*/kernel/**" / f"{name}{suffix}"), recursive=True)
        if hits:
            return Path(hits[0])
    return None


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is XZ-compressed.

    QEMU boots the ELF directly (through its PVH entry), about 3 s sooner
    than the bzImage, which would decompress itself under emulation.
    """
    if bzimage.startswith(ELF_MAGIC):
        return bzimage
    start = bzimage.find(XZ_MAGIC)
    while start >= 0:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            elf = decompressor.decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(ELF_MAGIC):
            return elf
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise VMError("no XZ-compressed ELF kernel found in the image")


def _build_initramfs(cache: Path, busybox: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="pkeys-initramfs-") as work:
        root = Path(work)
        (root / "bin").mkdir()
        (root / "lib/modules").mkdir(parents=True)
        shutil.copy2(busybox, root / "bin/busybox")
        init = root / "init"
        init.write_bytes(_init_script())
        init.chmod(0o755)
        present = []
        for name in MODULES:
            module = cache / "modules" / f"{name}.ko"
            if module.exists():
                shutil.copy2(module, root / "lib/modules" / module.name)
                present.append(name)
        (root / "modules.order").write_text("\n".join(present) + "\n")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=root,
            input="\n".join(files).encode(),
            capture_output=True,
            check=True,
        ).stdout
    for stale in cache.glob("initramfs-*.cpio"):
        stale.unlink()
    target.write_bytes(archive)


def setup(cache: Path | None = None) -> Status:
    """Make ``pkeys vm`` ready; idempotent, fast when everything is cached."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    current = status(cache)
    missing = [
        package
        for tool, package in PACKAGES.items()
        if not {"qemu-system-x86_64": current.qemu, "busybox": current.busybox, "cpio": current.cpio}[tool]
    ]
    if missing:
        _install_packages(missing)
    if not (cache / "vmlinux").exists():
        _fetch_kernel(cache)
    current = status(cache)
    if not current.initramfs:
        if not current.busybox:
            raise VMError("no static busybox found (package busybox-static)")
        _log("building the initramfs")
        _build_initramfs(cache, current.busybox, _initramfs_path(cache))
    current = status(cache)
    if not current.ready:
        raise VMError("setup incomplete: missing " + ", ".join(current.missing()))
    return current


def guest_script(argv: list[str], cwd: str, environ: dict[str, str]) -> str:
    """The shell script the guest runs: this environment, this directory, this command."""
    interpreter_dir = os.path.dirname(sys.executable)
    env = dict(environ)
    # pyenv's shims cost seconds per start under emulation: put the real
    # interpreter first.
    env["PATH"] = interpreter_dir + os.pathsep + env.get("PATH", "")
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()) if "=" not in k)
    return (
        f"cd {shlex.quote(cwd)} || exit {EXIT_VM_FAILED}\n"
        f"exec env -i {assignments} {' '.join(shlex.quote(a) for a in argv)}\n"
    )


def qemu_command(
    kernel: Path, initramfs: Path, control: Path, cwd: str, *, smp: int = 1, mem: int = 2048
) -> list[str]:
    """The QEMU invocation: TCG, ``-cpu max``, 9p shares, console on stdio."""
    shares = [("hostroot", "/", True), ("ctl", str(control), False)]
    if cwd != "/":
        shares.append(("work", cwd, False))
    command = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", str(smp),
        "-m", str(mem),
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none",
        "-kernel", str(kernel),
        "-initrd", str(initramfs),
        "-append", "console=ttyS0 quiet loglevel=0 panic=-1 rdinit=/init",
        "-chardev", "stdio,id=console,signal=off",
        "-serial", "chardev:console",
    ]
    for tag, path, readonly in shares:
        options = f"local,id={tag},path={path},security_model=none,multidevs=remap"
        if readonly:
            options += ",readonly=on"
        command += ["-fsdev", options, "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]
    return command


def exit_code(status_text: str | None, timed_out: bool) -> int:
    """Our exit status from the guest's report: the command's own status,
    124 on timeout, 125 when the VM produced none."""
    if timed_out:
        return EXIT_TIMEOUT
    if status_text is None:
        return EXIT_VM_FAILED
    try:
        code = int(status_text.strip())
    except ValueError:
        return EXIT_VM_FAILED
    return code if 0 <= code <= 255 else EXIT_VM_FAILED


class _ConsoleFilter:
    """Forwards the guest console: drops everything before the start
    marker (boot noise), CRs, and stray kernel log lines."""

    _KERNEL_LINE = re.compile(rb"^\[\s*\d+\.\d+\] ")

    def __init__(self, out) -> None:  # type: ignore[no-untyped-def]
        self.out = out
        self.started = False
        self.pending = b""

    def feed(self, data: bytes) -> None:
        data = data.replace(b"\r", b"")
        if not self.started:
            self.pending += data
            index = self.pending.find(START_MARKER)
            if index < 0:
                self.pending = self.pending[-4096:]
                return
            self.started = True
            data = self.pending[index + len(START_MARKER):].lstrip(b"\n")
            self.pending = b""
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            if not self._KERNEL_LINE.match(line):
                self.out.write(line + b"\n")
        if self.pending and not self._KERNEL_LINE.match(self.pending):
            # A prompt or progress output without a newline: show it now.
            self.out.write(self.pending)
            self.pending = b""
        self.out.flush()

    def close(self) -> None:
        if self.pending and not self._KERNEL_LINE.match(self.pending):
            self.out.write(self.pending)
        self.out.flush()


def _isatty(stream) -> bool:  # type: ignore[no-untyped-def]
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def run(
    argv: list[str],
    *,
    timeout: float = 1800,
    kernel: Path | None = None,
    smp: int = 1,
    mem: int = 2048,
    cwd: str | None = None,
    environ: dict[str, str] | None = None,
    out=None,  # type: ignore[no-untyped-def]
) -> int:
    """Run ``argv`` in the emulated machine; the command's exit status."""
    if not argv:
        raise VMError("no command given: pkeys vm -- CMD ARGS...")
    ready = status()
    if not ready.qemu or not ready.initramfs or not (kernel or ready.kernel):
        raise VMError(
            "the emulated machine is not ready (missing "
            + ", ".join(ready.missing()) + "); run `python -m pkeys vm setup` first"
        )
    cwd = os.path.realpath(cwd or os.getcwd())
    out = out or sys.stdout.buffer
    with tempfile.TemporaryDirectory(prefix="pkeys-vm-") as control_dir:
        control = Path(control_dir)
        (control / "cwd").write_text(cwd)
        if _isatty(out):
            (control / "tty").write_text("")
        (control / "run.sh").write_text(
            guest_script(argv, cwd, dict(os.environ if environ is None else environ))
        )
        command = qemu_command(
            Path(kernel or ready.kernel), ready.initramfs, control, cwd, smp=smp, mem=mem  # type: ignore[arg-type]
        )
        console = _ConsoleFilter(out)
        timed_out = False
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        os.set_blocking(process.stdout.fileno(), False)  # type: ignore[union-attr]
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    process.kill()
                    break
                if selector.select(min(remaining, 1.0)):
                    chunk = process.stdout.read()  # type: ignore[union-attr]
                    if chunk:
                        console.feed(chunk)
                    elif chunk == b"":
                        break
                elif process.poll() is not None:
                    break
        console.close()
        process.wait()
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""  # type: ignore[union-attr]
        status_file = control / "status"
        status_text = status_file.read_text() if status_file.exists() else None
        code = exit_code(status_text, timed_out)
        if timed_out:
            print(f"pkeys vm: timed out after {timeout:g} s; the VM was killed", file=sys.stderr)
        elif code == EXIT_VM_FAILED and status_text is None:
            detail = stderr.strip()[-2000:] or f"QEMU exited with status {process.returncode}"
            print(f"pkeys vm: the VM failed before the command finished: {detail}", file=sys.stderr)
        return code
