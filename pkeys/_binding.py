"""The compiled shim, and the one place that imports it."""

from __future__ import annotations

import os

__all__ = ["ffi", "lib", "entry_point"]

_EXTENSION = f"{__package__}._pkeys_cffi"


def _source_tree_message(package_dir: str) -> str:
    return (
        f"pkeys was imported from {package_dir}, which has no compiled extension "
        "(_pkeys_cffi): that is a source tree, and because Python searches the current "
        "directory first, it hides any installed pkeys. Either run from another "
        "directory to use the installed pkeys, or build the extension in this tree "
        "with `pip install -e .`."
    )


try:
    from ._pkeys_cffi import ffi, lib
except ModuleNotFoundError as missing:
    # Only the extension itself being absent means "source tree"; a missing
    # dependency inside it (or cffi) is reported as it is.
    if missing.name != _EXTENSION:
        raise
    raise ImportError(
        _source_tree_message(os.path.dirname(os.path.abspath(__file__))), name=_EXTENSION
    ) from None


def _realize_every_type() -> None:
    """Build every C type the package uses now, once, at import.

    cffi builds a struct type (and a function's signature) the first time
    it is named, and that step is not re-entrant: a garbage-collector
    finalizer that runs during it (any allocation can start a collection)
    and names the same type aborts the process in
    ``_realize_c_struct_or_union`` or gets "the types are different".
    After this, finalizers only find types that exist."""
    for name in ffi.list_types()[1]:
        ffi.typeof(f"struct {name} *")
        try:
            ffi.sizeof(f"struct {name}")  # lays out its fields too
        except ffi.error:
            pass  # opaque here (struct pk_vbuf): no fields to lay out
    for name in dir(lib):
        getattr(lib, name)


_realize_every_type()


def entry_point(function: str) -> int:
    """The address of one of the shim's C functions, for the scope types
    (``pkeys._scope``), which call it directly: one copy of the state."""
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, function)))
