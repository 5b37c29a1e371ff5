"""Stress for rights in every thread (issue 15): scopes in several threads,
revocations from another, threads born and exiting, signal handlers
(faulthandler's) running when revocations land, and forks, all at once.

Short by default (CI); ``PKEYS_STRESS_SECONDS=N`` runs it for N seconds and
prints its figures, e.g. on the emulated CPU with four vCPUs::

    python -m pkeys vm --kernel 6.1 --smp 4 -- env PKEYS_STRESS_SECONDS=600 \\
        python3 -m pytest -s -p no:cacheprovider tests/test_revocation_stress.py

Every check is made with ``pkey_get`` and with a real read (``probe``):
outside every scope a thread must be denied, and inside a scope it must be
denied once a revocation that began after the scope was entered returned.
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import threading
import time
from collections import Counter

import pytest

import pkeys

SECONDS = float(os.environ.get("PKEYS_STRESS_SECONDS", "3"))
WORKERS = 3


class Run:
    def __init__(self, key: pkeys.Key, page: object) -> None:
        self.key, self.page = key, page
        self.started = self.done = 0  # revocations begun, revocations returned
        self.stop = threading.Event()
        # Stopped first: pthread_kill on a thread that has exited is a
        # use after free in glibc, so the workers outlive the pester.
        self.stop_pestering = threading.Event()
        self.counts: Counter[str] = Counter()
        self.violations: list[tuple[str, int, object]] = []
        self.lock = threading.Lock()
        self.workers: list[threading.Thread] = []

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def check_denied(self, where: str) -> None:
        rights = pkeys.pkey_get(self.key)
        fault = pkeys.probe(self.page)
        if not rights & pkeys.PKEY_DISABLE_ACCESS or fault is None:
            with self.lock:
                self.violations.append((where, rights, fault))

    def scopes(self, count: int) -> None:
        for _ in range(count):
            with self.key.allow():
                begun = self.started
                pkeys.probe(self.page)  # a real read, allowed or not
                if self.done > begun:
                    self.check_denied("in a scope older than a returned revocation")
            self.check_denied("outside every scope")
        self.count("scopes", count)

    def worker(self, index: int) -> None:
        rounds = 0
        while not self.stop.is_set():
            self.scopes(50)
            rounds += 1
            if index == 0 and rounds % 20 == 0:
                self.fork_and_check()

    def fork_and_check(self) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                rights = pkeys.pkey_get(self.key)
                if not rights & pkeys.PKEY_DISABLE_ACCESS or pkeys.probe(self.page) is None:
                    code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            with self.lock:
                self.violations.append(("in a forked child", status, None))
        self.count("forks")

    def spawner(self) -> None:
        while not self.stop.is_set():
            born = [threading.Thread(target=self.scopes, args=(20,)) for _ in range(2)]
            for thread in born:
                thread.start()
            for thread in born:
                thread.join()
            self.count("threads born", len(born))

    def pester(self) -> None:
        """SIGUSR1 to the workers: faulthandler's handler runs in them, and
        revocations land inside it."""
        chooser = random.Random(15)
        while not self.stop_pestering.is_set():
            target = chooser.choice(self.workers)
            if target.ident is not None:
                signal.pthread_kill(target.ident, signal.SIGUSR1)
                self.count("handlers entered")
            time.sleep(0.001)

    def revoker(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.started += 1
            self.key.revoke(timeout=60)
            self.done += 1
            self.count("revocations")
            time.sleep(0.001)


@pytest.mark.pku
def test_revocations_hold_under_stress(key, page):
    key.protect(page)
    run = Run(key, page)
    signal.alarm(int(SECONDS) + 600)
    devnull = open(os.devnull, "wb")
    faulthandler.register(signal.SIGUSR1, file=devnull, all_threads=False)
    helpers: list[threading.Thread] = []
    try:
        run.workers = [threading.Thread(target=run.worker, args=(i,)) for i in range(WORKERS)]
        helpers = [threading.Thread(target=run.spawner), threading.Thread(target=run.pester)]
        for thread in run.workers + helpers:
            thread.start()
        began = time.monotonic()
        run.revoker(SECONDS)
        elapsed = time.monotonic() - began
    finally:
        # The pester first (see stop_pestering), then the spawner and the
        # workers: every thread that checks has ended before the page is
        # given back to key 0 below, or its check would read key 0's page.
        run.stop_pestering.set()
        for thread in helpers[1:]:
            thread.join(60)
        run.stop.set()
        for thread in run.workers + helpers[:1]:
            thread.join(60)
            assert not thread.is_alive(), "a stress thread did not stop"
        faulthandler.unregister(signal.SIGUSR1)
        devnull.close()
        signal.alarm(0)
        pkeys.pkey_mprotect(page, None, pkeys.PROT_READ | pkeys.PROT_WRITE, 0)
    figures = ", ".join(f"{name} {value}" for name, value in sorted(run.counts.items()))
    kinds = Counter(where for where, _, _ in run.violations)
    print(f"\nstress on {os.uname().release}, {os.cpu_count()} CPUs, {elapsed:.0f} s: "
          f"{figures}, violations {len(run.violations)} {dict(kinds)}")
    assert not run.violations, run.violations[:5]
    assert run.counts["revocations"] > 0 and run.counts["scopes"] > 0
