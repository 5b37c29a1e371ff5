"""Scopes, keys and buffers under threads, asyncio, generators, garbage
collection and fork: the invariants of the state model (``csrc/state.c``).

Interleavings are forced with events, never left to luck.  Everything here
holds on both backends (``anybackend``): per thread on hardware, process-wide
on the software backend, and the assertions say which.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import gc
import hmac
import mmap
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

import pkeys
from pkeys._child import run_in_child

from ._libc import address_of, map_anonymous, unmap

pytestmark = pytest.mark.anybackend
PAGE = mmap.PAGESIZE
HARDWARE = pkeys.backend() == "hardware"
SECRET = b"correct horse battery staple"


def readable(target) -> bool:
    return pkeys.probe(target) is None


def writable(target) -> bool:
    return pkeys.probe(target, write=True) is None


def in_thread(function, *args):
    """Run ``function`` in a new thread, re-raising what it raised."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = function(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "thread hung"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


@pytest.fixture
def buf():
    # Anonymous memory: the fork tests rely on WIPEONFORK (secret memory is
    # not inherited at all; tests/test_secrets.py covers it).
    buffer = pkeys.ProtectedBuffer(len(SECRET), label="concurrency", secretmem=False)
    buffer.write(SECRET)
    yield buffer
    buffer.close()


class Parked:
    """A thread parked inside a block until released, so that other code
    runs while its scope is active."""

    def __init__(self, block, body=lambda view: None) -> None:
        self.inside, self.release, self.done = threading.Event(), threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.seen: list[object] = []

        def run() -> None:
            try:
                with block() as view:
                    self.inside.set()
                    assert self.release.wait(30)
                    self.seen.append(body(view))
            except BaseException as exc:  # noqa: BLE001 - checked by join()
                self.errors.append(exc)
            finally:
                self.inside.set()
                self.done.set()

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.inside.wait(30)

    def join(self) -> list[object]:
        self.release.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.errors:
            raise self.errors[0]
        return self.seen


# -- counted grants: scopes end in any order -------------------------------
def test_overlapping_unlocked_blocks_in_threads(buf):
    digest = lambda view: hmac.digest(view, b"msg", "sha256")  # noqa: E731
    first = Parked(buf.unlocked, digest)
    second = Parked(buf.unlocked, digest)
    assert first.join() == [hmac.digest(SECRET, b"msg", "sha256")]
    # The first block ended while the second is still inside: it keeps access.
    assert second.join() == [hmac.digest(SECRET, b"msg", "sha256")]
    assert not readable(buf.address)  # and after both, no thread can read


def test_first_exit_leaves_the_other_thread_open(buf):
    parked = Parked(buf.unlocked, lambda view: bytes(view))
    with buf.unlocked() as view:
        assert bytes(view) == SECRET
    # On the software backend our exit withdrew only our own grant.
    assert parked.join() == [SECRET]
    assert not readable(buf.address)


def test_write_while_another_thread_reads(buf):
    parked = Parked(buf.unlocked, lambda view: bytes(view))
    assert buf.write(b"C", 0) == 1
    assert parked.join() == [b"C" + SECRET[1:]]
    assert not readable(buf.address)


def test_close_while_another_thread_is_inside_changes_nothing(buf):
    parked = Parked(buf.unlocked, lambda view: bytes(view))
    with pytest.raises(BufferError, match="in use"):
        buf.close()
    assert not buf.closed
    assert parked.join() == [SECRET]
    buf.close()
    assert buf.closed


def test_asyncio_tasks_overlapping_across_an_await(buf):
    order: list[str] = []

    async def reader(name: str, entered: asyncio.Event, leave: asyncio.Event) -> bytes:
        with buf.unlocked() as view:
            entered.set()
            await leave.wait()
            order.append(name)
            return bytes(view)  # still inside its own block: must be readable

    async def main() -> list[bytes]:
        first_in, second_in = asyncio.Event(), asyncio.Event()
        first_out, second_out = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(reader("first", first_in, first_out))
        second = asyncio.create_task(reader("second", second_in, second_out))
        await first_in.wait()
        await second_in.wait()
        first_out.set()
        one = await first
        assert readable(buf.address)  # the second task's block is still open
        second_out.set()
        return [one, await second]

    assert asyncio.run(main()) == [SECRET, SECRET]
    assert order == ["first", "second"]
    assert not readable(buf.address)


