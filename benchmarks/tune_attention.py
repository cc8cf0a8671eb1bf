"""Launch settings of the Triton attention kernels, measured candidate by candidate on a GPU.

    python -m benchmarks.tune_attention [--head-dims 64 32 128] [--dtype bfloat16] [--dropout 0 0.1]
                                        [--batch 16 --seqlen 512 --heads 12] [--time-limit S] [--out FILE.json]
    python -m benchmarks.tune_attention --quick        # CPU (TRITON_INTERPRET=1): the plumbing only

The tiles in kernels/attention.py (`_fwd_config`, `_bwd_dq_config`, `_bwd_config`) came from
ad-hoc H200 sweeps of earlier kernels. What ptxas makes of them is visible without a GPU
(`python tests/triton_aot.py --arch 90 --resources FILE`: kernels/RESOURCES.md): on Triton 3.6 the
dK/dV kernel's 32x128, 4-warp tile spills at head_dim 64 (24 bytes a thread, 144 with dropout)
where the same tile on 8 warps does not. Whether that costs time is for this script to say.

Per (head_dim, dropout) it times, with triton.testing.do_bench (warm-up, median), through
kernels.attention.CONFIG_OVERRIDE:
  fwd     attention_fwd under each forward candidate;
  bwd_dq  attention_bwd under each dQ candidate (the dK/dV kernel at its default);
  bwd     attention_bwd under each dK/dV candidate (dQ at the best found just before).
The current default is always a candidate, so every row carries its ratio to the default measured
in the same run. Every candidate's outputs are compared with the default's (a tile that computes
something else is reported "mismatch", never "best"). Candidates past --time-limit are skipped.
Each candidate is a new compile (seconds on the device's CPU): the default run, head_dim 64 with
and without dropout, is about 40 compiles.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

GPU_CANDIDATES = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages); the default is added if missing
    "fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
            (128, 32, 4, 3)],
    "bwd_dq": [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 2),
               (64, 128, 8, 3)],
    "bwd": [(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3),
            (16, 128, 4, 3), (64, 128, 8, 2)],
}
QUICK_CANDIDATES = {kernel: [(16, 16, 1, 1), (32, 16, 1, 1)] for kernel in GPU_CANDIDATES}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # max |diff| / max |default|


def _cfg(t: tuple) -> dict:
    return dict(BLOCK_M=t[0], BLOCK_N=t[1], num_warps=t[2], num_stages=t[3])


def _label(cfg: dict) -> str:
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}/w{cfg['num_warps']}/s{cfg['num_stages']}"


def _timer(device: torch.device, quick: bool):
    """ms of one call of fn: do_bench's median on a GPU; one plain call otherwise (--quick)."""
    if device.type == "cuda" and not quick:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def once(fn):
        started = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - started)
    return once


def _rel_diff(got: tuple, ref: tuple) -> float:
    worst = 0.0
    for g, r in zip(got, ref):
        scale = max(r.float().abs().max().item(), 1e-6)
        worst = max(worst, (g.float() - r.float()).abs().max().item() / scale)
    return worst


