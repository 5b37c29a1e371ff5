"""glibc's five ``pkey_*`` functions (glibc >= 2.27), exactly as glibc
behaves, looked up at run time.

glibc validates nothing beyond what the kernel does and does not track
keys: ``pkey_get``/``pkey_set`` accept any key in 0..15, allocated or not.
Its ``pkey_get``/``pkey_set`` run RDPKRU/WRPKRU with no CPU check and die of
SIGILL without PKU; here they raise :class:`pkeys.UnsupportedError` instead,
as does any function this libc lacks.
"""

from __future__ import annotations

from ._binding import ffi, lib
from ._errors import UnsupportedError
from ._raw import call

__all__ = [
    "available",
    "version",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "pkey_get",
    "pkey_set",
]

_FUNCTIONS = {
    "pkey_alloc": lib.PK_GLIBC_ALLOC,
    "pkey_free": lib.PK_GLIBC_FREE,
    "pkey_mprotect": lib.PK_GLIBC_MPROTECT,
    "pkey_get": lib.PK_GLIBC_GET,
    "pkey_set": lib.PK_GLIBC_SET,
}
_FOUND = lib.pk_glibc_available()
_OSPKE = bool(lib.pk_cpu_has_ospke())


def available() -> dict[str, bool]:
    """Which of glibc's ``pkey_*`` functions this process's libc provides."""
    return {name: bool(_FOUND & bit) for name, bit in _FUNCTIONS.items()}


def version() -> str:
    """The running glibc's version, or ``""`` for another libc."""
    name: bytes = ffi.string(lib.pk_glibc_version())
    return name.decode()


def _require(name: str, needs_register: bool = False) -> None:
    if lib.pk_build_simulated():
        raise UnsupportedError(
            f"this is the simulated-register build: glibc's {name} would act on the CPU's "
            "keys and register, which that build does not use"
        )
    if not _FOUND & _FUNCTIONS[name]:
        raise UnsupportedError(f"this libc has no {name} (glibc >= 2.27 provides it)")
    if needs_register and not _OSPKE:
        raise UnsupportedError(
            f"glibc's {name} executes RDPKRU/WRPKRU unchecked and would die of "
            "SIGILL: this CPU or OS has not enabled PKU (CPUID OSPKE is 0)"
        )


def pkey_alloc(flags: int, access_rights: int) -> int:
    _require("pkey_alloc")
    lib.pk_exposure_untracked()  # a key pkeys does not track may open here
    return call(lib.pk_glibc_pkey_alloc, flags, access_rights)


def pkey_free(pkey: int) -> None:
    _require("pkey_free")
    lib.pk_exposure_untracked()  # a number freed behind pkeys' back
    call(lib.pk_glibc_pkey_free, pkey)


def pkey_mprotect(addr: int, length: int, prot: int, pkey: int) -> None:
    _require("pkey_mprotect")
    call(lib.pk_glibc_pkey_mprotect, addr, length, prot, pkey)


def pkey_get(pkey: int) -> int:
    _require("pkey_get", needs_register=True)
    return call(lib.pk_glibc_pkey_get, pkey)


def pkey_set(pkey: int, access_rights: int) -> None:
    _require("pkey_set", needs_register=True)
    lib.pk_exposure_untracked()  # the register changes behind pkeys' back
    call(lib.pk_glibc_pkey_set, pkey, access_rights)