def test_one_scope_object_entered_twice(key, page):
    key.protect(page)
    scope = key.allow()
    with scope:
        with scope:
            assert writable(page)
        assert writable(page)  # the outer entry is still active
    assert not readable(page)
    assert scope.active == 0


def test_one_unlocked_object_entered_twice(buf):
    block = buf.unlocked()
    with block as outer:
        with block as inner:
            assert bytes(inner) == SECRET
        assert bytes(outer) == SECRET
    assert not readable(buf.address)


def test_generators_ending_in_either_order(key, page):
    key.protect(page)

    def reader():
        with key.allow(write=False):
            yield
            yield bytes(page[:1])

    first, second = reader(), reader()
    next(first), next(second)
    assert next(first) == b"\0"
    first.close()  # the first generator's scope ends first
    assert readable(page) and not writable(page)
    assert next(second) == b"\0"
    second.close()
    assert not readable(page)


def test_deny_wins_over_allow_and_rights_come_back(key, page):
    key.protect(page)
    with key.allow():
        with key.deny():
            assert not readable(page)
            with key.allow():
                assert not readable(page)  # fail closed: deny() wins while active
        assert writable(page)
    assert not readable(page)


def test_pkey_set_inside_a_scope_sets_the_rights_after_it(key, page):
    key.protect(page)
    with key.allow():
        pkeys.pkey_set(key, pkeys.PKEY_DISABLE_WRITE)
        assert writable(page)  # the scope's grant is still in force
    assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_WRITE
    assert readable(page) and not writable(page)


def test_a_scope_outliving_its_key_never_touches_the_next_key(page):
    old = pkeys.Key()
    scope = old.allow()
    scope.__enter__()
    number = old.pkey
    old.close()  # guards no memory, so it may go while the scope is active
    new = pkeys.Key()
    try:
        assert new.pkey == number  # the number came back...
        new.protect(page)
        scope.__exit__(None, None, None)  # ...and the old scope must not open or close it
        assert pkeys.pkey_get(new) == pkeys.PKEY_DISABLE_ACCESS
        assert not readable(page)
        with new.allow():
            assert writable(page)
        assert not readable(page)
    finally:
        pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
        new.close()


def test_a_scope_ended_in_another_thread_is_refused(key, page):
    key.protect(page)

    def scoped():
        with key.allow():
            yield

    generator = scoped()
    next(generator)
    with pytest.raises(pkeys.ScopeError, match="thread that entered it"):
        in_thread(generator.close)
    if HARDWARE:
        # Another thread's register cannot be changed by ending a scope
        # there: the entering thread keeps its grant until a revocation.
        assert writable(page)
        key.revoke()
    # On the software backend the process-wide grant was withdrawn anyway.
    assert not readable(page)


def test_more_exits_than_entries_are_refused(key):
    scope = key.allow()
    with pytest.raises(pkeys.ScopeError):
        scope.__exit__(None, None, None)


# -- identities ------------------------------------------------------------
@pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_key_cannot_be_duplicated(key, duplicate):
    with pytest.raises(TypeError, match="only owner"):
        duplicate(key)


def test_a_closed_key_object_is_refused_by_the_functions():
    key = pkeys.Key()
    key.close()
    for call in (pkeys.pkey_get, pkeys.pkey_free, lambda k: pkeys.pkey_set(k, 0)):
        with pytest.raises(pkeys.InvalidKeyError, match="closed"):
            call(key)


