"""Type aliases and protocols shared by the public signatures."""

from __future__ import annotations

from typing import Protocol, SupportsIndex, TypeAlias

__all__ = ["Backend", "KeyLike"]

# A protection key number, or anything that converts to one losslessly
# through __index__, as pkeys.Key does.  (int is itself SupportsIndex; it is
# spelt out because it is what most callers pass.)
KeyLike: TypeAlias = int | SupportsIndex


class Backend(Protocol):
    """What a backend module (_hardware, _software, _unavailable) provides.

    The operations themselves are the same on every backend (``pkeys._api``;
    the mode is chosen in C), so a backend is its name and its C mode.
    """

    NAME: str
    MODE: int
