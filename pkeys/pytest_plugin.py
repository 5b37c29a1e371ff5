"""pytest plugin: tests that need real protection keys, run where they can.

Loaded whenever pkeys is installed (entry point ``pytest11``).

* ``@pytest.mark.pku`` marks a test that needs real protection keys.
* Without ``--pkeys-vm``, such tests run on PKU hardware and are skipped
  elsewhere, with a reason that names the option.  ``PKEYS_REQUIRE_PKU=1``
  turns that skip into a usage error, so a tier can never be skipped
  silently.
* ``pytest --pkeys-vm`` runs them inside ``pkeys vm`` where the host has no
  PKU (natively where it does): one VM per kernel for all of them, started
  in the background as the session begins, while the rest of the suite
  runs here.  The guest's reports come back through pytest's own report
  serialisation and are logged as this session's reports, so terminal
  output, ``-r`` summaries and junit XML see them like any other test.
* ``--pkeys-vm-kernel SERIES`` picks the kernel (6.1, 6.12, ...); given
  several times, every marked test runs on each and fails if it fails on
  any.  Missing kernels are set up first (``pkeys vm setup``).
* The ini option ``pkeys_vm_also`` names markers of tests that run here
  natively *and* again in the VM; a failure in either fails the test.
  ``pkeys_vm_also_kernels`` (kernel series as given to
  ``--pkeys-vm-kernel``) runs them again on those kernels only, to keep a
  many-kernel run short; marked tests always run on every kernel.

Fixtures: ``expect_fault`` (call a function in a forked child and return
the :class:`pkeys.Fault` it died of) and ``pkey`` (a fresh :class:`pkeys.Key`,
closed afterwards).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._fault import Fault, FaultKind
    from ._key import Key
    from ._types import ExpectFault

MARK = "pku"
#: Set in the guest's environment: the shared folder for node ids and results.
EXCHANGE_ENV = "PKEYS_VM_PLUGIN_EXCHANGE"
#: Set in the guest's environment: the file there listing its node ids.
NODEIDS_ENV = "PKEYS_VM_PLUGIN_NODEIDS"
REQUIRE_ENV = "PKEYS_REQUIRE_PKU"
#: How often, at most, the count of finished VM items is printed.
PROGRESS_SECONDS = 10.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pkeys", "protection keys (pkeys)")
    group.addoption("--pkeys-vm", action="store_true",
                    help="run @pytest.mark.pku tests on an emulated PKU CPU (pkeys vm) when this "
                         "machine has no PKU")
    group.addoption("--pkeys-vm-kernel", action="append", metavar="SERIES",
                    help="kernel for --pkeys-vm (6.1, 6.12, a release or an image path); "
                         "repeat to run the tests on each")
    parser.addini("pkeys_vm_also", type="linelist", default=[],
                  help="markers of tests that --pkeys-vm runs natively and again in the VM")
    parser.addini("pkeys_vm_also_kernels", type="linelist", default=[],
                  help="kernel series (as given to --pkeys-vm-kernel) on which the pkeys_vm_also "
                       "tests run again (default: every kernel)")
    parser.addini("pkeys_vm_timeout", default="1800",
                  help="seconds one VM session may take (default 1800)")
    parser.addini("pkeys_vm_smp", default="1",
                  help="virtual CPUs of each VM (default 1; 2 runs threads truly in parallel)")


def _hardware() -> bool:
    import pkeys

    return pkeys.hardware_supported() and pkeys.backend() == "hardware"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARK}: needs real protection keys (PKU hardware, or "
                                       "the emulated CPU of `pytest --pkeys-vm`)")
    # Taken out of the environment: a pytest that a test starts in the guest
    # is a user's own session, and must not write into this one's results.
    exchange = os.environ.pop(EXCHANGE_ENV, None)
    nodeids = os.environ.pop(NODEIDS_ENV, "nodeids-0.txt")
    if exchange:
        config.pluginmanager.register(_Guest(config, Path(exchange), nodeids), "pkeys-vm-guest")
    elif config.getoption("pkeys_vm") and not _hardware():
        config.pluginmanager.register(_Host(config), "pkeys-vm-host")
    else:
        config.pluginmanager.register(_Native(config), "pkeys-native")


def _require_hardware(where: str) -> None:
    if not _hardware():
        import pkeys

        raise pytest.UsageError(
            f"{where}, but hardware protection keys are not active here "
            f"(backend {pkeys.backend()}: {pkeys.backend_reason()})"
        )


class _Native:
    """No VM: marked tests run on PKU hardware and are skipped elsewhere."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        marked = [item for item in items if item.get_closest_marker(MARK)]
        if os.environ.get(REQUIRE_ENV) == "1" and marked:
            _require_hardware(f"{REQUIRE_ENV}=1")
        if marked and not _hardware():
            import pkeys

            skip = pytest.mark.skip(
                reason=f"needs PKU ({pkeys.backend_reason()}); run `pytest --pkeys-vm` to run it "
                       "on an emulated PKU CPU")
            for item in marked:
                item.add_marker(skip)


