"""The guest console, split into the boot log and the command's stdout."""

from __future__ import annotations

import re
from collections import deque
from typing import BinaryIO

START_MARKER = b"@@pkeys-vm-start@@"
_KERNEL_LINE = re.compile(rb"^\[\s*\d+\.\d+\] ")
_PANIC = re.compile(rb"Kernel panic - not syncing")


class Console:
    """Feeds on the raw console bytes.  Before the start marker they are the
    boot log: kept (its last lines explain a failed boot) and shown live
    when ``boot_log`` is given.  After it they are the command's stdout,
    forwarded without CRs or stray kernel log lines."""

    def __init__(self, out: BinaryIO, boot_log: BinaryIO | None = None) -> None:
        self.out = out
        self.boot_log = boot_log
        self.started = False
        self.boot_lines: deque[bytes] = deque(maxlen=40)
        self._boot_partial = b""
        self._pending = b""
        self.failed_boot = False  # a panic was seen before the command started
        self._marker_newline = False  # the marker's own newline is still to come

    def feed(self, data: bytes) -> None:
        data = data.replace(b"\r", b"")
        if not self.started:
            data = self._feed_boot(data)
            if not self.started:
                return
        if self._marker_newline and data:
            # The marker's newline may arrive in a later read than the marker.
            self._marker_newline = False
            data = data.removeprefix(b"\n")
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            if not _KERNEL_LINE.match(line):
                self.out.write(line + b"\n")
        if self._pending and not _KERNEL_LINE.match(self._pending):
            # A prompt or progress output without a newline: show it now.
            self.out.write(self._pending)
            self._pending = b""
        self.out.flush()

    def _feed_boot(self, data: bytes) -> bytes:
        text = self._boot_partial + data
        index = text.find(START_MARKER)
        boot = text if index < 0 else text[:index]
        if self.boot_log is not None:
            shown = boot[len(self._boot_partial):] if len(boot) >= len(self._boot_partial) else b""
            self.boot_log.write(shown)
            self.boot_log.flush()
        *lines, partial = boot.split(b"\n")
        for line in lines:
            self.boot_lines.append(line)
            if _PANIC.search(line):
                self.failed_boot = True
        if index < 0:
            # Keep the unfinished line, and enough to spot a split marker.
            self._boot_partial = partial[-4096:]
            return b""
        self.started = True
        self._marker_newline = True
        if partial:
            self.boot_lines.append(partial)
        return text[index + len(START_MARKER):]

    def last_boot_lines(self, count: int = 15) -> list[str]:
        raw = list(self.boot_lines)
        if self._boot_partial and not self.started:
            raw.append(self._boot_partial)
        lines = [line.decode(errors="replace").rstrip() for line in raw if line.strip()]
        return lines[-count:]

    def close(self) -> None:
        if self._pending and not _KERNEL_LINE.match(self._pending):
            self.out.write(self._pending)
        self.out.flush()
