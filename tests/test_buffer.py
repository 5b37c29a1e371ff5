"""ProtectedBuffer and the unguarded-fault report, on whichever backend is active
(marked ``anybackend``: CI runs them natively and on the emulated PKU CPU)."""

from __future__ import annotations

import faulthandler
import gc
import os
import pickle
import resource
import signal
import threading

import pytest

import pkeys
from pkeys._binding import ffi
from pkeys._child import run_in_child
from pkeys._fault import SEGV_ACCERR, SEGV_PKUERR, FaultKind

from ._libc import allocate_until_enospc, keyed_copy, record_inner_before_unmap, smaps_field

pytestmark = pytest.mark.anybackend
SECRET = b"tok_live_0123456789abcdef"
DENIED_CODE = SEGV_PKUERR if pkeys.backend() == "hardware" else SEGV_ACCERR


@pytest.fixture
def buf():
    buffer = pkeys.ProtectedBuffer(len(SECRET), label="api-token")
    buffer.write(SECRET)
    yield buffer
    buffer.close()


def vm_flags(address: int) -> set[str]:
    return set(smaps_field(address, "VmFlags"))


def mapped(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


def touch(address: int) -> int:
    return ffi.cast("volatile unsigned char *", address)[0]


def test_contents_are_denied_while_locked(buf):
    fault = pkeys.probe(buf.address)
    assert fault is not None and fault.si_code == DENIED_CODE
    assert fault.address == buf.address
    assert pkeys.probe(buf.address + len(SECRET) - 1, write=True).si_code == DENIED_CODE


def test_one_byte_past_the_end_faults_even_when_unlocked(buf):
    with buf.unlocked(write=True):
        assert pkeys.probe(buf.address + len(SECRET) - 1, write=True) is None
        past = pkeys.probe(buf.address + len(SECRET))
        assert past is not None and past.kind is FaultKind.PROTECTION  # the guard page
    anonymous = pkeys.ProtectedBuffer(len(SECRET), secretmem=False)  # a child has its pages
    try:
        result = run_in_child(lambda: (anonymous.unlocked(write=True).__enter__(),
                                       ffi.cast("char *", anonymous.address)[len(SECRET)]))
    finally:
        anonymous.close()
    assert result.segfaulted


def test_unlocked_gives_access_and_ends_it(buf):
    with buf.unlocked() as view:
        assert bytes(view) == SECRET
        assert view.readonly
        assert pkeys.probe(buf.address) is None
        assert pkeys.probe(buf.address, write=True) is not None
    with pytest.raises(ValueError, match="released"):
        bytes(view)  # a Python error, not a crash
    assert pkeys.probe(buf.address) is not None
    with buf.unlocked(write=True) as view:
        view[:3] = b"TOK"
    assert pkeys.probe(buf.address, write=True) is not None
    out = bytearray(3)
    buf.readinto(out)
    assert out == b"TOK"


def test_rights_come_back_after_an_exception_in_the_block(buf):
    with pytest.raises(RuntimeError):
        with buf.unlocked(write=True):
            raise RuntimeError("boom")
    assert pkeys.probe(buf.address) is not None


def test_readinto_and_write_work_while_locked(buf):
    out = bytearray(len(SECRET))
    assert buf.readinto(out) == len(SECRET) and bytes(out) == SECRET
    assert buf.write(b"XY", offset=4) == 2
    part = bytearray(6)
    buf.readinto(part, offset=2)
    assert part == b"k_XYve"
    assert pkeys.probe(buf.address) is not None  # still locked afterwards
    for bad in ((bytearray(len(SECRET) + 1), 0), (bytearray(1), len(SECRET)), (bytearray(1), -1)):
        with pytest.raises(pkeys.ArgumentError, match="do not fit"):
            buf.readinto(*bad)
    with pytest.raises(pkeys.ArgumentError):
        buf.write(b"x" * (len(SECRET) + 1))
    with pytest.raises(TypeError):
        buf.readinto(b"read-only bytes")


def test_bytes_are_zero_before_the_pages_are_unmapped(monkeypatch):
    seen = record_inner_before_unmap(monkeypatch)
    buffer = pkeys.ProtectedBuffer(5000)
    buffer.write(b"\xff" * 5000)
    buffer.close()
    assert len(seen["bytes"]) == 8192
    assert seen["bytes"] == bytes(8192)


@pytest.mark.parametrize("secretmem", [False, None])
def test_memory_hygiene_flags(secretmem):
    with pkeys.ProtectedBuffer(64, secretmem=secretmem) as buffer:
        buffer.write(b"x" * 64)  # an anonymous page is locked when first touched
        flags = vm_flags(buffer.address)
        assert "dd" in flags  # MADV_DONTDUMP
        assert buffer.memory_locked
        if buffer.backing == "anonymous":
            assert "lo" in flags  # mlock (on fault)
            assert "wf" in flags  # MADV_WIPEONFORK
        else:
            # Secret pages are never on the LRU, so never swapped; whether the
            # VMA also shows VM_LOCKED depends on the kernel (6.18 does, 6.1
            # and 6.12 do not).
            assert "dc" in flags  # MADV_DONTFORK: secretmem refuses WIPEONFORK


def test_forked_child_sees_zeros():
    with pkeys.ProtectedBuffer(len(SECRET), secretmem=False) as buf:
        buf.write(SECRET)

        def child() -> None:
            with buf.unlocked() as view:
                assert bytes(view) == bytes(len(SECRET))
            buf.close()  # no false BufferCorruptedError: WIPEONFORK zeroed the canary too

        result = run_in_child(child)
        assert result.exitcode == 0, result.stderr
        with buf.unlocked() as view:
            assert bytes(view) == SECRET  # the parent's copy is intact


def test_the_canary_detects_an_underrun():
    buffer = pkeys.ProtectedBuffer(64)
    mapping = buffer._mapping
    address = buffer.address
    stray = ffi.new("char[]", b"!")
    keyed_copy(mapping, address - 1, int(ffi.cast("uintptr_t", stray)), 1)
    number = buffer.pkey  # the virtual key the copy borrowed
    with pytest.raises(pkeys.BufferCorruptedError, match="wiped and unmapped all the same"):
        buffer.close()
    assert buffer.closed
    assert not mapped(address)
    assert number not in pkeys.allocated_keys()


def test_close_refuses_while_a_view_is_alive(buf):
    with buf.unlocked() as view:
        with pytest.raises(BufferError, match="in use"):
            buf.close()
        assert bytes(view[:3]) == SECRET[:3]
    assert not buf.closed
    with pytest.raises(BufferError, match="still alive"):
        with buf.unlocked() as view:
            kept = view[2:5]  # a derived view escapes the block
    assert pkeys.probe(buf.address) is not None  # access was closed all the same
    with pytest.raises(BufferError):
        buf.close()
    assert not buf.closed
    kept.release()
    buf.close()
    assert buf.closed


def test_numpy_works_inside_unlocked():
    numpy = pytest.importorskip("numpy")
    with pkeys.ProtectedBuffer(8 * 4, label="weights") as buffer:
        with buffer.unlocked(write=True) as view:
            array = numpy.frombuffer(view, dtype=numpy.float64)
            array[:] = [1.5, 2.5, 3.0, 4.0]
            total = float(array.sum())
            del array
        assert total == 11.0
        out = bytearray(32)
        buffer.readinto(out)
        assert numpy.frombuffer(bytes(out), dtype=numpy.float64).tolist() == [1.5, 2.5, 3.0, 4.0]


def test_repr_hides_the_contents_and_pickling_is_refused(buf):
    text = repr(buf)
    assert "api-token" in text and str(len(SECRET)) in text
    assert SECRET.decode() not in text and "tok_" not in text
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(buf)
    import copy

    with pytest.raises(TypeError):
        copy.copy(buf)
    with pytest.raises(TypeError):
        copy.deepcopy(buf)


def test_finalizer_closes_an_abandoned_buffer():
    buffer = pkeys.ProtectedBuffer(16)
    buffer.write(b"0123456789abcdef")
    address, number = buffer.address, buffer.pkey
    del buffer
    gc.collect()
    assert not mapped(address)
    assert number not in pkeys.allocated_keys()


def test_mlock_refusal_is_a_warning_not_an_error():
    def child() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
        if os.geteuid() == 0:  # root may lock regardless of the limit: become nobody
            os.setgid(65534)
            os.setuid(65534)
        with pytest.warns(pkeys.MemoryLockWarning, match="RLIMIT_MEMLOCK"):
            buffer = pkeys.ProtectedBuffer(16)
        assert not buffer.memory_locked
        buffer.write(b"still works")
        out = bytearray(11)
        buffer.readinto(out)
        assert out == b"still works"
        buffer.close()

    result = run_in_child(child)
    assert result.exitcode == 0, result.stderr


def test_shared_key_is_not_freed_by_its_buffers():
    with pkeys.Key() as shared:
        first = pkeys.ProtectedBuffer(8, key=shared)
        second = pkeys.ProtectedBuffer(8, key=shared)
        assert first.key is shared and second.key is shared
        with pytest.raises(pkeys.KeyInUseError):
            shared.close()
        first.close()
        assert not shared.closed
        second.write(b"12345678")
        second.close()


@pytest.mark.parametrize("size", [0, -1, 2**41, 2**200])
def test_bad_sizes_are_refused(size):
    with pytest.raises(pkeys.ArgumentError):
        pkeys.ProtectedBuffer(size)


def test_bad_arguments_are_type_errors():
    with pytest.raises(TypeError):
        pkeys.ProtectedBuffer(16.0)
    with pytest.raises(TypeError):
        pkeys.ProtectedBuffer(16, key=3)
    with pytest.raises(TypeError):
        pkeys.ProtectedBuffer(16, label=b"x")


@pytest.mark.parametrize("keyed", [False, True])
def test_the_callers_tags_never_reach_a_buffers_memory(keyed):
    """pkey_mprotect(page, ..., 0) of a buffer's own page made the secret
    readable outside every block, and left the buffer's key stranded."""
    page_size = pkeys._rights.PAGE_SIZE
    with pkeys.Key() as own, pkeys.Key() as shared:
        buffer = pkeys.ProtectedBuffer(page_size, key=shared if keyed else None)
        buffer.write(b"s" * page_size)
        data_page = buffer.address  # a page-sized buffer starts on a page
        keys, stats = pkeys.allocated_keys(), pkeys.virtual_key_stats()["pkeys"]
        for pkey in (0, own):
            for call in (lambda: pkeys.pkey_mprotect(data_page, page_size, pkeys.PROT_READ, pkey),
                         lambda: pkeys.pkey_mprotect(data_page - page_size, 3 * page_size,
                                                     pkeys.PROT_READ, pkey)):
                with pytest.raises(pkeys.ArgumentError, match="ProtectedBuffer"):
                    call()
        with pytest.raises(pkeys.ArgumentError, match="ProtectedBuffer"):
            own.protect(data_page, page_size)
        with buffer.unlocked(write=True) as view:
            with pytest.raises(pkeys.ArgumentError, match="ProtectedBuffer"):
                pkeys.pkey_mprotect(view, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
        assert pkeys.probe(buffer) is not None  # still closed outside a block
        assert (pkeys.allocated_keys(), pkeys.virtual_key_stats()["pkeys"]) == (keys, stats)
        assert pkeys._api.regions(own.pkey) == []
        buffer.close()
        # Unmapped: whatever is mapped there later is the caller's again.
        assert not pkeys._state.package_memory(data_page, data_page + page_size)


def test_a_closed_buffer_refuses_use():
    buffer = pkeys.ProtectedBuffer(4)
    buffer.close()
    buffer.close()  # idempotent
    for call in (lambda: buffer.unlocked(), lambda: buffer.write(b"x"),
                 lambda: buffer.readinto(bytearray(1)), lambda: buffer.address):
        with pytest.raises(pkeys.PkeysError, match="closed"):
            call()
    assert repr(buffer) == "<ProtectedBuffer 'secret' closed>"


def test_probe_reports_the_backends_si_code(buf):
    fault = pkeys.probe(buf.address, write=True)
    if pkeys.backend() == "hardware":
        assert fault.kind is FaultKind.PKEY and fault.pkey == buf.pkey
    else:
        assert fault.kind is FaultKind.PROTECTION and fault.pkey is None


# -- unguarded faults ---------------------------------------------------------

def _fault_report(buffer_first: bool, enable_faulthandler: bool, reassert: bool = False,
                  disable_later: bool = False) -> tuple:
    def child() -> None:
        # A clean slate: pytest's faulthandler off, SIGSEGV back to default.
        faulthandler.disable()
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        if enable_faulthandler and not buffer_first:
            faulthandler.enable(file=2)
        buffer = pkeys.ProtectedBuffer(32, label="api-token")
        if enable_faulthandler and buffer_first:
            faulthandler.enable(file=2)
        if reassert:
            with buffer.unlocked():
                pass
        if disable_later:
            faulthandler.disable()
        touch(buffer.address)

    return run_in_child(child, keep_faulthandler=True)


def _assert_named(result, number_hint=True):
    assert "in protected buffer 'api-token'" in result.stderr, result.stderr
    # A virtual-key buffer that holds no key is closed by PROT_NONE: no key
    # to name then (test_unguarded_fault_names_a_shared_key checks that line).
    if "(pkey " in result.stderr:
        assert "rights for pkey" in result.stderr and "no access" in result.stderr
    assert result.stderr.count("pkeys: ") == 1


def test_unguarded_fault_names_a_shared_key():
    def child() -> None:
        faulthandler.disable()
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        key = pkeys.Key()
        buffer = pkeys.ProtectedBuffer(32, label="api-token", key=key)
        touch(buffer.address)

    result = run_in_child(child, keep_faulthandler=True)
    assert result.segfaulted
    assert "in protected buffer 'api-token' (pkey " in result.stderr, result.stderr
    assert "rights for pkey" in result.stderr and "no access" in result.stderr


def test_unguarded_fault_with_faulthandler_enabled_first():
    result = _fault_report(buffer_first=False, enable_faulthandler=True)
    assert result.segfaulted
    _assert_named(result)
    assert "Fatal Python error: Segmentation fault" in result.stderr
    assert result.stderr.index("pkeys: ") < result.stderr.index("Fatal Python error")
    assert "in child" in result.stderr  # the traceback names the faulting function


def test_unguarded_fault_with_faulthandler_enabled_after_then_unlocked():
    result = _fault_report(buffer_first=True, enable_faulthandler=True, reassert=True)
    assert result.segfaulted
    _assert_named(result)
    assert result.stderr.count("Fatal Python error: Segmentation fault") == 1


def test_unguarded_fault_with_faulthandler_enabled_after_still_dies_with_a_traceback():
    # faulthandler runs first here and re-raises: the process dies as before.
    result = _fault_report(buffer_first=True, enable_faulthandler=True)
    assert result.segfaulted
    assert result.stderr.count("Fatal Python error: Segmentation fault") == 1


@pytest.mark.parametrize("buffer_first", [True, False])
def test_unguarded_fault_after_faulthandler_disable(buffer_first):
    result = _fault_report(buffer_first=buffer_first, enable_faulthandler=True, reassert=True,
                           disable_later=True)
    assert result.segfaulted
    assert "Fatal Python error" not in result.stderr
    if buffer_first:
        _assert_named(result)


def test_unguarded_fault_without_faulthandler():
    result = _fault_report(buffer_first=True, enable_faulthandler=False)
    assert result.segfaulted
    _assert_named(result)


def test_unguarded_fault_under_pytests_faulthandler():
    assert faulthandler.is_enabled()  # pytest's plugin
    buffer = pkeys.ProtectedBuffer(32, label="api-token")
    try:
        # Re-enabling only points the output at fd 2 (pytest writes to a
        # duplicate); an enabled faulthandler keeps its place among handlers.
        result = run_in_child(lambda: (faulthandler.enable(file=2), touch(buffer.address)),
                              keep_faulthandler=True)
    finally:
        buffer.close()
    assert result.segfaulted
    _assert_named(result)
    assert "Fatal Python error: Segmentation fault" in result.stderr


def test_faults_the_package_does_not_own_are_never_swallowed():
    buffer = pkeys.ProtectedBuffer(8)
    try:
        null_read = run_in_child(lambda: touch(16))
        sent = run_in_child(lambda: os.kill(os.getpid(), signal.SIGSEGV))
    finally:
        buffer.close()
    assert null_read.segfaulted and "pkeys: " not in null_read.stderr
    assert sent.segfaulted


@pytest.mark.pku
def test_another_thread_stays_denied_while_one_has_it_unlocked(buf):
    go, done = threading.Event(), threading.Event()
    seen = []

    def other() -> None:
        go.wait()
        seen.append(pkeys.probe(buf.address))
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with buf.unlocked() as view:
        go.set()
        done.wait()
        assert bytes(view) == SECRET
        number = buf.pkey
    thread.join()
    assert seen[0] is not None and seen[0].pkey == number


def test_no_key_or_mapping_leaks_after_many_cycles():
    def maps_count() -> int:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)

    def locked_kb() -> int:
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith("VmLck:"))

    keys_before, maps_before, locked_before = pkeys.allocated_keys(), maps_count(), locked_kb()
    # 10,000 natively; the emulated CPU is about 30 times slower.
    for _ in range(10_000 if not pkeys._select.emulated() else 1_000):
        buffer = pkeys.ProtectedBuffer(48, label="cycle")
        buffer.write(b"x" * 48)
        buffer.close()
    assert pkeys.allocated_keys() == keys_before
    assert locked_kb() == locked_before
    # Python's own allocator may map or drop an arena meanwhile; a leak would be 10,000.
    assert maps_count() <= maps_before + 4
    if pkeys.backend() == "hardware":
        # The kernel agrees: every number is still free to allocate.
        raw = allocate_until_enospc(lambda: pkeys.sys.pkey_alloc(0, 1))
        for pkey in raw:
            pkeys.sys.pkey_free(pkey)
        assert len(raw) >= 15 - len(keys_before) - 1  # the kernel may hold its exec-only key


