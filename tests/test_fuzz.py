"""A fuzz of the whole public API: hypothesis draws sequences of calls to
every public function and method (``pkeys.__all__``, Key, Scope,
ProtectedBuffer and its blocks, the validated ``pkey_*`` functions; Scope,
Unlocked and Fault through the calls that make them) with
hostile arguments -- huge and negative numbers, wrong types, closed keys
and buffers, released views, read-only, PROT_NONE and tagged mappings,
other keys' and the virtual-key pool's numbers -- and checks, after every
call:

* an exception is a clean one (:data:`CLEAN`);
* after an exception, the rights (``pkey_get``) of every allocated key,
  the allocated keys and ``probe()`` of every tagged page and open buffer
  are what they were before the call;
* outside every scope and block, memory tagged with a key that denies
  access (write), and every open buffer whose key denies access or that
  holds none, cannot be read (written);
* on hardware, ``ProtectionKey:`` in /proc/self/smaps is the key each page
  was tagged with;
* at the end of each case, after closing what it made: no descriptor,
  mapping or key (the package's, the pool's or the kernel's) is left over.

The raw layers (``pkeys.sys``, ``pkeys.glibc``, ``pkeys.pkru.write``) are
left out: they can deny the process its own memory by design.

Each case runs in its own forked worker process that holds the objects and
makes the calls; the state machine here only draws them and sends them
over.  A worker that dies (SIGSEGV, SIGILL, an abort) or hangs fails the
case with the calls that led there, and hypothesis shrinks it like any
other failure.

``PKEYS_FUZZ_EXAMPLES=N`` runs N cases (randomised, with hypothesis's
reproduction blob printed on failure) instead of the suite's small,
derandomised count, and ``PKEYS_FUZZ_STEPS=N`` makes each case up to N
calls long (default 10).  Hypothesis keeps no database (``database=None``).
"""

from __future__ import annotations

import copy
import errno
import gc
import mmap
import os
import pickle
import select
import signal
import struct
import tempfile
import traceback
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

import pkeys
from pkeys import _api
from pkeys._binding import lib

pytestmark = pytest.mark.anybackend

PAGE = mmap.PAGESIZE
HARDWARE = pkeys.backend() == "hardware"
EMULATED = pkeys._select.emulated()
LONG_RUN = int(os.environ.get("PKEYS_FUZZ_EXAMPLES", "0"))
EXAMPLES = LONG_RUN or (6 if EMULATED else 150)  # the emulated tier is CI's long pole
# Calls per case at most; PKEYS_FUZZ_STEPS=N changes it for a long run.
STEPS = int(os.environ.get("PKEYS_FUZZ_STEPS", "10"))
# Seconds a worker may take for one call (a hang fails the case).
CALL_TIMEOUT = 120 if EMULATED else 30
CLEAN = (TypeError, ValueError, OSError, pkeys.PkeysError, BufferError)
SLOTS = 3

# -- hostile values ------------------------------------------------------------
HUGE = [-2**64, -2**31 - 1, -1, 2**31, 2**32, 2**63, 2**64, 2**100]
NOT_INTS = [None, 1.5, "1", b"1", True, float("nan")]
slot = st.integers(0, SLOTS - 1)
key_arg = st.one_of(
    st.sampled_from([0, 1, 7, 15, 16, *HUGE, *NOT_INTS]),
    st.tuples(st.sampled_from(["key", "keyno", "pool", "bufkey", "raw"]), slot),
)
rights_arg = st.sampled_from([0, 1, 2, 3, 0, 1, 2, 3, 4, -1, 2**32, *NOT_INTS])
prot_arg = st.sampled_from([0, 1, 2, 3, 4, 5, 7, 3, 3, 8, -1, 2**40, *NOT_INTS])
# Lengths for buffer targets, which are checked against the buffer's size;
# an int address is only ever given its own mapping's length or less
# (beyond it lies memory the caller does not own: the contract of an int).
length_arg = st.sampled_from([None, None, PAGE, 2 * PAGE, 1, 0, -1, PAGE + 1, *HUGE, 1.0])
address_length = st.sampled_from([1, PAGE, PAGE - 1, 0, -1, -PAGE, None])
offset_arg = st.sampled_from([0, 0, 1, 7, 39, 40, 41, 4095, 4096, -1, *HUGE, "0", None])
size_arg = st.sampled_from([1, 8, 40, 40, PAGE, PAGE - 16, 2 * PAGE + 1, 0, -1, 2**40 + 1,
                            2**64, 1.0, None, "8", True])
