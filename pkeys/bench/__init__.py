"""``pkeys bench``: what protection keys cost, from C and from Python.

The suite (:mod:`pkeys.bench.suite`) is a pyperf script: calibrated loops
in worker processes, JSON that ``python -m pyperf compare_to`` reads, case
names ``group/op/impl``.  The contention experiment
(:mod:`pkeys.bench.contention`) measures page-fault throughput while one
thread flips access.  :mod:`pkeys.bench.report` prints the table, the
targets and the machine, and draws the chart.
"""
