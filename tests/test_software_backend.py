"""The mprotect emulation: same API, enforced with page protections."""

from __future__ import annotations

import errno
import gc
import mmap
import threading

import pytest

import pkeys
from pkeys import _state
from pkeys._binding import lib
from pkeys._binding import ffi
from pkeys._child import run_in_child
from pkeys._fault import FaultKind

from ._libc import address_of, allocate_until_enospc

pytestmark = pytest.mark.software
PAGE = mmap.PAGESIZE


def test_initial_register_is_the_kernels_init_value():
    assert pkeys.rdpkru() & ~sum(3 << 2 * k for k in pkeys.allocated_keys()) == 0x55555554


def test_rights_are_enforced_with_mprotect(key, page):
    page[0] = 42
    key.protect(page)
    fault = pkeys.probe(page)
    assert fault is not None and fault.kind is FaultKind.PROTECTION and fault.si_code == 2
    assert fault.address == address_of(page)
    with key.allow(write=False):
        assert pkeys.probe(page) is None
        assert page[0] == 42
        assert pkeys.probe(page, write=True).kind is FaultKind.PROTECTION
    with key.allow():
        assert pkeys.probe(page, write=True) is None
        page[0] = 43
    assert pkeys.probe(page) is not None
    with key.allow():
        assert page[0] == 43


def test_denied_access_kills_a_child_with_sigsegv(key, page):
    key.protect(page)
    result = run_in_child(lambda: page[0])
    assert result.segfaulted, result
    with key.allow():
        assert run_in_child(lambda: page[0]).exitcode == 0


def test_effective_prot_fails_closed_on_exec_and_drops_what_the_rights_deny():
    rwx = pkeys.PROT_READ | pkeys.PROT_WRITE | pkeys.PROT_EXEC
    effective = lib.pk_effective_prot
    assert effective(rwx, 0) == rwx
    assert effective(rwx, pkeys.PKEY_DISABLE_WRITE) == pkeys.PROT_READ | pkeys.PROT_EXEC
    # x86 without PKU cannot express execute-without-read: denied means nothing.
    assert effective(rwx, pkeys.PKEY_DISABLE_ACCESS) == pkeys.PROT_NONE
    assert effective(pkeys.PROT_READ, 3) == pkeys.PROT_NONE


def test_rights_are_process_wide(key, page):
    key.protect(page)
    seen = []
    with key.allow():
        worker = threading.Thread(target=lambda: seen.append(pkeys.probe(page)))
        worker.start()
        worker.join()
    assert seen == [None]  # unlike PKU, where the other thread stays denied


def test_keys_run_out_with_enospc():
    allocated = allocate_until_enospc(pkeys.pkey_alloc)
    try:
        with pytest.raises(OSError) as info:
            pkeys.pkey_alloc()
        assert info.value.errno == errno.ENOSPC
        assert len(allocated) == 15 - len(set(pkeys.allocated_keys()) - set(allocated))
        assert 0 not in allocated and len(set(allocated)) == len(allocated)
    finally:
        for pkey in allocated:
            pkeys.pkey_free(pkey)


def test_initial_rights_come_from_pkey_alloc():
    pkey = pkeys.pkey_alloc(0, pkeys.PKEY_DISABLE_WRITE)
    try:
        assert pkeys.pkey_get(pkey) == pkeys.PKEY_DISABLE_WRITE
    finally:
        pkeys.pkey_free(pkey)


def test_register_is_rewritten_only_when_the_value_changes(key, page):
    key.protect(page)
    before = lib.pk_reprotections()
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)
    assert lib.pk_reprotections() == before
    pkeys.pkey_set(key, 0)
    assert lib.pk_reprotections() == before + 1
    pkeys.pkey_set(key, 0)
    assert lib.pk_reprotections() == before + 1
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)


def test_memory_released_by_its_owner_is_never_mprotected(key):
    memory = mmap.mmap(-1, PAGE)
    key.protect(memory)
    memory.close()  # the owner releases it: the kernel may reuse the range
    reused = mmap.mmap(-1, PAGE)
    before = lib.pk_reprotections()
    pkeys.pkey_set(key, 0)
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)
    assert lib.pk_reprotections() == before  # the closed owner's region was dropped
    assert pkeys.probe(reused, write=True) is None  # whoever got the range keeps its access
    reused.close()
    key.close()  # nothing live is guarded any more


def test_garbage_collected_owner_releases_the_key():
    k = pkeys.Key()
    memory = mmap.mmap(-1, PAGE)
    k.protect(memory)
    with pytest.raises(pkeys.KeyInUseError, match="still guards 1 tracked region"):
        k.close()
    assert not k.closed
    del memory
    gc.collect()
    k.close()
    assert k.closed