class _Guest:
    """Inside the VM: run only the host's node ids and write every report."""

    def __init__(self, config: pytest.Config, exchange: Path, nodeids: str) -> None:
        self.config = config
        self.exchange = exchange
        self.nodeids = nodeids
        self.results = open(exchange / f"results-{os.uname().release}.jsonl", "w")  # noqa: SIM115

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        _require_hardware("the pkeys vm guest expects real protection keys")
        wanted = set((self.exchange / self.nodeids).read_text().splitlines())
        keep = [item for item in items if item.nodeid in wanted]
        dropped = [item for item in items if item.nodeid not in wanted]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.results.write(json.dumps(data) + "\n")
        self.results.flush()

    def pytest_unconfigure(self) -> None:
        self.results.close()


@dataclass
class _Session:
    """One VM running the delegated tests on one kernel."""

    kernel: str | None
    log: Path
    #: Whether the pkeys_vm_also tests run here too, not only the marked ones.
    runs_also: bool = True
    #: How many items it runs.
    items: int = 0
    process: subprocess.Popen[bytes] | None = None
    status: int | None = None
    error: str | None = None
    release: str | None = None
    reports: dict[str, list[pytest.TestReport]] = field(default_factory=dict)
    seconds: float = 0.0
    # Progress while it runs: how far the results file has been read, the
    # incomplete line at its end, and the items whose last phase arrived.
    read: int = 0
    partial: bytes = b""
    finished: int = 0

    @property
    def name(self) -> str:
        return self.release or self.kernel or "default kernel"

    def summary_line(self) -> str:
        if self.error:
            return f"pkeys vm ({self.name}): {self.error.splitlines()[0]}"
        tail = ""
        if self.log.exists():
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
            tail = lines[-1].strip("= ") if lines else ""
        return f"pkeys vm ({self.name}, {self.seconds:.0f} s): {tail or f'exit status {self.status}'}"


