"""The simulated-register backend: the hardware backend's code, run on a
build where RDPKRU/WRPKRU act on a thread-local variable.

Only a build made with ``PKEYS_BUILD_SIMULATED_PKU=1 pip install .`` has
it (see ``csrc/pkeys_internal.h``); it is never the default and never in
a wheel.  Keys are a bitmap with the kernel's errors and ``pkey_mprotect``
is ``mprotect``: **nothing is protected**.  It exists to measure the
package's layers on the hardware path on a machine without PKU.  Threads
start at the kernel's init value (0x55555554) instead of copying their
creator's register.  pkeys warns at import (SimulatedRegisterWarning).
"""

from __future__ import annotations

from typing import Final

from ._api import *  # noqa: F403 - the backend's operations
from ._api import __all__ as _operations
from ._binding import lib

NAME: Final = "simulated"
MODE = lib.PK_MODE_HARDWARE

__all__ = ["NAME", "MODE", *_operations]
