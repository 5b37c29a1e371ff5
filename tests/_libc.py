"""Test-only access to libc calls Python's mmap module does not offer
(MAP_FIXED, mremap), through cffi's ABI mode, and to what the kernel shows
of this process's memory (smaps, /proc/self/mem)."""

from __future__ import annotations

import mmap
import os

import cffi

ffi = cffi.FFI()
ffi.cdef(
    """
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    void *mremap(void *old_address, size_t old_size, size_t new_size, int flags, ...);
    int madvise(void *addr, size_t length, int advice);
    """
)
libc = ffi.dlopen(None)

PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x02, 0x10, 0x20
MREMAP_MAYMOVE = 1
MAP_FAILED = 2**64 - 1


def _address(pointer) -> int:
    value = int(ffi.cast("uintptr_t", pointer))
    if value == MAP_FAILED:
        raise OSError(ffi.errno, "mmap/mremap failed")
    return value


def map_anonymous(length: int, address: int = 0, fixed: bool = False) -> int:
    flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_FIXED if fixed else 0)
    return _address(
        libc.mmap(ffi.cast("void *", address), length, PROT_READ | PROT_WRITE, flags, -1, 0)
    )


def unmap(address: int, length: int) -> None:
    if libc.munmap(ffi.cast("void *", address), length) != 0:
        raise OSError(ffi.errno, "munmap failed")


def remap(address: int, old_length: int, new_length: int) -> int:
    return _address(libc.mremap(ffi.cast("void *", address), old_length, new_length, MREMAP_MAYMOVE))


def address_of(memory) -> int:
    """The address of a buffer's first byte."""
    from pkeys._binding import ffi as pkeys_ffi

    pin = pkeys_ffi.from_buffer(memory)
    try:
        return int(pkeys_ffi.cast("uintptr_t", pin))
    finally:
        pkeys_ffi.release(pin)


def smaps_field(address: int, field: str) -> list[str]:
    """The words after ``field:`` in /proc/self/smaps for the mapping at ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0] if line.strip() else ""
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith(field + ":"):
                return line.split()[1:]
    raise LookupError(f"no {field} line for {address:#x}")


def smaps_pkey(address: int) -> int:
    """The ProtectionKey that /proc/self/smaps shows for the mapping at ``address``."""
    return int(smaps_field(address, "ProtectionKey")[0])


def allocate_until_enospc(allocate, after_each=None) -> list[int]:
    """Call ``allocate()`` until it fails with ENOSPC; the keys it returned.
    ``after_each(keys)`` runs after every success.  Any other error is raised."""
    import errno

    keys: list[int] = []
    while True:
        try:
            keys.append(allocate())
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return keys
        if after_each is not None:
            after_each(keys)


def keyed_copy(mapping, dst: int, src: int, length: int) -> None:
    """Copy with a protected buffer's access opened for the copy only (the
    buffer's own path, without its bounds checks; works while closing)."""
    from pkeys._binding import ffi as pkeys_ffi
    from pkeys._binding import lib

    op = pkeys_ffi.new("struct pk_vbuf_op *", {"token": -1})
    status = lib.pk_vbuf_copy(mapping.vbuf, dst, src, length, lib.PK_GRANT_READ_WRITE, 1, op, 0)
    assert status == 0, status


def record_inner_before_unmap(monkeypatch) -> dict:
    """Make every protected buffer copy its inner pages into the returned
    dict (key "bytes") just before they are unmapped."""
    from pkeys import _buffer
    from pkeys._binding import ffi as pkeys_ffi

    seen: dict = {}
    real_unmap = _buffer._Mapping._unmap

    def inspect_then_unmap(mapping) -> None:
        copy = pkeys_ffi.new("char[]", mapping.inner_length)
        keyed_copy(mapping, int(pkeys_ffi.cast("uintptr_t", copy)), mapping.inner,
                   mapping.inner_length)
        seen["bytes"] = pkeys_ffi.buffer(copy)[:]
        real_unmap(mapping)

    monkeypatch.setattr(_buffer._Mapping, "_unmap", inspect_then_unmap)
    return seen


def proc_self_mem(address: int, length: int) -> bytes | int:
    """What /proc/self/mem gives for the range: the bytes, or the errno."""
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        return os.pread(fd, length, address)
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)


def no_export(memory: mmap.mmap) -> bool:
    """Whether nothing holds an export of the mmap (resize refuses then)."""
    try:
        memory.resize(len(memory))
    except BufferError:
        return False
    return True