# -- regions follow the memory, not the view --------------------------------
@pytest.mark.parametrize("make_view", [
    lambda memory: memoryview(memory)[:PAGE],
    lambda memory: __import__("numpy").frombuffer(memory, dtype="uint8"),
])
def test_a_temporary_view_keeps_its_memory_tracked(make_view):
    memory = mmap.mmap(-1, PAGE)
    key = pkeys.Key()
    key.protect(make_view(memory))
    gc.collect()  # the view is gone; the mmap that owns the memory is not
    with pytest.raises(pkeys.KeyInUseError):
        key.close()
    assert not readable(memory)
    with key.allow():
        assert writable(memory)
    assert not readable(memory)
    memory.close()
    key.close()  # the owner released its memory: nothing is guarded any more


def test_an_escaped_view_does_not_leak_the_key_after_collection():
    np = pytest.importorskip("numpy")
    buffer = pkeys.ProtectedBuffer(64)
    address = buffer.address
    block = buffer.unlocked(write=True)
    with pytest.raises(BufferError):
        with block as view:
            escaped = np.frombuffer(view.obj, dtype="uint8")  # noqa: F841
    number = buffer.pkey  # the virtual key it borrowed
    del buffer, block, view
    gc.collect()
    # Wiped and closed at once: the pool key is given back (pages PROT_NONE,
    # key 0) while the array still holds the memory.
    assert pkeys.virtual_key_stats()["keys"] == 0 and number not in pkeys.allocated_keys()
    assert pkeys.probe(address) is not None
    del escaped
    gc.collect()
    assert not any(start <= address < end for start, end, _, _ in pkeys._api.regions())


# -- fail closed -------------------------------------------------------------
def test_a_read_write_tag_on_a_read_only_file_mapping_is_refused(key, tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"x" * PAGE)
    with open(path, "rb") as file:
        memory = mmap.mmap(file.fileno(), PAGE, prot=mmap.PROT_READ)
    try:
        address = address_of(memory)
        with pytest.raises(PermissionError):
            pkeys.pkey_mprotect(address, PAGE, pkeys.PROT_READ | pkeys.PROT_WRITE, key)
        assert pkeys._api.regions(key.pkey) == []
        assert memory[0:1] == b"x"  # unchanged and still readable
    finally:
        memory.close()


