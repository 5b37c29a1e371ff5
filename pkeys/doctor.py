"""``pkeys doctor``: what this machine offers, and what pkeys does with it."""

from __future__ import annotations

import errno
import json
import platform
import sys
from typing import Any

import psutil

import pkeys

from . import _api, glibc
from ._binding import lib
from ._errors import UnsupportedError
from ._revocation import no_revocation_error, signal_taken_error
from ._rights import NUM_KEYS
from ._select import cpu_model, emulated, hardware_absence_reason, hardware_supported

__all__ = ["SCHEMA", "collect", "main"]

#: The version of ``pkeys doctor --json``'s layout (docs/commands.md).  It
#: goes up when a field is removed, renamed or changes meaning; new fields
#: do not change it.
SCHEMA = 1

SOFTWARE_DIFFERENCES = [
    "rights are process-wide, not per thread: allowing a key in one thread allows it in all",
    "each rights change costs an mprotect syscall per region, not one instruction",
    "a denied access faults with SEGV_ACCERR, not SEGV_PKUERR",
    "ProtectedBuffer.unlocked() opens the buffer to every thread for the block",
    "a key that denies access makes PROT_EXEC memory unexecutable too",
]


def _limit(value: int) -> int | None:
    return None if value == psutil.RLIM_INFINITY else value


