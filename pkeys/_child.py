"""Run a function in a forked child and report how the child ended.

Faults are the point of protection keys, and a fault kills the process.
Running the access in a fork keeps the caller alive.  A fork is cheap
compared with a new interpreter, which costs about a second under
emulation.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ChildResult", "run_in_child"]


@dataclass(frozen=True)
class ChildResult:
    signal: int | None
    exitcode: int | None
    stderr: str

    @property
    def segfaulted(self) -> bool:
        return self.signal == signal.SIGSEGV

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exited with status {self.exitcode}"


def run_in_child(
    function: Callable[[], object], *, quiet: bool = True, keep_faulthandler: bool = False
) -> ChildResult:
    """Fork, call ``function`` in the child, and wait.

    The child exits 0 when ``function`` returns, 1 when it raises.
    Its stderr is captured.  ``quiet`` silences faulthandler in the child
    (it would print a traceback before the expected death) unless
    ``keep_faulthandler`` asks to see it.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            os.close(read_end)
            os.dup2(write_end, 2)
            if quiet and not keep_faulthandler:
                faulthandler.disable()
            function()
            status = 0
        except BaseException:
            import traceback

            # fd 2 itself: sys.stderr may be a test runner's replacement.
            os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    stderr = b"".join(chunks).decode(errors="replace")
    if os.WIFSIGNALED(wait_status):
        return ChildResult(os.WTERMSIG(wait_status), None, stderr)
    return ChildResult(None, os.WEXITSTATUS(wait_status), stderr)
