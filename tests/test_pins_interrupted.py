"""An exception raised asynchronously (a signal handler's KeyboardInterrupt)
while the software backend's pins are taken for a scope or a block.

A key that also guards a caller's mmap needs its owner pinned, in Python,
for every grant change (csrc/regions.c).  Whatever Python code runs on the
way, an exception raised at any point of it must leave either the entry
recorded with the key open, or nothing changed: never a grant without its
token (the key open with no scope active) or a token without its grant.
sys.setprofile stands in for the signal: it raises at the n-th event of
__enter__ or __exit__ (CPython checks for signals at the same places, and
after C calls), for every n until the call completes without one.

pkey_set and the scope types pin in C when every owner is alive and in
place (csrc/scope_type.c, pin_in_c); Python code still runs there when an
owner's ``ref`` is a Python function (any exporter but an mmap), so each
test runs with both kinds of owner.  pkey_set must leave, when
interrupted, the rights it found and no export held."""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest

import pkeys
from pkeys import PKEY_DISABLE_ACCESS

from ._libc import no_export

pytestmark = pytest.mark.software


Guarded = tuple[pkeys.Key, mmap.mmap]


class Interrupt(BaseException):
    """What the stand-in signal raises."""


@contextmanager
def interrupt_at(n: int) -> Iterator[list[int]]:
    """Raise Interrupt at the n-th profile event inside the block; the
    list yielded gets the number of events seen."""
    seen = [0]
    history: list[tuple[str, object]] = []  # the events before it: (event, C function's name)

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        seen[0] += 1
        if seen[0] == n:
            sys.setprofile(None)
            raise Interrupt(history)
        history.append((event, getattr(arg, "__name__", None)))

    sys.setprofile(hook)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def before_the_call(interrupt: Interrupt, name: str) -> bool:
    """Whether the interrupt came before the C method `name` ran: at the
    profile event of its call at the latest (raising there skips the call)."""
    (history,) = interrupt.args
    return ("c_call", name) not in history


def at_every_event(step: Callable[[int], bool]) -> int:
    """step(n) for n = 1, 2, ... until it completes without the interrupt
    (it returns True then); the number of points tried."""
    for n in range(1, 500):
        if step(n):
            assert n > 2, "no Python code ran: the pins were not needed"
            return n
    raise AssertionError("the call never completed")


def foreign_view(memory: mmap.mmap) -> ctypes.Array[ctypes.c_char]:
    """A ctypes array over the mmap's memory that is its own exporter (made
    from the address, it keeps no view of the mmap)."""
    through = (ctypes.c_char * len(memory)).from_buffer(memory)
    address = ctypes.addressof(through)
    del through  # its export of the mmap goes with it
    return (ctypes.c_char * len(memory)).from_address(address)


