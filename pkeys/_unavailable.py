"""Stand-in backend for ``PKEYS_BACKEND=hardware`` (or a misspelt value)
where it cannot be honoured.  Importing pkeys still works, and so does
``pkeys doctor``; C was never given a mode, so every operation answers
``PK_E_UNSUPPORTED`` and raises UnsupportedError with the reason that
the choice carries (``_select.Choice``)."""

from __future__ import annotations

from typing import Final

from ._api import *  # noqa: F403 - the backend's operations
from ._api import __all__ as _operations

NAME: Final = "hardware"
MODE = 0

__all__ = ["NAME", "MODE", *_operations]
