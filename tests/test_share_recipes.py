"""The recipes of docs/sharing.md, run as written (the page includes these
very files from docs/recipes/): gunicorn --preload with 2 workers and the
post_fork check, ProcessPoolExecutor signing, a Pool initializer, and the
Unix socket hand-over.  Native only: test_share.py and test_share_mp.py
carry the same paths onto the emulated PKU CPU."""

from __future__ import annotations

import hmac
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import pkeys
from pkeys import _secretmem

from ._sharing import deadline, fingerprint, holdings

RECIPES = pathlib.Path(__file__).resolve().parent.parent / "docs" / "recipes"
pytestmark = pytest.mark.skipif(not _secretmem.availability()[0],
                                reason=f"no secretmem: {_secretmem.availability()[1]}")


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "signing.key"
    path.write_bytes(os.urandom(32).hex().encode() + b"\n")  # as `openssl rand -hex 32` writes it
    yield path


def tag(key_file: pathlib.Path, message: bytes) -> bytes:
    return hmac.digest(key_file.read_bytes().rstrip(b"\n"), message, "sha256")


def run_recipe(*args: str, stdin: str = "") -> list[str]:
    result = subprocess.run([sys.executable, *args], cwd=RECIPES, input=stdin, text=True,
                            capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_executor_signing_as_written(key_file):
    assert run_recipe("executor_signing.py", str(key_file), "a", "b") == [
        tag(key_file, b"a").hex(), tag(key_file, b"b").hex()]


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
@deadline
def test_executor_signing_with_each_start_method(key_file, method, monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))  # where a spawned worker imports it from
    import executor_signing

    before = holdings()
    assert executor_signing.sign_all(key_file, [b"m"], method) == [tag(key_file, b"m")]
    assert holdings() == before


def test_pool_initializer_as_written(key_file):
    good = f"event-1 {tag(key_file, b'event-1').hex()}"
    forged = f"event-2 {tag(key_file, b'event-X').hex()}"
    assert run_recipe("pool_initializer.py", str(key_file), stdin=f"{good}\n{forged}\n") == [
        "ok", "forged"]


@deadline
def test_the_unix_socket_hand_over(monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))
    import unix_socket

    parent_end, child_end = socket.socketpair()
    with parent_end, child_end:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            status = 1
            try:
                received = unix_socket.receive_buffer(child_end)
                child_end.sendall(fingerprint(received))
                received.close()
                status = 0
            finally:
                os._exit(status)
        with pkeys.ProtectedBuffer(32, on_fork="shared", label="handed") as buffer:
            buffer.write(os.urandom(32))
            unix_socket.send_buffer(parent_end, buffer)
            assert parent_end.recv(32) == fingerprint(buffer)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def _read_until(stream, pattern: str, count: int, deadline: float) -> list[re.Match[str]]:
    found: list[re.Match[str]] = []
    log = []
    while len(found) < count:
        assert time.monotonic() < deadline, "gunicorn did not say it:\n" + "".join(log)
        line = stream.readline()
        assert line, "gunicorn exited:\n" + "".join(log)
        log.append(line)
        match = re.search(pattern, line)
        if match:
            found.append(match)
        assert "not the master's shared copy" not in line, "".join(log)
    return found


@deadline
def test_gunicorn_preload_workers_share_the_key(key_file):
    pytest.importorskip("gunicorn", reason="in the test extra: pip install -e '.[test]'")
    environment = dict(os.environ, SIGNING_KEY_FILE=str(key_file))
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "--workers", "2", "--bind",
         "127.0.0.1:0", "-c", "gunicorn_conf.py", "gunicorn_app:app"],
        cwd=RECIPES, env=environment, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    try:
        deadline = time.monotonic() + 60
        port = _read_until(server.stderr, r"Listening at: http://127\.0\.0\.1:(\d+)", 1,
                           deadline)[0].group(1)
        pattern = r"worker (\d+) shares the master's signing key"
        workers = {int(m.group(1)) for m in _read_until(server.stderr, pattern, 2, deadline)}
        assert len(workers) == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/orders/42", timeout=30) as reply:
            assert reply.read().decode() == tag(key_file, b"/orders/42").hex()
        # A worker that exits closes its buffer (no wipe: the pages are
        # shared); the master's next worker still sees the same key.
        os.kill(workers.pop(), signal.SIGTERM)
        replacement = _read_until(server.stderr, pattern, 1, deadline)[0]
        assert int(replacement.group(1)) not in workers
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/orders/43", timeout=30) as reply:
            assert reply.read().decode() == tag(key_file, b"/orders/43").hex()
    finally:
        server.terminate()
        server.wait(timeout=60)
        server.stderr.close()
