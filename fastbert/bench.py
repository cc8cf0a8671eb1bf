"""`fastbert bench`: time fastbert's kernels against eager PyTorch, torch.compile and SDPA.

    fastbert bench [--suite kernels|e2e|all] [--quick | --budget] [--out DIR]
                   [--ops attention,layernorm,span] [--compile none|key|all] [--time-limit SECONDS]
                   [--filter REGEX]

Writes DIR/kernels.json (every row with GPU, driver, versions, commit and time),
DIR/kernels.md (the full table) and DIR/kernels.png (plots); prints the key-shape
summary last. DIR defaults to benchmarks/results/<date>-<gpu>/ in a source checkout,
./fastbert-bench/<date>-<gpu>/ for an installed wheel. The e2e suite
(benchmarks/bench_e2e.py: a fine-tuning step and inference of BERT-base/large with
a classification and a QA head, fastbert against transformers) writes DIR/e2e.json,
DIR/e2e.md and DIR/e2e.png the same way; "all" runs kernels, then e2e.

  --quick       every benchmark once at tiny sizes, on CPU too (Triton through the
                interpreter when TRITON_INTERPRET=1 is set before Python starts): a smoke test
  --budget      fewer repetitions, for a GPU check of a few minutes (scripts/gpu_check.sh)
  --compile     which cases get a torch.compile baseline: none, key (the key shapes, default), all
  --time-limit  start no new case group after this many seconds (lowest-priority groups go first);
                results are saved after every group, so a killed run keeps what it measured
                (with --suite all the limit covers both suites: e2e gets what kernels left)
  --filter      e2e only: run the cases whose "<model>-<head> <shape> <mode> <impl>" matches REGEX

The harness and the benchmarks live in benchmarks/ of the source checkout (found next to
this package, or at $FASTBERT_REPO); a wheel installs the same files as fastbert.benchmarks,
which serve when there is no checkout. Also runnable as `python -m fastbert.bench`.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

SUITES = {"kernels": ("attention", "layernorm", "span"), "e2e": ()}
SUITES["all"] = SUITES["kernels"]  # and then the e2e suite (benchmarks/bench_e2e.py)
MODULES = {"attention": "bench_attention", "layernorm": "bench_layernorm", "span": "bench_span"}


def _checkout() -> Path | None:
    """The source checkout holding benchmarks/ (put on sys.path so `benchmarks` imports there), or
    None: then the suites come from the installed package, fastbert.benchmarks."""
    candidates = [Path(os.environ["FASTBERT_REPO"])] if os.environ.get("FASTBERT_REPO") else []
    candidates.append(Path(__file__).resolve().parents[1])
    for repo in candidates:
        if (repo / "benchmarks" / "harness.py").is_file() and (repo / "kernels").is_dir():
            if str(repo) not in sys.path:
                sys.path.insert(0, str(repo))
            return repo
    if os.environ.get("FASTBERT_REPO"):
        raise RuntimeError(f"FASTBERT_REPO={os.environ['FASTBERT_REPO']} holds no benchmarks/harness.py")
    return None


def _suites():
    """The benchmarks package: the checkout's (its results folder is in the repository) or the
    installed copy (a wheel user's)."""
    try:
        if _checkout() is not None:
            import benchmarks
        else:
            from fastbert import benchmarks
        importlib.import_module(f"{benchmarks.__name__}.bench_attention")  # pytest, for its entry points
    except ImportError as err:
        raise RuntimeError("the benchmark suites need the 'bench' extra of fastbert-kernels (pytest-benchmark, "
                           f"matplotlib, transformers: pip install '<our wheel or checkout>[bench]'): {err}") from None
    return benchmarks


def _default_out(repo: Path | None, env: dict) -> Path:
    """benchmarks/results/<date>-<gpu> in a checkout; ./fastbert-bench/<date>-<gpu> for an installed wheel."""
    gpu = re.sub(r"[^a-z0-9]+", "-", str(env.get("gpu", "cpu")).lower()).strip("-")
    root = repo / "benchmarks" / "results" if repo is not None else Path.cwd() / "fastbert-bench"
    return root / f"{datetime.date.today().isoformat()}-{gpu}"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fastbert bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="kernels")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="tiny sizes, one pass; runs on CPU")
    speed.add_argument("--budget", action="store_true", help="short repetitions for a timed GPU check")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<date>-<gpu>)")
    parser.add_argument("--ops", default=None, help="comma-separated subset of: " + ", ".join(MODULES))
    parser.add_argument("--compile", dest="compile_scope", choices=["none", "key", "all"], default="key")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; see above")
    parser.add_argument("--filter", default=None, help="e2e: regex over '<model>-<head> <shape> <mode> <impl>'")
    args = parser.parse_args(argv)
    # Every argument is checked here, before a suite starts: a bad one found after the kernel suite of
    # `--suite all` had run (or a 0 read as "no limit") cost the whole run.
    if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
        parser.error(f"--time-limit must be a number of seconds > 0, got {args.time_limit}")
    if args.filter is not None:
        try:
            re.compile(args.filter)
        except re.error as err:
            parser.error(f"--filter {args.filter!r} is not a regular expression: {err}")
    if args.suite == "kernels" and args.filter is not None:
        parser.error("--filter selects end-to-end cases: it goes with --suite e2e or all (the kernel suite takes --ops)")
    if args.suite == "e2e" and args.ops is not None:
        parser.error("--ops selects kernel benchmarks: it goes with --suite kernels or all (e2e takes --filter)")
    if args.ops is not None:
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        if not ops or any(o not in MODULES for o in ops):
            parser.error(f"--ops must name one or more of {', '.join(MODULES)} (comma-separated), got {args.ops!r}")
        args.ops = ",".join(ops)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    try:
        repo = _checkout()
        suites = _suites()
    except RuntimeError as err:
        print(f"fastbert bench: error: {err}", file=sys.stderr)
        return 2
    harness = importlib.import_module(f"{suites.__name__}.harness")
    if args.suite in ("e2e", "all") and importlib.util.find_spec("transformers") is None:
        print("fastbert bench: error: the e2e suite compares against transformers, which is not installed "
              "(the 'bench' extra of fastbert-kernels brings it)", file=sys.stderr)
        return 2
    if args.out is not None:
        from .checkpoint import check_writable

        try:  # before any timing: the results are written at the end
            check_writable("--out", args.out, folder=True)
            args.out.mkdir(parents=True, exist_ok=True)
        except (ValueError, OSError) as err:
            print(f"fastbert bench: error: --out {str(args.out)!r} cannot be made: {err}"
                  if isinstance(err, OSError) else f"fastbert bench: error: {err}", file=sys.stderr)
            return 2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        print("fastbert bench: error: no CUDA GPU here; timings on the CPU mean nothing. "
              "Use --quick for the smoke test.", file=sys.stderr)
        return 2
    rc = 0
    if args.suite != "e2e":
        rc = _kernels(args, argv, repo, device, started, suites)
    if args.suite in ("e2e", "all"):
        bench_e2e = importlib.import_module(f"{suites.__name__}.bench_e2e")

        out_dir = args.out or _default_out(repo, harness.environment(device))
        rc = max(rc, bench_e2e.run(args, device, out_dir, started, list(argv or sys.argv[1:]),
                                   log=lambda line: print(line, flush=True)))
    return rc


