"""Run to run, the kernel backends give the same bits: every output and every gradient,
dropout included, for each op and for a whole fine-tuning step.

The design promises it (kernels/attention.py, kernels/layernorm.py, csrc/*.cuh): no atomics
anywhere (the attention backward splits dQ from dK/dV; weight and bias gradients are
per-block partial sums finished by a second pass), and dropout masks regenerated from a seed
that torch.manual_seed reproduces. On a GPU these tests are what catches a reduction whose
order follows the scheduler, or a seed drawn from a source manual_seed does not reach. Without
one the Triton interpreter and the CUDA emulation (blocks on several host threads) run the
same launchers and kernels at small sizes.

Each test also checks that another manual_seed changes the result, so that dropout is on and
the comparison is not between two runs that ignore the seed.
"""
import pytest
import torch

import fastbert
from conftest import DEVICE, ON_GPU
from fastbert import heads, ops
from test_model_backends import _cuda_attention_on

pytest.importorskip("triton")

HALF = torch.bfloat16 if ON_GPU else torch.float16  # the interpreter has no bf16


@pytest.fixture(autouse=True)
def _pytorch_deterministic():
    """PyTorch's own share of these runs (GEMMs, embedding backward) on its deterministic kernels
    where it has them, so that a difference is ours; warn_only, as cuBLAS would otherwise raise
    for want of CUBLAS_WORKSPACE_CONFIG. Our ops do not read the flag: they are always deterministic.
    The flag also makes torch.empty fill with NaN, so an element a kernel leaves unwritten fails too."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _run(fn, inputs, seed):
    """fn(*leaves) forward and backward under torch.manual_seed(seed): [out, grad of each input]."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    torch.manual_seed(seed)
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    out.backward(grad_out)
    return [out.detach()] + [leaf.grad for leaf in leaves if leaf.requires_grad]


def _assert_same_bits(fn, inputs, names):
    first, second, other_seed = _run(fn, inputs, 11), _run(fn, inputs, 11), _run(fn, inputs, 12)
    for name, a, b in zip(names, first, second):
        assert not torch.isnan(a).any(), f"{name}: NaN"
        assert torch.equal(a, b), f"{name}: two runs with one seed differ in " \
                                  f"{(a != b).sum().item()} of {a.numel()} elements"
    assert not torch.equal(first[0], other_seed[0]), "another seed gave the same output: is dropout on?"


