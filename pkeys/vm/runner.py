"""Running one command in the emulated machine, as a well-mannered command.

* stdout and stderr stay apart (two serial lines) and stream live;
* stdin is forwarded when it is a pipe or a file (a terminal is not: the
  guest gets /dev/null);
* SIGINT and SIGTERM are passed to the guest command's process group; QEMU
  is then ended and the status is 128+n, as a shell reports it;
* QEMU never outlives us: it runs in its own session (a terminal's Ctrl-C
  reaches us, not it) and dies with us (PR_SET_PDEATHSIG);
* a guest that never reaches the command fails fast, with the end of its
  boot log;
* a closed stdout (``| head``) ends the run quietly with status 141.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Self

from . import qemu
from .console import Console
from .errors import EXIT_TIMEOUT, EXIT_VM_FAILED, VMError, exit_for_signal
from .guest import Identity, guest_script

#: After a forwarded signal, how long the guest command gets to exit.
SIGNAL_GRACE_S = 10.0
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_BROKEN_PIPE = exit_for_signal(signal.SIGPIPE)


@dataclass(frozen=True)
class Options:
    timeout: float = 1800.0
    boot_timeout: float = 60.0
    smp: int = 1
    mem: int = 2048
    verbose: bool = False
    append: str = ""
    root: bool = False


def validate(options: Options) -> None:
    """Refuse what QEMU would accept and then hang on, or refuse obscurely."""
    if not qemu.MIN_MEM_MB <= options.mem <= 1 << 20:
        raise VMError(f"--mem {options.mem}: give between {qemu.MIN_MEM_MB} and {1 << 20} MB "
                      "(the kernel alone needs about 100 MB)")
    if not 1 <= options.smp <= qemu.MAX_SMP:
        raise VMError(f"--smp {options.smp}: give between 1 and {qemu.MAX_SMP} virtual CPUs")
    if options.timeout <= 0 or options.boot_timeout <= 0:
        raise VMError("timeouts must be positive")


def exit_code(status_text: str | None, timed_out: bool) -> int:
    """Our exit status from the guest's report: the command's own status,
    124 on timeout, 125 when the VM produced none."""
    if timed_out:
        return EXIT_TIMEOUT
    if status_text is None:
        return EXIT_VM_FAILED
    try:
        code = int(status_text.strip())
    except ValueError:
        return EXIT_VM_FAILED
    return code if 0 <= code <= 255 else EXIT_VM_FAILED


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _isatty(stream: object) -> bool:
    try:
        return os.isatty(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def _forwardable_stdin(stdin: IO[Any] | None) -> int | None:
    """The fd to forward: a pipe, a file or a socket, never a terminal or /dev/null."""
    if stdin is None:
        return None
    try:
        fd = stdin.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return None
    if stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode):
        return fd
    return None


def _pump_stdin(fd: int, control: Path, stop: threading.Event) -> None:
    """Append what stdin gives to the control share's relay file, then mark the end."""
    with open(control / "stdin", "ab", buffering=0) as relay:
        while not stop.is_set():
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            relay.write(chunk)
    (control / "stdin.done").touch()


class _Signals:
    """SIGINT/SIGTERM handlers that only record the signal and wake the loop."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.write_end, False)
        self.received: list[int] = []
        self.previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signo in FORWARDED_SIGNALS:
                self.previous[signo] = signal.signal(signo, self._handle)
        return self

    def _handle(self, signo: int, frame: object) -> None:
        self.received.append(signo)
        try:
            os.write(self.write_end, b"s")
        except OSError:
            pass

    def __exit__(self, *exc: object) -> None:
        for signo, handler in self.previous.items():
            signal.signal(signo, handler)  # type: ignore[arg-type]
        os.close(self.read_end)
        os.close(self.write_end)


class _Output:
    """One of our output streams; remembers a reader that went away."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.broken = False

    def write(self, data: bytes) -> int:
        if not self.broken:
            try:
                self.stream.write(data)
            except BrokenPipeError:
                self.broken = True
        return len(data)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.broken = True


def run(
    argv: list[str],
    *,
    kernel: Path,
    initramfs: Path,
    options: Options = Options(),
    cwd: str | None = None,
    environ: dict[str, str] | None = None,
    stdin: BinaryIO | None = None,
    out: BinaryIO | None = None,
    err: BinaryIO | None = None,
    identity: Identity | None = None,
) -> int:
    """Run ``argv`` in the emulated machine; the exit status as described above.
    The command runs as ``identity`` (default: ours; root with ``options.root``)."""
    if not argv:
        raise VMError("no command given: pkeys vm -- CMD ARGS...")
    validate(options)
    cwd = os.path.realpath(cwd or os.getcwd())
    stdout = _Output(out or sys.stdout.buffer)
    stderr = _Output(err or sys.stderr.buffer)
    stdin_fd = _forwardable_stdin(sys.stdin if stdin is None else stdin)
    with tempfile.TemporaryDirectory(prefix="pkeys-vm-") as control_dir:
        control = Path(control_dir)
        (control / "cwd").write_text(cwd)
        if _isatty(stdout.stream):
            (control / "stdout-tty").touch()
        if _isatty(stderr.stream):
            (control / "stderr-tty").touch()
        if stdin_fd is not None:
            (control / "stdin").touch()
        if options.root:
            identity = None
        elif identity is None:
            identity = Identity.current()
        script = guest_script(argv, cwd, dict(os.environ if environ is None else environ), identity)
        (control / "run.sh").write_text(script)
        err_read, err_write = os.pipe()
        command = qemu.qemu_command(
            kernel, initramfs, control, cwd,
            stderr_path=f"/dev/fd/{err_write}",
            smp=options.smp, mem=options.mem,
            append=qemu.kernel_append(options.verbose, options.append),
        )
        if options.verbose:
            stderr.write(("pkeys vm: " + " ".join(command) + "\n").encode())
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(err_write,), start_new_session=True,
                # Safe here: no other thread of ours runs before QEMU has started.
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        except OSError as exc:
            os.close(err_read)
            os.close(err_write)
            raise VMError(f"cannot start {command[0]}: {exc.strerror}") from None
        os.close(err_write)
        stop_pump = threading.Event()
        if stdin_fd is not None:
            threading.Thread(target=_pump_stdin, args=(stdin_fd, control, stop_pump), daemon=True).start()
        try:
            with _Signals() as signals:
                outcome = _supervise(process, err_read, signals, stdout, stderr, options)
        finally:
            stop_pump.set()
            if process.poll() is None:
                process.kill()
            process.wait()
            os.close(err_read)
        status_file = control / "status"
        status_text = status_file.read_text() if status_file.exists() else None
    return _report(outcome, status_text, stderr, options)


