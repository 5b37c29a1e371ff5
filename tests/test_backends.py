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
    from pkeys import _select

    assert _select.chosen().backend.NAME == pkeys.backend()
    assert lib.pk_state_mode() == _select.chosen().backend.MODE
    assert {backend.NAME for backend in BACKENDS} == {"hardware", "software"}


def test_choosing_changes_nothing_and_the_choice_carries_its_reason():
    from pkeys import _select

    before = (_select.chosen(), lib.pk_state_mode(), pkeys.backend_reason())
    choice = _select.choose({"PKEYS_BACKEND": "no-such-backend"})
    assert choice.backend is _unavailable and choice.backend.MODE == 0
    assert choice.unsupported_reason == choice.reason
    assert "'no-such-backend' is not one of auto, hardware, software" in choice.reason
    assert _select.choose({"PKEYS_BACKEND": "software"}).unsupported_reason == ""
    # Nothing else moved: the choice made at import, C's mode, the reason an
    # unsupported operation would give.
    assert (_select.chosen(), lib.pk_state_mode(), pkeys.backend_reason()) == before
    assert _select.select() is before[0]
    assert not hasattr(_unavailable, "reason")
