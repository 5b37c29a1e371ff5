"""The backends are interchangeable: the same functions, with the same
signatures, so that dispatch can bind them directly."""

from __future__ import annotations

import inspect

import pytest

from pkeys import _hardware, _software, _unavailable

BACKEND_API = [
    "pkey_alloc", "pkey_free", "pkey_get", "pkey_set", "pkey_mprotect", "rdpkru", "wrpkru",
    "is_allocated", "allocated_keys", "shadow_pkru", "copy", "wipe",
]


@pytest.mark.parametrize("name", BACKEND_API)
def test_backends_share_names_and_signatures(name):
    signatures = {
        backend.__name__: str(inspect.signature(getattr(backend, name)))
        for backend in (_hardware, _software, _unavailable)
    }
    assert len(set(signatures.values())) == 1, signatures


def test_scope_entry_points_exist_everywhere():
    for backend in (_hardware, _software, _unavailable):
        assert callable(backend.enter) and callable(backend.leave)
        assert backend.NAME in ("hardware", "software")
