"""What the numbers were measured on."""

from __future__ import annotations

import platform
import sys
from typing import Any

from .._binding import lib
from .._select import hardware_supported


def cpu_model() -> str:
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


def describe() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "pku": bool(lib.pk_cpu_has_pku()),
        "ospke": bool(lib.pk_cpu_has_ospke()),
        "hardware_supported": hardware_supported(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "emulated": emulated(),
    }
