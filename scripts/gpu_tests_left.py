"""The GPU tests a capped `pytest -m gpu` run did not get to, to run them in the next call.

    python scripts/gpu_tests_left.py RESULTS/gpu_tests.log [--out FILE] [--with-failed]

gpu_check.sh runs the GPU tests with -v, so its gpu_tests.log holds a line for every test that
ended, in xdist's form ("[gw3] [ 41%] PASSED tests/test_x.py::test_y[...]") or plain pytest's
("tests/test_x.py::test_y[...] SKIPPED (its reason)   [ 41%]"). The GPU tests are collected on any machine (they
skip where there is no GPU), so the ones that never ended are the collection here minus those
lines. FILE (default: print) gets their node ids, one per line, in collection order; give it to
the next call as GPU_TESTS_FROM=FILE (a path inside the checkout, e.g. under benchmarks/results/,
since only the checkout travels). --with-failed adds the tests that failed or errored, to see
them again. Exits 1 when the log holds no test line at all (not a -v log of gpu_check.sh).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
ENDED = (re.compile(rf"^\[gw\d+\] \[ *\d+%\] ({OUTCOMES}) (\S.*?)\s*$"),    # xdist: outcome, then the id
         re.compile(rf"^(\S.*::.*?) ({OUTCOMES})(?: \(.*\))? +\[ *\d+%\]\s*$"))          # plain: the id, then outcome


def ended_tests(log: str) -> dict[str, str]:
    """{node id: outcome} of every test line of a pytest -v log."""
    ended = {}
    for line in log.splitlines():
        xdist, plain = ENDED[0].match(line), ENDED[1].match(line)
        if xdist:
            ended[xdist[2]] = xdist[1]
        elif plain:
            ended[plain[1]] = plain[2]
    return ended


def collected_gpu_tests() -> list[str]:
    """Node ids of `pytest -m gpu tests`, in collection order, collected on this machine."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests", "--collect-only", "-q",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True)
    ids = [line for line in done.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if done.returncode != 0 or not ids:
        sys.exit(f"gpu_tests_left.py: collecting the GPU tests failed (rc {done.returncode}):\n"
                 f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return ids


def left(collected: list[str], ended: dict[str, str], with_failed: bool = False) -> list[str]:
    again = {"FAILED", "ERROR"} if with_failed else set()
    return [node for node in collected if node not in ended or ended[node] in again]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log", type=Path, help="gpu_tests.log of a gpu_check.sh call")
    parser.add_argument("--out", type=Path, help="write the node ids here (default: print them)")
    parser.add_argument("--with-failed", action="store_true", help="also the tests that failed or errored")
    parser.add_argument("--collected", type=Path,
                        help="node ids of the GPU tests, one per line, instead of collecting them here")
    args = parser.parse_args(argv)
    if not args.log.is_file():
        parser.error(f"log {str(args.log)!r}: no such file")
    ended = ended_tests(args.log.read_text(errors="replace"))
    if not ended:
        print(f"gpu_tests_left.py: {args.log} holds no test line of pytest -v", file=sys.stderr)
        return 1
    collected = ([line for line in args.collected.read_text().splitlines() if line.strip()] if args.collected
                 else collected_gpu_tests())
    rest = left(collected, ended, args.with_failed)
    unknown = sorted(set(ended) - set(collected))
    counts = {o: sum(v == o for v in ended.values()) for o in OUTCOMES.split("|")}
    print(f"{len(collected)} GPU tests collected; the log ended {len(ended)} ("
          + ", ".join(f"{n} {o.lower()}" for o, n in counts.items() if n) + f"); {len(rest)} left", file=sys.stderr)
    if unknown:  # a test id the GPU machine collected and this one did not (parameters built from the device)
        print(f"{len(unknown)} ended tests are not in this collection, e.g. {unknown[0]}", file=sys.stderr)
    text = "".join(f"{node}\n" for node in rest)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
