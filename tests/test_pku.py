"""The hardware tier: real protection keys, on PKU hardware or the emulated
CPU of ``python -m pkeys vm``.

It reproduces the behaviours checked by the kernel's protection-key
selftests and glibc's tst-pkey, driving the package's API, and dropping to
:mod:`pkeys.sys` where the raw kernel behaviour is the point.  As in the
selftests, a shadow of the expected PKRU is compared with the register
after the operations (the ``shadow`` fixture).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
import threading

import pytest

import pkeys
from pkeys import glibc
from pkeys._binding import ffi, lib
from pkeys._child import run_in_child
from pkeys._fault import SEGV_PKUERR, FaultKind

from . import _libc
from ._libc import address_of, allocate_until_enospc

pytestmark = pytest.mark.pku
PAGE = mmap.PAGESIZE
INIT_PKRU = 0x55555554


def untag(memory) -> None:
    pkeys.pkey_mprotect(memory, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)


def in_thread(function):
    """Run ``function`` in a new thread and return its result."""
    box = []
    thread = threading.Thread(target=lambda: box.append(function()))
    thread.start()
    thread.join()
    return box[0]


# 1 ---------------------------------------------------------------------------
def test_detection():
    with open("/proc/cpuinfo") as cpuinfo:
        flags = set(cpuinfo.read().split())
    assert {"pku", "ospke"} <= flags
    assert lib.pk_cpu_has_pku() == 1 and lib.pk_cpu_has_ospke() == 1
    assert pkeys.hardware_supported()
    assert pkeys.backend() == "hardware"


# 2 ---------------------------------------------------------------------------
@pytest.mark.parametrize("flags, rights", [(1, 0), (0x80000000, 0), (0, 4), (0, 0xFF)])
def test_kernel_rejects_bad_alloc_arguments(flags, rights):
    with pytest.raises(OSError) as info:
        pkeys.sys.pkey_alloc(flags, rights)
    assert info.value.errno == errno.EINVAL


# 3, 4 ------------------------------------------------------------------------
def test_exhaustion_with_a_fork_part_way(shadow):
    allocated: list[int] = []
    child_result = None

    def after_each(keys: list[int]) -> None:
        nonlocal child_result
        allocated[:] = keys
        shadow.set(keys[-1], 0)
        shadow.check()
        if len(keys) == 5 and child_result is None:
            mine = list(keys)

            def child() -> None:
                assert pkeys.allocated_keys() == mine
                assert pkeys.rdpkru() == shadow.value
                for pkey in mine:
                    pkeys.pkey_free(pkey)
                assert pkeys.allocated_keys() == []
                # The child's frees returned the numbers to the child alone.
                assert pkeys.pkey_alloc() == mine[0]

            child_result = run_in_child(child)

    try:
        allocated[:] = allocate_until_enospc(pkeys.pkey_alloc, after_each)
        assert child_result is not None and child_result.exitcode == 0, child_result.stderr
        assert 13 <= len(allocated) <= 15, allocated
        assert 0 not in allocated
        assert len(set(allocated)) == len(allocated)
        assert pkeys.allocated_keys() == sorted(allocated)
    finally:
        for pkey in allocated:
            pkeys.pkey_free(pkey)
            shadow.set(pkey, 1)
    shadow.check()


def test_raw_pkey_alloc_never_returns_key_zero():
    raw = allocate_until_enospc(lambda: pkeys.sys.pkey_alloc(0, pkeys.PKEY_DISABLE_ACCESS))
    try:
        assert raw and 0 not in raw
    finally:
        for pkey in raw:
            pkeys.sys.pkey_free(pkey)


# 5 ---------------------------------------------------------------------------
@pytest.mark.parametrize("rights", [0, 1, 2, 3])
def test_initial_rights_apply_to_the_calling_thread_only(rights, shadow):
    ready, go = threading.Event(), threading.Event()
    seen = []

    def earlier_thread() -> None:
        ready.set()
        go.wait()
        seen.append(pkeys.pkru.read())

    thread = threading.Thread(target=earlier_thread)
    thread.start()
    ready.wait()
    pkey = pkeys.pkey_alloc(0, rights)
    try:
        shadow.set(pkey, rights)
        shadow.check()
        go.set()
        thread.join()
        assert pkeys.pkru.rights_of(seen[0], pkey) == pkeys.PKEY_DISABLE_ACCESS
    finally:
        pkeys.pkey_free(pkey)
        shadow.set(pkey, 1)
    shadow.check()


# 6 ---------------------------------------------------------------------------
def test_freed_keys_are_refused_by_the_kernel(page):
    pkey = pkeys.sys.pkey_alloc(0, 0)
    pkeys.sys.pkey_free(pkey)
    with pytest.raises(OSError) as info:
        pkeys.sys.pkey_free(pkey)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        pkeys.sys.pkey_mprotect(address_of(page), PAGE, mmap.PROT_READ, pkey)
    assert info.value.errno == errno.EINVAL


def test_never_allocated_key_is_refused_by_the_kernel(page):
    unused = next(k for k in range(15, 0, -1) if k not in pkeys.allocated_keys())
    with pytest.raises(OSError) as info:
        pkeys.sys.pkey_mprotect(address_of(page), PAGE, mmap.PROT_READ, unused)
    assert info.value.errno == errno.EINVAL


def test_kernel_free_keeps_rights_but_the_safe_layer_revokes(shadow):
    saved = pkeys.pkru.read()
    pkey = pkeys.sys.pkey_alloc(0, 0)
    try:
        pkeys.sys.pkey_free(pkey)
        # The kernel's "use after free": the freed number is still open here.
        assert pkeys.pkru.rights_of(pkeys.pkru.read(), pkey) == 0
    finally:
        pkeys.pkru.write(saved)
    pkey = pkeys.pkey_alloc(0, 0)
    shadow.set(pkey, 0)
    shadow.check()
    pkeys.pkey_free(pkey)
    shadow.set(pkey, pkeys.PKEY_DISABLE_ACCESS)
    shadow.check()


# 7, 8, 9 --------------------------------------------------------------------
@pytest.mark.parametrize("touched", [True, False], ids=["faulted-in", "untouched"])
@pytest.mark.parametrize(
    "rights, read_ok, write_ok",
    [(0, True, True), (pkeys.PKEY_DISABLE_WRITE, True, False), (pkeys.PKEY_DISABLE_ACCESS, False, False),
     (3, False, False)],
)
def test_access_semantics(touched, rights, read_ok, write_ok, shadow):
    memory = mmap.mmap(-1, PAGE)
    if touched:
        memory[0] = 7
    try:
        with pkeys.Key(rights=rights) as key:
            shadow.set(key, rights)
            key.protect(memory)
            shadow.check()
            target = address_of(memory) + 123
            read = pkeys.probe(target)
            write = pkeys.probe(target, write=True)
            assert (read is None) == read_ok
            assert (write is None) == write_ok
            for fault in (read, write):
                if fault is not None:
                    assert fault.kind is FaultKind.PKEY
                    assert fault.si_code == SEGV_PKUERR
                    assert fault.pkey == key.pkey
                    assert fault.address == target
                    assert fault.handler_pkru == INIT_PKRU
            # probe restored this thread's PKRU after each fault
            shadow.check()
            untag(memory)
    finally:
        memory.close()


def test_denied_access_kills_with_sigsegv(key, page):
    key.protect(page)
    result = run_in_child(lambda: page[0])
    assert result.segfaulted, result
    with key.allow(write=False):
        assert run_in_child(lambda: page[0]).exitcode == 0
        assert run_in_child(lambda: page.__setitem__(0, 1)).segfaulted
    untag(page)


# 10 --------------------------------------------------------------------------
def test_kernel_copies_obey_pkru(key, page):
    key.protect(page)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"x" * 64)
        with pytest.raises(OSError) as info:
            os.readv(read_end, [page])
        assert info.value.errno == errno.EFAULT
        with pytest.raises(OSError) as info:
            os.write(write_end, memoryview(page)[:16])
        assert info.value.errno == errno.EFAULT
        with key.allow():
            assert os.readv(read_end, [memoryview(page)[:64]]) == 64
            assert os.write(write_end, memoryview(page)[:16]) == 16
    finally:
        os.close(read_end)
        os.close(write_end)
        untag(page)


# 11 --------------------------------------------------------------------------
def test_plain_exec_only_mprotect_gets_the_kernels_exec_only_key():
    # In a child: the kernel allocates its exec-only key for the process and
    # denies it in this thread, which the parent's tests should not inherit.
    def child() -> None:
        address = _libc.map_anonymous(PAGE)
        pkeys.sys.mprotect(address, PAGE, mmap.PROT_EXEC)
        exec_key = _libc.smaps_pkey(address)
        assert exec_key != 0
        fault = pkeys.probe(address)
        assert fault is not None and fault.si_code == SEGV_PKUERR and fault.pkey == exec_key
        assert pkeys.pkru.rights_of(pkeys.pkru.read(), exec_key) == pkeys.PKEY_DISABLE_ACCESS

    result = run_in_child(child)
    assert result.exitcode == 0, result.stderr


# 12 --------------------------------------------------------------------------
def test_keys_survive_mprotect_madvise_and_mremap_but_not_map_fixed(key):
    address = _libc.map_anonymous(2 * PAGE)
    try:
        pkeys.sys.pkey_mprotect(address, 2 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, key.pkey)
        assert _libc.smaps_pkey(address) == key.pkey
        pkeys.sys.mprotect(address, 2 * PAGE, mmap.PROT_READ)
        assert _libc.smaps_pkey(address) == key.pkey
        pkeys.sys.mprotect(address, 2 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE)
        _madvise(address, 2 * PAGE, mmap.MADV_DONTNEED)
        assert _libc.smaps_pkey(address) == key.pkey
        moved = _libc.remap(address, 2 * PAGE, 8 * PAGE)
        address = moved
        assert _libc.smaps_pkey(moved) == key.pkey
        _libc.unmap(moved + 2 * PAGE, 6 * PAGE)
        _libc.map_anonymous(PAGE, moved, fixed=True)
        assert _libc.smaps_pkey(moved) == 0
        assert _libc.smaps_pkey(moved + PAGE) == key.pkey
    finally:
        _libc.unmap(address, 2 * PAGE)


def _madvise(address: int, length: int, advice: int) -> None:
    if _libc.libc.madvise(_libc.ffi.cast("void *", address), length, advice) != 0:
        raise OSError(_libc.ffi.errno, "madvise failed")


# 13 --------------------------------------------------------------------------
def test_threads_inherit_pkru_at_creation(page, shadow):
    go = threading.Event()
    early_faults = []
    early = threading.Thread(target=lambda: (go.wait(), early_faults.append(pkeys.probe(page))))
    early.start()
    with pkeys.Key(rights=0) as key:
        shadow.set(key, 0)
        key.protect(page)
        go.set()
        early.join()
        fault = early_faults[0]
        assert fault is not None and fault.kind is FaultKind.PKEY and fault.pkey == key.pkey
        assert in_thread(lambda: pkeys.probe(page, write=True)) is None
        assert in_thread(lambda: pkeys.pkey_get(key)) == 0
        shadow.check()
        untag(page)


def test_allow_in_one_thread_does_not_open_another(key, page, shadow):
    key.protect(page)
    go, done = threading.Event(), threading.Event()
    seen = []

    def other() -> None:
        go.wait()
        seen.append(pkeys.probe(page))
        seen.append(pkeys.pkey_get(key))
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with key.allow():
        assert pkeys.probe(page, write=True) is None
        go.set()
        done.wait()
    thread.join()
    assert seen[0] is not None and seen[0].pkey == key.pkey
    assert seen[1] == pkeys.PKEY_DISABLE_ACCESS
    shadow.check()
    untag(page)


# 14 --------------------------------------------------------------------------
def test_forked_child_inherits_pkru_and_allocations(key, shadow):
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_WRITE)
    shadow.set(key, 2)
    expected_pkru, expected_keys = pkeys.rdpkru(), pkeys.allocated_keys()

    def child() -> None:
        assert pkeys.rdpkru() == expected_pkru
        assert pkeys.allocated_keys() == expected_keys
        with pytest.raises(OSError):  # the kernel, too, sees the key allocated
            pkeys.sys.pkey_free(99)
        pkeys.sys.pkey_mprotect(_libc.map_anonymous(PAGE), PAGE, mmap.PROT_READ, key.pkey)

    result = run_in_child(child)
    assert result.exitcode == 0, result.stderr
    shadow.check()


def test_execd_child_starts_from_the_init_pkru(key):
    pkeys.pkey_set(key, 0)
    code = "import pkeys; print(hex(pkeys.pkru.read())); print(pkeys.sys.pkey_alloc(0, 0))"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert output == [hex(INIT_PKRU), "1"]


# 15 --------------------------------------------------------------------------
def test_c_signal_handlers_run_with_the_init_pkru(key, shadow):
    pkeys.pkey_set(key, 0)
    shadow.set(key, 0)
    in_handler, after = ffi.new("int64_t *"), ffi.new("int64_t *")
    assert lib.pk_signal_pkru(in_handler, after) == 0
    assert in_handler[0] == INIT_PKRU
    assert after[0] == shadow.value  # sigreturn restored the interrupted value
    shadow.check()


def test_python_signal_handlers_see_the_threads_rights(key, page, shadow):
    key.protect(page)
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: seen.append((pkeys.rdpkru(), pkeys.probe(page))))
    try:
        with key.allow():
            os.kill(os.getpid(), signal.SIGUSR1)
            opened = pkeys.rdpkru()
        assert seen == [(opened, None)]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    shadow.check()
    untag(page)


def test_probe_restores_pkru_after_the_handler_jumps_out(key, page, shadow):
    key.protect(page)
    with pkeys.Key(rights=0) as open_key:
        number = open_key.pkey
        shadow.set(number, 0)
        fault = pkeys.probe(page)
        assert fault is not None and fault.handler_pkru == INIT_PKRU
        shadow.check()  # not left at the handler's 0x55555554
    shadow.set(number, 1)
    untag(page)


# 16 --------------------------------------------------------------------------
def test_glibc_and_register_paths_agree(shadow):
    keys = [pkeys.Key() for _ in range(3)]
    try:
        for key in keys:
            for rights in range(4):
                glibc.pkey_set(key.pkey, rights)
                shadow.set(key, rights)
                assert pkeys.pkru.read() == shadow.value
                assert glibc.pkey_get(key.pkey) == rights
                assert pkeys.pkey_get(key) == rights
                pkeys.pkey_set(key, 3 - rights)
                shadow.set(key, 3 - rights)
                assert glibc.pkey_get(key.pkey) == 3 - rights
                assert pkeys.pkru.rights_of(pkeys.pkru.read(), key.pkey) == 3 - rights
                shadow.check()
        # glibc's view of key 0 and its range checks
        assert glibc.pkey_get(0) == 0
        with pytest.raises(OSError) as info:
            glibc.pkey_get(16)
        assert info.value.errno == errno.EINVAL
    finally:
        for key in keys:
            key.close()


def test_pkey_set_round_trips_through_rdpkru(key, shadow):
    for rights in (0, 1, 2, 3, 2, 0, 1):
        pkeys.pkey_set(key, rights)
        shadow.set(key, rights)
        shadow.check()
        assert (pkeys.rdpkru() >> (2 * key.pkey)) & 3 == rights


# 17 --------------------------------------------------------------------------
def test_shadow_tracks_every_safe_operation(page, shadow):
    with pkeys.Key() as a, pkeys.Key(rights=2) as b:
        numbers = a.pkey, b.pkey
        shadow.set(a, 1)
        shadow.set(b, 2)
        shadow.check()
        a.protect(page)
        shadow.check()
        with pkeys.allow(a, b):
            shadow.set(a, 0), shadow.set(b, 0)
            shadow.check()
            with a.deny():
                shadow.set(a, 1)
                shadow.check()
            shadow.set(a, 0)
            shadow.check()
        shadow.set(a, 1), shadow.set(b, 2)
        shadow.check()
        pkeys.wrpkru(shadow.value & ~(3 << 2 * b.pkey))
        shadow.set(b, 0)
        shadow.check()
        untag(page)
    for number in numbers:
        shadow.set(number, 1)
    shadow.check()
