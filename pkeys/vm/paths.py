"""Where ``pkeys vm`` keeps what it downloads and builds."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pkeys/vm``, else ``~/.cache/pkeys/vm``: CI caches this one folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pkeys" / "vm"


def kernels_dir(cache: Path | None = None) -> Path:
    """One sub-folder per kernel release, so that several live side by side."""
    return (cache or cache_dir()) / "kernels"


def apt_dir(cache: Path | None = None) -> Path:
    """A private apt state (sources, lists, downloads): the system's is never touched."""
    return (cache or cache_dir()) / "apt"


def log(message: str) -> None:
    import sys

    print(f"pkeys vm: {message}", file=sys.stderr, flush=True)
