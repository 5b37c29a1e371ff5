"""The errors of a change of rights for every thread (``csrc/revoke.c``),
said in words that lead somewhere: which thread, what it is, and why it
could not be reached."""

from __future__ import annotations

import os
import signal
from typing import Any

from ._binding import ffi, lib
from ._errors import RevocationError, UnsupportedError

__all__ = ["revocation_error", "no_revocation_error", "signal_taken_error", "signal_name"]

# A thread that blocks every signal, the usual reason one never answers.
WATCHDOG_HINT = (
    "a common cause is faulthandler.dump_traceback_later(), whose watchdog thread "
    "blocks every signal: call faulthandler.cancel_dump_traceback_later() before "
    "revoking, closing a Key or closing a ProtectedBuffer, or start the watchdog "
    "before allocating keys (a thread born before a key never had it and is left out)"
)


def signal_name(signo: int) -> str:
    if signo == lib.PK_HANDLER_SIGNAL_UNKNOWN:  # seen by its frame, installed without SA_SIGINFO
        return "signal"
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"SIGRTMIN+{signo - signal.SIGRTMIN}"


def _thread_name(tid: int) -> str:
    """``tid (comm)``: /proc/self/task/TID/comm usually says whose thread it is."""
    try:
        with open(f"/proc/self/task/{tid}/comm", encoding="utf-8", errors="replace") as comm:
            return f"{tid} ({comm.read().strip()!r})"
    except OSError:
        return f"{tid} (exited)"


def _blocks(tid: int, signo: int) -> bool:
    try:
        with open(f"/proc/self/task/{tid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("SigBlk:"):
                    return bool((int(line.split()[1], 16) >> (signo - 1)) & 1)
    except (OSError, ValueError):
        pass
    return False


def revocation_error(pkey: object, consequence: str, result: Any = None) -> RevocationError:
    """The RevocationError for a broadcast that failed (``PK_E_BROADCAST``):
    ``result`` if the caller passed one to C, else this thread's last
    failed broadcast (paths such as a pool eviction pass none)."""
    if result is None:
        result = ffi.new("struct pk_broadcast *")
        lib.pk_revocation_last_failure(result)
    count = min(result.unanswered + result.refused + result.in_handler, lib.PK_BROADCAST_LISTED)
    listed = [(result.listed[i], result.listed_signal[i]) for i in range(count)]
    first_refused, first_in_handler = result.unanswered, result.unanswered + result.refused
    unanswered = tuple(tid for tid, _ in listed[:first_refused])
    refused = tuple(tid for tid, _ in listed[first_refused:first_in_handler])
    in_handler = tuple(tid for tid, _ in listed[first_in_handler:])
    signo = lib.pk_revocation_signal()
    parts = [f"pkey {pkey}: the change reached {result.answered} of {result.threads} other "
             f"thread(s) and this one"
             + (f" ({result.exempt} more never had the key and needed nothing)"
                if result.exempt else "")]
    if unanswered:
        blocking = [tid for tid in unanswered if _blocks(tid, signo)]
        names = ", ".join(_thread_name(tid) for tid in unanswered)
        parts.append(
            f"thread(s) {names} did not answer signal {signal_name(signo)} ({signo}) within "
            f"{result.seconds:.2f} s" + (" (they block it)" if blocking else "")
            + f"; they apply the change when they handle it; {WATCHDOG_HINT}")
    if refused:
        parts.append(f"the signal frames of threads {list(refused)} could not be edited")
    if in_handler:
        names = ", ".join(f"{_thread_name(tid)} in a {signal_name(outer)} handler"
                          for tid, outer in listed[first_in_handler:])
        parts.append(
            f"thread(s) {names} were running another signal handler each time they were "
            "signalled (or block that handled signal on purpose); the handler's return "
            "would restore the rights they had, so they keep them: revoke again once the "
            "handler has returned")
    if consequence:
        parts.append(consequence)
    return RevocationError("; ".join(parts), threads=result.threads, answered=result.answered,
                           unanswered=unanswered, refused=refused, in_handler=in_handler,
                           exempt=result.exempt)


def no_revocation_error() -> UnsupportedError:
    """The signal-frame edit does not work on the running kernel."""
    return UnsupportedError(
        f"rights for every thread at once do not work on this kernel ({os.uname().release}): "
        "editing the PKRU saved in a signal frame did not change the register after "
        "sigreturn (checked before the first revocation; `pkeys doctor` reports it). "
        "Key.revoke(), pkey_set(..., threads='all'), Key.close() and the virtual-key pool "
        "refuse rather than report a revocation that did not happen")


def signal_taken_error() -> RevocationError:
    """The revocation signal has a handler that is not pkeys'."""
    signo = lib.pk_revocation_signal()
    return RevocationError(
        f"signal {signal_name(signo)} ({signo}), which pkeys uses to revoke rights in every "
        "thread, has another handler (installed before pkeys', or over it since); nothing "
        "was signalled. Leave that signal to pkeys, or pick another one for it with "
        "PKEYS_REVOKE_SIGNAL=N (SIGRTMIN+N) in the environment before pkeys is imported")