def locked_bytes() -> int:
    """This process's locked memory (``VmLck``), which ProtectedBuffer's
    ``mlock`` adds to; psutil has no field for it."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    return 0


def backend_failure() -> str | None:
    """None when the chosen backend can allocate and free a key; else why not."""
    try:
        pkey = pkeys.pkey_alloc()
    except UnsupportedError as refused:
        return str(refused)
    except OSError as error:
        # Every key taken is a full backend, not a broken one.
        if error.errno == errno.ENOSPC:
            return None
        raise
    pkeys.pkey_free(pkey)
    return None


def collect() -> dict[str, Any]:
    """Everything ``pkeys doctor`` reports, as plain data."""
    try:
        pkru: int | None = pkeys.rdpkru()
    except UnsupportedError:
        pkru = None
    process = psutil.Process()
    memlock_soft, memlock_hard = process.rlimit(psutil.RLIMIT_MEMLOCK)
    shadow = _api.shadow_pkru()
    allocated = pkeys.allocated_keys()
    failure = backend_failure()
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "version": pkeys.__version__,
        "cpu": {
            "model": cpu_model(),
            "arch": platform.machine(),
            "pku": bool(lib.pk_cpu_has_pku()),
            "ospke": bool(lib.pk_cpu_has_ospke()),
        },
        "emulated": emulated(),
        "simulated_register": bool(lib.pk_build_simulated()),
        "kernel": platform.release(),
        "glibc": {"version": glibc.version() or None, "functions": glibc.available()},
        "hardware_supported": hardware_supported(),
        "hardware_absence_reason": hardware_absence_reason() or None,
        "backend": {
            "name": pkeys.backend(),
            "reason": pkeys.backend_reason(),
            "works": failure is None,
            "failure": failure,
            "differences_from_hardware": SOFTWARE_DIFFERENCES
            if pkeys.backend() == "software" else [],
        },
        "pkru": None
        if pkru is None
        else {
            "value": f"{pkru:#010x}",
            "scope": "process (emulated)" if pkeys.backend() == "software" else "this thread",
            "keys": {str(k): _rights_name((pkru >> (2 * k)) & 3) for k in range(NUM_KEYS)},
            "matches_package_record": None if shadow is None else shadow == pkru,
        },
        "allocated_keys": allocated,
        "revocation": _revocation_status(),
        "locked_memory": locked_bytes(),
        "rlimit_memlock": {"soft": _limit(memlock_soft), "hard": _limit(memlock_hard)},
        "threads": process.num_threads(),
        "vm": _vm_status(),
        "secretmem": _secret_memory(),
    }
    report["verdict"] = _verdict(report)
    return report


def _verdict(report: dict[str, Any]) -> dict[str, Any]:
    """The conclusion, as the exit status sees it: whether hardware keys
    are usable, whether the chosen backend works, and one sentence."""
    hardware = ("hardware protection keys are usable" if report["hardware_supported"] else
                f"no hardware protection keys: {report['hardware_absence_reason']}")
    backend = report["backend"]
    return {
        "hardware_usable": report["hardware_supported"],
        "backend_works": backend["works"],
        "summary": f"{hardware}; the {backend['name']} backend "
        + ("works" if backend["works"] else "does NOT work"),
    }


def _secret_memory() -> dict[str, Any]:
    from ._secretmem import availability, seal_availability

    (available, reason), (sealable, seal_reason) = availability(), seal_availability()
    return {"available": available, "reason": reason, "mseal": sealable, "mseal_reason": seal_reason}


def _revocation_status() -> dict[str, Any]:
    """Whether Key.revoke() can reach other threads here: it edits the PKRU
    saved in their signal frames, which depends on the kernel."""
    if pkeys.backend() == "software":
        return {"mechanism": "process-wide rights (software backend)", "works": True,
                "signal": None, "reason": ""}
    status = lib.pk_revocation_check()  # the check every revocation relies on
    reason = ""
    if status == lib.PK_E_NO_REVOCATION:
        reason = str(no_revocation_error())
    elif status == lib.PK_E_SIGNAL_TAKEN:
        reason = str(signal_taken_error())
    elif status:
        reason = f"the check could not run (status {status})"
    mechanism = ("thread-local simulated PKRU edit" if lib.pk_build_simulated()
                 else "signal-frame PKRU edit")
    return {"mechanism": mechanism, "works": status == 0,
            "signal": lib.pk_revocation_signal(), "reason": reason}


def _vm_status() -> dict[str, Any]:
    from . import vm

    ready = vm.status()
    return {"ready": ready.ready, "missing": ready.missing(), "cache": str(vm.cache_dir())}


def _rights_name(bits: int) -> str:
    return ("read/write", "no access", "read-only", "no access")[bits]


def _render(report: dict[str, Any]) -> str:
    cpu = report["cpu"]
    glibc_info = report["glibc"]
    missing = [name for name, found in glibc_info["functions"].items() if not found]
    lines = [
        f"CPU            {cpu['model']} ({cpu['arch']})"
        + (", emulated: semantics are real, timings are not" if report["emulated"] else ""),
        f"  PKU          {'yes' if cpu['pku'] else 'no'}",
        f"  OSPKE        {'yes' if cpu['ospke'] else 'no'}",
        f"kernel         {report['kernel']}",
        f"glibc          {glibc_info['version'] or 'not glibc'}; pkey_* functions: "
        + ("all present" if not missing else "missing " + ", ".join(missing)),
        f"backend        {report['backend']['name']}: {report['backend']['reason']}",
    ]
    if report["simulated_register"]:
        lines.insert(0, "!! SIMULATED-REGISTER BUILD: PKU and OSPKE read as present, the register "
                        "is a thread-local variable, NOTHING IS PROTECTED")
    if not report["backend"]["works"]:
        lines.append(f"  NOT WORKING  {report['backend']['failure']}")
    for difference in report["backend"]["differences_from_hardware"]:
        lines.append(f"  unlike PKU:  {difference}")
    pkru = report["pkru"]
    if pkru is None:
        lines.append("PKRU           unavailable")
    else:
        lines.append(f"PKRU           {pkru['value']} ({pkru['scope']})")
        row = "  ".join(f"{k:>2}:{_short(v)}" for k, v in pkru["keys"].items())
        lines.append(f"  per key      {row}")
        lines.append("               (rw = read/write, r- = read-only, -- = no access)")
        if pkru["matches_package_record"] is False:
            lines.append("  warning      PKRU differs from what pkeys last wrote: something else wrote it")
    keys = report["allocated_keys"]
    lines.append(f"allocated keys {', '.join(map(str, keys)) if keys else 'none'}")
    revocation = report["revocation"]
    lines.append(
        f"all threads    {revocation['mechanism']}: "
        + ("works" if revocation["works"] else "does NOT work")
        + (f" (signal {revocation['signal']})" if revocation["signal"] else "")
        + (f": {revocation['reason']}" if revocation["reason"] else "")
    )
    memlock = report["rlimit_memlock"]
    lines.append(f"locked memory  {_bytes(report['locked_memory'])} (ProtectedBuffer mlocks its pages)")
    lines.append(
        f"RLIMIT_MEMLOCK soft {_bytes(memlock['soft'])}, hard {_bytes(memlock['hard'])}"
    )
    secret = report["secretmem"]
    lines.append(f"secretmem      {'yes' if secret['available'] else 'no'}: {secret['reason']}")
    lines.append(f"mseal          {'yes' if secret['mseal'] else 'no'}: {secret['mseal_reason']}")
    lines.append(f"threads        {report['threads']}")
    vm = report["vm"]
    lines.append(
        "emulated PKU VM "
        + ("ready: `pkeys vm -- CMD` runs CMD on an emulated PKU CPU" if vm["ready"] else
           f"not ready (missing {', '.join(vm['missing'])}): run `pkeys vm setup`")
    )
    lines.append(f"verdict        {report['verdict']['summary']}")
    return "\n".join(lines)


def _short(name: str) -> str:
    return {"read/write": "rw", "read-only": "r-", "no access": "--"}[name]


def _bytes(value: int | None) -> str:
    return "unlimited" if value is None else f"{value} bytes"


def main(as_json: bool = False, require_hardware: bool = False) -> int:
    """Print the report.  The exit status is 0 when the chosen backend works
    (the software one included), 1 when it does not; with
    ``require_hardware``, 0 only when hardware PKU is usable."""
    report = collect()
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_render(report))
    verdict = report["verdict"]
    if require_hardware and not verdict["hardware_usable"]:
        print(f"pkeys doctor: exit status 1 (--require-hardware): no hardware protection keys: "
              f"{report['hardware_absence_reason']}", file=sys.stderr)
        return 1
    if not require_hardware and not verdict["backend_works"]:
        print(f"pkeys doctor: exit status 1: the {report['backend']['name']} backend does not "
              f"work: {report['backend']['failure']}", file=sys.stderr)
        return 1
    return 0
