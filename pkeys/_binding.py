"""The compiled shim, and the one place that imports it."""

from ._pkeys_cffi import ffi, lib

__all__ = ["ffi", "lib"]