def _randn(*shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def skip_without_extension(device):
    if device.type == "cuda" and "cuda" not in ops.available_backends(device):
        pytest.skip("fastbert._C is not built here: no cuda backend")


@pytest.fixture(params=["triton", "cuda"])
def backend_device(request, cuda_device, monkeypatch):
    """(backend, device) for each kernel backend. The cuda one on the GPU, or without one on the
    CPU through the emulation; the triton one once, under the cuda_device case that matches the
    machine (on the CPU the interpreter runs it, whatever the emulation patched)."""
    backend = request.param
    if backend == "cuda":
        skip_without_extension(cuda_device)
        _cuda_attention_on(cuda_device, monkeypatch)
        return backend, cuda_device
    if (cuda_device.type == "cuda") != ON_GPU:
        pytest.skip("the triton backend runs once: on the GPU where there is one, else interpreted")
    return backend, DEVICE


def test_attention_repeats_bit_for_bit(backend_device):
    backend, device = backend_device
    B, S, H, D = (8, 512, 12, 64) if device.type == "cuda" else (2, 67, 2, 32)
    q, k, v = (_randn(B, S, H, D, dtype=HALF, seed=s).to(device) for s in (1, 2, 3))
    mask = torch.arange(S, device=device)[None, :] < torch.tensor([S, S // 3 + 1] * (B // 2), device=device)[:, None]

    def fn(q, k, v):
        with ops.use_backend(backend):
            return ops.attention(q, k, v, mask, dropout_p=0.1)
    _assert_same_bits(fn, (q, k, v), ("out", "dq", "dk", "dv"))


def test_attention_varlen_repeats_bit_for_bit(backend_device):
    backend, device = backend_device
    lengths = [128, 77, 512, 3, 300] if device.type == "cuda" else [5, 67, 1]
    T, H, D = sum(lengths), (12 if device.type == "cuda" else 2), (64 if device.type == "cuda" else 32)
    q, k, v = (_randn(T, H, D, dtype=HALF, seed=s).to(device) for s in (4, 5, 6))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)

    def fn(q, k, v):
        with ops.use_backend(backend):
            return ops.attention_varlen(q, k, v, cu, max(lengths), dropout_p=0.1)
    _assert_same_bits(fn, (q, k, v), ("out", "dq", "dk", "dv"))


def test_add_layernorm_repeats_bit_for_bit(backend_device):
    """dweight and dbias sum over every row: thousands of row blocks on a GPU."""
    backend, device = backend_device
    M, N = (8192, 768) if device.type == "cuda" else (67, 96)
    x, residual = (_randn(M, N, dtype=HALF, seed=s).to(device) for s in (7, 8))
    weight, bias = (1 + 0.1 * _randn(N, dtype=HALF, seed=9)).to(device), _randn(N, dtype=HALF, seed=10).to(device)

    def fn(x, residual, weight, bias):
        with ops.use_backend(backend):
            return ops.add_layernorm(x, residual, weight, bias, 1e-12, dropout_p=0.1)
    _assert_same_bits(fn, (x, residual, weight, bias), ("y", "dx", "dresidual", "dweight", "dbias"))


def test_layernorm_gelu_and_bias_gelu_repeat_bit_for_bit(backend_device):
    """Neither has dropout: the other-seed check runs on the dropout that follows them here."""
    backend, device = backend_device
    M, N = (8192, 768) if device.type == "cuda" else (67, 96)
    x = _randn(M, N, dtype=HALF, seed=13).to(device)
    weight, bias = (1 + 0.1 * _randn(N, dtype=HALF, seed=14)).to(device), _randn(N, dtype=HALF, seed=15).to(device)
    inner_bias = _randn(4 * N, dtype=HALF, seed=16).to(device)
    up = (_randn(N, 4 * N, dtype=HALF, seed=17) / N ** 0.5).to(device)

    def fn(x, weight, bias, inner_bias):
        with ops.use_backend(backend):
            h = ops.bias_gelu(ops.layernorm_gelu(x, weight, bias, 1e-12) @ up, inner_bias)
        return torch.nn.functional.dropout(h, 0.1)
    _assert_same_bits(fn, (x, weight, bias, inner_bias), ("y", "dx", "dweight", "dbias", "dinner_bias"))


def test_finetuning_step_repeats_bit_for_bit(backend_device):
    """A classifier's loss and every gradient, with attention and hidden dropout on, under autocast
    (half Linear outputs, the float32 residual stream through add_layernorm's mixed kernels).
    PyTorch's own dropouts (the embeddings', the head's) are off, so that the other-seed check
    stands on the kernels' seeds."""
    backend, device = backend_device
    on_gpu = device.type == "cuda"
    config = fastbert.BertConfig(vocab_size=1000, hidden_size=768 if on_gpu else 64,
                                 num_hidden_layers=2, num_attention_heads=12 if on_gpu else 2,
                                 intermediate_size=3072 if on_gpu else 128, max_position_embeddings=128,
                                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(config, num_labels=3).to(device)
    model.dropout_p = model.bert.embeddings.dropout_p = 0.0
    B, S = (32, 128) if on_gpu else (3, 21)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 1000, (B, S), generator=gen).to(device)
    lengths = torch.randint(1, S + 1, (B,), generator=gen).to(device)
    mask = (torch.arange(S, device=device)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, 3, (B,), generator=gen).to(device)

    def step(seed):
        model.zero_grad()
        torch.manual_seed(seed)
        with ops.use_backend(backend), torch.autocast(device.type, dtype=HALF):
            out = model(ids, mask, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    (loss, grads), (loss2, grads2), (loss3, _) = step(5), step(5), step(6)
    assert torch.isfinite(loss) and torch.equal(loss, loss2), f"loss {loss.item()} then {loss2.item()}"
    for name, g in grads.items():
        assert torch.equal(g, grads2[name]), f"{name}: two steps with one seed differ in " \
                                             f"{(g != grads2[name]).sum().item()} of {g.numel()} elements"
    assert not torch.equal(loss, loss3), "another seed gave the same loss: is dropout on?"