@pytest.fixture(params=["mmap", "ctypes"])
def guarded(request: pytest.FixtureRequest) -> Iterator[Guarded]:
    """A key that guards a caller's mmap: its grants need pins.  Tagged
    as the mmap itself (C pins it without Python code), or through a
    ctypes array over its memory (the owner is that array, held by a
    Python function that C calls while pinning)."""
    memory = mmap.mmap(-1, mmap.PAGESIZE)
    with pkeys.Key() as key:
        if request.param == "mmap":
            key.protect(memory)
        else:
            key.protect(foreign_view(memory))
        yield key, memory
        pkeys.pkey_mprotect(memory, mmap.PAGESIZE, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
    memory.close()


def assert_closed(key: pkeys.Key, memory: mmap.mmap) -> None:
    assert pkeys.pkey_get(key) == PKEY_DISABLE_ACCESS
    assert pkeys.probe(memory) is not None


def assert_open(key: pkeys.Key, memory: mmap.mmap) -> None:
    assert pkeys.pkey_get(key) != PKEY_DISABLE_ACCESS
    assert pkeys.probe(memory, write=True) is None


def assert_open_for_reading(key: pkeys.Key, memory: mmap.mmap) -> None:
    assert pkeys.pkey_get(key) != PKEY_DISABLE_ACCESS
    assert pkeys.probe(memory) is None


def test_a_scope_entry_interrupted_anywhere_is_recorded_or_undone(guarded: Guarded) -> None:
    key, memory = guarded

    def step(n: int) -> bool:
        scope = key.allow()
        interrupted = False
        try:
            with interrupt_at(n):
                scope.__enter__()
        except Interrupt:
            interrupted = True
        if scope.active:
            # Recorded (the interrupt may come after __enter__ returned):
            # open until its exit.
            assert scope.active == 1
            assert_open(key, memory)
            scope.__exit__(None, None, None)
        else:
            assert interrupted
        assert_closed(key, memory)
        with scope:
            assert_open(key, memory)
        assert scope.active == 0
        assert_closed(key, memory)
        return not interrupted

    at_every_event(step)


def test_a_scope_exit_interrupted_anywhere_ends_the_grant(guarded: Guarded) -> None:
    # A `with` statement calls __exit__ once: an exit that kept its grant
    # because an interrupt came while pinning left the key open for good
    # (the adversary's KeyboardInterrupt from SIGALRM did that).  The exit
    # pins again, ends the grant, then raises the interrupt.
    key, memory = guarded

    def step(n: int) -> bool:
        scope = key.allow()
        scope.__enter__()
        interrupted = False
        try:
            with interrupt_at(n):
                scope.__exit__(None, None, None)
        except Interrupt as interrupt:
            interrupted = True
            if before_the_call(interrupt, "__exit__"):
                assert scope.active == 1  # never entered: the next exit ends it
                scope.__exit__(None, None, None)
        assert scope.active == 0
        assert_closed(key, memory)
        return not interrupted

    at_every_event(step)


def buffer_on(key: pkeys.Key) -> pkeys.ProtectedBuffer:
    buffer = pkeys.ProtectedBuffer(16, key=key)
    with buffer.unlocked(write=True) as view:
        view[:5] = b"hello"
    return buffer


def test_a_block_entry_interrupted_anywhere_is_recorded_or_undone(guarded: Guarded) -> None:
    key, memory = guarded
    buffer = buffer_on(key)
    block = buffer.unlocked()

    def step(n: int) -> bool:
        view = None
        interrupted = False
        try:
            with interrupt_at(n):
                view = block.__enter__()
        except Interrupt:
            interrupted = True
        if view is not None:
            assert bytes(view[:5]) == b"hello"
        view = None
        if pkeys.pkey_get(key) != PKEY_DISABLE_ACCESS:
            # Recorded (the interrupt may come after __enter__ returned,
            # the view lost): open until its exit.
            assert pkeys.probe(buffer) is None
            assert_open_for_reading(key, memory)
            block.__exit__(None, None, None)
        else:
            assert interrupted
            with pytest.raises(pkeys.PkeysError):
                block.__exit__(None, None, None)  # nothing to end
        assert_closed(key, memory)
        assert pkeys.probe(buffer) is not None
        with block as again:
            assert bytes(again[:5]) == b"hello"
        del again
        assert_closed(key, memory)
        return not interrupted

    at_every_event(step)
    buffer.close()


def test_a_block_exit_interrupted_anywhere_ends_the_grant(guarded: Guarded) -> None:
    key, memory = guarded
    buffer = buffer_on(key)
    block = buffer.unlocked()

    def step(n: int) -> bool:
        view = block.__enter__()
        del view
        interrupted = False
        try:
            with interrupt_at(n):
                block.__exit__(None, None, None)
        except Interrupt as interrupt:
            interrupted = True
            if before_the_call(interrupt, "__exit__"):
                block.__exit__(None, None, None)  # never entered: this one ends it
        assert pkeys.pkey_get(key) == PKEY_DISABLE_ACCESS  # ended, interrupted or not
        with pytest.raises(pkeys.PkeysError):
            block.__exit__(None, None, None)  # nothing left to end
        assert_closed(key, memory)
        assert pkeys.probe(buffer) is not None
        return not interrupted

    at_every_event(step)
    buffer.close()


def test_a_pkey_set_interrupted_anywhere_changes_nothing_or_completes(guarded: Guarded) -> None:
    key, memory = guarded
    # Two more owners, pinned in this order after the first: an mmap, then
    # an exporter held by a Python function, where the interrupt can come
    # with the mmap's export taken already; it must be released.
    other = mmap.mmap(-1, mmap.PAGESIZE)
    key.protect(other)
    third = mmap.mmap(-1, mmap.PAGESIZE)
    key.protect(foreign_view(third))

    def step(n: int) -> bool:
        interrupted = False
        try:
            with interrupt_at(n):
                pkeys.pkey_set(key, 0)
        except Interrupt:
            interrupted = True
        assert no_export(memory) and no_export(other) and no_export(third)
        if pkeys.pkey_get(key) == PKEY_DISABLE_ACCESS:
            assert interrupted
            assert_closed(key, memory)
            assert pkeys.probe(other) is not None and pkeys.probe(third) is not None
        else:
            assert_open(key, memory)
            assert pkeys.probe(other, write=True) is None
            assert pkeys.probe(third, write=True) is None
            pkeys.pkey_set(key, PKEY_DISABLE_ACCESS)
        assert_closed(key, memory)
        return not interrupted

    at_every_event(step)
    for memory in (other, third):
        pkeys.pkey_mprotect(memory, mmap.PAGESIZE, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
        memory.close()
