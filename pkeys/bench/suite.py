"""The pyperf suite.  Run through ``python -m pkeys bench``, or directly
as ``python -m pkeys.bench.suite [pyperf options]``.

Cases are named ``group/op/impl``:

* ``c/...``        loops in C (csrc/bench.c): no Python in the timing;
* ``baseline/...`` the floor: a cffi no-op call and a plain Python call;
* ``pkeys/...``    the package's safe calls;
* ``glibc/...``    glibc's functions through :mod:`pkeys.glibc`;
* ``ctypes/...``   what people write today without pkeys;
* ``software/...`` the mprotect emulation, and the raw ``mprotect`` it issues.

Cases that need PKU are skipped where it is absent (the report prints
"n/a (no PKU)").  On the simulated-register build
(``PKEYS_BUILD_SIMULATED_PKU=1``) the layer cases (SIMULATED_CASES) run,
labelled "simulated register": they measure what the package adds around
RDPKRU/WRPKRU, which there act on a thread-local variable.  Each case does its setup on first use, so a pyperf
worker only pays for the case it runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading
import time
from collections.abc import Callable
from typing import Any

import pyperf

import pkeys
from pkeys import glibc
from pkeys._binding import ffi, lib

from pkeys.bench.report import SOFTWARE_MMAPS, software_set_case

HARDWARE = pkeys.hardware_supported() and pkeys.backend() == "hardware"
SIMULATED = pkeys.backend() == "simulated"
# What the package adds around the instructions, which the simulated
# register measures on any CPU.  Not the glibc and ctypes cases (they would
# run the real instructions), nor pkey_mprotect (plain mprotect there).
SIMULATED_CASES = frozenset({
    "c/rdpkru/insn", "c/wrpkru/same", "c/wrpkru/alternate",
    "pkeys/pkey_get/safe", "pkeys/pkey_set/same", "pkeys/pkey_get/key",
    "pkeys/pkey_set/key-same", "pkeys/rdpkru/safe", "pkeys/pkey_set/toggle",
    "pkeys/allow/key", "pkeys/allow/4keys", "pkeys/unlocked/hot",
})
PAGE = mmap.PAGESIZE
SYS_PKEY_MPROTECT = 329

# pyperf's time function: loops -> seconds for that many operations
TimeFunction = Callable[[int], float]

# name -> (needs PKU, time function)
CASES: dict[str, tuple[bool, TimeFunction]] = {}

# A C loop shorter than this is dominated by the two clock reads around it
# and by the first, cold iteration: with pyperf's single-loop --quick values
# a null syscall read 2,185 ns instead of ~200.
MIN_C_ITERATIONS = 10_000
# The same for calls from Python, whose first calls also warm caches.
MIN_PYTHON_CALLS = 1_000


def runs_here(name: str) -> bool:
    """Whether the case can run in this process's build and backend."""
    needs_pku, _ = CASES[name]
    return not needs_pku or HARDWARE or (SIMULATED and name in SIMULATED_CASES)


def case(name: str, needs_pku: bool = False) -> Callable[[TimeFunction], TimeFunction]:
    def register(function: TimeFunction) -> TimeFunction:
        CASES[name] = (needs_pku, function)
        return function

    return register


_cache: dict[str, object] = {}


def once(name: str, make: Callable[[], object]) -> object:
    if name not in _cache:
        _cache[name] = make()
    return _cache[name]


def release_cached() -> None:
    """Unmap the cached pages, then free the cached keys (a key that still
    guards live memory cannot be freed)."""
    for value in _cache.values():
        if isinstance(value, tuple) and isinstance(value[0], mmap.mmap):
            value[0].close()
    for name, value in _cache.items():
        if isinstance(value, pkeys.ProtectedBuffer):
            value.close()
    for name, value in _cache.items():
        if isinstance(value, pkeys.Key):
            value.close()
        elif isinstance(value, list):
            for key in value:
                key.close()
    _cache.clear()