class _Host:
    """``--pkeys-vm`` on a machine without PKU: delegate marked tests to VMs."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.also = set(config.getini("pkeys_vm_also"))
        # Each kernel once: two guests of one release would write one results file.
        self.kernels: list[str | None] = list(dict.fromkeys(config.getoption("pkeys_vm_kernel") or [None]))
        self.also_kernels = set(config.getini("pkeys_vm_also_kernels"))
        if self.also_kernels - set(self.kernels):
            # Those tests would then run on no kernel at all, silently.
            raise pytest.UsageError(
                f"pkeys_vm_also_kernels names {sorted(self.also_kernels - set(self.kernels))}, "
                f"which no --pkeys-vm-kernel gives")
        self.only_vm: set[str] = set()  # node ids run in the VM only
        self.twice: set[str] = set()  # node ids run here and in the VM
        self.items: list[pytest.Item] = []
        self.exchange: Path | None = None
        self.sessions: list[_Session] = []
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        self.last_progress = time.monotonic()

    # -- collection and start ---------------------------------------------
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            if item.get_closest_marker(MARK):
                self.only_vm.add(item.nodeid)
            elif any(item.get_closest_marker(name) for name in self.also):
                self.twice.add(item.nodeid)
        self.items = [item for item in items if item.nodeid in self.only_vm | self.twice]

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if not self.items:
            self.done.set()
            return
        base = Path(self.config.invocation_params.dir)
        self.exchange = Path(tempfile.mkdtemp(prefix=".pkeys-vm-pytest-", dir=base))
        self._plan_sessions()
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            names = ", ".join(f"{s.kernel or 'the default kernel'}: {s.items}" for s in self.sessions)
            reporter.write_line(f"pkeys vm: {len(self.items)} tests start on an emulated PKU CPU "
                                f"({names}) in the background")
        self.thread = threading.Thread(target=self._run_all, daemon=True)
        self.thread.start()

    def _plan_sessions(self) -> None:
        """One session per kernel, and the node ids each runs (in the
        exchange folder): every marked test, and the pkeys_vm_also ones
        where pkeys_vm_also_kernels lets them."""
        assert self.exchange is not None
        self.sessions = [_Session(k, self.exchange / f"output-{n}.log",
                                  runs_also=not self.also_kernels or k in self.also_kernels)
                         for n, k in enumerate(self.kernels)]
        for n, session in enumerate(self.sessions):
            mine = [i.nodeid for i in self.items if self._runs(session, i)]
            (self.exchange / f"nodeids-{n}.txt").write_text("".join(f"{i}\n" for i in mine))
            session.items = len(mine)

    def _runs(self, session: _Session, item: pytest.Item) -> bool:
        """Whether `session`'s guest runs `item`."""
        return session.runs_also or item.nodeid in self.only_vm

    def _guest_argv(self, session: _Session) -> list[str]:
        files = sorted({str(item.path) for item in self.items if self._runs(session, item)})
        argv = [sys.executable, "-m", "pytest", "-p", "pkeys.pytest_plugin", "-p", "no:cacheprovider",
                "--rootdir", str(self.config.rootpath)]
        if self.config.inipath:
            argv += ["-c", str(self.config.inipath)]
        return [*argv, *files]

    def _run_all(self) -> None:
        try:
            self._setup()
        except Exception as exc:  # noqa: BLE001 - reported on every delegated test
            for session in self.sessions:
                session.error = f"setup failed: {exc}"
            self.done.set()
            return
        threads = [threading.Thread(target=self._run_one, args=(n, s))
                   for n, s in enumerate(self.sessions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.done.set()

    def _setup(self) -> None:
        from .vm import kernels, prepare

        prepare.setup([k for k in self.kernels if k] or None)
        for session in self.sessions:
            found = kernels.find(session.kernel)
            session.release = found.release if found else None

    def _guest_env(self, index: int) -> dict[str, str]:
        """The environment of session `index`'s guest: this one's, less
        PKEYS_BACKEND, plus where to find its node ids and report."""
        # The guest is there for hardware keys: a PKEYS_BACKEND=software that
        # made this session delegate (a PKU machine running the suite as one
        # without PKU would) must not follow the tests into it.
        env = {name: value for name, value in os.environ.items() if name != "PKEYS_BACKEND"}
        env.update({EXCHANGE_ENV: str(self.exchange), REQUIRE_ENV: "1",
                    NODEIDS_ENV: f"nodeids-{index}.txt",
                    # Entry-point plugins cost seconds to load under emulation.
                    "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
        return env

    def _run_one(self, index: int, session: _Session) -> None:
        assert self.exchange is not None
        command = [sys.executable, "-m", "pkeys", "vm", "--timeout", self.config.getini("pkeys_vm_timeout"),
                   "--smp", self.config.getini("pkeys_vm_smp")]
        if session.kernel:
            command += ["--kernel", session.kernel]
        env = self._guest_env(index)
        started = time.monotonic()
        with open(session.log, "wb") as log:
            session.process = subprocess.Popen(
                [*command, "--", *self._guest_argv(session)], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=env, cwd=self.config.invocation_params.dir)
            session.status = session.process.wait()
        session.seconds = time.monotonic() - started
        results = self.exchange / f"results-{session.release}.jsonl"
        if not results.exists():
            found = sorted(self.exchange.glob("results-*.jsonl"))
            # Without a release known in advance (a path kernel), take the newest file.
            results = found[-1] if len(self.sessions) == 1 and found else results
        if results.exists():
            for line in results.read_text().splitlines():
                report = self.config.hook.pytest_report_from_serializable(
                    config=self.config, data=json.loads(line))
                session.reports.setdefault(report.nodeid, []).append(report)
        if session.status not in (0, 1):  # 1: some test failed; the reports say which
            output = session.log.read_text(errors="replace")[-3000:]
            session.error = f"the VM session ended with status {session.status}:\n{output}"

    # -- reporting ---------------------------------------------------------
    def _wait(self) -> None:
        while not self.done.wait(timeout=1.0):
            self._progress()
        self._progress()

    def pytest_runtest_logfinish(self) -> None:
        """After each test that ran here: what the VMs finished meanwhile."""
        if not self.done.is_set():
            self._progress()

    def _arrived(self, session: _Session) -> list[dict[str, Any]]:
        """The reports the guest wrote since the last call (complete lines
        only: it may be writing the next one)."""
        if self.exchange is None or session.release is None:
            return []
        try:
            with open(self.exchange / f"results-{session.release}.jsonl", "rb") as results:
                results.seek(session.read)
                chunk = results.read()
        except FileNotFoundError:
            return []
        session.read += len(chunk)
        *lines, session.partial = (session.partial + chunk).split(b"\n")
        reports = [json.loads(line) for line in lines if line.strip()]
        session.finished += sum(1 for report in reports if report.get("when") == "teardown")
        return reports

    def _progress(self) -> None:
        """Show what arrived from the VMs: with -v each result as it comes;
        otherwise, at most every PROGRESS_SECONDS, the items finished per
        kernel.  Called from pytest's own thread only, between tests or
        while it waits, so the lines never cut into another test's."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        verbose = self.config.getoption("verbose") > 0
        arrived = False
        for session in self.sessions:
            for report in self._arrived(session):
                arrived = True
                when, outcome = report.get("when"), report.get("outcome", "")
                if verbose and (when == "call" or outcome != "passed"):
                    phase = "" if when == "call" else f" (in {when})"
                    reporter.write_line(f"pkeys vm ({session.name}): {report.get('nodeid')} "
                                        f"{outcome.upper()}{phase}")
        now = time.monotonic()
        if arrived and (self.done.is_set() or now - self.last_progress >= PROGRESS_SECONDS):
            self.last_progress = now
            counts = ", ".join(f"{s.name} {s.finished}/{s.items}" for s in self.sessions)
            reporter.write_line(f"pkeys vm: items finished: {counts}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        if item.nodeid not in self.only_vm:
            return None
        self._wait()
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self._merged(item):
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        # The item ran elsewhere, but what earlier items set up here (their
        # module, its fixtures) must still end where the next item needs it
        # to, as pytest's own protocol would do after the item.
        item.session._setupstate.teardown_exact(nextitem)
        return True

    def _merged(self, item: pytest.Item) -> list[pytest.TestReport]:
        """One report per phase: the first failure among the kernels, else
        the first pass, else the skip; each names the kernels' outcomes."""
        merged = []
        outcomes: list[str] = []
        for when in ("setup", "call", "teardown"):
            candidates = []
            for session in self.sessions:
                found = [r for r in session.reports.get(item.nodeid, []) if r.when == when]
                if found:
                    candidates.append((session, found[0]))
                    if when == "call" or found[0].outcome != "passed":
                        outcomes.append(f"{session.name}: {when} {found[0].outcome}")
                elif when == "setup":
                    candidates.append((session, self._missing(item, session)))
                    outcomes.append(f"{session.name}: no result")
            if not candidates:
                continue
            chosen = next((c for c in candidates if c[1].outcome == "failed"), None) \
                or next((c for c in candidates if c[1].outcome == "passed"), None) or candidates[0]
            report = chosen[1]
            if len(self.sessions) > 1 or report.outcome == "failed":
                report.sections.append(("pkeys vm", "\n".join(outcomes) or chosen[0].name))
            merged.append(report)
            if report.outcome != "passed" and when == "setup":
                break
        return merged

    def _missing(self, item: pytest.Item, session: _Session) -> pytest.TestReport:
        why = session.error or f"the guest (status {session.status}) did not report this test"
        return pytest.TestReport(item.nodeid, item.location, {}, "failed",
                                 f"pkeys vm ({session.name}): {why}", "setup")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
        outcome: Any = yield
        if item.nodeid not in self.twice or call.when != "call":
            return
        report: pytest.TestReport = outcome.get_result()
        self._wait()
        failures = []
        for session in self.sessions:
            if not session.runs_also:
                continue
            phases = session.reports.get(item.nodeid)
            if not phases:
                failures.append(f"pkeys vm ({session.name}): "
                                f"{session.error or 'the guest did not report this test'}")
                continue
            for vm_report in phases:
                if vm_report.failed:
                    failures.append(f"pkeys vm ({session.name}), {vm_report.when}:\n"
                                    f"{vm_report.longreprtext}")
        if failures and report.outcome != "failed":
            report.outcome = "failed"
            report.longrepr = "this test passed here but failed on the emulated PKU CPU:\n\n" \
                + "\n\n".join(failures)
        elif failures:
            report.sections.append(("pkeys vm", "\n\n".join(failures)))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.sessions:
            return
        terminalreporter.section("pkeys vm")
        for session in self.sessions:
            terminalreporter.write_line(session.summary_line())

    def pytest_unconfigure(self) -> None:
        for session in self.sessions:
            if session.process is not None and session.process.poll() is None:
                session.process.send_signal(signal.SIGTERM)  # pkeys vm ends its QEMU
                try:
                    session.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    session.process.kill()
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.exchange is not None:
            shutil.rmtree(self.exchange, ignore_errors=True)


# -- fixtures ----------------------------------------------------------------
@pytest.fixture
def pkey() -> Iterator[Key]:
    """A fresh :class:`pkeys.Key` (access disabled), closed after the test."""
    import pkeys

    key = pkeys.Key()
    yield key
    if not key.closed:
        key.close()


@pytest.fixture
def expect_fault() -> ExpectFault:
    """``expect_fault(function, kind=None)``: call ``function`` in a forked
    child, which must die of a fault; return that fault as a
    :class:`pkeys.Fault` (kind, ``si_code``, pkey, address, signal).  The
    test fails if the child returns, raises, or dies otherwise, or if
    ``kind`` is given and differs.

    By default every SIGSEGV or SIGBUS fault is accepted except one: an
    ``unmapped`` fault on memory that is secret memory (``memfd_secret``)
    in the parent.  A forked child has none of those pages (MADV_DONTFORK),
    so any access there faults whatever the key says: the test would pass
    without testing the key, and it fails instead, saying what to do.
    ``kind=pkeys.FaultKind.UNMAPPED`` asks for that fault explicitly."""
    return _expect_fault


def _secret_memory_ranges() -> list[tuple[int, int]]:
    """The address ranges of this process's memfd_secret mappings."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if line.rstrip().endswith("/secretmem (deleted)"):
                    start, end = line.split(None, 1)[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        pass
    return ranges


def _expect_fault(function: Callable[[], object], kind: FaultKind | None = None) -> Fault:
    from ._binding import ffi, lib
    from ._child import run_in_child
    from ._fault import Fault, FaultKind

    kinds = {4: FaultKind.PKEY, 2: FaultKind.PROTECTION, 1: FaultKind.UNMAPPED}
    read_end, write_end = os.pipe()

    def in_child() -> None:
        if lib.pk_fault_reporter(write_end) != 0:
            raise OSError("cannot install the fault reporter")
        function()

    secret_ranges = _secret_memory_ranges()
    try:
        child = run_in_child(in_child)
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    size = ffi.sizeof("struct pk_fault_report")
    if len(data) < size:
        pytest.fail(f"expected a fault, but the child {child.describe()}"
                    + (f":\n{child.stderr}" if child.stderr else ""), pytrace=False)
    report = ffi.new("struct pk_fault_report *")
    ffi.memmove(report, data[:size], size)
    fault = Fault(
        kind=kinds.get(report.code, FaultKind.OTHER) if report.signo == signal.SIGSEGV else FaultKind.OTHER,
        si_code=report.code,
        pkey=None if report.pkey < 0 else report.pkey,
        address=report.addr,
        signal=report.signo,
    )
    if kind is None and fault.kind is FaultKind.UNMAPPED and any(
            start <= fault.address < end for start, end in secret_ranges):
        pytest.fail(
            f"the child faulted at {fault.address:#x}, in secret memory (memfd_secret) that a "
            "forked child does not have (MADV_DONTFORK): any access there faults, whatever the "
            "key says, so this fault tests nothing. Make the buffer with secretmem=False for "
            "this test, or create it inside the function that expect_fault calls",
            pytrace=False)
    if kind is not None and fault.kind != kind:
        pytest.fail(f"expected a {kind.value} fault, got {fault}", pytrace=False)
    return fault
