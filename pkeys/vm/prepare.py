"""``pkeys vm setup``: make the machine ready, idempotently.

QEMU and busybox come from the system's packages (installed with apt-get
when root); kernels come from Debian's archive through a private apt state
and never touch /boot; each kernel gets its own initramfs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import initramfs, kernels, paths, tools
from .decompress import zstd_backend
from .errors import VMError


@dataclass
class Status:
    qemu: str | None
    busybox: str | None
    kernel: kernels.Kernel | None
    initramfs: Path | None
    cached: list[kernels.Kernel] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return bool(self.qemu and self.busybox and self.kernel and self.initramfs)

    def missing(self) -> list[str]:
        items = [name for name in ("qemu", "busybox", "kernel") if not getattr(self, name)]
        if self.kernel and not self.initramfs:
            items.append("initramfs")
        return items


def status(kernel: str | None = None, cache: Path | None = None) -> Status:
    """What is ready to boot ``kernel`` (None: the default), changing nothing
    but a missing initramfs of a cached kernel."""
    found = kernels.find(kernel, cache)
    bb = initramfs.busybox()
    return Status(
        qemu=tools.qemu(),
        busybox=bb,
        kernel=found,
        initramfs=initramfs.path_for(found) if found and bb else None,
        cached=kernels.cached(cache),
    )


def _tools() -> None:
    missing = []
    if not tools.qemu():
        missing.append(tools.PACKAGES["qemu"])
    if not initramfs.busybox():
        missing.append(tools.PACKAGES["busybox"])
    if not shutil.which("strace"):
        missing.append(tools.PACKAGES["strace"])  # counts the syscalls of hot paths in tests
    if missing:
        tools.install_packages(missing)


def _kernel(spec: str | None, cache: Path | None, refresh: bool) -> kernels.Kernel:
    if spec is not None and kernels.is_path(spec):
        return kernels.import_image(Path(spec), cache)
    if not refresh:
        # A cached kernel of the series is enough: no network for a warm cache.
        found = kernels.find(spec, cache)
        if found is not None and found.package is not None:
            return found
    try:
        return kernels.fetch_debian(spec, cache)
    except VMError as exc:
        if "zstd" in str(exc) and zstd_backend() is None:
            tools.install_packages([tools.PACKAGES["zstd"]])
            return kernels.fetch_debian(spec, cache)
        raise


def setup(
    kernel_specs: list[str] | None = None, cache: Path | None = None, *, refresh: bool = False
) -> list[Status]:
    """Ready ``pkeys vm`` for each kernel named (none: Debian's default one)."""
    cache = cache or paths.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    _tools()
    specs: list[str | None] = list(kernel_specs) if kernel_specs else [None]
    ready = []
    for spec in specs:
        kernel = _kernel(spec, cache, refresh)
        if spec is None or kernels.default_release(cache) is None:
            kernels.set_default(kernel, cache)
        current = Status(tools.qemu(), initramfs.busybox(), kernel, initramfs.require(kernel),
                         kernels.cached(cache))
        if not current.ready:
            raise VMError("setup incomplete: missing " + ", ".join(current.missing()))
        ready.append(current)
    return ready
