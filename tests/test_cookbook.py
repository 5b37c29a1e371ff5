"""The cookbook (docs/protected-buffer.md), each recipe with the copies of the secret it leaves
in this process counted by scanning memory.

The scanner reads every writable mapping (the heap, Python's arenas,
OpenSSL's allocations, stacks, libraries' data) through /proc/self/mem and
counts occurrences of the secret outside the ProtectedBuffer itself.  The
secret is random and never exists as a Python object: it is read from
/dev/urandom straight into the buffer, and the test keeps only a masked
form of it.  The needle is rebuilt, for each scan, in a scratch mmap that
the scan skips (as it skips its own read buffer).
"""

from __future__ import annotations

import gc
import hmac
import mmap
import os

import pytest

import pkeys

pytestmark = pytest.mark.anybackend
SIZE = 32
CHUNK = 1 << 20


class Secret:
    """A random secret in a ProtectedBuffer, and a way to look for it."""

    def __init__(self) -> None:
        self.buffer = pkeys.ProtectedBuffer(SIZE, label="cookbook")
        with open("/dev/urandom", "rb", buffering=0) as source:
            assert self.buffer.read_from(source.fileno()) == SIZE
        self.scratch = mmap.mmap(-1, mmap.PAGESIZE)   # the needle lives here only
        self.chunk = mmap.mmap(-1, CHUNK + SIZE)      # what the scan reads into
        self.mask = os.urandom(SIZE)
        view = memoryview(self.scratch)
        self.buffer.readinto(view[:SIZE])
        for i in range(SIZE):                        # masked in place: ints only
            view[i] ^= self.mask[i]
        self.masked = bytes(view[:SIZE])
        view[:SIZE] = bytes(SIZE)
        view.release()

    def close(self) -> None:
        self.buffer.close()
        self.scratch.close()
        self.chunk.close()

    def _skipped(self) -> list[tuple[int, int]]:
        spans = []
        for memory in (self.scratch, self.chunk):
            pin = memoryview(memory)
            from pkeys._binding import ffi

            handle = ffi.from_buffer(pin)
            start = int(ffi.cast("uintptr_t", handle))
            ffi.release(handle)
            pin.release()
            spans.append((start, start + len(memory)))
        mapping = self.buffer._mapping
        spans.append((mapping.base, mapping.base + mapping.map_length))
        return spans

    def copies(self) -> int:
        """Occurrences of the secret in writable memory outside the buffer."""
        gc.collect()
        skipped = self._skipped()
        needle_view = memoryview(self.scratch)
        for i in range(SIZE):
            needle_view[i] = self.masked[i] ^ self.mask[i]
        needle = needle_view[:SIZE]
        found = 0
        fd = os.open("/proc/self/mem", os.O_RDONLY)
        try:
            for start, end in _writable_regions():
                if any(s < end and start < e for s, e in skipped):
                    continue
                found += self._scan(fd, start, end, needle)
        finally:
            os.close(fd)
            needle.release()
            needle_view[:SIZE] = bytes(SIZE)
            needle_view.release()
            self.chunk[:] = bytes(len(self.chunk))
        return found

    def _scan(self, fd: int, start: int, end: int, needle: memoryview) -> int:
        found = 0
        target = memoryview(self.chunk)
        try:
            position = start
            while position < end:
                length = min(CHUNK + SIZE, end - position)
                try:
                    got = os.preadv(fd, [target[:length]], position)
                except OSError:
                    got = 0  # secretmem (EIO), or gone meanwhile
                if got <= 0:
                    position += CHUNK
                    continue
                offset = self.chunk.find(needle, 0, got)
                while offset >= 0:
                    if offset < CHUNK or position + CHUNK >= end:  # the overlap counts once
                        found += 1
                    offset = self.chunk.find(needle, offset + 1, got)
                position += CHUNK
        finally:
            target.release()
        return found


def _writable_regions() -> list[tuple[int, int]]:
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if "w" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            regions.append((start, end))
    return regions


@pytest.fixture
def secret():
    made = Secret()
    yield made
    made.close()


def test_the_scanner_finds_a_copy_and_its_removal(secret):
    assert secret.copies() == 0  # loading left none
    leaked = bytearray(SIZE)
    secret.buffer.readinto(leaked)
    assert secret.copies() == 1  # positive control
    leaked[:] = bytes(SIZE)
    assert secret.copies() == 0


def test_hmac_with_the_view_leaves_no_copy(secret):
    with secret.buffer.unlocked() as key:
        tag = hmac.digest(key, b"message to authenticate", "sha256")
    assert len(tag) == 32
    assert secret.copies() == 0


def test_hmac_with_bytes_of_the_view_leaves_a_copy(secret):
    with secret.buffer.unlocked() as key:
        copied = bytes(key)  # the anti-pattern: a bytes object nobody can wipe
        hmac.digest(copied, b"message", "sha256")
    assert secret.copies() >= 1
    del copied


def test_aesgcm_keeps_one_openssl_copy_while_it_lives(secret):
    aead_module = pytest.importorskip("cryptography.hazmat.primitives.ciphers.aead")
    nonce = os.urandom(12)
    with secret.buffer.unlocked() as key:
        aead = aead_module.AESGCM(key)
        sealed = aead.encrypt(nonce, b"attack at dawn", None)
        # OpenSSL expanded the key into its own context: the first round keys
        # of AES-256 are the key itself.
        while_alive = secret.copies()
        assert aead.decrypt(nonce, sealed, None) == b"attack at dawn"
        del aead  # frees the contexts: OpenSSL cleanses them
    after = secret.copies()
    assert while_alive >= 1
    assert after == 0


def test_a_bearer_header_has_one_copy_until_it_is_zeroed(secret):
    prefix = b"Authorization: Bearer "
    header = bytearray(len(prefix) + SIZE)
    header[:len(prefix)] = prefix
    secret.buffer.readinto(memoryview(header)[len(prefix):])
    assert secret.copies() == 1  # the header itself: unavoidable, and ours to wipe
    header[len(prefix):] = bytes(SIZE)
    assert secret.copies() == 0


def test_the_naive_bearer_header_leaves_copies(secret):
    with secret.buffer.unlocked() as token:
        header = b"Authorization: Bearer " + bytes(token)
    assert secret.copies() >= 1  # immutable: no way to drop it but to hope
    del header
