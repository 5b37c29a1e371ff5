"""No grant outlives its owner (issue 15, point 3).

* A thread started inside an ``allow()`` or ``unlocked()`` block is born
  with its creator's rights outside every grant (``pkeys/_births.py``):
  it never holds the block's access, so nothing is left when it ends.
* ``ProtectedBuffer.revoke()`` ends access to a buffer in every thread.
* A block whose generator is closed in another thread ends there: the
  buffer's key is revoked in every thread, its use is released, and the
  buffer can be closed.

The same behaviour holds on both backends (``anybackend``).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

import pkeys

pytestmark = pytest.mark.anybackend
HARDWARE = pkeys.backend() == "hardware"


@pytest.fixture
def buf():
    buffer = pkeys.ProtectedBuffer(64, label="owner-test", secretmem=False)
    buffer.write(b"s" * 64)
    yield buffer
    buffer.close()


def run_thread(target) -> None:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reraised below
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def test_a_thread_started_inside_allow_keeps_nothing_after_the_block(key, page):
    key.protect(page)
    go, seen = threading.Event(), {}

    def child() -> None:
        seen["during"] = pkeys.probe(page)
        assert go.wait(30)
        seen["after"] = pkeys.probe(page)
        seen["rights"] = pkeys.pkey_get(key)

    with key.allow():
        thread = threading.Thread(target=child)
        thread.start()
        assert pkeys.probe(page) is None  # the creator's own grant stands
    go.set()
    thread.join(30)
    assert seen["after"] is not None, "a thread born inside the block kept its access"
    assert seen["rights"] == pkeys.PKEY_DISABLE_ACCESS
    if HARDWARE:  # the grant is the creator's alone, from the start
        assert seen["during"] is not None


@pytest.mark.pku  # on the software backend the block opens the process
def test_a_thread_started_inside_a_block_gets_its_creators_rights_outside_it(key, page):
    key.protect(page)
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_WRITE)  # the base: read-only
    seen = {}
    with key.allow():
        run_thread(lambda: seen.update(read=pkeys.probe(page), write=pkeys.probe(page, True)))
    assert seen["read"] is None
    assert seen["write"] is not None


def test_the_default_executors_first_worker_born_inside_unlocked_keeps_nothing(buf):
    """asyncio.to_thread starts the default executor's first worker while
    another task is inside unlocked(); once that block ends, the worker
    (reused for the next call) cannot read the buffer."""

    async def main() -> tuple[object, object, int, int]:
        inside, done = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            with buf.unlocked():
                inside.set()
                await done.wait()

        task = asyncio.create_task(holder())
        await inside.wait()
        first = await asyncio.to_thread(lambda: (pkeys.probe(buf), threading.get_ident()))
        done.set()
        await task
        second = await asyncio.to_thread(lambda: (pkeys.probe(buf), threading.get_ident()))
        return first[0], second[0], first[1], second[1]

    during, after, first_worker, second_worker = asyncio.run(main())
    assert first_worker == second_worker  # the worker born inside the block
    assert after is not None, "the executor's worker kept access after the block ended"
    if HARDWARE:
        assert during is not None


def test_a_generator_suspended_inside_unlocked_and_closed_elsewhere_ends_its_grant():
    buffer = pkeys.ProtectedBuffer(16, label="generator", secretmem=False)
    buffer.write(b"g" * 16)

    def reader():
        with buffer.unlocked() as view:
            yield bytes(view[:1])
            yield None

    generator = reader()
    assert next(generator) == b"g"
    assert pkeys.probe(buffer) is None  # this thread holds the grant
    run_thread(generator.close)  # the block ends in another thread
    assert pkeys.probe(buffer) is not None, "the grant of the closed generator stayed"
    buffer.close()  # its use ended: closing is no longer refused
    assert buffer.closed


def test_a_generator_closed_elsewhere_leaves_a_shared_key_revoked_not_open(key):
    buffer = pkeys.ProtectedBuffer(16, key=key, secretmem=False)

    def reader():
        with buffer.unlocked(write=True) as view:
            view[:1] = b"x"
            yield

    generator = reader()
    next(generator)
    run_thread(generator.close)
    assert pkeys.probe(buffer) is not None
    with buffer.unlocked() as view:  # a new block opens it again
        assert bytes(view[:1]) == b"x"
    buffer.close()


def test_revoke_ends_access_to_a_buffer_in_every_thread(buf):
    inside, asked, leave = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}
    errors: list[BaseException] = []

    def user() -> None:
        try:
            with buf.unlocked():
                seen["before"] = pkeys.probe(buf)
                inside.set()
                assert asked.wait(30)
                seen["revoked"] = pkeys.probe(buf)
                assert leave.wait(30)
            seen["outside"] = pkeys.probe(buf)
            with buf.unlocked() as view:  # a new block grants again
                seen["again"] = bytes(view[:1])
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    thread = threading.Thread(target=user)
    thread.start()
    assert inside.wait(30)
    buf.revoke()
    asked.set()
    leave.set()
    thread.join(30)
    assert not errors, errors
    assert seen["before"] is None
    assert seen["revoked"] is not None, "the thread kept access after revoke()"
    assert seen["outside"] is not None
    assert seen["again"] == b"s"


def test_revoke_on_a_buffer_holding_no_key_does_nothing_and_closed_buffers_refuse():
    buffer = pkeys.ProtectedBuffer(16, secretmem=False)
    buffer.revoke()  # never opened: it holds no key
    assert pkeys.probe(buffer) is not None
    buffer.close()
    with pytest.raises(pkeys.ClosedError):
        buffer.revoke()
