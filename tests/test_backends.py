"""The backends are interchangeable: the same operations with the same
signatures, the mode itself chosen in C once at import."""

from __future__ import annotations

import inspect

import pytest

import pkeys
from pkeys import _api, _hardware, _software, _unavailable
from pkeys._binding import lib

BACKENDS = (_hardware, _software, _unavailable)


@pytest.mark.parametrize("name", _api.__all__)
def test_backends_share_names_and_signatures(name):
    signatures = {
        backend.__name__: str(inspect.signature(getattr(backend, name))) for backend in BACKENDS
    }
    assert len(set(signatures.values())) == 1, signatures


def test_the_chosen_backend_is_the_mode_c_runs_in():
    from pkeys import _key

    assert _key.chosen_backend.NAME == pkeys.backend()
    assert lib.pk_state_mode() == _key.chosen_backend.MODE
    assert {backend.NAME for backend in BACKENDS} == {"hardware", "software"}
