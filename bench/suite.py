#!/usr/bin/env python3
"""The pyperf suite alone, with pyperf's own options:

    python bench/suite.py -o raw.json [--fast | --rigorous | -p 20 ...]
    python -m pyperf compare_to before.json after.json
"""

from pkeys.bench.suite import main

if __name__ == "__main__":
    main()
