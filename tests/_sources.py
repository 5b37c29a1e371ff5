"""The C sources of each extension, as _build_ffi.py lists them: the shim's
(the cffi module, which C test programs link) and the scope type's
(pkeys._scope, which needs Python's headers).  Every C file is one's."""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

sys.path.insert(0, str(ROOT))
try:
    import _build_ffi
finally:
    sys.path.remove(str(ROOT))

SHIM_SOURCES = sorted(ROOT / name for name in _build_ffi.SOURCES)
SCOPE_SOURCES = sorted(ROOT / name for name in _build_ffi.SCOPE_EXTENSION["sources"])
SCOPE_EXTENSION = _build_ffi.SCOPE_EXTENSION
assert set(CSRC.glob("*.c")) == set(SHIM_SOURCES) | set(SCOPE_SOURCES), "a C file of neither"
