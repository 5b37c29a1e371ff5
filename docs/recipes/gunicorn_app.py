"""A WSGI app that signs with a key loaded once, in gunicorn's master,
before it forks the workers (``gunicorn --preload``).  The key file's path
is in SIGNING_KEY_FILE; each response is the HMAC-SHA256 of the path."""

import hmac
import os

import pkeys

# Read straight into secret memory, once; on_fork="shared": every worker
# forked from the master maps these same pages, and none holds a copy.
SIGNING_KEY = pkeys.ProtectedBuffer.from_file(
    os.environ["SIGNING_KEY_FILE"], strip_newline=True, on_fork="shared", label="signing-key"
)

with SIGNING_KEY.unlocked() as key:
    # What a worker compares with, to know that it sees the same key.
    FINGERPRINT = hmac.digest(key, b"fingerprint", "sha256")


def app(environ, start_response):
    with SIGNING_KEY.unlocked() as key:
        tag = hmac.digest(key, environ["PATH_INFO"].encode(), "sha256")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [tag.hex().encode()]
