"""Which kernel modules the guest needs, and the order to load them in.

The guest needs 9p over virtio (the shares) and overlayfs (its /tmp).
What those depend on changes between kernels (6.12's ``9pnet`` needs
``netfs``, 6.1's does not), so the order is derived, never listed: from
``modules.dep`` where the tree has one (an installed kernel), otherwise
from each module's own ``depends=`` field in its ``.modinfo`` section,
which is what depmod would have written (Debian's packages ship no
``modules.dep``; their post-install script generates it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from .decompress import decompress_module, module_name
from .errors import VMError

#: What the guest init needs; everything they depend on comes along.
WANTED = ("virtio_pci", "9pnet_virtio", "9p", "overlay")


def modinfo(elf: bytes) -> dict[str, str]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section."""
    if not elf.startswith(b"\x7fELF") or elf[4] != 2:
        raise VMError("not an ELF64 kernel module")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name = struct.unpack_from("<I", elf, base)[0]
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        end = elf.index(b"\0", names_offset + name)
        if elf[names_offset + name:end] == b".modinfo":
            info: dict[str, str] = {}
            for entry in elf[offset:offset + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    return {}


class ModuleTree:
    """The modules of one kernel release under ``lib/modules/RELEASE``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, Path] = {}
        for path in root.rglob("*.ko*"):
            parsed = module_name(path.name)
            if parsed:
                self.files.setdefault(parsed[0], path)
        self.builtin = self._builtin_names()
        self._dep = self._read_modules_dep()

    def _builtin_names(self) -> set[str]:
        names = set()
        builtin = self.root / "modules.builtin"
        if builtin.exists():
            for line in builtin.read_text().split():
                parsed = module_name(Path(line).name)
                if parsed:
                    names.add(parsed[0])
        return names

    def _read_modules_dep(self) -> dict[str, list[str]] | None:
        dep = self.root / "modules.dep"
        if not dep.exists():
            return None
        return parse_modules_dep(dep.read_text())

    def data(self, name: str) -> bytes:
        path = self.files[name]
        suffix = module_name(path.name)[1]  # type: ignore[index]
        return decompress_module(path.read_bytes(), suffix)

    def depends(self, name: str) -> list[str]:
        if self._dep is not None:
            return self._dep.get(name, [])
        value = modinfo(self.data(name)).get("depends", "")
        return [d.replace("-", "_") for d in value.split(",") if d]

    def load_order(self, wanted: Iterable[str] = WANTED) -> list[str]:
        """Modules to insmod, dependencies first; built-in ones are left out."""
        return load_order(wanted, self.depends, has=self.files.__contains__, builtin=self.builtin)


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``kernel/fs/9p/9p.ko.xz: kernel/fs/netfs/netfs.ko.xz ...`` → names."""
    graph: dict[str, list[str]] = {}
    for line in text.splitlines():
        module, sep, deps = line.partition(":")
        parsed = module_name(Path(module.strip()).name)
        if not sep or not parsed:
            continue
        names = [module_name(Path(d).name) for d in deps.split()]
        graph[parsed[0]] = [n[0] for n in names if n]
    return graph


def load_order(
    wanted: Iterable[str],
    depends: Callable[[str], list[str]],
    *,
    has: Callable[[str], bool],
    builtin: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[str]:
    """Depth-first: every module after all it depends on."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, needed_by: str | None) -> None:
        if name in order or name in builtin:
            return
        if not has(name):
            raise VMError(
                f"kernel module {name} (needed by {needed_by or 'the guest'}) is neither "
                "a module nor built into this kernel"
            )
        if name in visiting:
            raise VMError(f"kernel module dependency cycle through {name}")
        visiting.add(name)
        for dependency in depends(name):
            visit(dependency, name)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name, None)
    return order
