"""Bad input to every public function: a clear exception, and nothing changes."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkeys

# Validation must not depend on the backend: CI runs this module natively
# and again on the emulated PKU CPU.
pytestmark = pytest.mark.anybackend

NOT_INTS = [1.0, "1", None, b"\x01", [1], object()]
OUT_OF_RANGE_KEYS = [-1, 16, 17, 2**31, 2**63, 2**64, 2**200, -(2**200)]


def snapshot():
    return (pkeys.rdpkru(), pkeys.allocated_keys())


@pytest.mark.parametrize("bad", NOT_INTS + [True])
def test_non_int_key_is_a_type_error(key, bad):
    before = snapshot()
    for call in (
        lambda: pkeys.pkey_get(bad),
        lambda: pkeys.pkey_set(bad, 0),
        lambda: pkeys.pkey_free(bad),
        lambda: pkeys.pkey_mprotect(mmap.mmap(-1, 4096), None, pkeys.PROT_READ, bad),
    ):
        with pytest.raises(TypeError):
            call()
    assert snapshot() == before


@pytest.mark.parametrize("bad", OUT_OF_RANGE_KEYS)
def test_out_of_range_key_is_refused(bad, page):
    before = snapshot()
    for call in (
        lambda: pkeys.pkey_get(bad),
        lambda: pkeys.pkey_set(bad, 0),
        lambda: pkeys.pkey_free(bad),
        lambda: pkeys.pkey_mprotect(page, None, pkeys.PROT_READ, bad),
    ):
        with pytest.raises(pkeys.InvalidKeyError, match="outside 0..15"):
            call()
    assert snapshot() == before
    assert pkeys.probe(page, write=True) is None  # the page is untouched


@given(st.integers())
@settings(max_examples=200, deadline=None)
def test_any_integer_key_is_range_checked(value):
    before = snapshot()
    if 0 <= value < 16 and value in pkeys.allocated_keys() or value == 0:
        assert pkeys.pkey_get(value) in (0, 1, 2, 3)
    else:
        with pytest.raises(ValueError):
            pkeys.pkey_get(value)
    assert snapshot() == before


def test_unallocated_key_is_refused_everywhere(page):
    free_key = next(k for k in range(1, 16) if k not in pkeys.allocated_keys())
    before = snapshot()
    with pytest.raises(pkeys.InvalidKeyError, match="not allocated"):
        pkeys.pkey_get(free_key)
    with pytest.raises(pkeys.InvalidKeyError, match="not allocated"):
        pkeys.pkey_set(free_key, 0)
    with pytest.raises(pkeys.InvalidKeyError, match="not allocated"):
        pkeys.pkey_mprotect(page, None, pkeys.PROT_READ, free_key)
    with pytest.raises(pkeys.InvalidKeyError, match="not allocated"):
        pkeys.pkey_free(free_key)
    assert snapshot() == before


def test_key_zero_may_be_read_but_never_changed_or_freed():
    assert pkeys.pkey_get(0) == pkeys.PKEY_UNRESTRICTED
    before = snapshot()
    for rights in range(4):
        with pytest.raises(pkeys.InvalidKeyError, match="key 0"):
            pkeys.pkey_set(0, rights)
    with pytest.raises(pkeys.InvalidKeyError, match="key 0"):
        pkeys.pkey_free(0)
    with pytest.raises(pkeys.InvalidKeyError, match="key 0"):
        pkeys.wrpkru(pkeys.rdpkru() | 1)
    with pytest.raises(pkeys.InvalidKeyError, match="key 0"):
        pkeys.allow(0)
    assert snapshot() == before


def test_double_free_is_refused():
    pkey = pkeys.pkey_alloc()
    pkeys.pkey_free(pkey)
    before = snapshot()
    with pytest.raises(pkeys.InvalidKeyError, match="already freed"):
        pkeys.pkey_free(pkey)
    assert snapshot() == before


@pytest.mark.parametrize("rights", [-1, 4, 5, 255, 2**40, -(2**40)])
def test_rights_outside_0_to_3_are_refused(key, rights):
    before = snapshot()
    with pytest.raises(pkeys.ArgumentError, match="0..3"):
        pkeys.pkey_set(key, rights)
    with pytest.raises(pkeys.ArgumentError, match="0..3"):
        pkeys.pkey_alloc(0, rights)
    with pytest.raises(pkeys.ArgumentError, match="0..3"):
        pkeys.Key(rights=rights)
    assert snapshot() == before


@pytest.mark.parametrize("flags", [1, 2, -1, 2**40])
def test_nonzero_flags_are_refused(flags):
    before = snapshot()
    with pytest.raises(pkeys.ArgumentError, match="flags must be 0"):
        pkeys.pkey_alloc(flags, 0)
    assert snapshot() == before


@pytest.mark.parametrize("value", [-1, 2**32, 2**64, 1.5, "0"])
def test_wrpkru_rejects_values_outside_32_bits(value):
    before = snapshot()
    with pytest.raises((ValueError, TypeError)):
        pkeys.wrpkru(value)
    assert snapshot() == before


def test_mprotect_rejects_unaligned_and_bad_targets(key, pages):
    memory = pages(2)
    before = snapshot()
    view = memoryview(memory)[1:]
    with pytest.raises(pkeys.ArgumentError, match="page-aligned"):
        pkeys.pkey_mprotect(view, None, pkeys.PROT_READ, key)
    view.release()
    with pytest.raises(pkeys.ArgumentError, match="exceeds"):
        pkeys.pkey_mprotect(memory, 3 * mmap.PAGESIZE, pkeys.PROT_READ, key)
    with pytest.raises(pkeys.ArgumentError, match="positive"):
        pkeys.pkey_mprotect(memory, 0, pkeys.PROT_READ, key)
    with pytest.raises(pkeys.ArgumentError, match="PROT_READ"):
        pkeys.pkey_mprotect(memory, None, 0x100, key)
    with pytest.raises(TypeError, match="length is required"):
        pkeys.pkey_mprotect(4096, None, pkeys.PROT_READ, key)
    with pytest.raises(pkeys.ArgumentError, match="negative"):
        pkeys.pkey_mprotect(-4096, 4096, pkeys.PROT_READ, key)
    with pytest.raises(TypeError, match="writable buffer"):
        pkeys.pkey_mprotect(b"\0" * 4096, None, pkeys.PROT_READ, key)
    with pytest.raises(TypeError, match="writable buffer"):
        pkeys.pkey_mprotect(3.0, 4096, pkeys.PROT_READ, key)
    assert snapshot() == before
    assert pkeys.probe(memory, write=True) is None


def test_kernel_refusal_is_a_plain_oserror_with_errno(key):
    # An unmapped but aligned range: the kernel answers ENOMEM.
    memory = mmap.mmap(-1, mmap.PAGESIZE)
    from pkeys._binding import ffi

    address = int(ffi.cast("uintptr_t", ffi.from_buffer(memory)))
    memory.close()
    with pytest.raises(OSError) as info:
        pkeys.pkey_mprotect(address, mmap.PAGESIZE, pkeys.PROT_READ, key)
    assert info.value.errno == 12
    assert type(info.value) is OSError
    assert not isinstance(info.value, pkeys.PkeysError)


def test_exception_hierarchy():
    assert issubclass(pkeys.InvalidKeyError, ValueError)
    assert issubclass(pkeys.KeyInUseError, pkeys.InvalidKeyError)
    assert issubclass(pkeys.ArgumentError, ValueError)
    assert issubclass(pkeys.UnsupportedError, OSError)
    for error in (pkeys.UnsupportedError, pkeys.ArgumentError, pkeys.InvalidKeyError):
        assert issubclass(error, pkeys.PkeysError)


def test_closed_key_refuses_use(page):
    k = pkeys.Key()
    k.close()
    k.close()  # idempotent
    assert k.closed
    for call in (lambda: k.pkey, lambda: k.allow(), lambda: k.deny(), lambda: k.protect(page),
                 lambda: int(k)):
        with pytest.raises(pkeys.InvalidKeyError, match="closed"):
            call()


def test_public_api_is_explicit():
    for name in pkeys.__all__:
        assert hasattr(pkeys, name), name
    assert "lib" not in pkeys.__all__ and "ffi" not in pkeys.__all__


def test_public_errors_are_named_where_they_are_imported_from():
    import pickle
    import traceback

    for name in ("PkeysError", "UnsupportedError", "ArgumentError", "InvalidKeyError",
                 "KeyInUseError", "BufferCorruptedError", "ClosedError", "ScopeError",
                 "RevocationError", "PkeysWarning", "MemoryLockWarning"):
        cls = getattr(pkeys, name)
        assert f"{cls.__module__}.{cls.__qualname__}" == f"pkeys.{name}"
    with pytest.raises(pkeys.InvalidKeyError) as caught:
        pkeys.pkey_set(0, pkeys.PKEY_DISABLE_ACCESS)
    assert traceback.format_exception_only(caught.value)[0].startswith("pkeys.InvalidKeyError: ")
    assert type(pickle.loads(pickle.dumps(caught.value))) is pkeys.InvalidKeyError
