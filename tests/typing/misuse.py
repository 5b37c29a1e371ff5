"""Deliberate misuse of the public API.  ``mypy --strict`` must report an
error on exactly the lines whose comment starts ``# E:``, with the error
code named there (in brackets) among that line's errors, and nowhere
else.  Never run."""

from __future__ import annotations

import mmap
from typing import Literal

import pkeys
from pkeys import pkru

page = mmap.mmap(-1, mmap.PAGESIZE)
key = pkeys.Key()

# The module-level functions, which dispatch to the backend.
x: str = pkeys.pkey_alloc("nonsense", 1, 2, 3)  # E: [call-arg] too many arguments
pkeys.pkey_free("1")  # E: [arg-type] a key is not a str
pkeys.pkey_mprotect(page, None, "rw", key)  # E: [arg-type] prot is an int
pkeys.pkey_set(1, "read-only")  # E: [arg-type] rights are an int
rights: str = pkeys.pkey_get(1)  # E: [assignment] pkey_get returns PkeyRights
register: bytes = pkeys.rdpkru()  # E: [assignment] rdpkru returns an int
pkeys.wrpkru(None)  # E: [arg-type] wrpkru needs an int
held: set[str] = pkeys.allocated_keys()  # E: [assignment] a list of ints

# The register helpers: a key number or anything with __index__, never a str.
pkru.rights_of(0x55555554, "3")  # E: [arg-type] a str is no key
pkru.granting(0, [1.5])  # E: [list-item] a float has no __index__
pkru.with_rights(0, key)  # E: [call-arg] the rights are missing
pkru.write("0")  # E: [arg-type] the register holds an int
value: str = pkru.read()  # E: [assignment] the register is an int

# The raw layers take exactly what C takes: ints, not Keys.
pkeys.sys.pkey_mprotect(0, 4096, 3, key)  # E: [arg-type] the raw layer wants an int
pkeys.glibc.pkey_get(None)  # E: [arg-type] the raw layer wants an int

# Objects.
pkeys.Key(rights="none")  # E: [arg-type] rights are an int
pkeys.allow(key, "write")  # E: [arg-type] write is keyword-only
buffer = pkeys.ProtectedBuffer("32")  # E: [arg-type] size is an int
with buffer.unlocked() as view:
    view.upper()  # E: [attr-defined] a memoryview is not a str
kind = pkeys.probe(page).kind  # E: [union-attr] probe may return None
pkeys.backend() + 1  # E: [operator] backend() is a str
same = pkeys.backend() == "hw"  # E: [comparison-overlap] backend() is "hardware" or "software"
mode: Literal["hardware"] = pkeys.backend()  # E: [assignment] it may be "software"

# A loader takes ProtectedBuffer's own options, by name and type.
pkeys.ProtectedBuffer.from_file("key.pem", labl="pem")  # E: [call-arg] a misspelt option
pkeys.ProtectedBuffer.from_file("key.pem", secretmem="yes")  # E: [arg-type] a bool or None
pkeys.ProtectedBuffer.from_file("key.pem", size="32")  # E: [arg-type] size is an int

# Data goes in and out through buffers, never a str.
buffer.write("tok_live_0123")  # E: [arg-type] a str is not a buffer
buffer.readinto("out")  # E: [arg-type] a str is not a buffer
buffer.write(12)  # E: [arg-type] an int is not a buffer

# The pool's statistics are a TypedDict.
pkeys.virtual_key_stats()["evicted"]  # E: [typeddict-item] no such field
held_keys: str = pkeys.virtual_key_stats()["pkeys"]  # E: [assignment] a list of ints


# The pytest plugin's fixtures, annotated with the exported types.
def test_with_fixtures(expect_fault: pkeys.ExpectFault, pkey: pkeys.Key) -> None:
    expect_fault(lambda: None, kind="pkey")  # E: [arg-type] a FaultKind, not a str
    fault: str = expect_fault(lambda: None)  # E: [assignment] it returns a Fault
    print(fault)
    expect_fault()  # E: [call-arg] the function to run is missing
    pkey.protect("page")  # E: [arg-type] a Key protects memory, not a str


# Memory arguments are an address or a buffer.
pkeys.pkey_mprotect("0x7f00", 4096, pkeys.PROT_READ, key)  # E: [arg-type] a str is no memory
pkeys.probe("page")  # E: [arg-type] a str is no memory
