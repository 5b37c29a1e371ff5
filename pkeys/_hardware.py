"""The hardware backend: the real, per-thread PKRU register.

Chosen in C (``pk_state_init(PK_MODE_HARDWARE)``) where the OS has enabled
PKU.  Rights and grants belong to each thread; a new thread copies its
creator's register.  The operations are those of :mod:`pkeys._api`, with
the same names and signatures on every backend.
"""

from __future__ import annotations

from typing import Final

from ._api import *  # noqa: F403 - the backend's operations
from ._api import __all__ as _operations
from ._binding import lib

NAME: Final = "hardware"
MODE = lib.PK_MODE_HARDWARE

__all__ = ["NAME", "MODE", *_operations]
