"""Compressed kernels and modules as Debian ships them, decompressed.

QEMU boots an ELF kernel directly (its PVH entry), seconds sooner than a
bzImage, which would decompress itself under emulation.  So setup takes the
ELF out of the bzImage once.  The payload is located through the boot
protocol header (``payload_offset``/``payload_length``); an image without a
usable header is searched for compressed streams instead.

Formats: gzip, bzip2, XZ and legacy LZMA from the standard library; zstd
(Debian's choice since 6.12) from ``compression.zstd`` (Python 3.14), else
the ``zstandard`` module (``pip install 'pkeys[vm]'``), else the ``zstd``
tool.
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable

from .errors import VMError

ELF_MAGIC = b"\x7fELF"
MAGICS = {
    "xz": b"\xfd7zXZ\x00",
    "zstd": b"\x28\xb5\x2f\xfd",
    "gzip": b"\x1f\x8b\x08",
    "bzip2": b"BZh",
    "lzma": b"\x5d\x00\x00",
}


def _xz(data: bytes) -> bytes:
    # A decompressor object stops at the end of the stream and ignores what
    # follows (the bzImage appends the uncompressed size).
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _lzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)


def _gzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _bzip2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data)


def zstd_backend() -> str | None:
    """Which zstd decoder is available: a module name, ``zstd`` (the tool), or None."""
    try:
        import compression.zstd  # type: ignore[import-not-found]  # noqa: F401

        return "compression.zstd"
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found, unused-ignore]  # noqa: F401

        return "zstandard"
    except ImportError:
        pass
    return "zstd" if shutil.which("zstd") else None


def _zstd(data: bytes) -> bytes:
    backend = zstd_backend()
    if backend == "compression.zstd":
        from compression import zstd  # type: ignore[import-not-found, unused-ignore]

        result: bytes = zstd.ZstdDecompressor().decompress(data)
        return result
    if backend == "zstandard":
        import zstandard  # type: ignore[import-not-found, unused-ignore]

        output: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        return output
    if backend == "zstd":
        # The tool rejects trailing bytes; callers pass one exact frame.
        tool = subprocess.run(["zstd", "-d", "-c", "-q"], input=data, capture_output=True, check=False)
        if tool.returncode != 0:
            raise VMError(f"zstd failed: {tool.stderr.decode(errors='replace').strip()}")
        return tool.stdout
    raise VMError(
        "this kernel is zstd-compressed and no zstd decoder is available: "
        "pip install zstandard (or pkeys[vm]), or install the zstd tool"
    )


DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "xz": _xz,
    "zstd": _zstd,
    "gzip": _gzip,
    "bzip2": _bzip2,
    "lzma": _lzma,
}


def compression_of(data: bytes) -> str | None:
    for name, magic in MAGICS.items():
        if data.startswith(magic):
            return name
    return None


def _payload(bzimage: bytes) -> bytes | None:
    """The compressed kernel that the boot protocol header points at, without
    the 4-byte uncompressed size that the kernel build appends to it."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    version = struct.unpack_from("<H", bzimage, 0x206)[0]
    if version < 0x208:  # payload fields arrived with boot protocol 2.08
        return None
    setup_sectors = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    if length <= 4 or start + length > len(bzimage):
        return None
    payload = bzimage[start:start + length]
    return payload if compression_of(payload) == "gzip" else payload[:-4]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage (or the image itself if it is ELF)."""
    if bzimage.startswith(ELF_MAGIC):
        return bzimage
    payload = _payload(bzimage)
    if payload is not None:
        kind = compression_of(payload)
        if kind is None:
            raise VMError(f"unknown kernel compression (payload starts {payload[:6].hex()})")
        elf = DECOMPRESSORS[kind](payload)
        if elf.startswith(ELF_MAGIC):
            return elf
        raise VMError(f"the {kind} payload of this kernel image is not an ELF kernel")
    # No usable header: try every compressed stream in the image.
    for kind, magic in MAGICS.items():
        start = bzimage.find(magic)
        while start >= 0:
            try:
                elf = DECOMPRESSORS[kind](bzimage[start:])
            except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError, VMError):
                elf = b""
            if elf.startswith(ELF_MAGIC):
                return elf
            start = bzimage.find(magic, start + 1)
    raise VMError("no compressed ELF kernel found in the image")


MODULE_SUFFIXES = {".ko": None, ".ko.xz": "xz", ".ko.zst": "zstd", ".ko.gz": "gzip"}


def module_name(filename: str) -> tuple[str, str] | None:
    """``("9pnet_virtio", ".ko.xz")`` for ``9pnet_virtio.ko.xz``; None for other files.
    Dashes become underscores, as the kernel does with module names."""
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if filename.endswith(suffix):
            return filename[: -len(suffix)].replace("-", "_"), suffix
    return None


def decompress_module(data: bytes, suffix: str) -> bytes:
    """A kernel module as insmod needs it (busybox insmod cannot decompress)."""
    kind = MODULE_SUFFIXES[suffix]
    if kind == "zstd":
        return _zstd(data)
    return DECOMPRESSORS[kind](data) if kind else data