def test_a_rights_change_that_cannot_be_applied_raises_and_opens_nothing(key):
    address = map_anonymous(2 * PAGE)
    key.protect(address, 2 * PAGE)
    unmap(address + PAGE, PAGE)  # the caller broke its promise for half the region
    try:
        if HARDWARE:
            pkeys.pkey_set(key, 0)  # the register needs no mprotect
            assert readable(address)
            pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)
        else:
            with pytest.raises(OSError) as info:
                pkeys.pkey_set(key, 0)
            assert info.value.errno == __import__("errno").ENOMEM
            assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS
        assert not readable(address)
    finally:
        pkeys.pkey_mprotect(address, PAGE, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
        from pkeys._binding import lib

        lib.pk_region_forget(address, 2 * PAGE)
        unmap(address, PAGE)


# -- garbage collection ------------------------------------------------------
def _operations_with_garbage_cycles(threshold: int) -> None:
    """Every operation, with finalizers of Keys and buffers in reference
    cycles forced to run at arbitrary allocations inside them."""
    gc.set_threshold(threshold, 1, 1)
    memory = mmap.mmap(-1, PAGE)
    for round_ in range(6):
        cycle: list[object] = [pkeys.ProtectedBuffer(32), pkeys.Key()]
        cycle.append(cycle)
        del cycle
        with pkeys.Key() as key:
            key.protect(memory)
            with key.allow():
                memory[0] = round_
            pkeys.pkey_set(key, pkeys.PKEY_DISABLE_WRITE)
            assert pkeys.probe(memory) is None
            pkeys.pkey_mprotect(memory, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
        buffer = pkeys.ProtectedBuffer(16)
        buffer.write(b"x" * 16)
        with buffer.unlocked() as view:
            bytes(view)
        buffer.close()
    gc.collect()


def test_finalizers_at_any_allocation_never_deadlock():
    thresholds = range(1, 121) if not pkeys._select.emulated() else range(1, 121, 17)
    for threshold in thresholds:
        def child(threshold: int = threshold) -> None:
            signal.alarm(30)  # a deadlock dies of SIGALRM instead of hanging the suite
            _operations_with_garbage_cycles(threshold)

        result = run_in_child(child)
        assert result.exitcode == 0, f"threshold {threshold}: {result.describe()}\n{result.stderr}"


def test_two_threads_out_of_keys_both_get_the_keys_garbage_held():
    """Thread A runs out of keys and collects; while its collection runs
    (held at a finalizer until B has called gc.collect), B runs out too.
    B's gc.collect returned at once, before A's collection freed anything,
    and B reported all keys in use."""
    def child() -> None:
        signal.alarm(30)
        in_collection, b_collected = threading.Event(), threading.Event()
        b_thread: list[threading.Thread] = []

        class HoldsTheCollection:
            def __init__(self) -> None:
                self.cycle = self

            def __del__(self) -> None:
                in_collection.set()
                b_collected.wait(10)

        class HoldsAKey:
            def __init__(self, key: pkeys.Key) -> None:
                self.cycle, self.key = self, key

        real_collect = gc.collect

        def collect(*args: int) -> int:
            found = real_collect(*args)
            if threading.current_thread() in b_thread:
                b_collected.set()
            return found

        gc.disable()  # only the collections the threads ask for
        HoldsTheCollection()  # older than the keys: finalized first
        gc.collect = lambda *args: 0  # the loop's last Key() must not collect yet
        while True:
            try:
                HoldsAKey(pkeys.Key())
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break  # every key is held by garbage now
        gc.collect = collect
        results: dict[str, object] = {}

        def allocate(name: str) -> None:
            if name == "b":
                in_collection.wait(10)
            try:
                with pkeys.Key() as key:
                    results[name] = key.pkey
            except Exception as exc:  # noqa: BLE001 - reported below
                results[name] = exc

        a = threading.Thread(target=allocate, args=("a",))
        b = threading.Thread(target=allocate, args=("b",))
        b_thread.append(b)
        b.start()
        a.start()
        a.join()
        b.join()
        gc.collect = real_collect
        assert in_collection.is_set() and b_collected.is_set()
        assert all(isinstance(results[name], int) for name in "ab"), results

    result = run_in_child(child)
    assert result.exitcode == 0, result.describe() + "\n" + result.stderr


# Names a struct type for the first time (in this fresh process) while a
# finalizer that names the same type is due at the 6th allocation: the
# pattern that aborted in cffi's _realize_c_struct_or_union, or raised
# "the types are different", when types were built lazily.  Then the
# issue's own pattern: a Key in a cycle and the first pkey_free.
_FIRST_USE_OF_EACH_TYPE_UNDER_GC = """
import gc, sys
import pkeys
from pkeys._binding import ffi

threshold = int(sys.argv[1])
for name in ffi.list_types()[1]:
    if name == "pk_vbuf":
        continue  # opaque: never allocated from Python
    type_name = f"struct {name} *"

    class Finalized:
        def __init__(self):
            self.cycle = self

        def __del__(self, type_name=type_name):
            ffi.new(type_name)

    gc.collect()
    gc.set_threshold(threshold)
    for _ in range(3):
        Finalized()
    ffi.new(type_name)
    gc.set_threshold(700)

class Holder:
    def __init__(self):
        self.cycle = self
        self.key = pkeys.Key()

Holder()
gc.collect()
gc.set_threshold(threshold)
Holder()
pkeys.pkey_free(pkeys.pkey_alloc())
"""


def test_finalizers_during_the_first_use_of_a_c_type_do_not_abort():
    for threshold in range(4, 12):
        result = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", _FIRST_USE_OF_EACH_TYPE_UNDER_GC,
             str(threshold)], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"threshold {threshold}: {result.returncode}\n{result.stderr}"


# -- fork --------------------------------------------------------------------
def test_fork_while_another_thread_changes_rights_gives_a_consistent_child(key, page):
    key.protect(page)
    stop = threading.Event()

    def flipper() -> None:
        rights = 0
        while not stop.is_set():
            pkeys.pkey_set(key, rights)
            rights = (rights + 1) % 4

    thread = threading.Thread(target=flipper)
    thread.start()

    def child() -> None:
        rights = pkeys.pkey_get(key)
        assert readable(page) == (not rights & pkeys.PKEY_DISABLE_ACCESS), rights
        assert writable(page) == (rights == 0), rights

    try:
        for _ in range(20 if not pkeys._select.emulated() else 5):
            result = run_in_child(child)
            assert result.exitcode == 0, result.stderr
    finally:
        stop.set()
        thread.join()
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)


