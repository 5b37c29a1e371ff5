"""The C shim (warning-free, correct where there is no PKU at all) and what
gets published: the sdist and the repaired abi3 wheel."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from ._sources import SCOPE_EXTENSION, SCOPE_SOURCES
from ._sources import SHIM_SOURCES as SOURCES

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

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
    printf("%d %d %d %d\n", pk_key_get(1, 0), pk_key_set(1, 0, 0, 0), pk_key_alloc(0, 0, &identity),
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


@pytest.mark.parametrize("arch", [[], ["-DPK_ASSUME_NON_X86"]], ids=["x86", "non-x86"])
def test_simulated_register_build_runs_the_hardware_path_without_the_instructions(tmp_path, arch):
    # This machine may have no PKU: a real RDPKRU here would be SIGILL.
    lines = build_and_run(tmp_path, "-DPK_SIMULATED_PKU=1", *arch)
    # PKU and OSPKE read as present; RDPKRU and WRPKRU work on the variable
    # (the compiler evaluates printf's arguments in either order: RDPKRU
    # reads the init value, or the 0 that WRPKRU wrote).
    _, pku, ospke, pkru, written = lines[0].split()
    assert (pku, ospke, written) == ("1", "1", "0")
    assert int(pkru) in (0x55555554, 0)
    assert lines[2] == "-1 1"  # glibc's pkey_get still refused: it would run the instruction
    assert lines[3] == "0 1"


def test_build_wheel_refuses_the_simulated_register_build(tmp_path):
    out = tmp_path / "dist"
    env = dict(os.environ, PKEYS_BUILD_SIMULATED_PKU="1", PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "tools" / "build-wheel.sh"), str(out)],
                            check=False, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "simulated-register" in result.stderr and "protects nothing" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("arch", [[], ["-DPK_ASSUME_NON_X86"]], ids=["x86", "non-x86"])
def test_the_scope_type_builds_warning_free_on_the_limited_api(tmp_path, arch):
    import sysconfig

    # Py_LIMITED_API 3.11 comes from the source itself (and setup.py):
    # any call outside the stable ABI is an implicit declaration, an error.
    subprocess.run(
        ["cc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", *arch,
         f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}", *map(str, SCOPE_SOURCES),
         "-o", str(tmp_path / "_scope.so")],
        check=True, capture_output=True, text=True)
    assert "#define Py_LIMITED_API 0x030B0000" in (CSRC / "scope_type.h").read_text()
    assert SCOPE_EXTENSION["py_limited_api"] is True


def test_wrpkru_has_a_memory_clobber():
    header = (CSRC / "pkeys_internal.h").read_text()
    wrpkru = header[header.index("pk_wrpkru_unchecked(uint32_t value)\n{"):]
    assert '"memory"' in wrpkru.split("}")[0]


def test_type_stub_covers_the_whole_api_header():
    import re

    # The production API and the test and bench entry points cffi also reads.
    header = (CSRC / "pkeys_api.h").read_text() + (CSRC / "pkeys_testing.h").read_text()
    stub = (ROOT / "pkeys" / "_pkeys_cffi.pyi").read_text()
    functions = set(re.findall(r"\b(pk_[a-z0-9_]+)\(", header))
    constants = set(re.findall(r"^#define (PK_[A-Z0-9_]+) ", header, re.MULTILINE))
    missing = {name for name in functions | constants if name not in stub}
    assert not missing, f"add to pkeys/_pkeys_cffi.pyi: {sorted(missing)}"


# ---- what gets published: sdist, abi3 wheel, manylinux repair ---------------

SITE_PACKAGES = pathlib.Path(__import__("cffi").__file__).resolve().parent.parent


def run_isolated(args: list[str], cwd: pathlib.Path, *path: pathlib.Path,
                 dependencies: bool = True) -> subprocess.CompletedProcess[str]:
    """Run this interpreter without site processing, so that neither the
    editable install's import hook nor anything but ``path`` (and, with
    ``dependencies``, the site-packages holding cffi and psutil) decides
    where ``pkeys`` comes from."""
    search = [*path, SITE_PACKAGES] if dependencies else list(path)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(map(str, search))}
    return subprocess.run([sys.executable, "-S", *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_package(destination: pathlib.Path, *, with_extension: bool) -> pathlib.Path:
    ignored = ["__pycache__"] + ([] if with_extension else ["*.so"])
    shutil.copytree(ROOT / "pkeys", destination / "pkeys", ignore=shutil.ignore_patterns(*ignored))
    return destination


def test_a_source_tree_without_the_extension_says_what_to_do(tmp_path):
    # `python -m pkeys` from a checkout: the current directory comes first
    # on sys.path, so the uncompiled tree is what gets imported.
    tree = copy_package(tmp_path / "checkout", with_extension=False)
    result = run_isolated(["-m", "pkeys", "--version"], tree)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: pkeys was imported from " + str(tree / "pkeys"))
    assert "no compiled extension" in last_line
    assert "run from another directory" in last_line
    assert "`pip install -e .`" in last_line


def test_a_missing_dependency_is_not_blamed_on_the_source_tree(tmp_path):
    tree = copy_package(tmp_path / "built", with_extension=True)
    assert list((tree / "pkeys").glob("_pkeys_cffi*.so")), "the editable install builds it"
    result = run_isolated(["-c", "import pkeys"], tree, dependencies=False)
    assert result.returncode == 1
    assert "ModuleNotFoundError: No module named '_cffi_backend'" in result.stderr
    assert "source tree" not in result.stderr


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHON=sys.executable,
               PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    result = subprocess.run(["bash", str(ROOT / "tools" / "build-wheel.sh"), str(out)],
                            check=False, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def only(paths: list[pathlib.Path]) -> pathlib.Path:
    assert len(paths) == 1, paths
    return paths[0]


@pytest.mark.slow
def test_wheel_is_manylinux_abi3_and_complete(dist):
    import platform
    import re
    import zipfile

    wheel = only(list(dist.glob("*.whl")))
    machine = platform.machine()
    name = re.fullmatch(rf"pkeys-([^-]+)-cp311-abi3-(manylinux_\d+_\d+_{machine})\.whl", wheel.name)
    assert name, wheel.name

    shown = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(wheel)],
                           check=False, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f'is consistent with\nthe following platform tag: "{name[2]}"' in shown.stdout

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = f"pkeys-{name[1]}.dist-info"
        wheel_metadata = archive.read(f"{dist_info}/WHEEL").decode()
        license_text = archive.read(f"{dist_info}/licenses/LICENSE").decode()
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    assert f"Tag: cp311-abi3-{name[2]}" in wheel_metadata
    assert "Root-Is-Purelib: false" in wheel_metadata
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    for required in ("pkeys/_pkeys_cffi.abi3.so", "pkeys/_pkeys_cffi.pyi", "pkeys/_scope.abi3.so",
                     "pkeys/_scope.pyi", "pkeys/py.typed"):
        assert required in names
    assert "pkeys/vm/init.sh" in names, sorted(names)
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "pkeys").rglob("*.py")}
    assert sources <= names, f"modules missing from the wheel: {sorted(sources - names)}"


def elf_section_names(image: bytes) -> set[str]:
    """The section names of a 64-bit little-endian ELF file."""
    import struct

    assert image[:6] == b"\x7fELF\x02\x01", "not a 64-bit little-endian ELF file"
    (section_headers,) = struct.unpack_from("<Q", image, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", image, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        base = section_headers + index * entry_size
        (name,) = struct.unpack_from("<I", image, base)
        offset, size = struct.unpack_from("<QQ", image, base + 0x18)
        return name, offset, size

    _, table, table_size = header(names_index)
    strings = image[table:table + table_size]
    return {strings[name:strings.index(b"\0", name)].decode() for name, _, _ in map(header, range(count))}


@pytest.mark.slow
def test_the_wheels_extension_is_stripped(dist):
    import zipfile

    with zipfile.ZipFile(only(list(dist.glob("*.whl")))) as archive:
        for extension in ("pkeys/_pkeys_cffi.abi3.so", "pkeys/_scope.abi3.so"):
            sections = elf_section_names(archive.read(extension))
            assert ".text" in sections and ".dynsym" in sections, (extension, sections)
            assert not {".symtab", ".strtab"} & sections, (extension, sections)
            assert not {name for name in sections if name.startswith(".debug")}, sections


@pytest.mark.slow
def test_sdist_carries_the_license_and_the_c_sources(dist):
    import tarfile

    sdist = only(list(dist.glob("*.tar.gz")))
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    needed = {"LICENSE", "_build_ffi.py", "setup.py", "pyproject.toml", "pkeys/_pkeys_cffi.pyi",
              "pkeys/py.typed", "pkeys/_scope.pyi", "csrc/scope_type.h"} | {
        str(p.relative_to(ROOT)) for p in SOURCES + SCOPE_SOURCES}
    assert needed <= names, sorted(needed - names)


@pytest.mark.slow
def test_sdist_carries_what_runs_the_tests_and_rebuilds(dist):
    import tarfile

    sdist = only(list(dist.glob("*.tar.gz")))
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "tests", "docs", "tools", "bench", ".ci", ".github"],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    needed = {"README.md", "CHANGELOG.md", "SECURITY.md", "mkdocs.yml", *tracked}
    assert needed <= names, sorted(needed - names)


@pytest.mark.slow
def test_the_installed_wheel_runs_from_anywhere(dist, tmp_path):
    wheel = only(list(dist.glob("*.whl")))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=120)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import pkeys, pkeys._binding as b; print(pkeys.__file__); print(b.lib.pk_arch_is_x86())"
    result = run_isolated(["-c", code], elsewhere, site)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(site / "pkeys" / "__init__.py")
    version = run_isolated(["-m", "pkeys", "--version"], elsewhere, site)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"pkeys {wheel.name.split('-')[1]}"
