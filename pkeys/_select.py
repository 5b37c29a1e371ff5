"""Choosing the backend: once, here, when ``pkeys`` is imported
(:func:`select`).

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
from dataclasses import dataclass

from ._binding import lib
from ._types import Backend

__all__ = ["hardware_supported", "hardware_absence_reason", "Choice", "choose", "select",
           "chosen", "cpu_model", "emulated"]

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


@dataclass(frozen=True)
class Choice:
    """A backend and the sentence saying why it was chosen.  For the
    unavailable stand-in (MODE 0) the sentence is also why every operation
    raises UnsupportedError."""

    backend: Backend
    reason: str

    @property
    def unsupported_reason(self) -> str:
        return "" if self.backend.MODE else self.reason


def choose(environ: os._Environ[str] | dict[str, str] = os.environ) -> Choice:
    """The backend that ``environ`` asks for on this machine.  Changes
    nothing: :func:`select` acts on the choice."""
    from . import _hardware, _simulated, _software, _unavailable

    requested = environ.get("PKEYS_BACKEND", "").strip().lower() or "auto"
    if requested not in CHOICES:
        return Choice(_unavailable,
                      f"PKEYS_BACKEND={requested!r} is not one of {', '.join(CHOICES)}")
    if requested == "software":
        return Choice(_software, "PKEYS_BACKEND=software asked for the mprotect emulation")
    if lib.pk_build_simulated():
        return Choice(_simulated, SIMULATED_REASON)
    if hardware_supported():
        how = "asked for by PKEYS_BACKEND" if requested == "hardware" else "detected"
        return Choice(_hardware, f"PKU and OSPKE present ({how})")
    if requested == "hardware":
        return Choice(_unavailable, f"PKEYS_BACKEND=hardware, but {hardware_absence_reason()}; "
                                    "unset it to use the software backend")
    return Choice(_software, f"{hardware_absence_reason()}, so the mprotect emulation is used")


_chosen: Choice | None = None


def select() -> Choice:
    """Make the choice, once per process: C runs every operation in its
    mode from then on, and on hardware every ``threading.Thread`` starts
    outside its creator's grants (``_births``: hardware grants belong to
    threads, and threads copy their creator's register).  ``pkeys``
    calls it as it is imported; later calls return the same choice."""
    global _chosen
    if _chosen is None:
        from . import _births
        from ._errors import SimulatedRegisterWarning

        choice = choose()
        if choice.backend.NAME == "simulated":
            warnings.warn(SIMULATED_REASON, SimulatedRegisterWarning, stacklevel=2)
        if choice.backend.MODE and lib.pk_state_mode() != choice.backend.MODE:
            lib.pk_state_init(choice.backend.MODE)
        if choice.backend.NAME == "hardware":
            _births.install()
        _chosen = choice
    return _chosen


def chosen() -> Choice:
    """The choice :func:`select` made."""
    return _chosen if _chosen is not None else select()