target_arg = st.one_of(
    st.tuples(st.sampled_from(["map", "mapaddr", "mapview", "buf", "bufaddr", "bufpage",
                               "blockview", "released", "bytes", "bytearray"]), slot),
    st.sampled_from([0, PAGE, 2**47 - PAGE, 2**64 - PAGE, 2**64, -PAGE, None, 1.5]),
)
data_arg = st.one_of(
    st.tuples(st.sampled_from(["bytes", "bytearray", "map", "mapview", "blockview",
                               "released", "buf"]), slot),
    st.sampled_from([None, 5, "text", b"", b"x" * 41]),
)
fd_arg = st.one_of(
    st.tuples(st.just("fd"), st.sampled_from(["file", "empty", "dir", "devnull", "closed"])),
    st.sampled_from([-1, 2**31, 2**31 - 1, 2**63, -2**63, 999_999, None, 1.5, True]),
)
path_arg = st.one_of(
    fd_arg,
    st.tuples(st.just("path"), st.sampled_from(["file", "empty", "dir", "missing", "long"])),
    st.sampled_from([b"", "", "\0", 3.0]),
)
timeout_arg = st.sampled_from([1.0, 0.0, -1.0, 1e300, float("nan"), float("inf"), None, "1"])
pkru_arg = st.sampled_from([0, 0x55555554, 0x55555550, 0xFFFFFFFC, 0xFFFFFFFF, 1, 3,
                            0x0000000C, -1, 2**32, 2**64, None, 1.5])
buffer_options = st.fixed_dictionaries({}, optional={
    "key": key_arg,
    "label": st.sampled_from(["api", "", "x" * 200, "a\0b", "\u00e9\u00e9", b"raw", 5]),
    "lock_memory": st.sampled_from([True, False, 0, "yes", None]),
    "secretmem": st.sampled_from([None, False, True, 1, "no"]),
    # seal=True works on 6.10+ hardware and keeps its mapping and key for
    # the rest of the process by design: only the refusals are drawn there.
    "seal": st.sampled_from([False, 1, "yes", None] + ([] if HARDWARE else [True])),
})


