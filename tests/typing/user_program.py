"""A small program using the public API the way the README does.

tests/test_typing.py checks it twice: ``mypy --strict`` must find nothing,
and it must run.  It is also the program to type-check against an
installed wheel.
"""

from __future__ import annotations

import mmap

import pkeys
from pkeys import pkru


def raw_calls() -> list[int]:
    """The kernel-style functions on an mmap'd page."""
    page = mmap.mmap(-1, mmap.PAGESIZE)
    pkey: int = pkeys.pkey_alloc(0, pkeys.PKEY_DISABLE_ACCESS)
    try:
        pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, pkey)
        before: pkeys.PkeyRights = pkeys.pkey_get(pkey)
        pkeys.pkey_set(pkey, pkeys.PKEY_UNRESTRICTED)
        page[0] = 42
        pkeys.pkey_set(pkey, before)
        held: list[int] = pkeys.allocated_keys()
        # Untag the page so that the key can be freed.
        pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
    finally:
        pkeys.pkey_free(pkey)
        page.close()
    return held


def register_round_trip() -> int:
    value: int = pkeys.rdpkru()
    pkeys.wrpkru(value)
    return value


def keys_and_scopes() -> pkeys.PkeyRights:
    """Key objects, scopes, probes, and the pkru helpers fed a Key."""
    with pkeys.Key() as key, mmap.mmap(-1, mmap.PAGESIZE) as page:
        key.protect(page)
        denied: pkeys.Fault | None = pkeys.probe(page)
        if denied is not None:
            assert denied.kind in (pkeys.FaultKind.PKEY, pkeys.FaultKind.PROTECTION)
        with key.allow(write=False):
            assert pkeys.probe(page) is None
        with pkeys.allow(key, write=True):
            page[0] = 1
        register = pkru.read() if pkeys.backend() == "hardware" else pkru.INIT_PKRU
        opened = pkru.granting(register, [key], write=False)
        rights = pkru.rights_of(opened, key)
        closed = pkru.with_rights(opened, key, pkeys.PKEY_DISABLE_ACCESS)
        assert pkru.decode(closed)[key.pkey] is pkeys.PkeyRights.DISABLE_ACCESS
        pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
    return rights


def keep_a_secret(secret: bytes) -> bytes:
    with pkeys.ProtectedBuffer(len(secret), label="api-token") as buffer:
        buffer.write(secret)
        with buffer.unlocked() as view:
            first = view[0]
        copy = bytearray(len(secret))
        copied: int = buffer.readinto(copy)
    assert copied == len(secret) and first == secret[0]
    return bytes(copy)


def load_and_count(secret: bytes) -> pkeys.VirtualKeyStats:
    """A loader with ProtectedBuffer's options, any buffer as data, typed stats."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp()
    try:
        os.write(fd, secret)
        os.close(fd)
        with pkeys.ProtectedBuffer.from_file(path, label="pem", secretmem=None) as pem:
            pem.write(memoryview(bytearray(secret)))
            pem.write(mmap.mmap(-1, len(secret)))
    finally:
        os.remove(path)
    stats = pkeys.virtual_key_stats()
    evictions: int = stats["evictions"]
    assert evictions >= 0 and stats["limit"] == pkeys.virtual_key_limit()
    return stats


def a_plugin_test(expect_fault: pkeys.ExpectFault, pkey: pkeys.Key) -> pkeys.Fault:
    """How a test using the pytest plugin's fixtures is annotated (not run here)."""
    page = mmap.mmap(-1, mmap.PAGESIZE)
    pkey.protect(page)
    return expect_fault(lambda: page[0], kind=pkeys.FaultKind.PKEY)


def main() -> int:
    name: pkeys.BackendName = pkeys.backend()
    assert name in ("hardware", "software")
    print(f"pkeys {pkeys.__version__}, {pkeys.backend()} backend: {pkeys.backend_reason()}")
    try:
        raw_calls()
        register_round_trip()
    except pkeys.UnsupportedError as refused:
        print(f"no protection keys here: {refused}")
        return 1
    print(f"rights while open: {keys_and_scopes()!r}")
    assert keep_a_secret(b"correct horse") == b"correct horse"
    print(f"virtual keys: {load_and_count(b'-----BEGIN PRIVATE KEY-----')['limit']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
