"""Key objects, scoped access and key tracking, on whichever backend is active."""

from __future__ import annotations

import os
import threading

import pytest

import pkeys
from pkeys import _api
from pkeys._child import run_in_child


def rights_bits(pkey: int) -> int:
    return (pkeys.rdpkru() >> (2 * int(pkey))) & 3


def test_key_context_manager_allocates_and_frees():
    with pkeys.Key() as k:
        assert 1 <= k.pkey <= 15
        assert k.pkey in pkeys.allocated_keys()
        assert int(k) == k.pkey == k.__index__()
        assert k.rights == pkeys.PKEY_DISABLE_ACCESS
        assert repr(k).startswith(f"<pkeys.Key {k.pkey} rights=DISABLE_ACCESS")
        number = k.pkey
    assert k.closed and number not in pkeys.allocated_keys()
    assert repr(k) == "<pkeys.Key closed>"


def test_key_is_accepted_wherever_a_key_number_is(key, page, shadow):
    pkeys.pkey_set(key, pkeys.PKEY_DISABLE_WRITE)
    shadow.set(key, 2)
    shadow.check()
    assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_WRITE
    key.rights = 0
    shadow.set(key, 0)
    shadow.check()
    pkeys.pkey_mprotect(page, None, pkeys.PROT_READ, key)
    pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)


def test_allow_and_deny_restore_the_previous_rights(key, shadow):
    with key.allow():
        shadow.set(key, 0)
        shadow.check()
        with key.deny():
            shadow.set(key, 1)
            shadow.check()
            with key.allow(write=False):
                shadow.check()  # a deny() wins over every allow() while it is active
            shadow.check()
            shadow.check()
        shadow.set(key, 0)
        shadow.check()
    shadow.set(key, 1)
    shadow.check()


def test_rights_come_back_after_an_exception(key, shadow):
    with pytest.raises(RuntimeError):
        with key.allow():
            raise RuntimeError("boom")
    shadow.check()
    assert key.rights == pkeys.PKEY_DISABLE_ACCESS


def test_scope_restores_only_its_own_keys(shadow):
    with pkeys.Key() as a, pkeys.Key() as b:
        shadow.set(a, 1)
        shadow.set(b, 1)
        with a.allow():
            pkeys.pkey_set(b, 0)  # changed inside the block, on purpose
        shadow.set(b, 0)
        shadow.check()
        pkeys.pkey_set(b, 1)


def test_allow_several_keys_is_one_grant(shadow):
    # One scope and one entry (one token, so one call into C and one
    # register write) for every key, Keys and numbers alike.
    with pkeys.Key() as a, pkeys.Key() as b, pkeys.Key(rights=2) as c:
        shadow.set(a, 1), shadow.set(b, 1), shadow.set(c, 2)
        with pkeys.allow(a, b, c.pkey) as scope:
            assert rights_bits(a) == rights_bits(b) == rights_bits(c) == 0
            assert type(scope) is pkeys.Scope and scope.active == 1
        assert scope.active == 0
        shadow.check()
        with pkeys.allow(a, b, c) as scope:
            assert rights_bits(a) == rights_bits(b) == rights_bits(c) == 0
            assert scope.active == 1
        shadow.check()
        with pkeys.allow(a, b, write=False):
            assert rights_bits(a) == rights_bits(b) == 2
        shadow.check()


def test_freeing_leaves_the_number_access_disabled():
    pkey = pkeys.pkey_alloc(0, 0)
    assert rights_bits(pkey) == 0
    pkeys.pkey_free(pkey)
    assert rights_bits(pkey) == pkeys.PKEY_DISABLE_ACCESS
    # A reuse of the number starts from what pkey_alloc asks, not the old rights.
    again = pkeys.pkey_alloc(0, pkeys.PKEY_DISABLE_WRITE)
    try:
        assert pkeys.pkey_get(again) == pkeys.PKEY_DISABLE_WRITE
    finally:
        pkeys.pkey_free(again)


def test_freeing_inside_a_scope_does_not_reopen_the_number():
    k = pkeys.Key()
    number = k.pkey
    with k.allow():
        k.close()
    assert rights_bits(number) == pkeys.PKEY_DISABLE_ACCESS


