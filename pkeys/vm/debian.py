"""Debian's kernel packages, found and downloaded through a private apt state.

The private state (sources, package lists, downloads) lives in the cache, so
nothing needs root and the system's apt configuration is neither used nor
changed.  It covers the suites where bookworm's kernels are: the release,
its updates, security and backports.  A series such as ``6.12`` is matched
against the versioned package names (``linux-image-6.12.117+deb12-amd64``)
and the newest version wins; no series at all means whatever Debian's
``linux-image-amd64`` metapackage points at.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from . import paths
from .errors import VMError

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"
RELEASE = "bookworm"
#: Package lists older than this are refreshed before a lookup.
LISTS_MAX_AGE = 24 * 3600


def sources_list() -> str:
    """The suites to search; ``PKEYS_VM_DEBIAN_MIRROR``/``PKEYS_VM_DEBIAN_SECURITY``
    replace the default archive addresses (a local mirror, say)."""
    mirror = os.environ.get("PKEYS_VM_DEBIAN_MIRROR", DEFAULT_MIRROR)
    security = os.environ.get("PKEYS_VM_DEBIAN_SECURITY", DEFAULT_SECURITY)
    signed = f"[signed-by={KEYRING}]"
    return "".join(
        f"deb {signed} {url} {suite} main\n"
        for url, suite in (
            (mirror, RELEASE),
            (mirror, f"{RELEASE}-updates"),
            (security, f"{RELEASE}-security"),
            (mirror, f"{RELEASE}-backports"),
        )
    )


class Archive:
    """apt-get and apt-cache over the private state in ``root``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or paths.apt_dir()

    def _options(self) -> list[str]:
        root = self.root
        options = {
            "Dir::Etc::sourcelist": root / "sources.list",
            "Dir::Etc::sourceparts": "-",
            "Dir::Etc::preferencesparts": "-",
            "Dir::State::lists": root / "lists",
            "Dir::State::status": root / "status",
            "Dir::Cache": root / "cache",
            "Dir::Cache::archives": root / "archives",
            "Acquire::Languages": "none",
            "APT::Get::List-Cleanup": "false",
        }
        if os.geteuid() == 0:
            # apt would otherwise download as the _apt user, which may not
            # be able to write into a root-owned cache.
            options["APT::Sandbox::User"] = "root"
        return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]

    def _prepare(self) -> None:
        for folder in ("lists/partial", "cache", "archives/partial"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        wanted = sources_list()
        sources = self.root / "sources.list"
        if not sources.exists() or sources.read_text() != wanted:
            sources.write_text(wanted)
            (self.root / "updated").unlink(missing_ok=True)

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        result = subprocess.run(
            [tool, *self._options(), *args], capture_output=True, text=True, cwd=cwd, check=False
        )
        if result.returncode != 0:
            raise VMError(f"{tool} {' '.join(args)} failed:\n{result.stderr.strip()[-2000:]}")
        return result.stdout

    def update(self, *, force: bool = False) -> None:
        """Fetch the package lists, unless they are recent."""
        if not KEYRING.exists():
            raise VMError(
                f"{KEYRING} is missing: install the debian-archive-keyring package, "
                "or pass --kernel PATH with a kernel image"
            )
        self._prepare()
        stamp = self.root / "updated"
        if not force and stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE:
            return
        paths.log("updating the list of Debian kernel packages")
        self._run("apt-get", "update", "-q")
        stamp.touch()

    def versions(self, names: list[str]) -> dict[str, str]:
        """The candidate version of each package that exists."""
        if not names:
            return {}
        text = self._run("apt-cache", "show", "--no-all-versions", *names)
        found: dict[str, str] = {}
        package = None
        for line in text.splitlines():
            if line.startswith("Package: "):
                package = line.split()[1]
            elif line.startswith("Version: ") and package:
                found[package] = line.split()[1]
        return found

    def pkgnames(self, prefix: str) -> list[str]:
        return self._run("apt-cache", "pkgnames", prefix).split()

    def depends_of(self, package: str) -> list[str]:
        text = self._run("apt-cache", "depends", package)
        return re.findall(r"Depends:\s*(\S+)", text)

    def download(self, package: str, version: str | None, into: Path) -> Path:
        """The .deb of ``package`` (at ``version`` if given), in ``into``."""
        spec = f"{package}={version}" if version else package
        paths.log(f"downloading {spec}")
        self._run("apt-get", "download", "-q", spec, cwd=into)
        debs = sorted(into.glob(f"{package}_*.deb"))
        if not debs:
            raise VMError(f"apt-get download {spec} left no .deb")
        return debs[-1]


_IMAGE = re.compile(r"^linux-image-(\d+\.\d+[^-]*(?:-\d+)?)-amd64(-unsigned)?$")


def series_of(release: str) -> tuple[int, ...]:
    """``(6, 12)`` for ``6.12.117+deb12-amd64``, ``(6, 1)`` for ``6.1.0-56-amd64``."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if not match:
        raise VMError(f"not a kernel release or series: {release!r}")
    return int(match.group(1)), int(match.group(2))


def matches_series(release: str, series: str) -> bool:
    wanted = tuple(int(part) for part in series.split("."))
    numbers = tuple(int(part) for part in re.findall(r"\d+", release)[: len(wanted)])
    return numbers == wanted


def _is_release(name: str, series: str) -> bool:
    """A full release of the series (``6.12.117+deb12``), not a per-series
    metapackage (``linux-image-6.12-amd64``, which only depends on one)."""
    return len(re.findall(r"\d+", name)) >= 3 and matches_series(name, series)


def newest(versions: dict[str, str]) -> str:
    """The package with the highest Debian version."""
    best = None
    for package, version in versions.items():
        if best is None or _compare(version, versions[best]) > 0:
            best = package
    assert best is not None
    return best


def _compare(a: str, b: str) -> int:
    if subprocess.run(["dpkg", "--compare-versions", a, "gt", b], check=False).returncode == 0:
        return 1
    return 0 if a == b else -1


def image_package(archive: Archive, series: str | None) -> tuple[str, str]:
    """``(package, version)`` of the newest generic amd64 image of ``series``
    (the signed build, else the unsigned one), or the metapackage's target."""
    archive.update()
    if series is None:
        targets = [d for d in archive.depends_of("linux-image-amd64") if _IMAGE.match(d)]
        if not targets:
            raise VMError("Debian's linux-image-amd64 depends on no generic kernel image")
        versions = archive.versions(targets[:1])
    else:
        series_of(series)  # validates
        names = [n for n in archive.pkgnames("linux-image-") if _IMAGE.match(n)]
        names = [n for n in names if _is_release(_IMAGE.match(n).group(1), series)]  # type: ignore[union-attr]
        versions = archive.versions(names)
        if not versions:
            raise VMError(
                f"no Debian kernel package for series {series} "
                f"(looked in {RELEASE}, -updates, -security and -backports)"
            )
        signed = {n: v for n, v in versions.items() if not n.endswith("-unsigned")}
        best = newest(versions)
        # The signed and unsigned builds of one version carry the same kernel.
        twin = best.removesuffix("-unsigned")
        if twin in signed and signed[twin] == versions[best]:
            best = twin
        versions = {best: versions[best]}
    package, version = next(iter(versions.items()))
    return package, version


def source_package(archive: Archive, series: tuple[int, int], version: str | None) -> tuple[str, str]:
    """``linux-source-X.Y`` at the kernel's own version when the archive still
    has it, else its newest."""
    archive.update()
    name = f"linux-source-{series[0]}.{series[1]}"
    text = archive._run("apt-cache", "madison", name)
    available = [line.split("|")[1].strip() for line in text.splitlines() if "|" in line]
    if not available:
        raise VMError(f"no {name} package in the archive")
    if version in available:
        return name, version
    best = available[0]
    for candidate in available[1:]:
        if _compare(candidate, best) > 0:
            best = candidate
    return name, best
