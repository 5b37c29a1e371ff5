"""The software backend: protection keys emulated with ``mprotect``.

Chosen in C (``pk_state_init(PK_MODE_SOFTWARE)``) where the CPU or kernel
has no PKU.  The API and the validation are those of the hardware backend,
with these differences (also in docs/backends.md and in ``pkeys doctor``):

* One emulated PKRU for the whole process, not one per thread: a grant made
  in one thread opens the key in all of them.
* Each rights change costs one ``mprotect`` per region of each key whose
  rights change, instead of one unprivileged instruction.
* A denied access faults with ``SEGV_ACCERR``, not ``SEGV_PKUERR``.
* Access-disable maps memory ``PROT_NONE``, ``PROT_EXEC`` included: x86
  without PKU cannot express execute-without-read, so code in such memory
  cannot run while its key is denied (on hardware it can).

Enforcement lives in ``csrc/regions.c``.
"""

from __future__ import annotations

from typing import Final

from ._api import *  # noqa: F403 - the backend's operations
from ._api import __all__ as _operations
from ._binding import lib

NAME: Final = "software"
MODE = lib.PK_MODE_SOFTWARE

__all__ = ["NAME", "MODE", *_operations]
