"""gunicorn settings (``-c gunicorn_conf.py``): each worker checks, as it
starts, that it sees the master's signing key, and that the key's pages are
secret memory there too (the kernel's /proc/PID/mem refuses them: EIO), so
the worker holds no copy of its own."""

import errno
import hmac
import os

preload_app = True


def post_fork(server, worker):
    from gunicorn_app import FINGERPRINT, SIGNING_KEY

    with SIGNING_KEY.unlocked() as key:
        same = hmac.compare_digest(hmac.digest(key, b"fingerprint", "sha256"), FINGERPRINT)
    mem = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        os.pread(mem, 1, SIGNING_KEY.address)
        refused = 0
    except OSError as error:
        refused = error.errno
    finally:
        os.close(mem)
    if not same or refused != errno.EIO or SIGNING_KEY.on_fork != "shared":
        raise SystemExit(f"worker {worker.pid}: the signing key is not the master's shared copy")
    server.log.info("worker %d shares the master's signing key: same pages, no copy",
                    worker.pid)
