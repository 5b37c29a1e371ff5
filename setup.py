# Only here because setuptools reads cffi_modules from setup() alone;
# everything else lives in pyproject.toml.
from setuptools import setup

setup(
    cffi_modules=["_build_ffi.py:ffibuilder"],
    # The extension uses only the stable ABI (see _build_ffi.py), so one
    # wheel serves CPython 3.11 and every later version: tag it cp311-abi3.
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
