"""Every fastbert._C kernel variant launched once, forward and backward, at small edge shapes:
the program compute-sanitizer runs (scripts/gpu_check.sh's sanitizer stage).

    compute-sanitizer --tool memcheck  python scripts/sanitize_csrc.py [--only attention,layernorm,...]
    compute-sanitizer --tool racecheck python scripts/sanitize_csrc.py --only attention

Why not the pytest selection alone: under memcheck each launch costs tens of milliseconds and
pytest's collection plus the float64 references cost more than the kernels, so a device call's
sanitizer minute ran out a few dozen tests in. This walks the variants the launchers can pick (head
dims 32/64/128 in fp16 and bf16, a padded batch with a fully masked row, dropout, the packed form;
LayerNorm widths that pick each thread layout, scalar and 16-byte chunks, the autocast dtype mix
with its copy; bias_gelu; span_score at length 1 and SQuAD's 384) with one launch each, and prints
one line per case as it goes (flushed), so a run cut by its time limit still says how far it got.
Correctness is the test suite's job; here outputs only need to be finite where they should be.

`--device cpu` runs the same cases through tests/cuda_emu's emulation of the kernels when the
caller has swapped it in (tests/test_sanitize_script.py does), so the list is checked without a GPU.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import fastbert.ops as ops

FAMILIES = ("attention", "layernorm", "gelu", "span")


def _grad_all(out, leaves):
    """Backward through every leaf with a random upstream gradient; the leaves' grads must be finite."""
    out = out if isinstance(out, (tuple, list)) else (out,)
    grads = [torch.randn_like(o) for o in out]
    torch.autograd.backward(list(out), grads)
    for i, t in enumerate(leaves):
        if t.grad is None or not torch.isfinite(t.grad).all():
            raise AssertionError(f"gradient {i} missing or not finite")


def _leaf(shape, dtype, device, scale=1.0):
    return (scale * torch.randn(shape, device=device, dtype=torch.float32)).to(dtype).requires_grad_(True)


def attention_cases(device):
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (32, 64, 128):
            def padded(dtype=dtype, head_dim=head_dim):
                # 129 keys: not a multiple of any tile; row 1 fully padded, row 2 one token
                q, k, v = (_leaf((3, 129, 2, head_dim), dtype, device) for _ in range(3))
                mask = torch.ones(3, 129, dtype=torch.bool, device=device)
                mask[1] = False
                mask[2, 1:] = False
                with torch.no_grad():  # inference: the forward without the output residual
                    ops.attention(q, k, v, mask)
                out = ops.attention(q, k, v, mask)
                _grad_all(out, (q, k, v))

            def dropout(dtype=dtype, head_dim=head_dim):
                q, k, v = (_leaf((2, 77, 2, head_dim), dtype, device) for _ in range(3))
                mask = torch.arange(77, device=device)[None, :] < torch.tensor([[77], [40]], device=device)
                out = ops.attention(q, k, v, mask, dropout_p=0.1, seed=1234)
                _grad_all(out, (q, k, v))

            def varlen(dtype=dtype, head_dim=head_dim):
                lengths = [1, 129, 64]
                cu = torch.tensor([0, 1, 130, 194], dtype=torch.int32, device=device)
                q, k, v = (_leaf((sum(lengths), 2, head_dim), dtype, device) for _ in range(3))
                out = ops.attention_varlen(q, k, v, cu, max(lengths), dropout_p=0.1, seed=7)
                _grad_all(out, (q, k, v))

            name = f"{str(dtype).removeprefix('torch.')} d{head_dim}"
            yield f"attention padded {name}", padded
            yield f"attention dropout {name}", dropout
            yield f"attention varlen {name}", varlen


# Widths that pick each forward/backward thread layout (csrc/README.md) for 4-byte and 2-byte
# types in 16-byte chunks (multiples of 8; 256 gives fp32 its 32x2 layout) and in the scalar
# fallback (7, 130, 4095), up to the widest, 4096.
LAYERNORM_WIDTHS = (7, 64, 130, 256, 384, 768, 1024, 2048, 4095, 4096)


