"""``pkeys vm selftest``: the kernel's own ``protection_keys`` selftest, in the guest.

The test comes from the Debian ``linux-source-X.Y`` package of the guest
kernel's series (at the kernel's own version when the archive still has
it): about 140 MB, downloaded once; only the few files the test needs are
kept, with the binaries built from them, under ``selftest/`` in the cache.

Its exit status is not to be trusted (it forks, and a parent exits 0
midway), so the verdict comes from its output: the number of ``PASSED``
lines and the final ``done (all tests OK)`` line.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import debian, initramfs, kernels, paths, runner
from .errors import VMError

DONE_LINE = "done (all tests OK)"
#: Where the test lives: tools/testing/selftests/mm since 6.3, .../vm before.
SELFTEST_DIRS = ("tools/testing/selftests/mm/", "tools/testing/selftests/vm/")
KEEP = re.compile(r"(protection_keys\.c|pkey[-_][\w-]*\.h)$")
EXTRA = ("tools/testing/selftests/kselftest.h",)


@dataclass(frozen=True)
class Result:
    binary: str
    release: str
    passed: int
    done: bool
    status: int

    @property
    def ok(self) -> bool:
        return self.done and self.passed > 0

    def describe(self) -> str:
        verdict = f"'{DONE_LINE}'" if self.done else f"no '{DONE_LINE}' line (exit status {self.status})"
        return f"{self.binary} on {self.release}: {self.passed} PASSED lines, {verdict}"


def count(output: str) -> tuple[int, bool]:
    """Distinct PASSED lines and whether the final verdict line is there.

    Distinct: with its output on a pipe, stdio buffers it, and each fork of
    the test repeats what its parent had not flushed yet."""
    passed = {line.strip() for line in output.splitlines() if re.search(r"\bPASSED\b", line)}
    return len(passed), DONE_LINE in output


def _extract_sources(deb: Path, into: Path) -> Path:
    """Stream the source tarball out of the .deb and keep only the test's files."""
    feed = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    kept: Path | None = None
    with tarfile.open(fileobj=feed.stdout, mode="r|") as outer:
        for member in outer:
            if not re.search(r"usr/src/linux-source-[\d.]+\.tar\.\w+$", member.name):
                continue
            inner_stream = outer.extractfile(member)
            # r|*: a stream, with its compression (xz, gz, bz2) found from its header.
            with tarfile.open(fileobj=inner_stream, mode="r|*") as inner:
                for entry in inner:
                    relative = entry.name.split("/", 1)[-1]
                    wanted = relative in EXTRA or (
                        relative.startswith(SELFTEST_DIRS) and KEEP.search(relative))
                    if wanted and entry.isfile():
                        target = into / relative
                        target.parent.mkdir(parents=True, exist_ok=True)
                        content = inner.extractfile(entry)
                        if content is None:
                            continue
                        target.write_bytes(content.read())
                        if relative.endswith("protection_keys.c"):
                            kept = target.parent
            break
    feed.stdout.close()  # type: ignore[union-attr]
    feed.wait()
    if kept is None:
        raise VMError(f"{deb.name} has no protection_keys.c")
    return kept


def _build(source_dir: Path) -> list[Path]:
    """protection_keys_64, and _32 where the compiler can build 32-bit programs."""
    built = []
    for bits, flags in (("64", []), ("32", ["-m32"])):
        binary = source_dir / f"protection_keys_{bits}"
        command = ["cc", *flags, "-O2", "-g", "-std=gnu99", "-pthread", "-Wall", "-mxsave",
                   f"-I{source_dir}", f"-I{source_dir.parent}", "protection_keys.c",
                   "-o", binary.name, "-lrt", "-ldl", "-lm"]
        result = subprocess.run(command, cwd=source_dir, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            built.append(binary)
        elif bits == "64":
            raise VMError(f"building protection_keys failed:\n{result.stderr[-3000:]}")
    return built


def prepare(kernel: kernels.Kernel) -> list[Path]:
    """The built selftest binaries for this kernel's series (cached)."""
    archive = debian.Archive(paths.apt_dir())
    name, version = debian.source_package(archive, kernel.series, kernel.version)
    folder = paths.cache_dir() / "selftest" / f"{name}_{version}"
    binaries = sorted(folder.rglob("protection_keys_*"))
    binaries = [b for b in binaries if b.suffix == ""]
    if binaries:
        return binaries
    with tempfile.TemporaryDirectory(prefix="pkeys-selftest-") as work:
        deb = archive.download(name, version, Path(work))
        paths.log(f"extracting the protection_keys selftest from {deb.name}")
        source_dir = _extract_sources(deb, folder)
    paths.log("building protection_keys")
    return _build(source_dir)


class _Tee(io.RawIOBase):
    def __init__(self, echo: bool) -> None:
        self.data = bytearray()
        self.echo = echo

    def writable(self) -> bool:
        return True

    def write(self, chunk: bytes) -> int:  # type: ignore[override]
        self.data += chunk
        if self.echo:
            import sys

            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        return len(chunk)


def main(spec: str | None, *, timeout: float = 1800, verbose: bool = False) -> int:
    kernel = kernels.find(spec)
    if kernel is None:
        from .prepare import setup

        kernel = setup([spec] if spec else None)[0].kernel
    assert kernel is not None
    binaries = prepare(kernel)
    results = []
    for binary in binaries:
        paths.log(f"running {binary.name} on {kernel.release}")
        out = _Tee(verbose)
        # The test forks and its parent may exit while the child still runs
        # tests: wait for every protection_keys process of the group (by its
        # 15-character name, which the wrapper shell does not have), since
        # the guest ends what the command leaves behind.
        # Line-buffered (stdbuf) so that forks repeat no buffered output.
        run = 'stdbuf -oL "$0"' if shutil.which("stdbuf") else '"$0"'
        wait_all = (f'{run}; status=$?; while pgrep -g $$ -x protection_keys >/dev/null; '
                    'do sleep 0.2; done; exit $status')
        status = runner.run(
            ["sh", "-c", wait_all, str(binary)], kernel=kernel.vmlinux, initramfs=initramfs.require(kernel),
            options=runner.Options(timeout=timeout, root=True), cwd=str(binary.parent),
            out=out, stdin=io.BytesIO(),  # type: ignore[arg-type]
        )
        passed, done = count(out.data.decode(errors="replace"))
        results.append(Result(binary.name, kernel.release, passed, done, status))
        print(results[-1].describe(), flush=True)
    return 0 if results and all(r.ok for r in results) else 1
