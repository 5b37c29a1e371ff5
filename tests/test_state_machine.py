"""A stateful property test of the state model: any order of alloc, free,
protect, set, scope enter and exit, probe and fork, checked against a model
of the rights every key should have.

The model is the rule of ``csrc/state.c``: while scopes are active on a key,
any deny wins, then any read-write grant, then any read-only grant; with
none active the key has the rights last set.  Each step is checked with
``pkey_get`` and with real accesses (``probe``) to a page of each key.
Runs natively (software backend) and in the ``pku`` tier (hardware).
"""

from __future__ import annotations

import mmap

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

import pkeys
from pkeys._child import run_in_child

pytestmark = pytest.mark.anybackend
PAGE = mmap.PAGESIZE
AD, WD = pkeys.PKEY_DISABLE_ACCESS, pkeys.PKEY_DISABLE_WRITE
KINDS = ("read-write", "read-only", "deny")


def expected_rights(base: int, kinds: list[str]) -> int:
    if "deny" in kinds:
        return AD
    if "read-write" in kinds:
        return 0
    if "read-only" in kinds:
        return WD
    return base


class KeysAndScopes(RuleBasedStateMachine):
    keys = Bundle("keys")
    scopes = Bundle("scopes")

    def __init__(self) -> None:
        super().__init__()
        self.base: dict[int, int] = {}  # id(Key) -> rights outside scopes
        self.live: dict[int, pkeys.Key] = {}
        self.pages: dict[int, mmap.mmap] = {}
        self.active: list[tuple[pkeys.Key, str, object]] = []

    def expected(self, key: pkeys.Key) -> int:
        kinds = [kind for owner, kind, _ in self.active if owner is key]
        return expected_rights(self.base[id(key)], kinds)

    @rule(target=keys, rights=st.sampled_from([0, AD, WD, AD | WD]))
    def allocate(self, rights):
        try:
            key = pkeys.Key(rights)
        except OSError:
            return None  # all 15 in use: the model keeps what it has
        self.live[id(key)] = key
        self.base[id(key)] = rights
        return key

    @rule(key=consumes(keys))
    def free(self, key):
        if key is None or key.closed:
            return
        page = self.pages.pop(id(key), None)
        if page is not None:
            with pytest.raises(pkeys.KeyInUseError):
                key.close()
            page.close()
        self.active = [entry for entry in self.active if entry[0] is not key]
        key.close()
        del self.live[id(key)], self.base[id(key)]

    @rule(key=keys)
    def protect(self, key):
        if key is None or key.closed or id(key) in self.pages:
            return
        page = mmap.mmap(-1, PAGE)
        key.protect(page)
        self.pages[id(key)] = page

    @rule(key=keys, rights=st.sampled_from([0, AD, WD, AD | WD]))
    def set_rights(self, key, rights):
        if key is None or key.closed:
            return
        pkeys.pkey_set(key, rights)
        self.base[id(key)] = rights

    @rule(target=scopes, key=keys, kind=st.sampled_from(KINDS))
    def enter(self, key, kind):
        if key is None or key.closed:
            return None
        scope = {"read-write": key.allow(), "read-only": key.allow(write=False),
                 "deny": key.deny()}[kind]
        scope.__enter__()
        entry = (key, kind, scope)
        self.active.append(entry)
        return entry

    @rule(entry=consumes(scopes))
    def exit(self, entry):
        if entry is None:
            return
        key, kind, scope = entry
        if not any(active is entry for active in self.active):
            return  # its key was freed: nothing to withdraw, and nothing changes
        scope.__exit__(None, None, None)
        self.active = [active for active in self.active if active is not entry]

    @rule()
    def fork(self):
        expectations = {id(k): self.expected(k) for k in self.live.values()}
        keys, pages = dict(self.live), dict(self.pages)

        def child() -> None:
            for ident, key in keys.items():
                assert pkeys.pkey_get(key) == expectations[ident]
                if ident in pages:
                    check_access(pages[ident], expectations[ident])

        result = run_in_child(child)
        assert result.exitcode == 0, result.stderr

    @invariant()
    def rights_match_the_model(self):
        for ident, key in self.live.items():
            expected = self.expected(key)
            assert pkeys.pkey_get(key) == expected, (key, self.active)
            if ident in self.pages:
                check_access(self.pages[ident], expected)

    def teardown(self):
        while self.active:
            _, _, scope = self.active.pop()
            scope.__exit__(None, None, None)
        for page in self.pages.values():
            page.close()
        for key in self.live.values():
            key.close()


def check_access(page: mmap.mmap, rights: int) -> None:
    readable = pkeys.probe(page) is None
    writable = pkeys.probe(page, write=True) is None
    assert readable == (not rights & AD), rights
    assert writable == (rights == 0), rights


KeysAndScopes.TestCase.settings = settings(
    max_examples=40 if not pkeys._select.emulated() else 12,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_keys_and_scopes_follow_the_model = KeysAndScopes.TestCase
