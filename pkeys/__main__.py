"""The ``pkeys`` command: ``doctor``, ``demo``, ``vm``, ``bench``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pkeys", description="Linux memory protection keys (x86 PKU) from Python."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor = commands.add_parser(
        "doctor", help="report PKU support, the backend and this thread's PKRU"
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    commands.add_parser("demo", help="protect a page and show access denied, then allowed")
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
        "bench", help="measure instructions vs syscalls, the Python layer, and mm-lock contention"
    )
    from .bench.cli import add_arguments

    add_arguments(bench)
    vm.add_argument("vm_args", nargs=argparse.REMAINDER, metavar="CMD", help="`setup`, or -- CMD ARGS...")
    return parser


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

        return doctor_main(as_json=args.json)
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