def tune(head_dim: int, dropout_p: float, args, device: torch.device, deadline: float, log=print) -> list[dict]:
    from fastbert.kernels import attention as KA

    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(1234 + head_dim)
    shape = (args.batch, args.seqlen, args.heads, head_dim)
    q, k, v, do = (torch.randn(shape, dtype=dtype, device=device, generator=g) for _ in range(4))
    seed = 12345
    KA.CONFIG_OVERRIDE.clear()
    shared = KA._max_shared(device)  # the tiles the launchers pick on this GPU
    defaults = {"fwd": KA._fwd_config(head_dim, dtype, shared), "bwd_dq": KA._bwd_dq_config(head_dim, dtype, shared),
                "bwd": KA._bwd_config(head_dim, dtype, shared)}
    out_ref, lse_ref = KA.attention_fwd(q, k, v, None, None, None, dropout_p, None, seed)
    grads_ref = KA.attention_bwd(do, q, k, v, out_ref, lse_ref, None, None, None, dropout_p, None, seed)
    timer = _timer(device, args.quick)
    candidates = QUICK_CANDIDATES if args.quick else GPU_CANDIDATES
    rows, best = [], dict(defaults)
    for kernel in ("fwd", "bwd_dq", "bwd"):
        configs = [_cfg(c) for c in candidates[kernel]]
        if defaults[kernel] not in configs:
            configs.insert(0, defaults[kernel])
        ms_default = None
        for cfg in sorted(configs, key=lambda c: c != defaults[kernel]):  # the default first
            row = {"head_dim": head_dim, "dtype": args.dtype, "dropout_p": dropout_p, "kernel": kernel,
                   "config": cfg, "label": _label(cfg), "default": cfg == defaults[kernel], "ms": None,
                   "vs_default": None, "rel_diff": None, "status": "ok", "note": ""}
            rows.append(row)
            if time.monotonic() > deadline:
                row["status"], row["note"] = "skipped", "time limit"
                continue
            KA.CONFIG_OVERRIDE.clear()
            if kernel == "bwd":
                KA.CONFIG_OVERRIDE["bwd_dq"] = best["bwd_dq"]
            KA.CONFIG_OVERRIDE[kernel] = cfg
            try:
                if kernel == "fwd":
                    def call():
                        return KA.attention_fwd(q, k, v, None, None, None, dropout_p, None, seed)
                    got, ref = call(), (out_ref, lse_ref)
                else:
                    def call():
                        return KA.attention_bwd(do, q, k, v, out_ref, lse_ref, None, None, None, dropout_p, None,
                                                seed)
                    got = call()
                    ref = grads_ref[:1] if kernel == "bwd_dq" else grads_ref[1:]
                    got = got[:1] if kernel == "bwd_dq" else got[1:]
                row["rel_diff"] = _rel_diff(got, ref)
                if not row["rel_diff"] <= TOLERANCE[dtype]:
                    row["status"] = "mismatch"
                row["ms"] = timer(call)
            except Exception as err:  # noqa: BLE001  (e.g. out of shared memory: report, go on)
                row["status"], row["note"] = "error", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            finally:
                KA.CONFIG_OVERRIDE.clear()
            if row["default"] and row["ms"]:
                ms_default = row["ms"]
            if ms_default and row["ms"]:
                row["vs_default"] = ms_default / row["ms"]
            log(f"D{head_dim} p={dropout_p:g} {kernel:6s} {row['label']:16s} "
                + (f"{1e3 * row['ms']:9.1f} us" if row["ms"] else "")
                # the default itself may have failed (out of shared memory): no ratio then
                + (f"  x{row['vs_default']:.3f} vs default" if row["vs_default"] else "")
                + f"  {row['status']}" + (f" ({row['note']})" if row["note"] else "")
                + (" [default]" if row["default"] else ""))
        ok = [r for r in rows if r["kernel"] == kernel and r["head_dim"] == head_dim and r["status"] == "ok"
              and r["ms"] is not None and r["dropout_p"] == dropout_p]
        if ok:
            best[kernel] = min(ok, key=lambda r: r["ms"])["config"]
    return rows


def _write_json(path: Path, record: dict) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(record, indent=1))
    os.replace(staging, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64])
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds: start no candidate after")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of every row")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and tiles: checks the plumbing (CPU)")
    args = parser.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif os.environ.get("TRITON_INTERPRET") == "1" and args.quick:
        device = torch.device("cpu")
    else:
        print("tune_attention: needs a CUDA GPU (or --quick with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if args.quick:
        args.batch, args.seqlen, args.heads, args.head_dims = 1, 40, 2, [16]
        if device.type == "cpu":
            args.dtype = "float32" if args.dtype == "bfloat16" else args.dtype  # the interpreter has no bf16
    started = time.monotonic()
    deadline = started + args.time_limit if args.time_limit else float("inf")
    import triton

    meta = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "commit": os.environ.get("FASTBERT_COMMIT", "unknown"),
            "shape": {"B": args.batch, "S": args.seqlen, "H": args.heads}, "quick": args.quick}
    print(f"tune_attention: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"B{args.batch} S{args.seqlen} H{args.heads} {args.dtype}", flush=True)
    rows = []
    for head_dim in args.head_dims:
        for p in args.dropout:
            rows += tune(head_dim, p, args, device, deadline, log=lambda line: print(line, flush=True))
            meta["wall_s"] = round(time.monotonic() - started, 1)
            if args.out:  # after each pair: what was measured survives a run cut short
                _write_json(args.out, {"meta": meta, "rows": rows})
    print("\nbest per kernel (ms; x = speed-up over the current default, same run):")
    for head_dim in args.head_dims:
        for p in args.dropout:
            for kernel in ("fwd", "bwd_dq", "bwd"):
                ok = [r for r in rows if (r["head_dim"], r["dropout_p"], r["kernel"]) == (head_dim, p, kernel)
                      and r["status"] == "ok" and r["ms"]]
                if ok:
                    top = min(ok, key=lambda r: r["ms"])
                    print(f"  D{head_dim} p={p:g} {kernel:6s} {top['label']:16s} x{top['vs_default'] or 0:.3f}"
                          + ("  (the default)" if top["default"] else ""))
    if args.out:
        print(f"wrote {args.out}")
    bad = [r for r in rows if r["status"] == "mismatch" or (r["default"] and r["status"] != "ok"
                                                              and r["status"] != "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