# -- the worker: holds the objects, makes the calls, checks -------------------
class World:
    """What one case made, and the model the checks use."""

    def __init__(self, directory: str) -> None:
        self.keys: list[pkeys.Key | None] = [None] * SLOTS
        self.key_numbers = [3] * SLOTS  # a slot's last key number, kept after close
        self.retired: list[pkeys.Key] = []  # replaced in their slot, closed at the end
        self.raw: list[tuple[int, int]] = []  # (number, identity) from pkey_alloc
        self.buffers: list[pkeys.ProtectedBuffer | None] = [None] * SLOTS
        self.all_buffers: list[pkeys.ProtectedBuffer] = []
        self.maps: list[mmap.mmap | None] = [None] * SLOTS
        self.all_maps: list[mmap.mmap] = []
        self.spans: list[tuple[int, int]] = []  # every mapping made: none may outlive the case
        self.page_keys: dict[tuple[int, int], int] = {}  # (map slot, page) -> key number
        self.scopes: list[Any] = []  # every scope made (from allow(), deny())
        self.entered: list[Any] = []  # active entries, scopes and blocks alike
        self.blocks: list[tuple[Any, memoryview]] = []  # (Unlocked, view) ever entered
        self.released = memoryview(b"x")
        self.released.release()
        self.directory = directory
        self.paths = {"file": os.path.join(directory, "file"),
                      "empty": os.path.join(directory, "empty"),
                      "dir": directory, "missing": os.path.join(directory, "missing"),
                      "long": os.path.join(directory, "x" * 300)}
        with open(self.paths["file"], "wb") as out:
            out.write(b"-----BEGIN KEY----- 0123456789 -----END KEY-----\n")
        open(self.paths["empty"], "wb").close()
        self.fds = {"file": os.open(self.paths["file"], os.O_RDONLY),
                    "empty": os.open(self.paths["empty"], os.O_RDONLY),
                    "dir": os.open(directory, os.O_RDONLY),
                    "devnull": os.open(os.devnull, os.O_RDWR)}
        closed = os.open(os.devnull, os.O_RDONLY)
        os.close(closed)
        self.fds["closed"] = closed
        self.fds_at_start = set(os.listdir("/proc/self/fd"))
        self.keys_at_start = pkeys.allocated_keys()
        self.kernel_keys_at_start = kernel_free_keys()

    # -- arguments ------------------------------------------------------------
    def value(self, token: Any) -> Any:
        if not isinstance(token, tuple):
            return token
        kind, index = token
        if kind == "key":
            return self.keys[index]
        if kind == "keyno":
            return self.key_numbers[index]
        if kind == "pool":
            pool = pkeys.virtual_key_stats()["pkeys"]
            return pool[index % len(pool)] if pool else 14
        if kind == "bufkey":
            buffer = self.buffers[index]
            return buffer.pkey if buffer is not None and not buffer.closed else 13
        if kind == "raw":
            return self.raw[index % len(self.raw)][0] if self.raw else 12
        if kind == "map":
            return self.maps[index]
        if kind == "mapaddr":
            memory = self.maps[index]
            return address_of(memory) if memory is not None and not memory.closed else 0
        if kind == "mapview":
            memory = self.maps[index]
            if memory is None or memory.closed:
                return self.released
            view = memoryview(memory)
            self.temporary.append(view)
            return view
        if kind == "buf":
            return self.buffers[index]
        if kind in ("bufaddr", "bufpage"):
            buffer = self.buffers[index]
            if buffer is None or buffer.closed:
                return 0
            return buffer.address if kind == "bufaddr" else buffer.address & ~(PAGE - 1)
        if kind == "blockview":
            return self.blocks[index % len(self.blocks)][1] if self.blocks else self.released
        if kind == "released":
            return self.released
        if kind == "bytes":
            return b"s" * (8, 40, PAGE)[index]
        if kind == "bytearray":
            return bytearray((8, 40, PAGE)[index])
        if kind == "fd":
            return self.fds[index]
        if kind == "path":
            return self.paths[index]
        raise AssertionError(f"unknown token {token!r}")

    def target_map(self, token: Any) -> int | None:
        """The map slot a target token names, if it is a live mapping."""
        if isinstance(token, tuple) and token[0] in ("map", "mapaddr", "mapview"):
            memory = self.maps[token[1]]
            if memory is not None and not memory.closed:
                return token[1]
        return None

    # -- one call -------------------------------------------------------------
    def run(self, name: str, args: tuple[Any, ...]) -> str:
        self.temporary: list[memoryview] = []
        before = self.observe()
        try:
            outcome = getattr(self, "op_" + name)(*args)
        except CLEAN as exc:
            outcome = f"raised {type(exc).__name__}: {exc}"
            after = self.observe()
            assert after == before, (
                f"{name}{args!r} raised {type(exc).__name__} ({exc}) but changed the state:\n"
                f"  before {before}\n  after  {after}")
        except Exception as exc:
            raise AssertionError(f"{name}{args!r} raised an unclean {type(exc).__name__}: "
                                 f"{exc}") from exc
        finally:
            for view in self.temporary:
                view.release()
        self.check()
        return "" if outcome is None else str(outcome)[:200]

    def observe(self) -> dict[str, Any]:
        """What a refused call must leave as it was.  The virtual-key pool's
        keys are left out: a buffer operation that reached the kernel (a
        read_from() that gets EISDIR) took its buffer's pool key first, as
        any use does, and the pool keeps it as a cache until eviction or
        close (the end of the case checks that none is left)."""
        pool = set(pkeys.virtual_key_stats()["pkeys"])
        allocated = [k for k in pkeys.allocated_keys() if k not in pool]
        pages = {}
        for (index, page), _ in sorted(self.page_keys.items()):
            address = address_of(self.maps[index]) + page * PAGE
            pages[(index, page)] = readable(address)
        buffers = {i: readable(b.address) for i, b in enumerate(self.all_buffers) if not b.closed}
        return {"keys": allocated, "rights": {k: int(pkeys.pkey_get(k)) for k in allocated},
                "pages": pages, "buffers": buffers}

    def check(self) -> None:
        """The invariants that hold after any call."""
        if not self.entered:  # outside every scope and block
            for (index, page), pkey in self.page_keys.items():
                rights = pkeys.pkey_get(pkey)
                address = address_of(self.maps[index]) + page * PAGE
                if rights & pkeys.PKEY_DISABLE_ACCESS:
                    assert pkeys.probe(address) is not None, (
                        f"page {page} of map {index}, tagged with denied key {pkey}, is readable")
                if rights:
                    assert pkeys.probe(address, write=True) is not None, (
                        f"page {page} of map {index}, tagged with key {pkey} ({rights!r}), "
                        "is writable")
            for buffer in self.all_buffers:
                if buffer.closed:
                    continue
                pkey = buffer.pkey
                if pkey is None or pkeys.pkey_get(pkey) & pkeys.PKEY_DISABLE_ACCESS:
                    assert pkeys.probe(buffer) is not None, (
                        f"{buffer!r} (key {pkey}) is readable outside every block")
        if HARDWARE:
            self.check_smaps()

    def check_smaps(self) -> None:
        vmas = smaps_keys()
        expected: dict[int, int] = {}
        for index, memory in enumerate(self.maps):
            if memory is not None and not memory.closed:
                for page in range(len(memory) // PAGE):
                    expected[address_of(memory) + page * PAGE] = self.page_keys.get((index, page), 0)
        for buffer in self.all_buffers:
            if not buffer.closed:
                mapping = buffer._mapping
                pkey = buffer.pkey
                for page in range(mapping.inner, mapping.inner + mapping.inner_length, PAGE):
                    expected[page] = 0 if pkey is None else pkey
                expected[mapping.base] = 0  # the guard pages
                expected[mapping.inner + mapping.inner_length] = 0
        for address, pkey in expected.items():
            shown = next((k for start, end, k in vmas if start <= address < end), None)
            assert shown == pkey, (
                f"smaps shows ProtectionKey {shown} at {address:#x}, expected {pkey}")

    # -- module functions -------------------------------------------------------
    def op_pkey_alloc(self, flags: Any, rights: Any) -> Any:
        pkey = pkeys.pkey_alloc(self.value(flags), self.value(rights))
        self.raw.append((pkey, lib.pk_key_identity(pkey)))
        return pkey

    def op_pkey_free(self, pkey: Any) -> None:
        pkeys.pkey_free(self.value(pkey))

    def op_pkey_get(self, pkey: Any) -> Any:
        return pkeys.pkey_get(self.value(pkey))

    def op_pkey_set(self, pkey: Any, rights: Any, threads: Any) -> None:
        if threads is None:
            pkeys.pkey_set(self.value(pkey), self.value(rights))
        else:
            pkeys.pkey_set(self.value(pkey), self.value(rights), threads=threads)

    def op_pkey_mprotect(self, target: Any, length: Any, prot: Any, pkey: Any) -> None:
        if isinstance(target, tuple) and target[0] in ("mapaddr", "bufpage", "bufaddr"):
            length = self.int_length(target, length)
        number = self.value(pkey)
        pkeys.pkey_mprotect(self.value(target), self.value(length), self.value(prot), number)
        self.tagged(target, length, int(number))

    def int_length(self, target: Any, length: Any) -> Any:
        """An int address's length, never beyond its own memory."""
        if target[0] == "mapaddr":
            memory = self.maps[target[1]]
            size = len(memory) if memory is not None and not memory.closed else PAGE
        else:
            size = PAGE
        return size if length is None or (isinstance(length, int) and length > size) else length

    def tagged(self, target: Any, length: Any, pkey: int) -> None:
        index = self.target_map(target)
        if index is None:
            return
        memory = self.maps[index]
        assert memory is not None
        pages = len(memory) // PAGE if length is None else -(-length // PAGE)
        for page in range(pages):
            if pkey:
                self.page_keys[(index, page)] = pkey
            else:
                self.page_keys.pop((index, page), None)

    def op_rdpkru(self) -> int:
        return pkeys.rdpkru()

    def op_wrpkru(self, value: Any) -> None:
        pkeys.wrpkru(value)

    def op_queries(self) -> str:
        return repr((pkeys.allocated_keys(), pkeys.hardware_supported(), pkeys.backend(),
                     pkeys.backend_reason()[:20], pkeys.virtual_key_stats()))

    def op_virtual_key_limit(self, limit: Any) -> int:
        return pkeys.virtual_key_limit(limit) if limit != "read" else pkeys.virtual_key_limit()

    def op_allow(self, keys: tuple[Any, ...], write: Any) -> None:
        scope = pkeys.allow(*(self.value(k) for k in keys), write=write)
        self.scopes.append(scope)
        self.enter(scope)

    def op_probe(self, target: Any, write: Any, offset: Any) -> Any:
        return pkeys.probe(self.value(target), write, offset=self.value(offset))

    def op_prompt(self, size: Any, tty: Any) -> None:
        # Never the default tty (/dev/tty would wait for a person).
        buffer = pkeys.prompt("> ", self.value(size), tty=self.value(tty))
        self.keep_buffer(0, buffer)

    def op_rights_enum(self, value: Any) -> Any:
        return pkeys.PkeyRights(value)

    # -- Key --------------------------------------------------------------------
    def op_key_new(self, index: int, rights: Any) -> None:
        key = pkeys.Key(self.value(rights))
        old = self.keys[index]
        if old is not None:
            self.retired.append(old)
        self.keys[index] = key
        self.key_numbers[index] = key.pkey

    def op_key_method(self, index: int, method: str, arg: Any) -> Any:
        key = self.keys[index]
        if key is None:
            return "no key"
        if method == "rights=":
            key.rights = self.value(arg)
            return None
        if method == "protect":
            target, length, prot = arg
            if isinstance(target, tuple) and target[0] in ("mapaddr", "bufpage", "bufaddr"):
                length = self.int_length(target, length)
            key.protect(self.value(target), self.value(length), self.value(prot))
            self.tagged(target, length, key.pkey)
            return None
        if method in ("allow", "deny"):
            scope = key.allow(arg) if method == "allow" else key.deny()
            self.scopes.append(scope)
            self.enter(scope)
            return None
        if method == "revoke":
            return key.revoke(self.value(arg))
        if method == "copy":
            return (copy.copy, copy.deepcopy, pickle.dumps)[arg % 3](key)
        if method == "with":
            with key:
                pass
            return None
        if method == "repr":
            return repr(key)
        return getattr(key, method)() if method in ("close", "__index__", "__int__") \
            else getattr(key, method)

    # -- scopes and blocks --------------------------------------------------------
    def enter(self, scope: Any) -> Any:
        entered = scope.__enter__()
        self.entered.append(scope)
        return entered

    def op_scope_again(self, which: int) -> None:
        """Enter a scope made earlier again (it may have ended, or its key closed)."""
        if self.scopes:
            self.enter(self.scopes[which % len(self.scopes)])

    def op_exit(self, which: int, latest: bool) -> None:
        """End an active entry (the latest, as ``with`` does, or any, as tasks
        may), or one that is no longer active (ScopeError expected)."""
        if latest and self.entered:
            scope = self.entered[-1]
        else:
            candidates = self.scopes + [u for u, _ in self.blocks]
            if not candidates:
                return
            scope = candidates[which % len(candidates)]
        scope.__exit__(None, None, None)
        if scope in self.entered:
            # The newest entry of that object is the one withdrawn.
            del self.entered[len(self.entered) - 1 - self.entered[::-1].index(scope)]

    # -- ProtectedBuffer ------------------------------------------------------------
    def keep_buffer(self, index: int, buffer: pkeys.ProtectedBuffer) -> None:
        self.buffers[index] = buffer
        self.all_buffers.append(buffer)
        mapping = buffer._mapping
        self.spans.append((mapping.base, mapping.base + mapping.map_length))

    def options(self, options: dict[str, Any]) -> dict[str, Any]:
        return {name: self.value(v) for name, v in options.items()}

    def op_buffer_new(self, index: int, size: Any, options: dict[str, Any]) -> None:
        self.keep_buffer(index, pkeys.ProtectedBuffer(self.value(size), **self.options(options)))

    def op_from_file(self, index: int, source: Any, size: Any, options: dict[str, Any]) -> None:
        buffer = pkeys.ProtectedBuffer.from_file(self.value(source), self.value(size),
                                                 **self.options(options))
        self.keep_buffer(index, buffer)
        if isinstance(source, tuple) and source[0] == "fd":
            os.lseek(self.fds[source[1]], 0, os.SEEK_SET)

    def op_buffer_method(self, index: int, method: str, args: tuple[Any, ...]) -> Any:
        buffer = self.buffers[index]
        if buffer is None:
            return "no buffer"
        values = [self.value(a) for a in args]
        if method == "unlocked":
            block = buffer.unlocked(*values)
            view = self.enter(block)
            self.blocks.append((block, view))
            return None
        if method == "readinto":
            return buffer.readinto(*values)
        if method == "write":
            return buffer.write(*values)
        if method == "read_from":
            try:
                return buffer.read_from(*values)
            finally:
                if isinstance(args[0], tuple) and args[0][0] == "fd":
                    os.lseek(self.fds[args[0][1]], 0, os.SEEK_SET)
        if method == "close":
            return buffer.close()
        if method == "len":
            return len(buffer)
        if method == "copy":
            return (copy.copy, copy.deepcopy, pickle.dumps)[args[0] % 3](buffer)
        if method == "with":
            with buffer:
                pass
            return None
        if method == "repr":
            return repr(buffer)
        return getattr(buffer, method)

    # -- mappings the caller owns ---------------------------------------------------
    def op_map_new(self, index: int, kind: str) -> None:
        if kind == "read-only file":
            with open(self.paths["file"], "rb") as source:
                memory = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)
        elif kind == "PROT_NONE":
            memory = mmap.mmap(-1, PAGE, prot=0)
        else:
            memory = mmap.mmap(-1, PAGE * (2 if kind == "two pages" else 1),
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.close_map(index)
        self.maps[index] = memory
        self.all_maps.append(memory)
        self.spans.append((address_of(memory), address_of(memory) + len(memory)))

    def op_map_close(self, index: int) -> None:
        self.close_map(index)

    def close_map(self, index: int) -> None:
        """What the caller owes before unmapping memory it tagged through an
        int address: key 0 again.  Then the mapping goes."""
        memory = self.maps[index]
        if memory is None or memory.closed:
            return
        if any(slot == index for slot, _ in self.page_keys):
            pkeys.pkey_mprotect(address_of(memory), len(memory), pkeys.PROT_READ, 0)
            self.page_keys = {k: v for k, v in self.page_keys.items() if k[0] != index}
        memory.close()

    # -- the end of a case ----------------------------------------------------------
    def finish(self) -> str:
        while self.entered:
            self.entered[-1].__exit__(None, None, None)
            self.entered.pop()
        for index in range(SLOTS):
            self.close_map(index)
        for buffer in self.all_buffers:
            buffer.close()
        for key in self.keys + self.retired:
            if key is not None:
                key.close()
        for number, identity in self.raw:
            if lib.pk_key_identity(number) == identity:
                pkeys.pkey_free(number)
        for fd in (v for k, v in self.fds.items() if k != "closed"):
            os.close(fd)
        self.blocks.clear()
        self.scopes.clear()
        leftovers = []
        if pkeys.allocated_keys() != self.keys_at_start:
            leftovers.append(f"keys {pkeys.allocated_keys()} (at the start {self.keys_at_start})")
        if pkeys.virtual_key_stats()["keys"]:
            leftovers.append(f"pool keys {pkeys.virtual_key_stats()}")
        if _api.regions():
            leftovers.append(f"tracked regions {_api.regions()}")
        fds = set(os.listdir("/proc/self/fd")) - self.fds_at_start
        fds.discard(str(self.fds["closed"]))  # the number reused by the probe of the list
        if fds - set(map(str, self.fds.values())):
            leftovers.append(f"descriptors {sorted(fds)}")
        for start, end, name in mappings():
            if "secretmem" in name or any(s <= start and end <= e for s, e in self.spans):
                leftovers.append(f"mapping {start:#x}-{end:#x} {name}")
        if kernel_free_keys() != self.kernel_keys_at_start:
            leftovers.append(f"the kernel has {kernel_free_keys()} free keys, "
                             f"{self.kernel_keys_at_start} at the start")
        assert not leftovers, "left over after the case: " + "; ".join(leftovers)
        return "clean"


def address_of(memory: mmap.mmap) -> int:
    from pkeys._binding import ffi

    pin = ffi.from_buffer(memory)
    try:
        return int(ffi.cast("uintptr_t", pin))
    finally:
        ffi.release(pin)


def readable(address: int) -> tuple[bool, bool]:
    return pkeys.probe(address) is None, pkeys.probe(address, write=True) is None


def mappings() -> list[tuple[int, int, str]]:
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append((start, end, fields[5].strip() if len(fields) > 5 else ""))
    return found


def smaps_keys() -> list[tuple[int, int, int]]:
    """``(start, end, ProtectionKey)`` of every VMA."""
    vmas: list[tuple[int, int, int]] = []
    start = end = 0
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0] if line.strip() else ""
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
            elif head == "ProtectionKey:":
                vmas.append((start, end, int(line.split()[1])))
    return vmas


