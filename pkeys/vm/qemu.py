"""The QEMU invocation: TCG with ``-cpu max`` (PKU and OSPKE), the kernel
booted directly, 9p shares, and two serial lines (stdout, stderr)."""

from __future__ import annotations

from pathlib import Path

from .tools import QEMU

#: Always on the kernel command line.  secretmem is off by default before
#: Linux 6.5; memfd_secret needs it.
BASE_APPEND = "console=ttyS0 panic=-1 rdinit=/init secretmem.enable=1"
# Emergencies only: a panic still shows (loglevel=0 would hide it too).
QUIET_APPEND = "quiet loglevel=1"
MIN_MEM_MB = 256
MAX_SMP = 64


def option_value(text: str) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return text.replace(",", ",,")


def kernel_append(verbose: bool = False, extra: str = "") -> str:
    parts = [BASE_APPEND] + ([] if verbose else [QUIET_APPEND]) + ([extra] if extra else [])
    return " ".join(parts)


def qemu_command(
    kernel: Path,
    initramfs: Path,
    control: Path,
    cwd: str,
    *,
    stderr_path: str,
    smp: int = 1,
    mem: int = 2048,
    append: str | None = None,
) -> list[str]:
    """The command line.  ``stderr_path`` is what the second serial line
    writes to (a ``/dev/fd/N`` of a pipe, for the runner)."""
    shares = [("hostroot", "/", True), ("ctl", str(control), False)]
    if cwd != "/":
        shares.append(("work", cwd, False))
    command = [
        QEMU,
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", str(smp),
        "-m", str(mem),
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none",
        "-kernel", str(kernel),
        "-initrd", str(initramfs),
        "-append", append if append is not None else kernel_append(),
        "-chardev", "stdio,id=console,signal=off",
        "-serial", "chardev:console",
        "-chardev", f"file,id=stderr,path={option_value(stderr_path)}",
        "-serial", "chardev:stderr",
    ]
    for tag, path, readonly in shares:
        options = f"local,id={tag},path={option_value(path)},security_model=none,multidevs=remap"
        if readonly:
            options += ",readonly=on"
        command += ["-fsdev", options, "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]
    return command
