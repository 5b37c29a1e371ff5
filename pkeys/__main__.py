"""The ``pkeys`` command: ``doctor``, ``demo``, ``vm``, ``bench``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pkeys", description="Linux memory protection keys (x86 PKU) from Python."
    )
    parser.add_argument("--version", action="version", version=f"pkeys {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor = commands.add_parser(
        "doctor",
        help="report PKU support, the backend and this thread's PKRU",
        description="Report what this machine offers (CPU, kernel, glibc, PKRU, locked memory "
        "and its limit) and which backend pkeys uses. Exits 0 when that backend works, the "
        "software emulation included, and 1 when it does not.",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--require-hardware", action="store_true",
                        help="exit 1 unless hardware protection keys are usable")
    commands.add_parser(
        "demo",
        help="protect a page and show access denied, then allowed",
        description="Tag a page holding a secret with a new key, then try to read and write "
        "it (in forked children) with access denied, read-only and open, and from another "
        "thread.",
    )
    vm = commands.add_parser(
        "vm",
        help="run a command on an emulated PKU CPU (QEMU TCG); `pkeys vm setup` prepares it",
        usage="pkeys vm [--timeout S] [--kernel PATH] [--smp N] [--mem MB] -- CMD ARGS...\n"
        "       pkeys vm setup",
    )
    vm.add_argument("--timeout", type=float, default=1800, metavar="S",
                    help="kill the VM after S seconds (exit 124); default 1800")
    vm.add_argument("--kernel", metavar="PATH", help="boot this kernel instead of the cached one")
    vm.add_argument("--smp", type=int, default=1, metavar="N", help="virtual CPUs (default 1)")
    vm.add_argument("--mem", type=int, default=2048, metavar="MB", help="guest memory (default 2048)")
    bench = commands.add_parser(
        "bench",
        help="measure instructions vs syscalls, the Python layer, and mm-lock contention",
        description="Time RDPKRU/WRPKRU against syscalls in C, the Python layer against a bare "
        "cffi call (pyperf), and page-fault throughput while another thread flips access; "
        "print the table and the targets. See bench/README.md.",
    )
    from .bench.cli import add_arguments

    add_arguments(bench)
    vm.add_argument("vm_args", nargs=argparse.REMAINDER, metavar="CMD", help="`setup`, or -- CMD ARGS...")
    _describe_by_help(commands)
    return parser


def _describe_by_help(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """A subcommand given no description of its own gets its one-line help,
    so that `pkeys COMMAND --help` never starts with bare usage."""
    for summary in commands._choices_actions:
        subcommand = commands.choices[summary.dest]
        if subcommand.description is None:
            subcommand.description = summary.help


def _vm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import vm

    command = list(args.vm_args)
    if command and command[0] == "--":
        command = command[1:]
    elif command == ["setup"]:
        try:
            ready = vm.setup()
        except vm.VMError as exc:
            print(f"pkeys vm setup: {exc}", file=sys.stderr)
            return 1
        print(f"pkeys vm: ready (kernel {ready.kernel}, initramfs {ready.initramfs})")
        return 0
    if not command:
        print("pkeys vm: give a command after --, or `setup`", file=sys.stderr)
        return 2
    try:
        return vm.run(
            command,
            timeout=args.timeout,
            kernel=Path(args.kernel) if args.kernel else None,
            smp=args.smp,
            mem=args.mem,
        )
    except vm.VMError as exc:
        print(f"pkeys vm: {exc}", file=sys.stderr)
        return vm.EXIT_VM_FAILED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(as_json=args.json, require_hardware=args.require_hardware)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main()
    if args.command == "vm":
        return _vm(args)
    if args.command == "bench":
        from .bench.cli import main as bench_main

        return bench_main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
