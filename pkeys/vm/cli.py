"""``pkeys vm``: its arguments and what each form does.

    pkeys vm [OPTIONS] -- CMD ARGS...     run CMD on the emulated PKU CPU
    pkeys vm setup [--kernel SERIES]...   prepare QEMU, kernels, initramfs
    pkeys vm selftest [--kernel SERIES]   the kernel's own protection_keys test
    pkeys vm --list                       the cached kernels

Everything before ``--`` is ours and is parsed strictly (``pkeys vm stup``
is refused with a hint, it never boots anything); everything after it is
the guest command, untouched.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys

from .errors import EXIT_USAGE, EXIT_VM_FAILED, VMError
from .qemu import MAX_SMP, MIN_MEM_MB

ACTIONS = ("setup", "selftest")


def _bounded_int(name: str, low: int, high: int):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} {value} is out of range: give {low} to {high}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"seconds must be positive, not {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="*", metavar="ACTION",
                        help="`setup` or `selftest` (downloads about 140 MB once); a command to "
                             "run goes after --. `pkeys vm ACTION --help` describes each")
    parser.add_argument("--kernel", action="append", metavar="SERIES",
                        help="Debian kernel series (6.1, 6.12), a cached release, or a kernel "
                             "image path; setup takes several; default: the one setup chose")
    parser.add_argument("--list", action="store_true", help="show the cached kernels")
    parser.add_argument("--timeout", type=_positive_seconds, default=1800.0, metavar="S",
                        help="kill the VM after S seconds (exit 124); default 1800")
    parser.add_argument("--boot-timeout", type=_positive_seconds, default=60.0, metavar="S",
                        help="fail (exit 125) if the guest has not started the command after S "
                             "seconds; default 60")
    parser.add_argument("--smp", type=_bounded_int("--smp", 1, MAX_SMP), default=1, metavar="N",
                        help="virtual CPUs (default 1)")
    parser.add_argument("--mem", type=_bounded_int("--mem", MIN_MEM_MB, 1 << 20), default=2048,
                        metavar="MB", help=f"guest memory in MB, at least {MIN_MEM_MB} (default 2048)")
    parser.add_argument("--root", action="store_true",
                        help="run the command as root in the guest (default: your uid and gid)")
    parser.add_argument("--append", default="", metavar="PARAMS",
                        help="extra kernel command-line parameters")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the QEMU command line and the guest's boot")
    parser.add_argument("--refresh", action="store_true",
                        help="setup: look for newer kernels of the series even if one is cached")
    parser.set_defaults(vm_parser=parser, guest_command=None)


def action_parser(action: str) -> argparse.ArgumentParser:
    """The help of ``pkeys vm setup`` and ``pkeys vm selftest``: what each
    does and the options it reads.  The vm parser above still parses them
    (one parser keeps ``pkeys vm stup`` a usage error, not a boot)."""
    if action == "setup":
        parser = argparse.ArgumentParser(
            prog="pkeys vm setup", usage="pkeys vm setup [--kernel SERIES]... [--refresh]",
            description="Prepare the emulated PKU machine, once: install QEMU and a static "
            "busybox (as root on an apt system; otherwise say which packages to install), find "
            "Debian's newest kernel package of each series, download it without installing it, "
            "keep its image and the modules the guest needs, and build an initramfs. Everything "
            "is cached in $XDG_CACHE_HOME/pkeys/vm (~/.cache/pkeys/vm by default); a cached kernel "
            "is kept until --refresh.")
        parser.add_argument("--kernel", action="append", metavar="SERIES",
                            help="a Debian kernel series (6.1, 6.12); give it once per kernel; "
                                 "default: Debian's default series")
        parser.add_argument("--refresh", action="store_true",
                            help="look for newer kernels of the series even if one is cached")
        return parser
    if action == "selftest":
        parser = argparse.ArgumentParser(
            prog="pkeys vm selftest", usage="pkeys vm selftest [--kernel SERIES] [--timeout S] [-v]",
            description="Run the kernel's own protection-keys selftest on the emulated CPU: "
            "download the matching Debian linux-source package (about 140 MB, once, cached), "
            "build tools/testing/selftests/mm/protection_keys.c from it, run it in the guest, and "
            "judge it by its output (distinct PASSED lines and the final `done (all tests OK)`), "
            "since its exit status cannot be trusted. Exits 0 when it passed.")
        parser.add_argument("--kernel", metavar="SERIES",
                            help="the kernel series or cached release to test; default: the one "
                                 "setup chose")
        parser.add_argument("--timeout", metavar="S",
                            help="kill the VM after S seconds (exit 124); default 1800")
        parser.add_argument("-v", "--verbose", action="store_true",
                            help="show the build and the test's output as they run")
        return parser
    raise ValueError(f"no action {action!r}: {', '.join(ACTIONS)}")


def _usage_error(args: argparse.Namespace, message: str) -> int:
    parser: argparse.ArgumentParser = args.vm_parser
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(args: argparse.Namespace) -> int:
    words: list[str] = args.action
    command: list[str] | None = args.guest_command
    if args.list:
        if words or command:
            return _usage_error(args, "--list takes no command")
        return _list()
    if words:
        action = words[0]
        if action not in ACTIONS or len(words) > 1:
            close = difflib.get_close_matches(action, ACTIONS, n=1)
            hint = f"did you mean `pkeys vm {close[0]}`? " if close and action not in ACTIONS else ""
            shown = " ".join(words)
            return _usage_error(
                args, f"unknown action {shown!r}: {hint}to run a command, put it after --: "
                      f"pkeys vm -- {shown}")
        if command is not None:
            return _usage_error(args, f"`{action}` takes no command after --")
        if action == "setup":
            return _setup(args)
        return _selftest(args)
    if not command:
        return _usage_error(args, "give a command after --, or `setup`: pkeys vm -- CMD ARGS...")
    if args.kernel and len(args.kernel) > 1:
        return _usage_error(args, "a command runs on one kernel: give --kernel once")
    return _run(args, command)


def _kernel_spec(args: argparse.Namespace) -> str | None:
    return args.kernel[0] if args.kernel else os.environ.get("PKEYS_VM_KERNEL") or None


def _run(args: argparse.Namespace, command: list[str]) -> int:
    from . import initramfs, kernels, runner, tools

    try:
        if not tools.qemu():
            raise VMError("QEMU is missing; run `pkeys vm setup` first")
        spec = _kernel_spec(args)
        kernel = kernels.find(spec)
        if kernel is None and spec and kernels.is_path(spec):
            kernel = kernels.import_image(__import__("pathlib").Path(spec))
        if kernel is None:
            kernel = kernels.require(spec)
        options = runner.Options(
            timeout=args.timeout, boot_timeout=args.boot_timeout, smp=args.smp, mem=args.mem,
            verbose=args.verbose, append=args.append, root=args.root,
        )
        return runner.run(command, kernel=kernel.vmlinux, initramfs=initramfs.require(kernel),
                          options=options)
    except VMError as exc:
        print(f"pkeys vm: {exc}", file=sys.stderr)
        return EXIT_VM_FAILED


def _setup(args: argparse.Namespace) -> int:
    from .prepare import setup

    try:
        ready = setup(args.kernel, refresh=args.refresh)
    except VMError as exc:
        print(f"pkeys vm setup: {exc}", file=sys.stderr)
        return 1
    for status in ready:
        print(f"pkeys vm: ready: kernel {status.kernel.describe()}")  # type: ignore[union-attr]
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from .selftest import main as selftest_main

    if args.kernel and len(args.kernel) > 1:
        return _usage_error(args, "selftest runs on one kernel at a time: give --kernel once")
    try:
        return selftest_main(_kernel_spec(args), timeout=args.timeout, verbose=args.verbose)
    except VMError as exc:
        print(f"pkeys vm selftest: {exc}", file=sys.stderr)
        return 1


def _list() -> int:
    from . import kernels, paths

    found = kernels.cached()
    if not found:
        print(f"no kernels cached in {paths.kernels_dir()}; run `pkeys vm setup`")
        return 0
    default = kernels.default_release()
    for kernel in found:
        mark = "*" if kernel.release == default else " "
        series = ".".join(str(n) for n in kernel.series)
        print(f"{mark} {series:6} {kernel.release:28} {kernel.origin}")
    print("(* the default kernel)")
    return 0
