"""The C shim: warning-free, and correct where there is no PKU at all."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")

PROGRAM = r"""
#include <errno.h>
#include <stdio.h>
#include "pkeys_internal.h"
int main(void) {
    struct pk_fault fault;
    int64_t in_handler, after;
    printf("%d %d %d %lld %d\n", pk_arch_is_x86(), pk_cpu_has_pku(), pk_cpu_has_ospke(),
           (long long)pk_rdpkru(), pk_wrpkru(0));
    uint32_t identity = 0;
    printf("%d %d %d %d\n", pk_key_get(1), pk_key_set(1, 0, 0), pk_key_alloc(0, 0, &identity),
           pk_state_init(PK_MODE_HARDWARE));
    int status, status2;
    errno = 0;
    status = pk_glibc_pkey_get(1);
    printf("%d %d\n", status, errno == ENOSYS);
    status = pk_probe((uintptr_t)&fault, 1, &fault);
    status2 = pk_probe(0, 0, &fault);
    printf("%d %d\n", status, status2);
    status = pk_signal_pkru(&in_handler, &after);
    printf("%d %lld\n", status, (long long)in_handler);
    return 0;
}
"""


def build_and_run(tmp_path, *defines: str) -> list[str]:
    source = tmp_path / "main.c"
    source.write_text(PROGRAM)
    binary = tmp_path / "main"
    command = [
        "cc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", *defines,
        f"-I{CSRC}", str(source), *map(str, SOURCES), "-ldl", "-o", str(binary),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.split("\n")


def test_non_x86_build_reports_no_hardware_and_never_traps(tmp_path):
    lines = build_and_run(tmp_path, "-DPK_ASSUME_NON_X86")
    assert lines[0] == "0 0 0 -1 -1"  # no x86, no PKU, no OSPKE, RDPKRU/WRPKRU refused
    assert lines[1] == "-1 -1 -1 -1"  # PK_E_UNSUPPORTED everywhere, hardware mode refused
    assert lines[2] == "-1 1"  # glibc's pkey_get refused with ENOSYS, not run
    assert lines[3] == "0 1"  # the guard still works: no fault, then a fault
    assert lines[4] == "0 -1"


def test_native_build_is_warning_free(tmp_path):
    lines = build_and_run(tmp_path)
    assert lines[0].split()[0] == "1"


def test_wrpkru_has_a_memory_clobber():
    header = (CSRC / "pkeys_internal.h").read_text()
    wrpkru = header[header.index("pk_wrpkru_unchecked(uint32_t value)\n{"):]
    assert '"memory"' in wrpkru.split("}")[0]


def test_type_stub_covers_the_whole_api_header():
    import re

    header = (CSRC / "pkeys_api.h").read_text()
    stub = (ROOT / "pkeys" / "_pkeys_cffi.pyi").read_text()
    functions = set(re.findall(r"\b(pk_[a-z0-9_]+)\(", header))
    constants = set(re.findall(r"^#define (PK_[A-Z0-9_]+) ", header, re.M))
    missing = {name for name in functions | constants if name not in stub}
    assert not missing, f"add to pkeys/_pkeys_cffi.pyi: {sorted(missing)}"
