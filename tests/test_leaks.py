"""Create/close cycles of the public objects end with the process holding
what it held before: no mapping, fd, locked page or key left behind."""

from __future__ import annotations

import mmap

import pytest

import pkeys

from ._process import Holdings, holdings

CYCLES = 300
# CPython's allocator may map or drop an arena during the loop; a leak of
# one mapping per cycle would be CYCLES.
ALLOCATOR_SLACK = 4


def assert_nothing_kept(before: Holdings, after: Holdings) -> None:
    growth = after.growth_since(before)
    assert growth.open_fds == 0, growth
    assert growth.locked_bytes == 0, growth
    assert growth.threads == 0, growth
    assert growth.mappings <= ALLOCATOR_SLACK, growth


def buffer_cycle() -> None:
    with pkeys.ProtectedBuffer(100, label="leak-check") as buffer:
        buffer.write(b"k" * 100)
        with buffer.unlocked() as view:
            assert bytes(view[:1]) == b"k"
        out = bytearray(100)
        buffer.readinto(out)


def key_cycle(page: mmap.mmap) -> None:
    with pkeys.Key() as key:
        key.protect(page)
        with key.allow():
            page[0] = 1
        # Untag before close: a key still guarding memory cannot be freed.
        pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)


@pytest.mark.anybackend
def test_buffer_cycles_leave_nothing_behind():
    buffer_cycle()  # first use: the fault handler, caches, one arena
    keys, before = pkeys.allocated_keys(), holdings()
    for _ in range(CYCLES):
        buffer_cycle()
    assert_nothing_kept(before, holdings())
    assert pkeys.allocated_keys() == keys


@pytest.mark.anybackend
def test_key_cycles_leave_nothing_behind():
    page = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        key_cycle(page)
        keys, before = pkeys.allocated_keys(), holdings()
        for _ in range(CYCLES):
            key_cycle(page)
        assert_nothing_kept(before, holdings())
        assert pkeys.allocated_keys() == keys
    finally:
        page.close()


def test_the_count_sees_buffers_that_are_kept():
    # The same measure must notice a real leak, or the tests above prove nothing.
    before = holdings()
    kept = [pkeys.ProtectedBuffer(100, label="kept") for _ in range(3)]
    try:
        growth = holdings().growth_since(before)
        # Each buffer is at least its data pages between two guard pages,
        # which cannot merge with anything around them.
        assert growth.mappings >= 3 * 2
        if all(buffer.memory_locked for buffer in kept):
            assert growth.locked_bytes >= 3 * mmap.PAGESIZE
        with pytest.raises(AssertionError):
            assert_nothing_kept(before, holdings())
    finally:
        for buffer in kept:
            buffer.close()
    assert_nothing_kept(before, holdings())