def test_locked_is_the_deprecated_name_of_memory_locked():
    with pkeys.ProtectedBuffer(16) as buffer:
        with pytest.warns(DeprecationWarning, match="memory_locked"):
            old = buffer.locked
        assert old is buffer.memory_locked
        assert f"memory_locked={buffer.memory_locked}>" in repr(buffer)


def test_a_buffers_mapping_is_set_once_by_init():
    # unlocked() takes raw addresses from the mapping's _block: a forged
    # one crashed, and another buffer's mapping got closed twice.  In a
    # child: a regression crashes.
    def child() -> None:
        class Forged:
            _block = (1, b"", 4096, 1 << 20)
            orphaned = False

        with pkeys.ProtectedBuffer(16, secretmem=False) as a, \
                pkeys.ProtectedBuffer(32, secretmem=False) as b:
            for value in (Forged(), a._mapping, None):
                try:
                    b._mapping = value
                except AttributeError as exc:
                    assert "set once" in str(exc), exc
                else:
                    raise AssertionError(f"_mapping = {value!r} accepted")
            try:
                del b._mapping
            except AttributeError:
                pass
            else:
                raise AssertionError("_mapping deleted")
            with b.unlocked() as view:
                assert len(view) == 32
        assert a.closed and b.closed

    result = run_in_child(child, quiet=False)
    assert result.exitcode == 0, f"{result.describe()}: {result.stderr}"


def test_a_block_keeps_a_buffer_that_nothing_else_references_open():
    # `with load_secret().unlocked() as v:`: the block object is the only
    # reference to the buffer, which must not be collected (and closed)
    # before the block begins or while it runs, and goes once the block does.
    import weakref

    made: list[weakref.ref[pkeys.ProtectedBuffer]] = []

    def load_secret() -> pkeys.ProtectedBuffer:
        buffer = pkeys.ProtectedBuffer(16)
        buffer.write(b"0123456789abcdef")
        made.append(weakref.ref(buffer))
        return buffer

    with load_secret().unlocked() as view:
        gc.collect()
        assert bytes(view) == b"0123456789abcdef"
    block = load_secret().unlocked()
    gc.collect()
    with block as view:
        assert bytes(view[:4]) == b"0123"
    assert made[1]() is not None
    del block, view
    gc.collect()
    assert [ref() for ref in made] == [None, None]
