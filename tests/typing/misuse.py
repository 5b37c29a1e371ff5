"""Deliberate misuse of the public API.  ``mypy --strict`` must report an
error on exactly the lines whose comment starts ``# E:``, with the error
code named there (in brackets) among that line's errors, and nowhere
else.  Never run."""

from __future__ import annotations

import mmap

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
