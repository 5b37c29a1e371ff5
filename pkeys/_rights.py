"""Access rights, memory protections and the limits of the PKRU register."""

from __future__ import annotations

import enum
import mmap

__all__ = [
    "PKEY_UNRESTRICTED",
    "PKEY_DISABLE_ACCESS",
    "PKEY_DISABLE_WRITE",
    "PkeyRights",
    "RIGHTS_BY_VALUE",
    "NUM_KEYS",
    "INIT_PKRU",
    "PKRU_MAX",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "PROT_EXEC",
    "PAGE_SIZE",
]


class PkeyRights(enum.IntFlag):
    """What a thread may do with memory tagged by one key.

    The values are the kernel's ``PKEY_DISABLE_*`` constants and also the
    two PKRU bits of a key: bit 0 denies all data access, bit 1 denies writes.
    """

    UNRESTRICTED = 0
    DISABLE_ACCESS = 1
    DISABLE_WRITE = 2


PKEY_UNRESTRICTED = 0
PKEY_DISABLE_ACCESS = 1
PKEY_DISABLE_WRITE = 2

# Indexed by a key's two PKRU bits: building an enum member per call costs
# more than the register access it describes.
RIGHTS_BY_VALUE = tuple(PkeyRights(value) for value in range(4))

NUM_KEYS = 16
# What the kernel gives a new process and every signal handler: access
# disabled for keys 1..15, key 0 open.
INIT_PKRU = 0x55555554
PKRU_MAX = 0xFFFFFFFF

PROT_NONE = mmap.PROT_NONE if hasattr(mmap, "PROT_NONE") else 0
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
PROT_EXEC = mmap.PROT_EXEC
PAGE_SIZE = mmap.PAGESIZE
