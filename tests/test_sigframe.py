"""How the kernel writes a signal frame onto memory that PKRU denies.

Linux 6.12 (commit 70044df250d0, "x86/pkeys: Update PKRU to enable all
pkeys before XSAVE") opens every key while it writes the frame, starts the
handler with its init PKRU, and restores the interrupted PKRU at sigreturn.
Before it, the frame is written under the thread's own PKRU: the write
fails and the kernel kills the process with SIGSEGV.  These tests assert
whichever behaviour the running kernel must have; the ``pkeys vm`` tier
runs them on 6.1 and on 6.12, so both branches are exercised.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

import pkeys
from pkeys._binding import ffi, lib
from pkeys._child import run_in_child

pytestmark = pytest.mark.pku
INIT_PKRU = 0x55555554


def kernel_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", os.uname().release).groups()  # type: ignore[union-attr]
    return int(major), int(minor)


OPENS_KEYS_FOR_THE_FRAME = kernel_version() >= (6, 12)


@pytest.mark.parametrize("rights", [pkeys.PKEY_DISABLE_ACCESS, pkeys.PKEY_DISABLE_WRITE],
                         ids=["access-disabled", "write-disabled"])
def test_a_signal_onto_an_alternate_stack_whose_key_the_thread_denies(rights):
    pkey = pkeys.sys.pkey_alloc(0, 0)
    read_end, write_end = os.pipe()

    def deliver() -> None:
        frame = ffi.new("struct pk_sigframe *")
        assert lib.pk_sigframe_altstack(pkey, int(rights), frame) == 0
        os.write(write_end, bytes(ffi.buffer(frame)))

    try:
        child = run_in_child(deliver)
    finally:
        os.close(write_end)
        pkeys.sys.pkey_free(pkey)
    with os.fdopen(read_end, "rb") as reader:
        report = reader.read()
    if OPENS_KEYS_FOR_THE_FRAME:
        assert child.exitcode == 0, f"{os.uname().release}: {child.describe()}\n{child.stderr}"
        frame = ffi.new("struct pk_sigframe *")
        ffi.memmove(frame, report, ffi.sizeof("struct pk_sigframe"))
        assert frame.handler_ran
        assert frame.stack_start <= frame.handler_stack < frame.stack_end  # on the tagged stack
        assert frame.entry_pkru == INIT_PKRU  # handlers still start at the kernel's init value
        denied = (frame.signal_pkru >> (2 * pkey)) & 3
        assert denied == int(rights)
        assert frame.after_pkru == frame.signal_pkru  # sigreturn put the thread's value back
    else:
        assert child.signal == signal.SIGSEGV, f"{os.uname().release}: {child.describe()}"
        assert report == b""  # the handler never ran