def kernel_free_keys() -> int:
    """How many keys the kernel would still hand out (raw pkey_alloc until
    ENOSPC, then free): catches a key the package forgot it had.  0 where
    there is no PKU."""
    if not HARDWARE:
        return 0
    got = []
    try:
        while True:
            got.append(pkeys.sys.pkey_alloc(0, pkeys.PKEY_DISABLE_ACCESS))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EINVAL):
            raise
    for pkey in got:
        pkeys.sys.pkey_free(pkey)
    return len(got)


def serve(requests: int, replies: int, directory: str) -> None:  # pragma: no cover - the worker
    """The worker's loop: a call in, its outcome (or the failure) out."""
    world = None
    try:
        world = World(directory)
        send(replies, ("ok", "ready"))
        while True:
            name, args = receive(requests)
            try:
                outcome = world.finish() if name == "finish" else world.run(name, args)
            except BaseException:
                send(replies, ("fail", traceback.format_exc()))
                return
            send(replies, ("ok", outcome))
            if name == "finish":
                return
    except BaseException:
        send(replies, ("fail", traceback.format_exc()))


def send(fd: int, message: object) -> None:
    data = pickle.dumps(message)
    os.write(fd, struct.pack("<I", len(data)) + data)


def receive(fd: int, timeout: float | None = None) -> Any:
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            if timeout is not None and not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(fd, count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    (length,) = struct.unpack("<I", exactly(4))
    return pickle.loads(exactly(length))


# -- the state machine: draws calls, sends them to the worker ------------------
class PublicApiFuzz(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []
        self.directory = tempfile.mkdtemp(prefix="pkeys-fuzz-")
        self.log = tempfile.TemporaryFile()
        requests_read, self.requests = os.pipe()
        self.replies, replies_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the worker
            status = 1
            try:
                # The collector would otherwise walk (and so copy, page by
                # page) every object of the test process: seconds per case
                # on the emulated CPU.
                gc.freeze()
                os.close(self.requests)
                os.close(self.replies)
                os.dup2(self.log.fileno(), 2)
                serve(requests_read, replies_write, self.directory)
                status = 0
            finally:
                os._exit(status)
        os.close(requests_read)
        os.close(replies_write)
        self.expect(self.reply())

    def reply(self) -> tuple[str, str]:
        try:
            return receive(self.replies, CALL_TIMEOUT)
        except TimeoutError:
            os.kill(self.pid, signal.SIGKILL)
            self.fail(f"the worker did not answer within {CALL_TIMEOUT} s (hung)")
        except EOFError:
            self.fail("the worker died")
        raise AssertionError("unreachable")

    def fail(self, what: str) -> None:
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        how = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
               if os.WIFSIGNALED(status) else f"exit status {os.WEXITSTATUS(status)}")
        self.log.seek(0)
        stderr = self.log.read().decode(errors="replace")[-4000:]
        raise AssertionError(f"{what} ({how}) after the calls:\n  " + "\n  ".join(self.sent)
                             + f"\nworker stderr:\n{stderr}")

    def expect(self, answer: tuple[str, str]) -> str:
        verdict, text = answer
        if verdict != "ok":
            os.waitpid(self.pid, 0)  # it exits after reporting
            self.pid = 0
            raise AssertionError(text + "\nafter the calls:\n  " + "\n  ".join(self.sent))
        return text

    def call(self, name: str, *args: Any) -> None:
        self.sent.append(f"{name}{args!r}")
        send(self.requests, (name, args))
        outcome = self.expect(self.reply())
        self.sent[-1] += f" -> {outcome}" if outcome else ""

    # Each rule is one public function or method, its arguments drawn hostile.
    @rule(flags=st.sampled_from([0, 0, 0, 1, -1, 2**64, None]), rights=rights_arg)
    def pkey_alloc(self, flags, rights):
        self.call("pkey_alloc", flags, rights)

    @rule(pkey=key_arg)
    def pkey_free(self, pkey):
        self.call("pkey_free", pkey)

    @rule(pkey=key_arg)
    def pkey_get(self, pkey):
        self.call("pkey_get", pkey)

    @rule(pkey=key_arg, rights=rights_arg,
          threads=st.sampled_from([None, "current", "all", "some", 1]))
    def pkey_set(self, pkey, rights, threads):
        self.call("pkey_set", pkey, rights, threads)

    @rule(where=target_arg, length=length_arg, prot=prot_arg, pkey=key_arg)
    def pkey_mprotect(self, where, length, prot, pkey):
        self.call("pkey_mprotect", where, length, prot, pkey)

    @rule(where=st.tuples(st.sampled_from(["mapaddr", "bufpage"]), slot),
          length=address_length, prot=prot_arg, pkey=key_arg)
    def pkey_mprotect_address(self, where, length, prot, pkey):
        self.call("pkey_mprotect", where, length, prot, pkey)

    @rule()
    def rdpkru(self):
        self.call("rdpkru")

    @rule(value=pkru_arg)
    def wrpkru(self, value):
        self.call("wrpkru", value)

    @rule()
    def queries(self):
        self.call("queries")

    @rule(limit=st.sampled_from(["read", None, 1, 2, 8, 15, 0, 16, -1, 2**64, 1.5]))
    def virtual_key_limit(self, limit):
        self.call("virtual_key_limit", limit)

    @rule(keys=st.lists(key_arg, max_size=3).map(tuple), write=st.sampled_from([True, False, 1]))
    def allow(self, keys, write):
        self.call("allow", keys, write)

    @rule(where=target_arg, write=st.booleans(), offset=offset_arg)
    def probe(self, where, write, offset):
        self.call("probe", where, write, offset)

    @rule(size=size_arg, tty=st.one_of(
        st.tuples(st.just("fd"), st.sampled_from(["file", "devnull", "closed"])),
        st.tuples(st.just("path"), st.sampled_from(["file", "missing", "dir"])),
        st.sampled_from([-1, 2**31, 1.5])))
    def prompt(self, size, tty):
        self.call("prompt", size, tty)

    @rule(value=st.sampled_from([0, 1, 2, 3, 4, -1, 2**64, "1", None]))
    def rights_enum(self, value):
        self.call("rights_enum", value)

    @rule(index=slot, rights=rights_arg)
    def key_new(self, index, rights):
        self.call("key_new", index, rights)

    @rule(index=slot, method=st.sampled_from(
        ["pkey", "__index__", "__int__", "identity", "closed", "rights", "close", "repr", "with"]))
    def key_query(self, index, method):
        self.call("key_method", index, method, None)

    @rule(index=slot, rights=rights_arg)
    def key_set_rights(self, index, rights):
        self.call("key_method", index, "rights=", rights)

    @rule(index=slot, where=target_arg, length=length_arg, prot=prot_arg)
    def key_protect(self, index, where, length, prot):
        self.call("key_method", index, "protect", (where, length, prot))

    @rule(index=slot, where=st.tuples(st.sampled_from(["mapaddr", "bufpage"]), slot),
          length=address_length, prot=prot_arg)
    def key_protect_address(self, index, where, length, prot):
        self.call("key_method", index, "protect", (where, length, prot))

    @rule(index=slot, method=st.sampled_from(["allow", "deny"]), write=st.booleans())
    def key_scope(self, index, method, write):
        self.call("key_method", index, method, write)

    @rule(index=slot, timeout=timeout_arg)
    def key_revoke(self, index, timeout):
        self.call("key_method", index, "revoke", timeout)

    @rule(index=slot, how=st.integers(0, 2))
    def key_copy(self, index, how):
        self.call("key_method", index, "copy", how)

    @rule(which=st.integers(0, 20))
    def scope_again(self, which):
        self.call("scope_again", which)

    @rule(which=st.integers(0, 20), latest=st.booleans())
    def exit(self, which, latest):
        self.call("exit", which, latest)

    @rule(index=slot, size=size_arg, options=buffer_options)
    def buffer_new(self, index, size, options):
        self.call("buffer_new", index, size, options)

    @rule(index=slot, source=path_arg, size=st.sampled_from([None, 100, 8, 1, 0, -1, 2**64]),
          options=buffer_options)
    def from_file(self, index, source, size, options):
        self.call("from_file", index, source, size, options)

    @rule(index=slot, method=st.sampled_from(
        ["size", "label", "key", "pkey", "backing", "sealed", "locked", "closed", "address",
         "len", "repr", "close", "with"]))
    def buffer_query(self, index, method):
        self.call("buffer_method", index, method, ())

    @rule(index=slot, write=st.sampled_from([False, True, 1, None]))
    def buffer_unlocked(self, index, write):
        self.call("buffer_method", index, "unlocked", (write,))

    @rule(index=slot, dest=data_arg, offset=offset_arg)
    def buffer_readinto(self, index, dest, offset):
        self.call("buffer_method", index, "readinto", (dest, offset))

    @rule(index=slot, data=data_arg, offset=offset_arg)
    def buffer_write(self, index, data, offset):
        self.call("buffer_method", index, "write", (data, offset))

    @rule(index=slot, fd=fd_arg, offset=offset_arg)
    def buffer_read_from(self, index, fd, offset):
        self.call("buffer_method", index, "read_from", (fd, offset))

    @rule(index=slot, how=st.integers(0, 2))
    def buffer_copy(self, index, how):
        self.call("buffer_method", index, "copy", (how,))

    @rule(index=slot, kind=st.sampled_from(
        ["one page", "two pages", "read-only file", "PROT_NONE"]))
    def map_new(self, index, kind):
        self.call("map_new", index, kind)

    @rule(index=slot)
    def map_close(self, index):
        self.call("map_close", index)

    def teardown(self) -> None:
        try:
            if self.pid:
                send(self.requests, ("finish", ()))
                self.sent.append("finish (close everything, look for leftovers)")
                self.expect(self.reply())
                _, status = os.waitpid(self.pid, 0)
                self.pid = 0
                assert status == 0, f"the worker ended with wait status {status:#x}"
        finally:
            if self.pid:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            os.close(self.requests)
            os.close(self.replies)
            self.log.close()
            for name in os.listdir(self.directory):
                os.unlink(os.path.join(self.directory, name))
            os.rmdir(self.directory)


PublicApiFuzz.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    database=None,
    # The suite's run is the same every time; a long run explores, and
    # prints the blob that reproduces a failure.
    derandomize=not LONG_RUN,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
test_public_api_fuzz = PublicApiFuzz.TestCase
