"""Kernel benchmarks: one shared harness (harness.py), one bench_<op>.py per op, report.py.

Run them with `fastbert bench` (fastbert/bench.py) or `pytest benchmarks/ --benchmark-json FILE`.
"""
