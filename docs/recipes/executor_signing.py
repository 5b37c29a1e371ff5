"""Sign messages in a ProcessPoolExecutor with a key loaded once in the
parent: ``python executor_signing.py KEY_FILE MESSAGE...`` prints one
HMAC-SHA256 per message.  The workers get the key's descriptor, never its
bytes, whatever the start method."""

import hmac
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

import pkeys

_key = None


def _keep(key):
    """The initializer: runs once in each worker, with that worker's mapping."""
    global _key
    _key = key


def sign(message):
    with _key.unlocked() as key:
        return hmac.digest(key, message, "sha256")


def sign_all(key_file, messages, start_method="spawn"):
    key = pkeys.ProtectedBuffer.from_file(key_file, strip_newline=True, on_fork="shared",
                                          label="signing-key")
    context = multiprocessing.get_context(start_method)
    with key, ProcessPoolExecutor(4, mp_context=context, initializer=_keep,
                                  initargs=(key,)) as pool:
        return list(pool.map(sign, messages))


if __name__ == "__main__":
    for tag in sign_all(sys.argv[1], [message.encode() for message in sys.argv[2:]]):
        print(tag.hex())