def test_a_forked_child_keeps_no_grant_of_another_thread(buf):
    parked = Parked(buf.unlocked)

    def child() -> None:
        # The parked thread does not exist here, so its block can never end:
        # its access must not survive into the child.
        assert not readable(buf.address)
        with buf.unlocked() as view:
            assert bytes(view) == bytes(len(SECRET))  # WIPEONFORK
        assert not readable(buf.address)

    try:
        result = run_in_child(child)
        assert result.exitcode == 0, result.stderr
    finally:
        parked.join()


# -- probe ---------------------------------------------------------------------
def test_probe_in_a_thread_that_blocks_sigsegv_reports_and_keeps_the_mask(key, page):
    """A blocked synchronous SIGSEGV kills the process (the kernel resets
    the action): probe unblocks it for the access and blocks it again."""
    key.protect(page)

    def child() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGSEGV})
        denied = pkeys.probe(page)
        assert denied is not None
        assert denied.kind in (pkeys.FaultKind.PKEY, pkeys.FaultKind.PROTECTION)
        with key.allow():
            assert pkeys.probe(page) is None
        assert signal.SIGSEGV in signal.pthread_sigmask(signal.SIG_BLOCK, set())

    result = run_in_child(child)
    assert result.exitcode == 0, result.describe() + "\n" + result.stderr