def _hardware_key() -> int:
    key = once("key", lambda: pkeys.Key(rights=0))
    assert isinstance(key, pkeys.Key)
    return key.pkey


def _page(name: str, pages: int = 1) -> tuple[mmap.mmap, int]:
    def make() -> tuple[mmap.mmap, int]:
        memory = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory[0] = 1
        pin = ffi.from_buffer(memory)
        address = int(ffi.cast("uintptr_t", pin))
        ffi.release(pin)
        return memory, address

    return once(name, make)  # type: ignore[return-value]


# ---- C-level loops ---------------------------------------------------------

# run(iterations, struct pk_bench *) -> status
CRun = Callable[[int, Any], int]

# name -> (run, minimum iterations).  pyperf times these in its workers;
# `pkeys bench` runs the very same loops again in its own process for the
# TSC cycles, so both columns measure one code path on the same memory.
C_LOOPS: dict[str, tuple[CRun, int]] = {}


def _c_loop(run: CRun, minimum: int = MIN_C_ITERATIONS) -> TimeFunction:
    def time_it(loops: int) -> float:
        result = ffi.new("struct pk_bench *")
        iterations = max(loops, minimum)
        status = run(iterations, result)
        if status:
            raise RuntimeError(f"C loop failed with status {status}, errno {ffi.errno}")
        # What `loops` operations took, at the rate of the longer run.
        return float(result.nanoseconds) / 1e9 * loops / iterations

    return time_it


def c_case(name: str, run: CRun, *, needs_pku: bool = False,
           minimum: int = MIN_C_ITERATIONS) -> None:
    C_LOOPS[name] = (run, minimum)
    case(name, needs_pku)(_c_loop(run, minimum))


c_case("c/rdpkru/insn", lambda n, r: lib.pk_bench_rdpkru(n, r), needs_pku=True)
c_case("c/wrpkru/same", lambda n, r: lib.pk_bench_wrpkru(n, 0, _hardware_key(), r), needs_pku=True)
c_case("c/wrpkru/alternate", lambda n, r: lib.pk_bench_wrpkru(n, 1, _hardware_key(), r),
       needs_pku=True)
c_case("c/pkey_set/glibc", lambda n, r: lib.pk_bench_glibc_pkey_set(n, _hardware_key(), r),
       needs_pku=True)
c_case("c/null_syscall/getppid", lambda n, r: lib.pk_bench_null_syscall(n, r))


def _mprotect_loop(pkey: Callable[[], int], pages: int, threads: int) -> CRun:
    def run(n: int, result: Any) -> int:
        _, address = _page(f"toggle{pages}", pages)
        return lib.pk_bench_mprotect(n, address, pages * PAGE, pkey(), threads, result)

    return run


