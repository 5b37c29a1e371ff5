#!/usr/bin/env python3
"""The benchmark suite as a script: the same as ``python -m pkeys bench``.

    python bench/run.py [--quick] [-o results.json] [--plot bench.png] [--allow-emulated]
"""

import argparse
import sys

from pkeys.bench.cli import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
