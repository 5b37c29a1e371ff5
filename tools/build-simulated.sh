#!/usr/bin/env bash
# Build the simulated-register variant (PKEYS_BUILD_SIMULATED_PKU=1) into a
# directory of its own, next to the normal install and never instead of it:
#   build/simulated-pku/pkeys   the package, with the simulated extension
#                               (and the scope type, csrc/scope_type.c)
# Use it with PYTHONPATH=build/simulated-pku, from a directory that has no
# pkeys/ of its own (the current directory comes first on sys.path).
# It protects nothing: it exists to measure the hardware path (`pkeys
# bench`) on any CPU.  tools/build-wheel.sh refuses to publish it.
# Rebuilds only when a C file, the header or the recipe changed (a few
# seconds of compiling); prints the directory.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python}
out=build/simulated-pku
stamp=$(cat _build_ffi.py csrc/* | sha256sum | cut -d' ' -f1)
if [ "$(cat "$out/.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$out"
    mkdir -p "$out"
    # cffi compiles in its output directory, with the recipe's relative paths.
    cp -r csrc "$out/csrc"
    PKEYS_BUILD_SIMULATED_PKU=1 "$python" -c '
import sys
sys.path.insert(0, ".")
import _build_ffi
_build_ffi.ffibuilder.compile(tmpdir=sys.argv[1])
' "$out" >"$out/build.log" 2>&1 || { cat "$out/build.log" >&2; exit 1; }
    # The scope type (csrc/scope_type.c) links against nothing of the shim,
    # so it is the normal build's; built here so the directory stands alone.
    "$python" -c '
import sys
sys.path.insert(0, ".")
from setuptools import Distribution, Extension
from _build_ffi import SCOPE_EXTENSION
dist = Distribution({"ext_modules": [Extension(**SCOPE_EXTENSION)]})
build = dist.get_command_obj("build_ext")
build.build_lib, build.build_temp = sys.argv[1], sys.argv[1] + "/scope-build"
dist.run_command("build_ext")
' "$out" >>"$out/build.log" 2>&1 || { cat "$out/build.log" >&2; exit 1; }
    echo "$stamp" >"$out/.stamp"
fi
# The Python files are copied every time (cheap), so they are never stale.
find "$out/pkeys" -mindepth 1 -maxdepth 1 ! -name '_pkeys_cffi*' ! -name '_scope.*.so' \
    -exec rm -rf {} +
tar -C pkeys --exclude='*.so' --exclude=__pycache__ --exclude=_pkeys_cffi.c -cf - . |
    tar -C "$out/pkeys" -xf -
realpath "$out"