for _pages in (1, 64):
    for _threads in (0, 3):
        # A protection change costs microseconds: fewer iterations suffice.
        c_case(f"c/pkey_mprotect/{_pages}page-{_threads}threads",
               _mprotect_loop(_hardware_key, _pages, _threads), needs_pku=True,
               minimum=MIN_C_ITERATIONS // 10)
        c_case(f"c/mprotect/{_pages}page-{_threads}threads",
               _mprotect_loop(lambda: -1, _pages, _threads), minimum=MIN_C_ITERATIONS // 10)


# Rights for every thread at once (Key.revoke) against re-tagging the memory,
# the alternative users would reach for, with as many other threads alive.
REVOCATION_THREADS = (1, 2, 4, 8, 16, 64)
for _threads in REVOCATION_THREADS:
    c_case(f"c/revoke/{_threads}threads",
           (lambda t: lambda n, r: lib.pk_bench_revoke(n, _hardware_key(), t, r))(_threads),
           needs_pku=True, minimum=100)
    if _threads not in (0, 3):
        c_case(f"c/pkey_mprotect/1page-{_threads}threads",
               _mprotect_loop(_hardware_key, 1, _threads), needs_pku=True,
               minimum=MIN_C_ITERATIONS // 10)


# ---- Python-level cases ------------------------------------------------------

def _timed(body: Callable[[], object]) -> TimeFunction:
    """Time ``loops`` calls of ``body`` (with a 10x unrolled inner loop so
    that the for-loop itself weighs little)."""

    def time_it(loops: int) -> float:
        call = body
        outer = range(max(MIN_PYTHON_CALLS, loops) // 10)
        start = time.perf_counter()
        for _ in outer:
            call(); call(); call(); call(); call(); call(); call(); call(); call(); call()  # noqa: E702
        return (time.perf_counter() - start) * loops / (len(outer) * 10)

    return time_it


def _at_least(time_it: TimeFunction) -> TimeFunction:
    """``time_it`` run for at least MIN_PYTHON_CALLS operations, its time
    scaled back to the ``loops`` asked for."""

    def scaled(loops: int) -> float:
        calls = max(MIN_PYTHON_CALLS, loops)
        return time_it(calls) * loops / calls

    return scaled


def _python_noop() -> None:
    pass


case("baseline/noop/cffi")(_timed(lib.pk_noop))
case("baseline/noop/python")(_timed(_python_noop))


@case("baseline/lock/with")
def _with_lock(loops: int) -> float:
    # The floor for any context manager written in C.
    lock = threading.Lock()

    def body() -> None:
        with lock:
            pass

    return _timed(body)(loops)


@case("pkeys/pkey_get/safe", True)
def _pkey_get(loops: int) -> float:
    key, get = _hardware_key(), pkeys.pkey_get
    return _timed(lambda: get(key))(loops)


@case("pkeys/pkey_set/same", True)
def _pkey_set_same(loops: int) -> float:
    key, set_ = _hardware_key(), pkeys.pkey_set
    return _timed(lambda: set_(key, 0))(loops)


def _key_object() -> pkeys.Key:
    key = once("key-object", lambda: pkeys.Key(rights=0))
    assert isinstance(key, pkeys.Key)
    return key


@case("pkeys/pkey_get/key", True)
def _pkey_get_key(loops: int) -> float:
    key, get = _key_object(), pkeys.pkey_get
    return _timed(lambda: get(key))(loops)


@case("pkeys/pkey_set/key-same", True)
def _pkey_set_key(loops: int) -> float:
    key, set_ = _key_object(), pkeys.pkey_set
    return _timed(lambda: set_(key, 0))(loops)


@case("pkeys/rdpkru/safe", True)
def _rdpkru(loops: int) -> float:
    return _timed(pkeys.rdpkru)(loops)


def _two_key_toggle(set_: Callable[[int, int], object], key: int) -> TimeFunction:
    # Alternate rights so every call writes the register.
    def time_it(loops: int) -> float:
        pairs = range(max(MIN_PYTHON_CALLS, loops) // 2)
        start = time.perf_counter()
        for _ in pairs:
            set_(key, 1)
            set_(key, 0)
        return (time.perf_counter() - start) * loops / (2 * len(pairs))

    return time_it


@case("pkeys/pkey_set/toggle", True)
def _pkey_set_toggle(loops: int) -> float:
    return _two_key_toggle(pkeys.pkey_set, _hardware_key())(loops)


@case("pkeys/allow/key", True)
def _key_allow(loops: int) -> float:
    key = once("allow-key", lambda: pkeys.Key())
    allow = key.allow  # type: ignore[attr-defined]

    def body() -> None:
        with allow():
            pass

    return _timed(body)(loops)


@case("pkeys/unlocked/hot", True)
def _unlocked_hot(loops: int) -> float:
    buffer = once("hot-buffer", lambda: pkeys.ProtectedBuffer(32, label="bench"))
    unlocked = buffer.unlocked  # type: ignore[attr-defined]

    def body() -> None:
        with unlocked():
            pass

    return _timed(body)(loops)


# ---- virtual keys: what a ProtectedBuffer without key= costs to open ---------

@case("buffer/unlocked/hot")
def _unlocked_virtual_hot(loops: int) -> float:
    # The buffer holds a pool key: a use, a grant, a view (no syscall on PKU).
    buffer = once("virtual-hot", lambda: pkeys.ProtectedBuffer(32, label="bench-hot"))
    unlocked = buffer.unlocked  # type: ignore[attr-defined]

    def body() -> None:
        with unlocked():
            pass

    return _timed(body)(loops)


@case("buffer/unlocked/cold")
def _unlocked_virtual_cold(loops: int) -> float:
    # One buffer more than the pool has keys, opened round-robin: every open
    # evicts the least recently used (PROT_NONE, key 0) and tags its own.
    def make() -> list[pkeys.ProtectedBuffer]:
        count = pkeys.virtual_key_limit() + 1
        return [pkeys.ProtectedBuffer(32, label="bench-cold") for _ in range(count)]

    buffers = once("virtual-cold", make)
    blocks = [buffer.unlocked for buffer in buffers]  # type: ignore[attr-defined]

    def time_it(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            with blocks[i % len(blocks)]():
                pass
        return time.perf_counter() - start

    return time_it(loops)


@case("buffer/mprotect/pair")
def _mprotect_pair(loops: int) -> float:
    # What a buffer closed by page protection alone costs to open and close
    # again: the plain mprotect pair that a cold open's retagging replaces.
    _, address = _page("pair-page")
    mprotect = lib.pk_sys_mprotect
    rw = mmap.PROT_READ | mmap.PROT_WRITE

    def body() -> None:
        mprotect(address, PAGE, rw)
        mprotect(address, PAGE, pkeys.PROT_NONE)

    return _timed(body)(loops)


@case("pkeys/allow/4keys", True)
def _allow_four(loops: int) -> float:
    keys = once("four", lambda: [pkeys.Key() for _ in range(4)])
    assert isinstance(keys, list)
    allow = pkeys.allow
    k1, k2, k3, k4 = keys  # as the target reads: pkeys.allow(k1, k2, k3, k4)

    def body() -> None:
        with allow(k1, k2, k3, k4):
            pass

    return _timed(body)(loops)


@case("glibc/pkey_get/pkeys.glibc", True)
def _glibc_get(loops: int) -> float:
    key = _hardware_key()
    return _timed(lambda: glibc.pkey_get(key))(loops)


@case("glibc/pkey_set/pkeys.glibc", True)
def _glibc_set(loops: int) -> float:
    return _two_key_toggle(glibc.pkey_set, _hardware_key())(loops)


def _ctypes_libc() -> ctypes.CDLL:
    def make() -> ctypes.CDLL:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.pkey_set.argtypes = [ctypes.c_int, ctypes.c_uint]
        libc.pkey_set.restype = ctypes.c_int
        libc.syscall.restype = ctypes.c_long
        return libc

    return once("ctypes", make)  # type: ignore[return-value]


@case("ctypes/pkey_set/glibc", True)
def _ctypes_set(loops: int) -> float:
    libc = _ctypes_libc()

    def pkey_set(key: int, rights: int) -> None:
        # What a careful ctypes user writes: call, then check errno.
        if libc.pkey_set(key, rights) != 0:
            raise OSError(ctypes.get_errno(), "pkey_set failed")

    return _two_key_toggle(pkey_set, _hardware_key())(loops)


@case("ctypes/pkey_mprotect/syscall", True)
def _ctypes_mprotect(loops: int) -> float:
    libc, key = _ctypes_libc(), _hardware_key()
    _, address = _page("ctypes-page")
    prots = (mmap.PROT_READ, mmap.PROT_READ | mmap.PROT_WRITE)

    def time_it(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            if libc.syscall(SYS_PKEY_MPROTECT, ctypes.c_void_p(address), ctypes.c_size_t(PAGE),
                            prots[i & 1], key) != 0:
                raise OSError(ctypes.get_errno(), "pkey_mprotect failed")
        return time.perf_counter() - start

    return _at_least(time_it)(loops)


@case("pkeys/pkey_mprotect/safe", True)
def _safe_mprotect(loops: int) -> float:
    key = _hardware_key()
    memory, _ = _page("safe-page")
    prots = (mmap.PROT_READ, mmap.PROT_READ | mmap.PROT_WRITE)
    protect = pkeys.pkey_mprotect

    def time_it(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            protect(memory, None, prots[i & 1], key)
        return time.perf_counter() - start

    return _at_least(time_it)(loops)


def _software_set(loops: int) -> float:
    # Each rights change re-protects the one region with one mprotect.
    key = once("software-key", _software_key)
    return _two_key_toggle(pkeys.pkey_set, key.pkey)(loops)  # type: ignore[attr-defined]


def _software_set_among(mmaps: int) -> TimeFunction:
    """The 1region case with ``mmaps - 1`` more mmaps alive, each tagged
    with another key: what a change costs must not grow with memory that
    does not carry the key being changed."""

    def time_it(loops: int) -> float:
        def make() -> pkeys.Key:
            other = once("software-other-key", pkeys.Key)
            assert isinstance(other, pkeys.Key)
            for index in range(mmaps - 1):
                other.protect(_page(f"software-other-{index}")[0])
            return once("software-key", _software_key)  # type: ignore[return-value]

        key = once(f"software-key-among-{mmaps}", make)
        return _two_key_toggle(pkeys.pkey_set, key.pkey)(loops)  # type: ignore[attr-defined]

    return time_it


def _software_key() -> pkeys.Key:
    memory, _ = _page("software-page")
    key = pkeys.Key()
    key.protect(memory)
    return key


def _software_set_buffer(loops: int) -> float:
    # The same, on memory the package owns (a ProtectedBuffer with a shared
    # key): no foreign owner to pin, so the change is one call into C.
    def make() -> pkeys.Key:
        key = pkeys.Key()
        buffer = pkeys.ProtectedBuffer(16, key=key, secretmem=False, lock_memory=False)
        once("software-buffer", lambda: buffer)
        return key

    key = once("software-buffer-key", make)
    return _two_key_toggle(pkeys.pkey_set, key.pkey)(loops)  # type: ignore[attr-defined]


# The backend is chosen in C once per process: on a PKU machine, run the
# bench with PKEYS_BACKEND=software to measure the emulation.
if pkeys.backend() == "software":
    case("software/pkey_set/1region")(_software_set)
    case("software/pkey_set/1region-buffer")(_software_set_buffer)
    # With 11 and 101 tagged mmaps alive (issue 16's table); the first is
    # the 1region case's own, the others carry another key.
    for _mmaps in SOFTWARE_MMAPS[1:]:
        case(software_set_case(_mmaps))(_software_set_among(_mmaps))


@case("software/mprotect/raw")
def _raw_mprotect(loops: int) -> float:
    _, address = _page("raw-page")
    mprotect = lib.pk_sys_mprotect
    prots = (pkeys.PROT_NONE, mmap.PROT_READ | mmap.PROT_WRITE)

    def time_it(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            mprotect(address, PAGE, prots[i & 1])
        return time.perf_counter() - start

    return _at_least(time_it)(loops)


def main() -> None:
    runner = pyperf.Runner()
    runner.metadata["pkeys_backend"] = pkeys.backend()
    runner.metadata["pkeys_simulated_register"] = str(SIMULATED)
    for name, (_, time_function) in CASES.items():
        if runs_here(name):
            runner.bench_time_func(name, time_function)


if __name__ == "__main__":
    main()
