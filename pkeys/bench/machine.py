"""What the numbers were measured on."""

from __future__ import annotations

import platform
import sys
from typing import Any

from .._binding import lib
from .._select import cpu_model, emulated, hardware_supported


def describe() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "pku": bool(lib.pk_cpu_has_pku()),
        "ospke": bool(lib.pk_cpu_has_ospke()),
        "hardware_supported": hardware_supported(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "emulated": emulated(),
        "simulated_register": bool(lib.pk_build_simulated()),
    }
