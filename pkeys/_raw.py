"""Calling the shim's thin wrappers from the raw layers (sys, glibc)."""

from __future__ import annotations

from collections.abc import Callable

from ._binding import ffi
from ._errors import ArgumentError, os_error

__all__ = ["call"]


def call(function: Callable[..., int], *args: int) -> int:
    """Call a C function that returns -1 and sets errno on failure.

    The arguments go to C unvalidated, as the raw layers promise; a value
    that does not fit the C parameter is an ArgumentError (a ValueError)
    rather than cffi's OverflowError, and a non-integer a TypeError.
    """
    for arg in args:
        if isinstance(arg, bool) or not isinstance(arg, int):
            raise TypeError(f"expected int arguments, got {type(arg).__name__}")
    try:
        result = function(*args)
    except OverflowError as exc:
        raise ArgumentError(f"argument out of range for the C call: {exc}") from None
    if result == -1:
        raise os_error(ffi.errno)
    return result
