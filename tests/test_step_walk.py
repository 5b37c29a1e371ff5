"""A revocation at every step boundary, walked deterministically (issue 15,
point 4).

``csrc/test_steps.c`` (test only) delivers a real revocation -- stamp,
signal, this thread's handler, wait -- at the n-th step boundary
(``PK_STEP()``) that the calling thread passes.  Each test walks n = 1, 2,
... through one operation until the operation ends before the n-th
boundary, and after each run checks that the revoked key is closed in this
thread: a scope that the revocation overtook re-grants nothing, and a
register write that it overtook does not undo it.
"""

from __future__ import annotations

import mmap

import pytest

import pkeys
from pkeys._binding import lib

pytestmark = pytest.mark.pku
CLOSED = pkeys.PKEY_DISABLE_ACCESS


def walk(key: pkeys.Key, operation, prepare=lambda: None, pkey=None, identity=None) -> int:
    """Run ``operation`` once per boundary, with the revocation there;
    returns how many boundaries it has.  After each run the key must be
    closed in this thread."""
    pkey = key.pkey if pkey is None else pkey
    identity = key.identity if identity is None else identity
    step = 0
    while True:
        step += 1
        assert step < 100, "the walk never ended"
        prepare()
        lib.pk_test_revoke_at_step(step, pkey, identity)
        try:
            operation()
        finally:
            delivered = lib.pk_test_revoked_at_step()
        if delivered == 0:
            assert step > 1, "the operation passed no boundary"
            return step - 1
        assert delivered == 1, f"the revocation failed ({delivered}) at step {step}"
        rights = pkeys.pkey_get(pkey)
        assert rights == CLOSED, f"pkey {pkey} is {rights!r} after a revocation at step {step}"


def open_key(key: pkeys.Key) -> None:
    pkeys.pkey_set(key, 0, threads="all")


def test_scope_enter_and_exit(key, page):
    key.protect(page)

    def scope() -> None:
        with key.allow():
            pass

    assert walk(key, scope) >= 8
    assert pkeys.probe(page) is not None


def test_a_nested_scope_inside_an_outer_one(key):
    outer = key.allow()

    def inner() -> None:
        with key.allow():
            pass

    def prepare() -> None:
        while outer.active:
            outer.__exit__(None, None, None)
        outer.__enter__()

    try:
        assert walk(key, inner, prepare) >= 8
    finally:
        while outer.active:
            outer.__exit__(None, None, None)
    assert pkeys.pkey_get(key) == CLOSED  # the outer scope was voided too


def test_pkey_set_of_another_key(key):
    other = pkeys.Key()
    try:
        assert walk(key, lambda: pkeys.pkey_set(other, 0), lambda: open_key(key)) >= 4
    finally:
        other.close()


def test_wrpkru(key):
    other = pkeys.Key()
    flip = 1 << (2 * other.pkey)

    def write() -> None:
        pkeys.wrpkru(pkeys.rdpkru() ^ flip)  # the key's open bits read before the call

    try:
        assert walk(key, write, lambda: open_key(key)) >= 4
    finally:
        other.close()


def test_probes_restore():
    key = pkeys.Key()
    closed = mmap.mmap(-1, mmap.PAGESIZE, prot=0)
    try:
        assert walk(key, lambda: pkeys.probe(closed), lambda: open_key(key)) >= 4
    finally:
        closed.close()
        key.close()


def test_buffer_enter_and_exit():
    buffer = pkeys.ProtectedBuffer(16, label="walk", secretmem=False)
    try:
        with buffer.unlocked():
            pkey = buffer.pkey
        assert pkey is not None
        identity = lib.pk_key_identity(pkey)

        def use() -> None:
            with buffer.unlocked():
                pass

        assert walk(None, use, pkey=pkey, identity=identity) >= 10  # type: ignore[arg-type]
        assert buffer.pkey == pkey  # the same key all along: the walk tested its grants
        assert pkeys.probe(buffer) is not None
    finally:
        buffer.close()
