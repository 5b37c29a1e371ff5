"""The exit statuses of ``pkeys vm`` and its one exception."""

from __future__ import annotations

import signal

EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_VM_FAILED = 125  # the machine, not the command, failed
EXIT_USAGE = 2


def exit_for_signal(signo: int) -> int:
    """What a shell reports for a command that a signal ended: 128 + n."""
    return 128 + int(signo)


EXIT_SIGINT = exit_for_signal(signal.SIGINT)  # 130
EXIT_SIGTERM = exit_for_signal(signal.SIGTERM)  # 143


class VMError(Exception):
    """The emulated machine could not be prepared or started."""
