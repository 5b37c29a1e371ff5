"""``pkeys vm``: run a command on an emulated PKU CPU.

QEMU's full-system software emulation (TCG) with ``-cpu max`` advertises
PKU and OSPKE, and a stock Debian kernel enables them, so protection keys
behave there as on hardware (only timings differ).  The guest sees the
host's root filesystem read-only over virtio-9p, the current directory
writable at the same path, and a throwaway /tmp.  The command runs in the
current directory with the host's environment, uid and gid; its exit
status is ours.

KVM is not used: it would not expose PKU to a stock guest on the machines
this was built for, and TCG boots the kernel in about 2.5 s.

Modules: :mod:`.kernels` (the cache of kernels; :mod:`.debian` finds and
downloads them, :mod:`.decompress` and :mod:`.modules` unpack them),
:mod:`.initramfs`, :mod:`.prepare` (`pkeys vm setup`), :mod:`.qemu`, :mod:`.guest` (the command's
script), :mod:`.console`, :mod:`.runner`, :mod:`.selftest`, :mod:`.cli`.
"""

from __future__ import annotations

from .decompress import extract_vmlinux
from .errors import EXIT_SIGINT, EXIT_SIGTERM, EXIT_TIMEOUT, EXIT_VM_FAILED, VMError
from .guest import Identity, guest_script
from .paths import cache_dir
from .qemu import qemu_command
from .runner import Options, exit_code, run
from .prepare import Status, setup, status
from .tools import install_packages as _install_packages  # noqa: F401  (kept for callers of 0.1)

__all__ = [
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_TIMEOUT",
    "EXIT_VM_FAILED",
    "Identity",
    "Options",
    "Status",
    "VMError",
    "cache_dir",
    "exit_code",
    "extract_vmlinux",
    "guest_script",
    "qemu_command",
    "run",
    "setup",
    "status",
]
