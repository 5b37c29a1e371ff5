"""The kernels that ``pkeys vm`` can boot, cached side by side.

Each lives in ``kernels/RELEASE/`` under the cache: its uncompressed ELF
image, the modules the guest needs (decompressed, since busybox's insmod
cannot decompress) with their load order, and ``kernel.json`` saying where
it came from.  A kernel is named on the command line by a Debian series
(``6.1``, ``6.12``: the newest cached release of it), by a release, or by
the path of a kernel image (``/boot/vmlinuz-...``), whose modules are then
taken from ``/lib/modules/RELEASE`` or from the tree the image sits in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import debian, paths
from .decompress import extract_vmlinux
from .errors import VMError
from .modules import ModuleTree


@dataclass(frozen=True)
class Kernel:
    release: str
    folder: Path
    origin: str  # "debian PACKAGE VERSION" or the image's path
    package: str | None = None
    version: str | None = None

    @property
    def vmlinux(self) -> Path:
        return self.folder / "vmlinux"

    @property
    def modules(self) -> list[Path]:
        order = (self.folder / "modules.order").read_text().split()
        return [self.folder / "modules" / f"{name}.ko" for name in order]

    @property
    def series(self) -> tuple[int, int]:
        return debian.series_of(self.release)  # type: ignore[return-value]

    def describe(self) -> str:
        return f"{self.release} ({self.origin})"


def _load(folder: Path) -> Kernel | None:
    try:
        meta = json.loads((folder / "kernel.json").read_text())
    except (OSError, ValueError):
        return None
    if not (folder / "vmlinux").exists():
        return None
    return Kernel(meta["release"], folder, meta["origin"], meta.get("package"), meta.get("version"))


def cached(cache: Path | None = None) -> list[Kernel]:
    """Every complete kernel in the cache, oldest series first."""
    root = paths.kernels_dir(cache)
    found = [k for k in (_load(f) for f in sorted(root.glob("*"))) if k]
    return sorted(found, key=lambda k: (k.series, [int(n) for n in re.findall(r"\d+", k.release)]))


def default_release(cache: Path | None = None) -> str | None:
    marker = (cache or paths.cache_dir()) / "default-kernel"
    return marker.read_text().strip() if marker.exists() else None


def set_default(kernel: Kernel, cache: Path | None = None) -> None:
    (cache or paths.cache_dir()).joinpath("default-kernel").write_text(kernel.release + "\n")


def is_path(spec: str) -> bool:
    return "/" in spec or os.path.isfile(spec)


def find(spec: str | None, cache: Path | None = None) -> Kernel | None:
    """The cached kernel that ``spec`` names (None: the default), or None."""
    kernels = cached(cache)
    if spec is None:
        release = default_release(cache)
        chosen = [k for k in kernels if k.release == release]
        return chosen[0] if chosen else (kernels[0] if len(kernels) == 1 else None)
    if is_path(spec):
        digest = _image_digest(Path(spec))
        return next((k for k in kernels if k.origin == f"image {digest}"), None)
    exact = [k for k in kernels if k.release == spec]
    if exact:
        return exact[0]
    debian.series_of(spec)
    matching = [k for k in kernels if debian.matches_series(k.release, spec)]
    return matching[-1] if matching else None


def require(spec: str | None, cache: Path | None = None) -> Kernel:
    kernel = find(spec, cache)
    if kernel is None:
        what = f"kernel {spec}" if spec else "default kernel"
        hint = f"pkeys vm setup --kernel {spec}" if spec else "pkeys vm setup"
        raise VMError(f"the {what} is not in the cache; run `{hint}` first")
    return kernel


def _image_digest(image: Path) -> str:
    try:
        with open(image, "rb") as stream:
            return hashlib.sha256(stream.read()).hexdigest()[:16]
    except OSError as exc:
        raise VMError(f"cannot read the kernel image {image}: {exc.strerror}") from None


def release_of_image(image: bytes) -> str | None:
    """The release string a bzImage header or an ELF kernel carries."""
    if image[0x202:0x206] == b"HdrS":
        pointer = struct.unpack_from("<H", image, 0x20E)[0]
        if pointer:
            text = image[pointer + 0x200:pointer + 0x300].split(b"\0")[0].decode(errors="replace")
            if text.split():
                return text.split()[0]
    match = re.search(rb"Linux version (\S+) ", image)
    return match.group(1).decode(errors="replace") if match else None


def _install(
    folder_name: str, release: str, vmlinux: bytes, tree: ModuleTree | None, meta: dict[str, str | None], cache: Path | None
) -> Kernel:
    """Write a kernel into the cache atomically (a half-written one is never seen)."""
    root = paths.kernels_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}-", dir=root))
    staging.chmod(0o755)
    try:
        (staging / "modules").mkdir()
        order = tree.load_order() if tree else []
        for name in order:
            (staging / "modules" / f"{name}.ko").write_bytes(tree.data(name))  # type: ignore[union-attr]
        (staging / "modules.order").write_text("".join(f"{n}\n" for n in order))
        (staging / "vmlinux").write_bytes(vmlinux)
        (staging / "kernel.json").write_text(json.dumps({"release": release, **meta}, indent=1))
        final = root / folder_name
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    kernel = _load(root / folder_name)
    assert kernel is not None
    return kernel


def fetch_debian(series: str | None, cache: Path | None = None) -> Kernel:
    """Download and unpack Debian's newest kernel of ``series`` (None: the
    default one), unless that very package is cached already."""
    archive = debian.Archive(paths.apt_dir(cache))
    package, version = debian.image_package(archive, series)
    for kernel in cached(cache):
        if kernel.package == package and kernel.version == version:
            return kernel
    with tempfile.TemporaryDirectory(prefix="pkeys-kernel-") as work:
        deb = archive.download(package, version, Path(work))
        tree = Path(work) / "tree"
        paths.log(f"unpacking {deb.name}")
        result = subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise VMError(f"dpkg-deb -x {deb.name} failed: {result.stderr.strip()}")
        deb.unlink()
        images = sorted(tree.glob("boot/vmlinuz-*"))
        if not images:
            raise VMError(f"{package} has no /boot/vmlinuz")
        release = images[0].name.removeprefix("vmlinuz-")
        modules = _modules_root(tree, release)
        return _install(
            release,
            release,
            extract_vmlinux(images[0].read_bytes()),
            ModuleTree(modules) if modules else None,
            {"origin": f"debian {package} {version}", "package": package, "version": version},
            cache,
        )


def _modules_root(tree: Path, release: str) -> Path | None:
    for candidate in (tree / "lib/modules" / release, tree / "usr/lib/modules" / release):
        if candidate.is_dir():
            return candidate
    return None


def import_image(image_path: Path, cache: Path | None = None) -> Kernel:
    """Cache a kernel image given by path, with its modules when they can be found."""
    data = image_path.read_bytes()
    release = release_of_image(data)
    if release is None:
        raise VMError(f"{image_path} is not a Linux kernel image (no release string found)")
    modules = None
    for base in (image_path.resolve().parent.parent, Path("/")):
        modules = _modules_root(base, release)
        if modules:
            break
    digest = _image_digest(image_path)
    return _install(
        f"{release}+image-{digest[:8]}",
        release,
        extract_vmlinux(data),
        ModuleTree(modules) if modules else None,
        {"origin": f"image {digest}", "path": str(image_path)},
        cache,
    )
