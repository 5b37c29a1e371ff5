"""The ``pkeys`` command: ``doctor``, ``demo``, ``vm``, ``bench``."""

from __future__ import annotations

import argparse
import os
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
        usage="pkeys vm [--kernel SERIES] [--timeout S] [--smp N] [--mem MB] [--root] [-v] "
        "-- CMD ARGS...\n"
        "       pkeys vm setup [--kernel SERIES]...\n"
        "       pkeys vm selftest [--kernel SERIES]\n"
        "       pkeys vm --list",
    )
    from .vm.cli import add_arguments as add_vm_arguments

    add_vm_arguments(vm)
    bench = commands.add_parser(
        "bench",
        help="measure instructions vs syscalls, the Python layer, and mm-lock contention",
        description="Time RDPKRU/WRPKRU against syscalls in C, the Python layer against a bare "
        "cffi call (pyperf), and page-fault throughput while another thread flips access; "
        "print the table and the targets. How to read them: the Benchmarks pages of the "
        "documentation (docs/benchmarks.md and docs/benchmarks-method.md in the source).",
    )
    from .bench.cli import add_arguments

    add_arguments(bench)
    _describe_by_help(commands)
    return parser


def _describe_by_help(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """A subcommand given no description of its own gets its one-line help,
    so that `pkeys COMMAND --help` never starts with bare usage."""
    for summary in commands._choices_actions:
        subcommand = commands.choices[summary.dest]
        if subcommand.description is None:
            subcommand.description = summary.help


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`pkeys doctor | head`): stop quietly, as other
        # Unix tools do, instead of a traceback; and keep Python's flush of
        # stdout at exit from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # killed by SIGPIPE, as the shell reports it


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `pkeys vm ... -- CMD`: what follows the first `--` is the guest's
    # command, kept away from our parser entirely.
    guest_command = None
    if "--" in argv:
        split = argv.index("--")
        argv, guest_command = argv[:split], argv[split + 1:]
    if argv[:1] == ["vm"] and len(argv) > 1 and {"-h", "--help"} & set(argv[2:]):
        from .vm.cli import ACTIONS, action_parser

        if argv[1] in ACTIONS:
            action_parser(argv[1]).print_help()
            return 0
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "vm":
        parser.error("unrecognized arguments: " + " ".join(unknown))
    if guest_command is not None and args.command != "vm":
        parser.error(f"`--` and a command after it are for `pkeys vm`, not `pkeys {args.command}`")
    if args.command == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(as_json=args.json, require_hardware=args.require_hardware)
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
