"""The script the guest runs for the command: limits, user, directory,
environment, argv, all taken from the host so that the command behaves as
it would have there."""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import sys
from dataclasses import dataclass, field

from .errors import EXIT_VM_FAILED


@dataclass(frozen=True)
class Identity:
    """Who the command runs as; ``root`` keeps the guest's root."""

    uid: int
    gid: int
    groups: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def current(cls) -> Identity:
        return cls(os.getuid(), os.getgid(), tuple(sorted(set(os.getgroups()))))

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def _limit(value: int) -> str:
    """An rlimit in the kilobytes that sh's ``ulimit -l`` takes."""
    return "unlimited" if value == resource.RLIM_INFINITY else str(value // 1024)


def _drop_privileges(identity: Identity) -> list[str]:
    """The argv prefix that runs the rest as ``identity``: util-linux setpriv
    where the host has it (it is the guest's /usr/bin too), else Python."""
    setpriv = shutil.which("setpriv")
    groups = ",".join(str(g) for g in identity.groups)
    if setpriv:
        group_option = f"--groups={groups}" if groups else "--clear-groups"
        return [setpriv, f"--reuid={identity.uid}", f"--regid={identity.gid}", group_option, "--"]
    code = (
        "import os, sys; g = [int(x) for x in sys.argv[1].split(',') if x]; "
        "os.setgroups(g); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[3])); "
        "os.execvp(sys.argv[4], sys.argv[4:])"
    )
    return [sys.executable, "-c", code, groups, str(identity.gid), str(identity.uid)]


def guest_script(
    argv: list[str],
    cwd: str,
    environ: dict[str, str],
    identity: Identity | None = None,
) -> str:
    """The shell script for the guest: this environment, this directory, this
    command, as ``identity`` (None: root), under the host's RLIMIT_MEMLOCK."""
    interpreter_dir = os.path.dirname(sys.executable)
    env = dict(environ)
    # pyenv's shims cost seconds per start under emulation: put the real
    # interpreter first.
    env["PATH"] = interpreter_dir + os.pathsep + env.get("PATH", "")
    # Every variable, whatever its name (A-B, BASH_FUNC_f%%, -X): `env`
    # takes them as arguments, not as shell assignments, and "--" keeps a
    # name that starts with "-" from reading as an option.  A name cannot
    # hold "=" (the environment's own separator).
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()) if "=" not in k)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    prefix = []
    if identity is not None and not identity.is_root:
        prefix = _drop_privileges(identity)
    command = " ".join(shlex.quote(a) for a in [*prefix, "env", "-i", "--"]) + f" {assignments} "
    command += " ".join(shlex.quote(a) for a in argv)
    return (
        # Locked memory is limited for non-root users as on the host (root
        # is not limited by it anyway).
        f"ulimit -H -l {_limit(hard)} 2>/dev/null; ulimit -S -l {_limit(soft)} 2>/dev/null\n"
        f"cd {shlex.quote(cwd)} || exit {EXIT_VM_FAILED}\n"
        f"exec {command}\n"
    )