def _kernels(args, argv, repo, device, started, suites) -> int:
    harness = importlib.import_module(f"{suites.__name__}.harness")
    report = importlib.import_module(f"{suites.__name__}.report")

    ops = list(SUITES[args.suite]) if args.ops is None else args.ops.split(",")  # checked by parse_args
    profile = "quick" if args.quick else "budget" if args.budget else "full"
    cfg = harness.Settings.make(device, quick=args.quick, budget=args.budget)
    env = harness.environment(device)
    out_dir = args.out or _default_out(repo, env)
    results = harness.Results(out_dir / "kernels.json", env, cfg, meta={
        "suite": args.suite, "ops": ops, "profile": profile, "compile_scope": args.compile_scope,
        "time_limit_s": args.time_limit, "started_utc": harness.utc_now(), "argv": list(argv or sys.argv[1:]),
        "fastbert_backends": __import__("fastbert").ops.available_backends(device),
    })
    print(f"fastbert bench: {profile} run of {', '.join(ops)} on {env['gpu']} "
          f"(torch {env['torch']}, triton {env['triton']}, commit {env['commit']}) -> {out_dir}", flush=True)

    results.ceilings = harness.measure_ceilings(cfg)
    results.save()
    c = results.ceilings
    print(f"ceilings: copy {c['copy_GBps']:.1f} GB/s, matmul {c['matmul_TFLOPs']:.2f} TFLOP/s "
          f"({c['matmul_shape']})", flush=True)

    cases = []
    for op in ops:
        cases += importlib.import_module(f"{suites.__name__}.{MODULES[op]}").cases(profile, cfg, args.compile_scope)
    deadline = started + args.time_limit if args.time_limit is not None else None
    harness.run_cases(cases, cfg, results, deadline, log=lambda line: print(line, flush=True))
    results.meta["finished_utc"] = harness.utc_now()
    results.meta["wall_s"] = round(time.monotonic() - started, 1)
    results.save()

    data = report.load(results.path)
    md, png = report.write_all(data, out_dir)
    print(f"\nwrote {results.path}, {md}" + (f", {png}" if png else "") + f" in {results.meta['wall_s']} s")
    if results.skipped_for_time:
        print(f"time limit: {len(results.skipped_for_time)} case groups not run (listed in the JSON)")
    print(report.summary_markdown(data))
    print("\nissue 6's targets (tier-1 rows):\n" + report.targets_markdown(data, None))
    broken = [r for r in results.rows if r["status"] == "error" and r["impl"] in ("triton", "cuda", "eager")]
    for r in broken:
        print(f"ERROR {r['op']} {r['impl']} {r['shape']} {r['dtype']} {r['mode']}: {r['note']}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
