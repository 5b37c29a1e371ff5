"""Whether the kernel offers ``memfd_secret`` and ``mseal``, and why not.

``memfd_secret(2)`` (Linux 5.14, ``CONFIG_SECRETMEM``) gives pages that
leave the kernel's direct map: ``/proc/PID/mem`` and ``process_vm_readv``
cannot read them, where they read straight through a protection key.
``mseal(2)`` (Linux 6.10) stops later ``mprotect``, ``pkey_mprotect``,
``munmap`` and ``mremap`` of a mapping.  Both answer ENOSYS for several
reasons; :func:`availability` and :func:`seal_availability` tell which.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
import re

from ._binding import lib

__all__ = ["availability", "explain", "kernel_version", "seal_availability", "memlock_budget"]

_ENABLE_PARAMETER = "/sys/module/secretmem/parameters/enable"


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of the running kernel (0, 0 when unreadable)."""
    match = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


@functools.cache
def availability() -> tuple[bool, str]:
    """``(available, reason)`` for secretmem-backed protected buffers."""
    if platform.machine() != "x86_64":
        return False, f"pkeys calls memfd_secret on x86-64 only, not on {platform.machine()}"
    status = lib.pk_secretmem_probe()
    if status == 0:
        return True, "memfd_secret works: protected buffers use secret memory by default"
    try:
        with open(_ENABLE_PARAMETER) as parameter:
            enabled: str | None = parameter.read().strip()
    except FileNotFoundError:
        enabled = None
    except OSError:
        enabled = ""
    return False, explain(-status, platform.release(), enabled)


def explain(err: int, release: str, enabled: str | None) -> str:
    """Why memfd_secret failed with ``err``, given the kernel ``release``
    and the ``secretmem.enable`` parameter (None: no such module)."""
    if err != errno.ENOSYS:
        return f"memfd_secret failed: {os.strerror(err)}"
    if kernel_version(release) < (5, 14):
        return f"kernel {release} predates memfd_secret (Linux 5.14)"
    if enabled is None:
        return "the kernel was built without CONFIG_SECRETMEM (memfd_secret: ENOSYS)"
    if enabled in ("N", "0"):
        return (
            "secretmem is disabled (secretmem.enable=0, the default before Linux 6.5): "
            "boot with secretmem.enable=1 on the kernel command line"
        )
    return (
        "memfd_secret: ENOSYS although CONFIG_SECRETMEM is built in (the kernel cannot "
        "remove pages from its direct map on this machine)"
    )


@functools.cache
def seal_availability() -> tuple[bool, str]:
    """``(available, reason)`` for ``ProtectedBuffer(seal=True)``'s ``mseal``."""
    if platform.machine() != "x86_64":
        return False, f"pkeys calls mseal on x86-64 only, not on {platform.machine()}"
    if lib.pk_mseal_available():
        return True, "mseal works"
    release = platform.release()
    if kernel_version(release) < (6, 10):
        return False, f"kernel {release} predates mseal (Linux 6.10)"
    return False, "mseal: ENOSYS (a kernel built without it)"


CAP_IPC_LOCK = 14


def memlock_budget() -> int | None:
    """How many more bytes RLIMIT_MEMLOCK lets this process lock, or None
    when it does not apply (no limit, or CAP_IPC_LOCK).  Secret pages count
    against it.  Only a first answer: other threads and processes lock
    memory too, so ``pk_secretmem_map`` also populates the pages when the
    limit applies, turning a refusal into an error instead of a SIGBUS at
    the first touch (6.1 and 6.12 map secret memory whatever the limit)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return None
    locked, capabilities = 0, 0
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmLck:"):
                    locked = int(line.split()[1]) * 1024
                elif line.startswith("CapEff:"):
                    capabilities = int(line.split()[1], 16)
    except OSError:
        return soft  # no procfs: the kernel decides, and populating catches it
    if capabilities >> CAP_IPC_LOCK & 1:
        return None
    return max(soft - locked, 0)
