"""The guest's initramfs: busybox, the init script and one kernel's modules.

Written as a ``newc`` cpio archive here, in Python, so no cpio tool is
needed.  Its name carries a digest of everything in it, so a changed init
script or module set builds a new one and a stale one is never booted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from importlib import resources
from pathlib import Path

from .errors import VMError
from .kernels import Kernel

MODE_DIR = stat.S_IFDIR | 0o755
MODE_FILE = stat.S_IFREG | 0o644
MODE_EXEC = stat.S_IFREG | 0o755


def init_script() -> bytes:
    return resources.files("pkeys.vm").joinpath("init.sh").read_bytes()


def busybox() -> str | None:
    """A statically linked busybox: the initramfs has no libc."""
    candidates = ["/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""]
    for candidate in candidates:
        if candidate and os.path.exists(candidate) and is_static(candidate):
            return candidate
    return None


def is_static(path: str) -> bool:
    try:
        with open(path, "rb") as binary:
            head = binary.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x7fELF") and b"/ld-linux" not in head and b"ld-musl" not in head


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's ``newc`` format (with the trailer)."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for inode, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(b"%08X" % value for value in fields)
        out += encoded
        pad()
        out += data
        pad()
    return bytes(out)


def contents(kernel: Kernel, busybox_path: str) -> list[tuple[str, int, bytes]]:
    modules = kernel.modules
    entries = [
        ("bin", MODE_DIR, b""),
        ("bin/busybox", MODE_EXEC, Path(busybox_path).read_bytes()),
        ("init", MODE_EXEC, init_script()),
        ("lib", MODE_DIR, b""),
        ("lib/modules", MODE_DIR, b""),
    ]
    entries += [(f"lib/modules/{m.name}", MODE_FILE, m.read_bytes()) for m in modules]
    entries.append(("modules.order", MODE_FILE, "".join(f"{m.stem}\n" for m in modules).encode()))
    return entries


def path_for(kernel: Kernel) -> Path | None:
    """This kernel's current initramfs, building it if needed (None: no busybox)."""
    found = busybox()
    if found is None:
        return None
    entries = contents(kernel, found)
    digest = hashlib.sha256()
    for name, mode, data in entries:
        digest.update(f"{name}\0{mode}\0{len(data)}\0".encode())
        digest.update(data)
    target = kernel.folder / f"initramfs-{digest.hexdigest()[:12]}.cpio"
    if not target.exists():
        for stale in kernel.folder.glob("initramfs-*.cpio"):
            stale.unlink()
        staging = target.with_suffix(".tmp")
        staging.write_bytes(newc(entries))
        os.replace(staging, target)
    return target


def require(kernel: Kernel) -> Path:
    found = path_for(kernel)
    if found is None:
        raise VMError("no static busybox found: install busybox-static (or run `pkeys vm setup`)")
    return found