def test_close_is_blocked_while_the_package_reprotects(key, page):
    # While the software backend changes a region's protection it holds an
    # export of the owner, so close() from elsewhere cannot unmap it then.
    key.protect(page)
    [owner] = _state._owners.values()
    export = owner.pin()
    assert export is not None
    with pytest.raises(BufferError):
        page.close()
    ffi.release(export)


def owner_token(memory):
    [token] = [token for token, owner in _state._owners.items() if owner.ref() is memory]
    return token


def test_a_change_pins_only_the_owners_of_the_keys_it_changes(key, pages, monkeypatch):
    # Issue 16, item 4: tagged memory of other keys costs the change nothing.
    other = pkeys.Key()
    unrelated = [pages() for _ in range(10)]
    for memory in unrelated:
        other.protect(memory)
    mine = pages()
    key.protect(mine)
    # pkey_set pins in C (csrc/scope_type.c, pin_in_c): the owners it asks
    # C for are the ones it pins.
    pkeys.pkey_set(key, 0)
    mine[0] = 1  # applied
    assert lib.pk_pins_wanted() == 1 << key.pkey
    owners = ffi.new("uint64_t[]", 16)
    assert lib.pk_pins_owners(owners, 16) == 1 and owners[0] == owner_token(mine)
    # The general path, prepare_pins, pins the same ones.
    pinned = []
    pin = _state._Owner.pin
    monkeypatch.setattr(_state._Owner, "pin", lambda owner: pinned.append(owner.token)
                        or pin(owner))
    status = _state.call(lib.pk_key_set, key.pkey, key.identity, pkeys.PKEY_DISABLE_WRITE)
    assert status == 0 and pkeys.probe(mine) is None and pkeys.probe(mine, write=True) is not None
    assert len(set(pinned)) == 1 and pinned[0] == owner_token(mine)
    assert lib.pk_pins_wanted() == 1 << key.pkey
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)
    for memory in unrelated:
        pkeys.pkey_mprotect(memory, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
    other.close()


def test_the_c_call_checks_each_pinned_exports_address_and_length(key, pages):
    mine = pages(2)
    key.protect(mine)
    token = owner_token(mine)
    assert lib.pk_key_set(key.pkey, key.identity, 0, 0) == lib.PK_E_NEED_PINS  # nothing vouched
    assert lib.pk_pins_wanted() == 1 << key.pkey
    owners = ffi.new("uint64_t[]", 4)
    assert lib.pk_pins_owners(owners, 4) == 1 and owners[0] == token
    export = ffi.from_buffer(mine)
    start = int(ffi.cast("uintptr_t", export))
    try:
        wrong = [(token + 1, start, 2 * PAGE),   # another owner's export
                 (token, start + PAGE, PAGE),    # the right owner, not covering the region
                 (token, start, PAGE)]           # too short
        for pin in wrong:
            described = ffi.new("struct pk_pin[]", [pin])
            status = lib.pk_key_set(key.pkey, key.identity, 0, lib.pk_pins_vouch(described, 1))
            assert status == lib.PK_E_NEED_PINS, pin
            assert pkeys.probe(mine) is not None  # nothing applied
        described = ffi.new("struct pk_pin[]", [(token, start, 2 * PAGE)])
        stale = lib.pk_pins_vouch(described, 1)
        lib.pk_pins_vouch(described, 1)  # a later vouch replaces it
        assert lib.pk_key_set(key.pkey, key.identity, 0, stale) == lib.PK_E_NEED_PINS
        assert lib.pk_key_set(key.pkey, key.identity, 0, lib.pk_pins_vouch(described, 1)) == 0
        assert pkeys.probe(mine, write=True) is None
    finally:
        ffi.release(export)
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)


