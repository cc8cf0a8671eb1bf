"""How exact D_i = rowsum(dO_i * O_i) must be in the attention backward: a float64 emulation.

Until stop 15 both attention backwards (kernels/attention.py, csrc/attention.cuh) took D
from the half-precision O the forward wrote, as FlashAttention-2 does. At a sharp softmax
that rounding alone put dq and dk ~20x further from the float64 reference than a float16
PyTorch composition (tests/test_ops_fuzz.py's sharp-softmax case), and with values sharing
a mean past the tests' tolerance. This script replays the kernels' formulas in float64,
rounding only where the kernels round (O to the input dtype, dS and P to it before their
matmuls), for each way of getting D:

  fa2        D from the rounded O (the launchers without out_residual)
  o_lo       D from O + its rounding residual, the residual stored as a second half
             tensor by the forward (one more (B, S, H, D) write forward, read backward):
             what attention() does since stop 15 when a gradient will be taken
  in_loop    D_exact = sum_j P_ij dP_ij accumulated in the dQ kernel's key loop (written
             for the dK/dV kernel, which then needs nothing more); dq corrected at the
             end by -scale (D_exact - D) sum_j P_ij k_j (one more MMA, P K, and a
             BLOCK_M x head_dim fp32 accumulator in the dQ kernel)

--minilm N also runs the Triton kernels themselves (the interpreter: set TRITON_INTERPRET=1 on a
CPU) on the real q, k, v of every layer of the embedded MiniLM over N shipped SST-2 sentences, with
a random dO, with and without out's residual, and prints each gradient's error as a multiple of
the tests' allowance (2x float16 PyTorch's error + the float16 floor).

Run: python scripts/attention_delta_precision.py [--seeds N] [--minilm N]  (CPU, seconds)
"""
import argparse
import math

import torch

from fastbert.ops.attention import attention_ref


