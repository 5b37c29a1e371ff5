"""The host programs ``pkeys vm`` runs: QEMU and a static busybox (and, for
zstd-compressed kernels without a Python decoder, the zstd tool), and
strace, which the test suite runs on the host and in the guest (the guest
sees the host's /usr over 9p)."""

from __future__ import annotations

import os
import shutil
import subprocess

from . import paths
from .errors import VMError

QEMU = "qemu-system-x86_64"
#: Debian/Ubuntu package of each tool.
PACKAGES = {"qemu": "qemu-system-x86", "busybox": "busybox-static", "zstd": "zstd",
            "strace": "strace"}


def qemu() -> str | None:
    return shutil.which(QEMU)


def install_packages(names: list[str]) -> None:
    """apt-get install, when root on an apt system; otherwise say what to install."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise VMError(
            "missing tools; install the packages " + " ".join(names)
            + " (for example: sudo apt-get install " + " ".join(names) + ")"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *names]
    paths.log("installing " + " ".join(names))
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        # Stale package lists are the usual cause: refresh them once.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise VMError(f"apt-get install failed:\n{result.stderr[-2000:]}")
