"""Check webhook signatures in a multiprocessing Pool whose initializer
hands every worker the shared key: ``python pool_initializer.py KEY_FILE``
reads ``MESSAGE TAG_HEX`` lines on stdin and prints ``ok`` or ``forged``."""

import hmac
import multiprocessing
import sys

import pkeys

_key = None


def _keep(key):
    global _key
    _key = key


def verify(line):
    message, _, tag = line.rpartition(" ")
    with _key.unlocked() as key:
        expected = hmac.digest(key, message.encode(), "sha256")
    return hmac.compare_digest(expected, bytes.fromhex(tag))


def verify_all(key_file, lines, start_method="forkserver"):
    key = pkeys.ProtectedBuffer.from_file(key_file, strip_newline=True, on_fork="shared",
                                          label="webhook-key")
    context = multiprocessing.get_context(start_method)
    with key, context.Pool(2, initializer=_keep, initargs=(key,)) as pool:
        return pool.map(verify, lines)


if __name__ == "__main__":
    lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for good in verify_all(sys.argv[1], lines):
        print("ok" if good else "forged")