@pytest.mark.parametrize("by_number", [False, True])
def test_a_key_freed_through_its_number_closes_quietly(by_number):
    """Key.close() after pkey_free(key) raised InvalidKeyError ("not
    allocated"), from close() and from the with block (found by the fuzz)."""
    with pkeys.Key() as k:
        number, identity = k.pkey, k.identity
        pkeys.pkey_free(number if by_number else k)
        assert number not in pkeys.allocated_keys()
        other = pkeys.Key()  # may get the number again: it is not k's to free
    assert k.closed
    k.close()
    assert other.pkey in pkeys.allocated_keys() and other.identity != identity
    other.close()


class _SubKey(pkeys.Key):
    """A Key subclass: the package's paths must treat it as a Key."""


def _general_get(key: pkeys.Key) -> object:
    return _api._pkey_get_any(key)  # the path the C one hands what it declines


_CHANGES = {
    "pkey_set in C": lambda k, page: pkeys.pkey_set(k, pkeys.PKEY_UNRESTRICTED),
    "pkey_set in Python": lambda k, page: pkeys.pkey_set(k, pkeys.PkeyRights.UNRESTRICTED,
                                                         threads="current"),
    "pkey_set for every thread": lambda k, page: pkeys.pkey_set(k, 0, threads="all"),
    "Key.rights =": lambda k, page: setattr(k, "rights", pkeys.PKEY_UNRESTRICTED),
    "pkey_get in C": lambda k, page: pkeys.pkey_get(k),
    "pkey_get in Python": lambda k, page: _general_get(k),
    "Key.rights": lambda k, page: k.rights,
    "pkey_free": lambda k, page: pkeys.pkey_free(k),
    "pkey_mprotect": lambda k, page: pkeys.pkey_mprotect(page, None, pkeys.PROT_READ, k),
}


@pytest.mark.parametrize("key_class", [pkeys.Key, _SubKey], ids=["Key", "subclass"])
@pytest.mark.parametrize("change", list(_CHANGES))
def test_a_freed_key_never_reaches_the_key_that_got_its_number(change, key_class, shadow,
                                                               page):
    """pkey_set(key), pkey_get(key) and Key.rights passed only the key's
    number, and threads="all", pkey_free and pkey_mprotect dropped a
    subclass's identity: with that
    number freed and given to a new key (here by pkey_free of the number,
    in a program by a close() in another thread or a signal handler), they
    set or read the new key's rights.  The Key's identity now goes with it,
    as scopes' do."""
    with key_class() as k:
        number = k.pkey
        pkeys.pkey_free(number)
        shadow.set(number, pkeys.PKEY_DISABLE_ACCESS)
        with pkeys.Key() as other:
            assert other.pkey == number  # the lowest free number, as the kernel gives it
            shadow.set(number, 0)  # pkey_alloc(0, 0): open in this thread
            pkeys.pkey_set(other, pkeys.PKEY_DISABLE_WRITE)
            shadow.set(number, pkeys.PKEY_DISABLE_WRITE)
            with pytest.raises(pkeys.InvalidKeyError, match="closed"):
                _CHANGES[change](k, page)
            assert pkeys.pkey_get(other) == pkeys.PKEY_DISABLE_WRITE
            assert other.pkey in pkeys.allocated_keys() and not _api.regions(number)
            shadow.check()
        shadow.set(number, pkeys.PKEY_DISABLE_ACCESS)
        shadow.check()


def test_freeing_a_key_that_guards_memory_is_refused(page):
    k = pkeys.Key()
    k.protect(page)
    before = pkeys.allocated_keys()
    with pytest.raises(pkeys.KeyInUseError, match=f"pkey {k.pkey} still guards"):
        k.close()
    with pytest.raises(pkeys.KeyInUseError):
        pkeys.pkey_free(k.pkey)
    assert pkeys.allocated_keys() == before
    pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
    k.close()


def test_unclosed_key_is_freed_with_a_resource_warning():
    k = pkeys.Key()
    number = k.pkey
    with pytest.warns(ResourceWarning, match="unclosed"):
        del k
        import gc

        gc.collect()
    assert number not in pkeys.allocated_keys()


