"""Shared fixtures and the two test tiers.

* ``pku`` tests need real protection keys: PKU hardware, or the emulated
  CPU of ``pytest --pkeys-vm``.  The pkeys pytest plugin
  (``pkeys/pytest_plugin.py``) skips them elsewhere, names the option in
  the reason, and turns the skip into an error under ``PKEYS_REQUIRE_PKU=1``.
* ``software`` tests exercise the mprotect emulation and run wherever it is
  the active backend.
"""

from __future__ import annotations

import mmap

import pytest

import pkeys

PAGE = mmap.PAGESIZE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_software = pytest.mark.skip(reason="the active backend is not the software emulation")
    for item in items:
        if "software" in item.keywords and pkeys.backend() != "software":
            item.add_marker(skip_software)


@pytest.fixture(autouse=True)
def no_leaked_keys():
    """Every test must free what it allocates through the safe layer."""
    before = pkeys.allocated_keys()
    yield
    leaked = sorted(set(pkeys.allocated_keys()) - set(before))
    assert not leaked, f"test leaked keys {leaked}"


@pytest.fixture
def page():
    """One fresh anonymous read/write page."""
    memory = mmap.mmap(-1, PAGE)
    yield memory
    memory.close()


@pytest.fixture
def pages():
    """A factory of fresh anonymous mappings, unmapped after the test."""
    made: list[mmap.mmap] = []

    def make(count: int = 1) -> mmap.mmap:
        memory = mmap.mmap(-1, count * PAGE)
        made.append(memory)
        return memory

    yield make
    for memory in made:
        memory.close()


@pytest.fixture
def key():
    """A Key with access disabled; any memory tagged with it is released first."""
    k = pkeys.Key()
    yield k
    if not k.closed:
        try:
            k.close()
        except pkeys.KeyInUseError:
            from pkeys import _api
            from pkeys._binding import lib

            for start, end, _, _ in _api.regions(k.pkey):
                lib.pk_region_forget(start, end - start)
            k.close()


class ShadowPKRU:
    """The PKRU this test expects, as in the kernel's pkey selftests: every
    operation updates it, and :meth:`check` compares it with the register
    and with the package's own record of what it last wrote."""

    def __init__(self) -> None:
        self.value = pkeys.rdpkru()

    def set(self, pkey: int, rights: int) -> None:
        shift = 2 * int(pkey)
        self.value = (self.value & ~(3 << shift)) | (int(rights) << shift)

    def check(self) -> None:
        actual = pkeys.rdpkru()
        assert actual == self.value, f"PKRU {actual:#010x}, expected {self.value:#010x}"
        from pkeys import _select

        recorded = _select.chosen().backend.shadow_pkru()
        if recorded is not None:
            assert recorded == actual, f"package record {recorded:#010x} != PKRU {actual:#010x}"


@pytest.fixture
def shadow():
    return ShadowPKRU()
