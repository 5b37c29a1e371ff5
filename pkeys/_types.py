"""Type aliases shared by the public signatures."""

from __future__ import annotations

from typing import SupportsIndex, TypeAlias

__all__ = ["KeyLike"]

# A protection key number, or anything that converts to one losslessly
# through __index__, as pkeys.Key does.  (int is itself SupportsIndex; it is
# spelt out because it is what most callers pass.)
KeyLike: TypeAlias = int | SupportsIndex