def test_tracking_is_consistent_under_eight_threads():
    errors: list[BaseException] = []
    held: set[int] = set()
    held_lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        try:
            start.wait()
            for round_ in range(60):
                # Key objects, not numbers: a number freed here may already
                # belong to another thread's new key, an identity never does.
                key = pkeys.Key((seed + round_) % 4)
                with held_lock:
                    assert key.pkey not in held, f"key {key.pkey} handed out twice"
                    held.add(key.pkey)
                for rights in (0, 1, 2, 3):
                    pkeys.pkey_set(key, rights)
                    if pkeys.backend() == "hardware":
                        assert pkeys.pkey_get(key) == rights
                with held_lock:
                    held.discard(key.pkey)
                    key.close()
                with pytest.raises(pkeys.InvalidKeyError):
                    pkeys.pkey_free(key)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert pkeys.allocated_keys() == []


def test_forked_child_inherits_keys_and_may_free_them():
    with pkeys.Key(rights=pkeys.PKEY_DISABLE_WRITE) as k:

        def child() -> None:
            assert k.pkey in pkeys.allocated_keys()
            assert pkeys.pkey_get(k) == pkeys.PKEY_DISABLE_WRITE
            k.close()
            assert k.pkey if not k.closed else True
            assert pkeys.allocated_keys() == []

        result = run_in_child(child)
        assert result.exitcode == 0, result.stderr
        assert k.pkey in pkeys.allocated_keys()  # the parent's copy is untouched


def test_backend_choice_is_reported():
    assert pkeys.backend() in ("hardware", "software")
    assert pkeys.backend_reason()
    assert pkeys.hardware_supported() == (pkeys.backend() == "hardware") or os.environ.get(
        "PKEYS_BACKEND"
    )


def test_a_keys_number_can_only_be_closed_from_python():
    # pkeys.allow, pkey_get and pkey_set read a Key's number in C as a bit
    # index; key._pkey = 2**31 - 1 then crashed pkeys.allow(key) (SIGBUS).
    # In a child: a regression crashes.
    def child() -> None:
        with pkeys.Key() as k:
            number = k.pkey
            for value in (2**31 - 1, 40, 0, number):
                try:
                    k._pkey = value
                except ValueError as exc:
                    assert "only be set to -1" in str(exc)
                else:
                    raise AssertionError(f"_pkey = {value} accepted")
            try:
                del k._pkey
            except AttributeError:
                pass
            else:
                raise AssertionError("_pkey deleted")
            assert k.pkey == number
            with pkeys.allow(k):
                assert rights_bits(k) == 0

    result = run_in_child(child, quiet=False)
    assert result.exitcode == 0, f"{result.describe()}: {result.stderr}"


def test_a_scope_made_directly_refuses_a_bad_kind_or_no_key(key, shadow):
    shadow.set(key, pkeys.PKEY_DISABLE_ACCESS)
    for kind in (3, -1, 2**31 - 1):
        with pytest.raises(ValueError, match="not a PK_GRANT_"):
            pkeys.Scope({key.pkey: key.identity}, kind)
    with pytest.raises(TypeError, match="at least one key"):
        pkeys.Scope({}, 0)
    with pkeys.Scope({key.pkey: key.identity}, 1):  # read-only, as allow(write=False)
        assert rights_bits(key) == pkeys.PKEY_DISABLE_WRITE
    shadow.check()


def test_the_c_scope_module_is_configured_once_at_import():
    # A second configure could point the hot paths at any address: it is
    # refused, and what pkeys configured keeps working.  In a child: a
    # regression jumps to address 1.
    def child() -> None:
        from pkeys import _scope

        attempts = {
            "configure": lambda: _scope.configure(1, 1, 1, print, print, print, print, print,
                                                  1, pkeys.Key),
            "configure_blocks": lambda: _scope.configure_blocks(1, 1, *[print] * 8, 11),
            "configure_rights": lambda: _scope.configure_rights(1, 1, print, print, print,
                                                                (0, 1, 2, 3)),
        }
        for name, attempt in attempts.items():
            try:
                attempt()
            except RuntimeError as exc:
                assert "configured already" in str(exc), exc
            else:
                raise AssertionError(f"{name} accepted again")
        with pkeys.Key() as k, pkeys.ProtectedBuffer(8, secretmem=False) as buffer:
            with k.allow():
                pkeys.pkey_set(k, pkeys.pkey_get(k))
            with buffer.unlocked() as view:
                assert bytes(view) == bytes(8)

    result = run_in_child(child, quiet=False)
    assert result.exitcode == 0, f"{result.describe()}: {result.stderr}"
