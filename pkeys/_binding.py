"""The compiled shim, and the one place that imports it."""

from __future__ import annotations

import os

__all__ = ["ffi", "lib"]

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
