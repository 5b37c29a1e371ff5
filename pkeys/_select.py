"""Choosing the backend, once, at import.

``PKEYS_BACKEND`` may be ``auto`` (the default), ``hardware`` or
``software``.  ``auto`` takes the hardware where the OS has enabled PKU and
the software emulation elsewhere.  Asking for ``hardware`` where it is
absent does not break the import: the first operation raises
UnsupportedError saying why.  In the simulated-register build
(``PKEYS_BUILD_SIMULATED_PKU=1``) ``auto`` and ``hardware`` give the
``simulated`` backend, with a SimulatedRegisterWarning.
"""

from __future__ import annotations

import os
import warnings

from ._binding import lib
from ._types import Backend

__all__ = ["hardware_supported", "hardware_absence_reason", "choose", "cpu_model", "emulated"]

CHOICES = ("auto", "hardware", "software")


def hardware_supported() -> bool:
    """True when PKU instructions can run: the CPU has PKU and the OS set
    CR4.PKE.  Never in the simulated-register build, which protects nothing."""
    return bool(lib.pk_cpu_has_pku() and lib.pk_cpu_has_ospke() and not lib.pk_build_simulated())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def emulated() -> bool:
    """True under QEMU's software emulation (TCG), whose timings are not a CPU's."""
    return "QEMU" in cpu_model()


SIMULATED_REASON = (
    "this is the simulated-register build (PKEYS_BUILD_SIMULATED_PKU=1): RDPKRU/WRPKRU act "
    "on a thread-local variable and pkey_mprotect is mprotect, so it PROTECTS NOTHING; it "
    "exists to measure the hardware path without PKU"
)


def hardware_absence_reason() -> str:
    if lib.pk_build_simulated():
        return SIMULATED_REASON
    if not lib.pk_arch_is_x86():
        return "not an x86 CPU: protection keys here are x86 PKU only"
    if not lib.pk_cpu_has_pku():
        return "the CPU does not have PKU (CPUID.7.0:ECX bit 3 is 0)"
    if not lib.pk_cpu_has_ospke():
        return "the OS has not enabled PKU (CPUID.7.0:ECX bit 4, OSPKE, is 0)"
    return ""


def choose(environ: os._Environ[str] | dict[str, str] = os.environ) -> tuple[Backend, str]:
    """The backend module and a sentence saying why it was chosen.  The
    choice is made in C too, once: every operation runs in that mode."""
    from . import _hardware, _simulated, _software, _unavailable, _validate
    from ._errors import SimulatedRegisterWarning

    requested = environ.get("PKEYS_BACKEND", "").strip().lower() or "auto"
    chosen: Backend
    if requested not in CHOICES:
        _unavailable.reason = (
            f"PKEYS_BACKEND={requested!r} is not one of {', '.join(CHOICES)}"
        )
        chosen, why = _unavailable, _unavailable.reason
    elif requested == "software":
        chosen, why = _software, "PKEYS_BACKEND=software asked for the mprotect emulation"
    elif lib.pk_build_simulated():
        chosen, why = _simulated, SIMULATED_REASON
        warnings.warn(SIMULATED_REASON, SimulatedRegisterWarning, stacklevel=2)
    elif hardware_supported():
        how = "asked for by PKEYS_BACKEND" if requested == "hardware" else "detected"
        chosen, why = _hardware, f"PKU and OSPKE present ({how})"
    elif requested == "hardware":
        _unavailable.reason = (
            f"PKEYS_BACKEND=hardware, but {hardware_absence_reason()}; "
            "unset it to use the software backend"
        )
        chosen, why = _unavailable, _unavailable.reason
    else:
        chosen, why = _software, f"{hardware_absence_reason()}, so the mprotect emulation is used"
    if chosen is _unavailable:
        _validate.unsupported_reason = _unavailable.reason
    elif lib.pk_state_mode() != chosen.MODE:
        lib.pk_state_init(chosen.MODE)
    return chosen, why