def test_probe_from_many_threads_from_its_first_call():
    program = """
import mmap, threading, pkeys
closed = mmap.mmap(-1, mmap.PAGESIZE, prot=0)
open_ = mmap.mmap(-1, mmap.PAGESIZE)
start = threading.Barrier(8)
errors = []
def worker():
    start.wait()
    for _ in range(300):
        if pkeys.probe(closed) is None or pkeys.probe(open_) is not None:
            errors.append("wrong answer")
threads = [threading.Thread(target=worker) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
assert not errors, errors[:3]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- stress --------------------------------------------------------------------
def test_eight_threads_doing_everything(pages):
    seconds = float(os.environ.get("PKEYS_STRESS_SECONDS",
                                   "4" if pkeys._select.emulated() else "20"))
    shared = pkeys.ProtectedBuffer(64, label="stress")
    shared.write(bytes(range(64)))
    shared_key = pkeys.Key()
    memory = pages(8)
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        mine = memoryview(memory)[index * PAGE:(index + 1) * PAGE]
        try:
            while not stop.is_set():
                with shared.unlocked() as view:
                    assert view[5] == 5
                out = bytearray(8)
                shared.readinto(out, 8)
                assert out == bytes(range(8, 16))
                try:
                    key = pkeys.Key()
                except OSError:
                    continue  # all keys in use by the other workers right now
                with key:
                    key.protect(mine)
                    with key.allow():
                        mine[0] = index
                    with key.allow(write=False):
                        assert mine[0] == index
                    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_WRITE)
                    pkeys.pkey_mprotect(mine, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
                with shared_key.allow():
                    pkeys.probe(shared.address)
                transient = pkeys.ProtectedBuffer(16)
                transient.write(b"t" * 16)
                transient.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "deadlock"
    assert not errors, repr(errors[0])
    # The state agrees with the kernel at the end.
    assert not readable(shared.address)
    assert pkeys.virtual_key_stats()["keys"] <= pkeys.virtual_key_limit()
    shared.close()
    shared_key.close()
    assert pkeys._api.regions() == []
    if not HARDWARE:
        assert pkeys.rdpkru() & 0xFFFFFFFC == 0x55555554 & 0xFFFFFFFC


def test_a_resized_owner_keeps_its_key_in_use_until_it_is_closed():
    memory = mmap.mmap(-1, 4 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    key = pkeys.Key()
    key.protect(memory)
    memory.resize(2 * PAGE)  # the pages that stay (or moved) still carry the key
    with pytest.raises(pkeys.KeyInUseError):
        key.close()
    memory.close()
    key.close()


@pytest.mark.parametrize("pages", [64, 1], ids=["grown-and-moved", "shrunk"])
def test_a_resized_mmap_takes_its_key_along_and_scopes_still_open_it(pages):
    """mremap carries the pages' key (hardware) or protection (software) to
    wherever the mmap went, a grown tail included; the region table follows
    them.  The software backend used to re-protect the old address and
    leave the moved pages shut: the write in the scope killed the process."""
    def child() -> None:
        memory = mmap.mmap(-1, 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        key = pkeys.Key()
        key.protect(memory)
        in_the_way = mmap.mmap(-1, PAGE)  # noqa: F841 - makes growing move the mapping
        memory.resize(pages * PAGE)
        with key.allow():
            memory[0] = 1
            memory[pages * PAGE - 1] = 2
        assert pkeys.probe(memory) is not None
        assert pkeys.probe(memory, offset=pages * PAGE - 1) is not None
        address = address_of(memory)
        assert pkeys._api.regions(key.pkey) == [(address, address + pages * PAGE, 3, key.pkey)]
        with key.allow():
            assert memory[0] == 1 and memory[pages * PAGE - 1] == 2
        pkeys.pkey_mprotect(memory, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
        memory.close()
        key.close()

    result = run_in_child(child)
    assert result.exitcode == 0, result.describe() + "\n" + result.stderr


def test_a_ctypes_view_is_tracked_by_the_mmap_behind_it():
    import ctypes

    memory = mmap.mmap(-1, PAGE)
    key = pkeys.Key()
    key.protect((ctypes.c_char * PAGE).from_buffer(memory))
    gc.collect()  # the ctypes array is gone; the mmap that owns the memory is not
    with pytest.raises(pkeys.KeyInUseError):
        key.close()
    memory.close()
    key.close()


def test_a_closed_buffer_refuses_like_a_closed_file():
    buffer = pkeys.ProtectedBuffer(8)
    buffer.close()
    for operation in (buffer.unlocked, lambda: buffer.write(b"x"), lambda: buffer.address):
        with pytest.raises(ValueError, match="closed"):
            operation()


def test_an_operation_whose_grant_ends_last_still_ends_it():
    # write(), readinto() and read_from() open the key in C for the call.
    # Here another grant keeps the key open while read_from() begins (so
    # beginning changes nothing), then ends while read_from() waits in
    # read(2): its own end is what closes the key, and on the software
    # backend that first needs the foreign mmap below pinned.
    from pkeys._binding import lib

    key = pkeys.Key()
    foreign = mmap.mmap(-1, PAGE)
    key.protect(foreign)
    buffer = pkeys.ProtectedBuffer(8, key=key, secretmem=False)
    read_end, write_end = os.pipe()
    scope = key.allow()
    scope.__enter__()
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(buffer.read_from(read_end)))
    reader.start()
    try:
        while not lib.pk_vbuf_users(buffer._mapping.vbuf):
            time.sleep(0.001)  # the reader is inside, blocked in read(2)
        scope.__exit__(None, None, None)
        os.write(write_end, b"12345678")
        reader.join(30)
        assert result == [8]
        assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS
        assert not readable(foreign) and not readable(buffer.address)
        buffer.close()  # no use was left behind
    finally:
        os.close(read_end)
        os.close(write_end)
        if not buffer.closed:
            buffer.close()
        foreign.close()
        key.close()
