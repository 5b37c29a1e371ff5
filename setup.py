# Only here because setuptools reads cffi_modules and ext_modules from
# setup() alone; everything else lives in pyproject.toml.
import os
import sys

from setuptools import Extension, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _build_ffi import SCOPE_EXTENSION  # noqa: E402

setup(
    cffi_modules=["_build_ffi.py:ffibuilder"],
    ext_modules=[Extension(**SCOPE_EXTENSION)],
    # Both extensions use only the stable ABI (see _build_ffi.py), so one
    # wheel serves CPython 3.11 and every later version: tag it cp311-abi3.
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
