"""Run by tests/test_simulated.py with the simulated-register build first on
sys.path: its API, natively, across threads.  Exits 0 after printing "ok"."""

from __future__ import annotations

import errno
import mmap
import threading
import warnings

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import pkeys
    from pkeys._binding import lib
assert any(issubclass(w.category, pkeys.SimulatedRegisterWarning) for w in caught), caught
assert issubclass(pkeys.SimulatedRegisterWarning, pkeys.PkeysWarning)

INIT = 0x55555554
assert lib.pk_build_simulated() == 1
assert pkeys.backend() == "simulated", pkeys.backend()
assert "PROTECTS NOTHING" in pkeys.backend_reason()
assert not pkeys.hardware_supported()  # it protects nothing: never "hardware"
assert pkeys.rdpkru() == INIT


def errno_of(function, *args) -> int:
    try:
        function(*args)
    except OSError as exc:
        return exc.errno or 0
    raise AssertionError(f"{function.__name__}{args} did not fail")


# Keys are a bitmap with the kernel's errors.
assert errno_of(pkeys.sys.pkey_alloc, 1, 0) == errno.EINVAL
assert errno_of(pkeys.sys.pkey_alloc, 0, 4) == errno.EINVAL
assert errno_of(pkeys.sys.pkey_free, 9) == errno.EINVAL
raw = [pkeys.sys.pkey_alloc(0, pkeys.PKEY_DISABLE_WRITE) for _ in range(15)]
assert sorted(raw) == list(range(1, 16)), raw
assert pkeys.pkru.rights_of(pkeys.rdpkru(), raw[0]) == pkeys.PKEY_DISABLE_WRITE
assert errno_of(pkeys.sys.pkey_alloc, 0, 0) == errno.ENOSPC
for key in raw:
    pkeys.sys.pkey_free(key)
page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
address = pkeys._buffer._address(page)
assert errno_of(pkeys.sys.pkey_mprotect, address, mmap.PAGESIZE, mmap.PROT_READ, 5) == errno.EINVAL

# glibc's functions would act on the CPU, not on the simulated register.
try:
    pkeys.glibc.pkey_get(1)
except pkeys.UnsupportedError as exc:
    assert "simulated-register" in str(exc)
else:
    raise AssertionError("glibc.pkey_get ran in the simulated build")

# Allocate, tag, allow: the hardware backend's rules, per thread.
key = pkeys.Key()
key.protect(page)
assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS
page[0] = 7  # protects nothing: the denied page is still written
inside, leave = threading.Event(), threading.Event()
seen: dict[str, int] = {}


def holder() -> None:
    with key.allow():
        seen["inside"] = pkeys.pkey_get(key)
        inside.set()
        assert leave.wait(30)
        seen["revoked"] = pkeys.pkey_get(key)
    seen["after"] = pkeys.pkey_get(key)


def fresh() -> None:
    seen["fresh"] = pkeys.rdpkru()


with key.allow():
    assert pkeys.pkey_get(key) == 0
    newcomer = threading.Thread(target=fresh)
    newcomer.start()
    newcomer.join(30)
# A new thread starts at the init value, not at its creator's register.
assert seen["fresh"] == INIT, hex(seen["fresh"])
assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS

# Revocation across threads: the handler edits the other thread's variable.
thread = threading.Thread(target=holder)
thread.start()
assert inside.wait(30)
assert seen["inside"] == 0
with key.allow():
    key.revoke(timeout=10)
    assert pkeys.pkey_get(key) == pkeys.PKEY_DISABLE_ACCESS
leave.set()
thread.join(30)
assert not thread.is_alive()
assert seen["revoked"] == pkeys.PKEY_DISABLE_ACCESS, seen
assert seen["after"] == pkeys.PKEY_DISABLE_ACCESS, seen  # the scope re-grants nothing

# A protected buffer opens and closes on the simulated register.
buffer = pkeys.ProtectedBuffer(16, secretmem=False, lock_memory=False)
buffer.write(b"0123456789abcdef")
with buffer.unlocked() as view:
    assert bytes(view) == b"0123456789abcdef"
buffer.close()
page.close()
key.close()
print("ok")
