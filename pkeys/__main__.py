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
        usage="pkeys vm [--kernel SERIES] [--timeout S] [--smp N] [--mem MB] [--root] [-v] "
        "-- CMD ARGS...\n"
        "       pkeys vm setup [--kernel SERIES]...\n"
        "       pkeys vm selftest [--kernel SERIES]\n"
        "       pkeys vm --list",
    )
    from .vm.cli import add_arguments as add_vm_arguments

    add_vm_arguments(vm)
    bench = commands.add_parser(
        "bench", help="measure instructions vs syscalls, the Python layer, and mm-lock contention"
    )
    from .bench.cli import add_arguments

    add_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `pkeys vm ... -- CMD`: what follows the first `--` is the guest's
    # command, kept away from our parser entirely.
    guest_command = None
    if "--" in argv:
        split = argv.index("--")
        argv, guest_command = argv[:split], argv[split + 1:]
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "vm":
        parser.error("unrecognized arguments: " + " ".join(unknown))
    if guest_command is not None and args.command != "vm":
        parser.error(f"`--` and a command after it are for `pkeys vm`, not `pkeys {args.command}`")
    if args.command == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(as_json=args.json)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main()
    if args.command == "vm":
        from .vm.cli import main as vm_main

        args.guest_command = guest_command
        # Unknown options before `--` are refused there, with the hint that
        # a command goes after `--`.
        args.action = [*args.action, *unknown]
        return vm_main(args)
    if args.command == "bench":
        from .bench.cli import main as bench_main

        return bench_main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