def test_raw_address_regions_stay_until_retagged(key, page):
    address = address_of(page)
    key.protect(address, PAGE)
    assert pkeys.probe(address) is not None
    with pytest.raises(pkeys.KeyInUseError):
        key.close()
    pkeys.pkey_mprotect(address, PAGE, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
    assert pkeys.probe(address, write=True) is None
    key.close()


def test_retagging_part_of_a_region_splits_it(pages):
    memory = pages(3)
    base = address_of(memory)
    with pkeys.Key() as outer, pkeys.Key() as middle:
        outer.protect(memory)
        middle.protect(base + PAGE, PAGE)
        with outer.allow():
            assert pkeys.probe(base) is None and pkeys.probe(base + 2 * PAGE) is None
            assert pkeys.probe(base + PAGE) is not None
        with middle.allow():
            assert pkeys.probe(base + PAGE) is None
            assert pkeys.probe(base) is not None
        pkeys.pkey_mprotect(memory, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)


def test_wrpkru_reapplies_every_changed_key(pages):
    memory = pages(2)
    base = address_of(memory)
    with pkeys.Key() as first, pkeys.Key() as second:
        first.protect(base, PAGE)
        second.protect(base + PAGE, PAGE)
        saved = pkeys.rdpkru()
        opened = pkeys.pkru.granting(saved, [first, second])
        pkeys.wrpkru(opened)
        assert pkeys.probe(base, write=True) is None and pkeys.probe(base + PAGE, write=True) is None
        pkeys.wrpkru(saved)
        assert pkeys.probe(base) is not None and pkeys.probe(base + PAGE) is not None
        pkeys.pkey_mprotect(memory, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)


def test_denied_exec_memory_is_not_readable(key, page):
    # Hardware keys never govern instruction fetch; without PKU the only way
    # to keep such memory unreadable is to take PROT_EXEC away too.
    def permissions() -> str:
        with open("/proc/self/maps") as maps:
            line = next(l for l in maps if l.startswith(f"{address_of(page):x}-"))
        return line.split()[1][:3]

    key.protect(page, prot=pkeys.PROT_READ | pkeys.PROT_EXEC)
    assert permissions() == "---"
    assert pkeys.probe(page) is not None
    with key.allow():
        assert permissions() == "r-x"
    assert permissions() == "---"


def _access(page: mmap.mmap) -> tuple[bool, bool]:
    return pkeys.probe(page) is None, pkeys.probe(page, write=True) is None


def _allows(rights: int) -> tuple[bool, bool]:
    return not rights & pkeys.PKEY_DISABLE_ACCESS, not rights & (pkeys.PKEY_DISABLE_ACCESS
                                                                  | pkeys.PKEY_DISABLE_WRITE)


@pytest.mark.parametrize("kind, base, in_force", [
    ("allow", pkeys.PKEY_DISABLE_ACCESS, pkeys.PKEY_UNRESTRICTED),
    ("deny", pkeys.PKEY_UNRESTRICTED, pkeys.PKEY_DISABLE_ACCESS),
    ("read-only", pkeys.PKEY_UNRESTRICTED, pkeys.PKEY_DISABLE_WRITE),
])
def test_a_forked_child_that_drops_its_grants_on_a_key_never_opens_it(kind, base, in_force,
                                                                      key, page):
    """Once a scope of the key has ended from another thread, a child forked
    inside a later scope cannot tell its thread's grants on the key from
    the others', so it drops them all.  Two defects there:
    - dropping a deny() or read-only grant opened the key in the child
      (found by an adversary): the child now keeps the stricter of the
      rights in force at the fork and those outside every scope;
    - the end of that scope in the child raised ScopeError ("ended more
      often than it was entered"): the child counts the drop as a
      revocation, which a scope's end withdraws nothing for."""
    key.protect(page)
    pkeys.pkey_set(key, base)
    crossed = key.allow()
    entering = threading.Thread(target=crossed.__enter__)
    entering.start()
    entering.join()
    with pytest.raises(pkeys.ScopeError):  # ended anyway, and reported
        crossed.__exit__(None, None, None)
    kept = _allows(in_force | base)  # the stricter of the two

    def in_child() -> None:
        assert _access(page) == kept
        scope.__exit__(None, None, None)  # without an error
        assert _access(page) == kept
        with key.allow():  # a new scope works as always
            assert _access(page) == (True, True)
        assert _access(page) == kept

    scope = {"allow": key.allow(), "deny": key.deny(),
             "read-only": key.allow(write=False)}[kind]
    with scope:
        assert _access(page) == _allows(in_force)
        result = run_in_child(in_child)
        assert result.exitcode == 0, result.stderr
        assert _access(page) == _allows(in_force)  # the parent's grant stands
    assert _access(page) == _allows(base)
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)


def test_a_child_drops_another_threads_deny_on_a_key_its_thread_never_used(key, page):
    """Another thread's deny() at the fork is dropped in the child, as every
    other thread's grant is: the child's only thread never had a grant on
    the key, so it has the rights outside every scope.  A first version of
    the fork fix above took such a thread's empty record for an unknowable
    one, and locked the other thread's deny into the child for good (found
    by an adversary)."""
    key.protect(page)
    pkeys.pkey_set(key, pkeys.PKEY_UNRESTRICTED)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with key.deny():
            holding.set()
            release.wait(60)

    def in_child() -> None:
        assert _access(page) == (True, True)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(60) and _access(page) == (False, False)
        result = run_in_child(in_child)
        assert result.exitcode == 0, result.stderr
    finally:
        release.set()
        holder.join()
    assert _access(page) == (True, True)
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_ACCESS)