def fuzz_case():
    """The inputs the random search of test_attention_fuzz found (float16, head_dim 64, scale 0.3)."""
    B, S, H, D = 2, 2, 1, 64

    def make(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn((S, B, H, D), generator=g, dtype=torch.float64).to(torch.float16).transpose(0, 1)
    q, k, v = make(2162), make(3), make(2)
    mask = torch.tensor([[True, False], [True, True]])
    g = torch.Generator().manual_seed(5)
    do = torch.randn((B, S, H, D), generator=g, dtype=torch.float64).to(torch.float16)
    return q, k, v, mask, do, 0.3


def random_case(seed, S=128, D=64, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn((2, S, 2, D), generator=g, dtype=torch.float64).to(torch.float16) for _ in range(4))
    mask = torch.ones((2, S), dtype=torch.bool)
    mask[1, S // 3:] = False
    return q, k, v, mask, do, scale


def emulate(q, k, v, mask, do, scale, variant):
    """dq, dk as the kernels compute them, in float64 but for the kernels' roundings."""
    half = q.dtype
    Q, K, V, dO = (t.double().permute(0, 2, 1, 3) for t in (q, k, v, do))       # (B, H, S, D)
    s = (scale * Q @ K.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], -math.inf)
    P = torch.softmax(s, -1).nan_to_num(0.0)
    O = P @ V
    O_half = O.to(half).double()
    dP = dO @ V.transpose(-1, -2)
    D_exact = (P * dP).sum(-1, keepdim=True)
    if variant == "o_lo":
        O_lo = (O - O_half).to(half).double()
        D = (dO * O_half).sum(-1, keepdim=True) + (dO * O_lo).sum(-1, keepdim=True)
    else:
        D = (dO * O_half).sum(-1, keepdim=True)
    dq = scale * (P * (dP - D)).to(half).double() @ K
    D_k = D
    if variant == "in_loop":
        dq = dq - scale * (D_exact - D) * (P.to(half).double() @ K)
        D_k = D_exact
    dk = scale * (P * (dP - D_k)).to(half).double().transpose(-1, -2) @ Q
    return dq.permute(0, 2, 1, 3), dk.permute(0, 2, 1, 3)


def errors(case):
    q, k, v, mask, do, scale = case
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    dq_ref, dk_ref = torch.autograd.grad(attention_ref(q64, k64, v64, mask, 0.0, scale), (q64, k64), do.double())
    qh, kh, vh = (t.clone().requires_grad_() for t in (q, k, v))
    dq_b, dk_b = torch.autograd.grad(attention_ref(qh, kh, vh, mask, 0.0, scale), (qh, kh), do)
    rows = {"torch fp16": (dq_b, dk_b)}
    for variant in ("fa2", "o_lo", "in_loop"):
        rows[variant] = emulate(q, k, v, mask, do, scale, variant)
    return {name: ((dq.double() - dq_ref).abs().max().item(), (dk.double() - dk_ref).abs().max().item())
            for name, (dq, dk) in rows.items()}


def minilm_rows(n_sentences):
    """(layer, {residual: (dq, dk, dv) error / allowance}) on the embedded MiniLM's real attention inputs."""
    from fastbert import BertModel, Tokenizer, model as model_module
    from fastbert.data import sample_path
    from fastbert.kernels.attention import attention_bwd, attention_fwd
    model, tokenizer = BertModel.from_pretrained("default").eval(), Tokenizer.from_pretrained("default")
    texts = [line.split("\t")[0] for line in sample_path().read_text().splitlines()[1:n_sentences + 1]]
    captured, attention = [], model_module.ops.attention

    def capture(q, k, v, mask=None, *args, **kwargs):
        captured.append([t.detach().contiguous().half() for t in (q, k, v)] + [mask])
        return attention(q, k, v, mask, *args, **kwargs)
    model_module.ops.attention = capture
    try:
        with torch.no_grad():
            model(**tokenizer(texts))
    finally:
        model_module.ops.attention = attention
    g = torch.Generator().manual_seed(0)
    for layer, (q, k, v, mask) in enumerate(captured):
        do = torch.randn(q.shape, generator=g, dtype=torch.float64).half()
        l64 = [t.double().requires_grad_() for t in (q, k, v)]
        ref = torch.autograd.grad(attention_ref(*l64, mask), l64, do.double())
        lh = [t.clone().requires_grad_() for t in (q, k, v)]
        base = torch.autograd.grad(attention_ref(*lh, mask), lh, do)
        row = {}
        for residual in (False, True):
            out_residual = torch.empty_like(q) if residual else None
            out, lse = attention_fwd(q, k, v, mask, out_residual=out_residual)
            grads = attention_bwd(do, q, k, v, out, lse, mask, out_residual=out_residual)
            row[residual] = [(a.double() - r).abs().max().item() / (2 * (b.double() - r).abs().max().item() + 2e-3)
                             for a, r, b in zip(grads, ref, base)]
        yield layer, row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="random 128-token cases besides the fuzz case")
    ap.add_argument("--minilm", type=int, default=0, metavar="N", help="also the kernels on MiniLM's q, k, v "
                    "over N SST-2 sentences (TRITON_INTERPRET=1 on a CPU)")
    args = ap.parse_args()
    cases = [("fuzz case", fuzz_case())] + [(f"random S=128 seed {i}", random_case(i)) for i in range(args.seeds)]
    print(f"{'case':<22} {'D from':<11} {'max|dq err|':>12} {'max|dk err|':>12}")
    for label, case in cases:
        for name, (eq, ek) in errors(case).items():
            print(f"{label:<22} {name:<11} {eq:12.3e} {ek:12.3e}")
    if args.minilm:
        print(f"\nMiniLM, {args.minilm} SST-2 sentences: error / allowance of dq, dk, dv (the Triton kernels)")
        for layer, row in minilm_rows(args.minilm):
            print(f"layer {layer}: D from rounded O {' '.join(f'{x:.2f}' for x in row[False])}   "
                  f"from O + residual {' '.join(f'{x:.2f}' for x in row[True])}")


if __name__ == "__main__":
    main()