@dataclass
class _Outcome:
    timed_out: bool = False
    signal: int | None = None
    broken_pipe: bool = False
    boot_failure: str | None = None  # why the guest never reached the command
    boot_lines: tuple[str, ...] = ()
    qemu_stderr: str = ""
    qemu_status: int | None = None


def _supervise(
    process: subprocess.Popen[bytes],
    err_read: int,
    signals: _Signals,
    stdout: _Output,
    stderr: _Output,
    options: Options,
) -> _Outcome:
    outcome = _Outcome()
    console = Console(stdout, boot_log=stderr if options.verbose else None)  # type: ignore[arg-type]
    qemu_errors = bytearray()
    started_at = time.monotonic()
    deadline = started_at + options.timeout
    boot_deadline = started_at + options.boot_timeout
    kill_at: float | None = None
    streams = {process.stdout.fileno(): "console", err_read: "stderr",  # type: ignore[union-attr]
               process.stderr.fileno(): "qemu", signals.read_end: "signal"}  # type: ignore[union-attr]
    with selectors.DefaultSelector() as selector:
        for fd, name in streams.items():
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ, name)
        open_streams = {"console", "stderr", "qemu"}
        while open_streams:
            now = time.monotonic()
            if now >= deadline:
                outcome.timed_out = True
                break
            if not console.started and now >= boot_deadline:
                outcome.boot_failure = f"the guest did not reach the command within {options.boot_timeout:g} s"
                break
            if kill_at is not None and now >= kill_at:
                break
            waits = [deadline, kill_at or deadline] + ([] if console.started else [boot_deadline])
            for key, _ in selector.select(max(0.0, min(waits) - now)):
                name = key.data
                if name == "signal":
                    os.read(signals.read_end, 64)
                    if outcome.signal is not None:
                        kill_at = now  # a second signal: stop at once
                    outcome.signal = signals.received[-1]
                    if kill_at is None:
                        _forward(process, outcome.signal)
                        kill_at = now + SIGNAL_GRACE_S
                    continue
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(key.fd)
                    open_streams.discard(name)
                    continue
                if name == "console":
                    console.feed(chunk)
                elif name == "stderr":
                    stderr.write(chunk)
                    stderr.flush()
                else:
                    qemu_errors += chunk
                if stdout.broken:
                    outcome.broken_pipe = True
                    return _finish(outcome, console, qemu_errors, process)
            if console.failed_boot and not console.started:
                outcome.boot_failure = "the guest kernel panicked"
                break
    return _finish(outcome, console, qemu_errors, process)


def _forward(process: subprocess.Popen[bytes], signo: int) -> None:
    """Ask the guest init to signal the command (it reads names on the console)."""
    try:
        process.stdin.write(f"{signal.Signals(signo).name.removeprefix('SIG')}\n".encode())  # type: ignore[union-attr]
        process.stdin.flush()  # type: ignore[union-attr]
    except (BrokenPipeError, OSError):
        pass


def _finish(outcome: _Outcome, console: Console, qemu_errors: bytearray,
            process: subprocess.Popen[bytes]) -> _Outcome:
    if process.poll() is None:
        process.kill()
    outcome.qemu_status = process.wait()
    console.close()
    if not console.started and outcome.boot_failure is None and not outcome.timed_out \
            and outcome.signal is None and not outcome.broken_pipe:
        outcome.boot_failure = f"QEMU exited (status {outcome.qemu_status}) before the command started"
    outcome.boot_lines = tuple(console.last_boot_lines())
    outcome.qemu_stderr = qemu_errors.decode(errors="replace").strip()
    return outcome


def _report(outcome: _Outcome, status_text: str | None, stderr: _Output, options: Options) -> int:
    def say(text: str) -> None:
        stderr.write(f"pkeys vm: {text}\n".encode())
        stderr.flush()

    if outcome.broken_pipe:
        return EXIT_BROKEN_PIPE
    if outcome.signal is not None:
        return exit_for_signal(outcome.signal)
    if outcome.timed_out:
        say(f"timed out after {options.timeout:g} s; the VM was killed")
        return EXIT_TIMEOUT
    if outcome.boot_failure is not None:
        detail = [outcome.boot_failure]
        if outcome.qemu_stderr:
            detail.append("QEMU said: " + outcome.qemu_stderr[-2000:])
        if outcome.boot_lines:
            detail.append("last lines of the boot log:\n  " + "\n  ".join(outcome.boot_lines))
        elif not options.verbose:
            detail.append("the boot log is empty; --verbose shows the whole boot")
        say("\n".join(detail))
        return EXIT_VM_FAILED
    code = exit_code(status_text, False)
    if status_text is None:
        say("the VM stopped before the command finished" +
            (f": {outcome.qemu_stderr[-2000:]}" if outcome.qemu_stderr else ""))
    return code
