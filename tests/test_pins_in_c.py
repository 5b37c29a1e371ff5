"""The software backend's pins taken in C (csrc/scope_type.c, pin_in_c).

A rights change on a key that guards a caller's mmap pins the mmap's
export while C re-protects it.  pkey_set and the scope types pin the
common case in C and leave every other one -- an owner gone, closed,
moved, more owners than C holds -- to pkeys/_state.py's prepare_pins.
Python code can still run while C pins (an owner held by a Python
function, a finalizer); these tests run it there, through an owner's
``ref``, and check that the change behaves: it completes on what is left,
or raises and changes nothing, and no export outlives the call.  What a
change costs is measured by ``python -m pkeys.bench.layers``, not here.
"""

from __future__ import annotations

import mmap
import pathlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import pkeys
from pkeys import PKEY_DISABLE_ACCESS, _api, _state
from pkeys._binding import ffi, lib

from ._libc import address_of, no_export
from ._strace import loop_syscalls

pytestmark = pytest.mark.software

PAGE = mmap.PAGESIZE
RW = pkeys.PROT_READ | pkeys.PROT_WRITE


def owner_of(memory: mmap.mmap) -> _state._Owner:
    [owner] = [owner for owner in _state._owners.values() if owner.ref() is memory]
    return owner


@contextmanager
def on_pin(memory: mmap.mmap, action: Callable[[mmap.mmap], object]) -> Iterator[None]:
    """Inside the block, run action(memory) each time memory's owner is
    looked up to be pinned (its ``ref`` is called), then give the mmap, as
    ``ref`` does."""
    owner = owner_of(memory)
    ref = owner.ref

    def hooked() -> object:
        action(memory)
        return ref()

    owner.ref = hooked
    try:
        yield
    finally:
        owner.ref = ref


def untag(*memories: mmap.mmap) -> None:
    for memory in memories:
        if not memory.closed:
            pkeys.pkey_mprotect(memory, None, RW, 0)


def tracked(pkey: int) -> int:
    """How many regions C tracks for the key (without pruning first)."""
    return lib.pk_regions_list(pkey, ffi.NULL, 0)


def test_a_change_pins_in_c_and_applies(key, pages) -> None:
    memory = pages()
    key.protect(memory)
    before = lib.pk_reprotections()
    pkeys.pkey_set(key, 0)
    memory[0] = 1
    assert lib.pk_reprotections() == before + 1
    pkeys.pkey_set(key, PKEY_DISABLE_ACCESS)
    assert pkeys.probe(memory) is not None
    assert no_export(memory)
    untag(memory)


def test_an_owner_closed_by_code_run_while_pinning_is_forgotten(key, pages) -> None:
    # The first owner's lookup closes the second before C pins it: C sees
    # it closed and leaves it to prepare_pins, which forgets it; the
    # change applies to what is left.
    first, second = pages(), pages()
    key.protect(first)
    key.protect(second)
    with on_pin(first, lambda _: second.close()):
        pkeys.pkey_set(key, 0)
    first[0] = 1
    assert tracked(key.pkey) == 1  # forgotten by the change, not pruned since
    [region] = _api.regions(key.pkey)
    assert region[0] == address_of(first)
    pkeys.pkey_set(key, PKEY_DISABLE_ACCESS)
    assert pkeys.probe(first) is not None
    untag(first)


def test_an_owner_that_closes_itself_while_pinned_for_is_forgotten(key, pages) -> None:
    memory = pages()
    key.protect(memory)
    with on_pin(memory, lambda m: m.close()):
        pkeys.pkey_set(key, 0)
    assert tracked(key.pkey) == 0
    assert pkeys.pkey_get(key) == 0


def test_closing_a_pinned_owner_fails_only_during_the_change(key, pages) -> None:
    # The second owner's lookup comes after the first was pinned: closing
    # the first then raises BufferError (its memory is being
    # re-protected); after the call it closes.
    first, second = pages(), pages()
    key.protect(first)
    key.protect(second)
    refused = []

    def close_first(_: mmap.mmap) -> None:
        try:
            first.close()
        except BufferError:
            refused.append(True)

    with on_pin(second, close_first):
        pkeys.pkey_set(key, 0)
    assert refused and not first.closed
    first[0] = second[0] = 1
    pkeys.pkey_set(key, PKEY_DISABLE_ACCESS)
    assert no_export(first) and no_export(second)
    untag(first, second)
    first.close()


def test_an_owner_moved_while_pinning_is_followed(key) -> None:
    # mmap.resize moves the memory; C sees the export elsewhere and leaves
    # it to prepare_pins, which moves the region with it (pk_owner_moved).
    memory = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE)  # a shared one cannot grow
    try:
        key.protect(memory)
        moved = []

        def grow(m: mmap.mmap) -> None:
            if not moved:
                moved.append(True)
                m.resize(64 * PAGE)

        with on_pin(memory, grow):
            pkeys.pkey_set(key, 0)
        assert moved
        memory[0] = memory[PAGE] = 1
        pkeys.pkey_set(key, PKEY_DISABLE_ACCESS)
        assert pkeys.probe(memory) is not None
        assert no_export(memory)
        untag(memory)
    finally:
        memory.close()


def test_an_exception_while_pinning_changes_nothing_and_holds_nothing(key, pages) -> None:
    first, second = pages(), pages()
    key.protect(first)
    key.protect(second)

    def fail(_: mmap.mmap) -> None:
        raise KeyboardInterrupt

    with on_pin(second, fail):  # after the first was pinned
        with pytest.raises(KeyboardInterrupt):
            pkeys.pkey_set(key, 0)
        assert pkeys.pkey_get(key) == PKEY_DISABLE_ACCESS
        assert pkeys.probe(first) is not None and pkeys.probe(second) is not None
        assert no_export(first) and no_export(second)
        with pytest.raises(KeyboardInterrupt):
            with key.allow():
                pass
    assert pkeys.pkey_get(key) == PKEY_DISABLE_ACCESS and no_export(first)
    untag(first, second)


def test_more_owners_than_c_pins_take_the_general_path(key, pages) -> None:
    memories = [pages() for _ in range(7)]  # C holds 4 inline (PK_PINS_INLINE)
    for memory in memories:
        key.protect(memory)
    pkeys.pkey_set(key, 0)
    for memory in memories:
        memory[0] = 1
    with key.deny():
        assert all(pkeys.probe(memory) is not None for memory in memories)
    pkeys.pkey_set(key, PKEY_DISABLE_ACCESS)
    assert all(pkeys.probe(memory) is not None and no_export(memory) for memory in memories)
    untag(*memories)


def test_a_software_pkey_set_makes_one_mprotect_and_no_other_syscall(
        tmp_path: pathlib.Path) -> None:
    script = pathlib.Path(__file__).resolve().parent / "simulated" / "software_set_loop.py"
    backend, syscalls = loop_syscalls(tmp_path, 1000, script=script)
    assert backend == "software"
    assert syscalls == {"mprotect": 1000}, syscalls