def layernorm_cases(device):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for hidden in LAYERNORM_WIDTHS:
            def add(dtype=dtype, hidden=hidden, dropout_p=0.1):
                x, r = _leaf((5, hidden), dtype, device), _leaf((5, hidden), dtype, device)
                w, b = _leaf((hidden,), dtype, device), _leaf((hidden,), dtype, device)
                _grad_all(ops.add_layernorm(x, r, w, b, 1e-12, dropout_p=dropout_p), (x, r, w, b))

            def gelu(dtype=dtype, hidden=hidden):
                x = _leaf((5, hidden), dtype, device)
                w, b = _leaf((hidden,), dtype, device), _leaf((hidden,), dtype, device)
                _grad_all(ops.layernorm_gelu(x, w, b, 1e-12), (x, w, b))

            name = f"{str(dtype).removeprefix('torch.')} N{hidden}"
            yield f"add_layernorm dropout {name}", add
            yield f"add_layernorm {name}", lambda add=add: add(dropout_p=0.0)
            yield f"layernorm_gelu {name}", gelu
            if dtype != torch.float32 and hidden in (64, 768, 4095, 4096):
                def mixed(dtype=dtype, hidden=hidden):
                    # autocast's pair: half x, fp32 residual stream, the half copy written beside y
                    x, r = _leaf((6, hidden), dtype, device), _leaf((6, hidden), torch.float32, device)
                    w, b = _leaf((hidden,), torch.float32, device), _leaf((hidden,), torch.float32, device)
                    with torch.autocast(device.type, dtype=dtype):
                        out = ops.add_layernorm(x, r, w, b, 1e-12, dropout_p=0.1, copy_in_x_dtype=True)
                    _grad_all(out, (x, r, w, b))
                yield f"add_layernorm autocast mix + copy {name}", mixed


def gelu_cases(device):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for hidden in (7, 3072, 4096):
            def run(dtype=dtype, hidden=hidden):
                x, b = _leaf((3, hidden), dtype, device), _leaf((hidden,), dtype, device)
                _grad_all(ops.bias_gelu(x, b), (x, b))
            yield f"bias_gelu {str(dtype).removeprefix('torch.')} N{hidden}", run


def span_cases(device):
    for length in (1, 7, 384):
        for topk in (1, 20):
            def run(length=length, topk=topk):
                s, e = (torch.randn(4, length, device=device) for _ in range(2))
                mask = torch.rand(4, length, device=device) < 0.8
                mask[1] = False  # a row with no allowed span: -1 / -inf
                start, end, score = ops.span_score(s, e, mask, max_answer_len=30, topk=topk)
                if not ((start[1] == -1).all() and torch.isneginf(score[1]).all()):
                    raise AssertionError("a row without allowed positions did not give -1 / -inf")
            yield f"span_score L{length} top{topk}", run


CASES = {"attention": attention_cases, "layernorm": layernorm_cases, "gelu": gelu_cases, "span": span_cases}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(FAMILIES),
                        help=f"comma-separated families to run, of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with the emulation swapped in")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in families if f not in CASES]
    if unknown or not families:
        parser.error(f"--only: unknown family {unknown or args.only!r}; choose from {', '.join(FAMILIES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_csrc: no CUDA device here", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    started, count, failed = time.perf_counter(), 0, 0
    with ops.use_backend("cuda"):
        for family in families:
            for name, case in CASES[family](device):
                try:
                    case()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    status = "ok"
                except Exception as err:  # noqa: BLE001 - reported per case, the run goes on
                    failed += 1
                    status = f"FAILED {type(err).__name__}: {err}"
                count += 1
                print(f"[{time.perf_counter() - started:7.1f}s] {name}: {status}", flush=True)
    print(f"sanitize_csrc: {count} cases, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
