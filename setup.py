# Only here because setuptools reads cffi_modules from setup() alone;
# everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["_build_ffi.py:ffibuilder"])
