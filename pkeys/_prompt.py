"""``prompt``: ``getpass`` for secrets that must never be a ``str``.

The line is read with ``read(2)`` straight into a new ProtectedBuffer,
with echo off and write access to the buffer open only for the call, so
no Python object (``str``, ``bytes``, an input buffer of ``sys.stdin``)
ever holds it.  The terminal's own line buffer in the kernel is the only
other place the secret passes through.
"""

from __future__ import annotations

import os
import termios
from typing import Any

from ._buffer import ProtectedBuffer
from ._errors import ArgumentError
from ._validate import check_fd, require_int

__all__ = ["prompt"]


def prompt(prompt: str = "Secret: ", size: int = 1024, *, tty: int | str | None = None,
           label: str = "prompt", **options: Any) -> ProtectedBuffer:
    """Ask for a secret on the terminal and return it in a ProtectedBuffer
    sized to the line (without its newline).

    ``size`` is the longest line accepted.  ``tty`` is the terminal: a
    path or an open descriptor (default ``/dev/tty``, the controlling
    terminal, as ``getpass`` does).  Echo is off while the line is read and
    is restored afterwards, even on error.  ``options`` are
    ProtectedBuffer's (``secretmem``, ``lock_memory``...).  Raises EOFError
    at end of input, ArgumentError for an empty or too long line (the rest
    of a long line is discarded).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
    size = require_int(size, "size")
    if not 0 < size < 1 << 30:
        raise ArgumentError(f"size must be in 1..2**30-1 bytes, not {size}")
    if isinstance(tty, bool) or not isinstance(tty, (int, str, type(None))):
        raise TypeError(f"tty must be a path or a file descriptor, not {type(tty).__name__}")
    own = not isinstance(tty, int)
    fd: int = (check_fd(tty) if isinstance(tty, int)
               else os.open(tty or "/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))
    try:
        try:
            saved = termios.tcgetattr(fd)
        except termios.error as exc:  # neither an OSError nor a PkeysError
            raise OSError(exc.args[0], f"prompt() needs a terminal, and tty={tty!r} is not one "
                          f"({exc.args[1]})") from None
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO  # lflag: no echo, but still canonical (line by line)
        # One byte more than allowed tells a line that is too long.
        buffer = ProtectedBuffer(size + 1, label=label, **options)
        try:
            os.write(fd, prompt.encode())
            termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
            try:
                got = buffer._mapping.read(fd, buffer._mapping.data, size + 1, True)
            finally:
                termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
                os.write(fd, b"\n")  # the newline that echo would have shown
            mapping = buffer._mapping
            newline = got > 0 and mapping.equal(mapping.data + got - 1, b"\n")
            length = got - 1 if newline else got
            if got == 0:
                raise EOFError("end of input before a line was entered")
            if not newline and got > size:
                termios.tcflush(fd, termios.TCIFLUSH)
                raise ArgumentError(f"the line is longer than size={size} bytes")
            if length == 0:
                raise ArgumentError("an empty line was entered")
            mapping.trim(length)  # the newline is left behind, and wiped
        except BaseException:
            buffer.close()
            raise
        return buffer
    finally:
        if own:
            os.close(fd)
