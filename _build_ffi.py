"""Build recipe for ``pkeys._pkeys_cffi`` (cffi out-of-line API mode).

The declarations come from ``csrc/pkeys_api.h``, the same header the C
sources include, so the two can never disagree.  All paths are relative to
this file's directory, which is where setuptools runs the build.
"""

from __future__ import annotations

import os
import pathlib

import cffi

CSRC = "csrc"
SOURCES = [
    f"{CSRC}/cpu.c",
    f"{CSRC}/sys.c",
    f"{CSRC}/glibc.c",
    f"{CSRC}/grants.c",
    f"{CSRC}/state.c",
    f"{CSRC}/backend_hardware.c",
    f"{CSRC}/backend_software.c",
    f"{CSRC}/regions.c",
    f"{CSRC}/revoke.c",
    f"{CSRC}/exposure.c",
    f"{CSRC}/guard.c",
    f"{CSRC}/secret.c",
    f"{CSRC}/bench.c",
    f"{CSRC}/secretmem.c",
    f"{CSRC}/virtual.c",
    f"{CSRC}/sigframe.c",
    f"{CSRC}/test_steps.c",
]
HEADERS = [f"{CSRC}/pkeys_api.h", f"{CSRC}/pkeys_testing.h", f"{CSRC}/pkeys_internal.h",
           f"{CSRC}/grants.h", f"{CSRC}/backend.h"]

# PKEYS_BUILD_SIMULATED_PKU=1 builds the simulated-register variant
# (csrc/pkeys_internal.h): RDPKRU/WRPKRU act on a thread-local variable and
# keys are a bitmap, to measure the hardware backend's code on any CPU.  It
# protects nothing; tools/build-wheel.sh refuses to ship it.  The macro is
# in the generated source too, so that switching variants rebuilds it.
SIMULATED = os.environ.get("PKEYS_BUILD_SIMULATED_PKU", "") not in ("", "0")
MACROS = [("PK_SIMULATED_PKU", "1")] if SIMULATED else []
PREAMBLE = "".join(f"#define {name} {value}\n" for name, value in MACROS)

ffibuilder = cffi.FFI()
# The production API, then the test and bench entry points (labelled apart).
for header in ("pkeys_api.h", "pkeys_testing.h"):
    ffibuilder.cdef(pathlib.Path(__file__).with_name(CSRC).joinpath(header).read_text())
ffibuilder.set_source(
    "pkeys._pkeys_cffi",
    PREAMBLE + '#include "pkeys_internal.h"\n',
    sources=SOURCES,
    depends=HEADERS,
    include_dirs=[CSRC],
    define_macros=MACROS,
    libraries=["dl", "pthread"],
    # Hidden: no other object links against the shim's C symbols (pkeys._scope
    # is handed their addresses at import), so each call and global among its
    # files goes direct, not through the PLT and GOT.  The module's init
    # function is exported by its own declaration.
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
    # Stable ABI only (Py_LIMITED_API): the wheel is tagged abi3 in setup.py.
    py_limited_api=True,
)

# The hot path of scopes (csrc/scope_type.c): a plain CPython extension on
# the stable ABI, built next to the cffi module by setup.py (and by
# tools/build-simulated.sh).  It links against nothing of the shim: pkeys._key
# hands it the entry points' addresses at import, so there is one state.
SCOPE_EXTENSION = {
    "name": "pkeys._scope",
    "sources": [f"{CSRC}/scope_type.c", f"{CSRC}/scope_rights.c", f"{CSRC}/scope_block.c"],
    "depends": [f"{CSRC}/pkeys_api.h", f"{CSRC}/scope_type.h"],
    "include_dirs": [CSRC],
    "define_macros": [("Py_LIMITED_API", "0x030B0000")],
    "extra_compile_args": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
    "py_limited_api": True,
}

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
