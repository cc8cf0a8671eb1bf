"""CUDA graphs: a captured training step replays with new dropout masks and without host syncs.

torch.cuda.make_graphed_callables / torch.cuda.graph record every kernel launch once and replay
them with no Python in between, the usual cure for host overhead at small batches. Two things
break a capture silently or loudly: a value drawn on the host (a Python int dropout seed is baked
into the graph, so every replay reuses one mask), and a host sync (the input-id and label range
checks, the unpadded encoder's token count), which the capture refuses. While capturing,
attention draws its seed on the device (the generator advances it per replay; add_layernorm always
did) and the model and heads leave their range checks to the eager warm-up runs.

Without a GPU `graph_capturing` is patched to True, which checks the paths a capture takes; the
replays themselves run on the GPU (`pytest -m gpu`).
"""
import contextlib
import importlib

import pytest
import torch

import fastbert
from conftest import DEVICE, ON_GPU
from fastbert import heads, ops
from fastbert.ops import _backend
from test_determinism import backend_device, skip_without_extension  # noqa: F401 (a fixture)
from test_model_backends import _cuda_attention_on

pytest.importorskip("triton")

A = importlib.import_module("fastbert.ops.attention")  # the package exports a function of that name


def _config(dropout, on_gpu):
    return fastbert.BertConfig(vocab_size=1000, hidden_size=384 if on_gpu else 64, num_hidden_layers=2,
                               num_attention_heads=12 if on_gpu else 2, intermediate_size=1536 if on_gpu else 128,
                               max_position_embeddings=128, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout)


def _batch(device, B, S):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 1000, (B, S), generator=gen).to(device)
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    lengths[0] = S
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long().to(device)
    labels = torch.randint(0, 2, (B,), generator=gen).to(device)
    return ids, mask, labels


# ----------------------------------------------------------------------------- without a GPU: the capture's paths

@pytest.mark.skipif(ON_GPU, reason="the GPU tests below capture for real")
def test_a_drawn_attention_seed_is_a_device_tensor_on_a_gpu(backend_device, monkeypatch):
    """On a GPU (patched here: _seed_on_device says yes on the CPU too) the launchers get one (1,)
    int64 seed tensor on q's device, drawn from torch's generator (manual_seed reproduces it), the
    same one forward and backward; and the kernels, reading the seed from it, give what they give
    for that seed as an int."""
    backend, device = backend_device
    seen = []
    launchers = A._LAUNCHERS[backend]
    for name in ("attention_fwd", "attention_bwd"):
        real = getattr(launchers, name)
        monkeypatch.setattr(launchers, name,
                            lambda *a, real=real, name=name: seen.append((name, a[8] if name[-3:] == "fwd" else a[11]))
                            or real(*a))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 19, 2, 32, generator=gen).to(device=device, dtype=torch.float16) for _ in range(3))
    mask = torch.arange(19, device=device)[None, :] < torch.tensor([19, 7], device=device)[:, None]

    def run(seed=None):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with ops.use_backend(backend):
            out = ops.attention(*leaves, mask, dropout_p=0.3, seed=seed)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad for t in leaves]

    monkeypatch.setattr(A, "_seed_on_device", lambda q, seed: seed is None)
    torch.manual_seed(7)
    on_device = run()
    (_, fwd_seed), (_, bwd_seed) = seen
    assert isinstance(fwd_seed, torch.Tensor) and fwd_seed.dtype == torch.int64 and fwd_seed.shape == (1,)
    assert fwd_seed.device == q.device and bwd_seed.data_ptr() == fwd_seed.data_ptr()
    torch.manual_seed(7)
    run()
    assert torch.equal(seen[2][1], fwd_seed), "manual_seed does not reproduce the drawn seed"
    monkeypatch.setattr(A, "_seed_on_device", lambda q, seed: False)
    seen.clear()
    as_int = run(seed=int(fwd_seed))
    assert isinstance(seen[0][1], int)
    for name, a, b in zip(("out", "dq", "dk", "dv"), on_device, as_int):
        assert torch.equal(a, b), f"{name}: the seed read from the tensor differs from the same seed as an int"


def test_graph_capturing_is_true_only_for_a_gpu_tensor_under_capture(monkeypatch):
    """graph_capturing(t), which host_sync_allowed asks for the model and heads: True exactly while a
    capture runs and t is on a GPU (a stand-in with is_cuda=True plays the GPU tensor here). The
    opposite would skip the range checks in eager GPU runs and sync under capture."""
    from types import SimpleNamespace

    for capturing in (False, True):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda capturing=capturing: capturing)
        assert _backend.graph_capturing(SimpleNamespace(is_cuda=True)) is capturing
        assert _backend.graph_capturing(torch.zeros(1)) is False


@contextlib.contextmanager
def _host_reads_refused(monkeypatch):
    """Every way of reading a tensor's values on the host raises inside (a capture refuses the sync)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a host read of a tensor under CUDA graph capture")

    with monkeypatch.context() as patch:
        for method in ("tolist", "item", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
            patch.setattr(torch.Tensor, method, refuse)
        yield


@pytest.mark.skipif(ON_GPU, reason="the GPU tests below capture for real")
@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_capture_makes_no_host_sync_in_a_training_step(backend, unpad, cuda_device, monkeypatch):
    """A training step, forward and backward, under (patched) capture: no tensor is read on the
    host (each way of reading one raises here), the unpadded encoder falls back to the padded
    one, and the loss and gradients are the eager step's. The cuda backend runs its Python
    launchers and bindings through the emulation (the Triton interpreter itself reads tensors
    on the host, so its launchers are not checked here)."""
    if backend == "cuda":
        _cuda_attention_on(cuda_device, monkeypatch)
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(_config(0.0, False), num_labels=2)
    if backend == "cuda":
        model = model.half()   # the cuda kernels take float16 / bfloat16
    ids, mask, labels = _batch(DEVICE, 3, 21)

    def step():
        model.zero_grad()
        with ops.use_backend(backend):
            loss = model(ids, mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_loss, eager_grads = step()   # padded, as a capture runs it
    model.bert.unpad = unpad

    monkeypatch.setattr(_backend, "graph_capturing", lambda t: True)  # host_sync_allowed asks it
    with _host_reads_refused(monkeypatch):
        loss, grads = step()
    assert torch.equal(loss, eager_loss)
    for name, g in grads.items():
        assert torch.equal(g, eager_grads[name]), name


def test_capture_makes_no_host_sync_in_a_transformers_additive_mask(monkeypatch):
    """patch_transformers' attention checks a 4D additive float mask's values (one sync) eagerly only."""
    from fastbert import transformers_integration as T

    mask = torch.zeros(2, 1, 1, 5)
    mask[1, ..., 3:] = torch.finfo(torch.float32).min
    eager = T._key_padding_bool(mask, 2, 5)
    monkeypatch.setattr(_backend, "graph_capturing", lambda t: True)
    with _host_reads_refused(monkeypatch):
        captured = T._key_padding_bool(mask, 2, 5)
    assert torch.equal(captured, eager) and eager.tolist() == [[True] * 5, [True] * 3 + [False] * 2]


def test_the_checks_skipped_under_capture_still_run_eagerly():
    """The range checks a capture skips keep refusing bad ids and labels in an eager call."""
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(_config(0.0, False), num_labels=2).to(DEVICE)
    ids, mask, labels = _batch(DEVICE, 3, 21)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(ids + 1000, mask, labels=labels)
    with pytest.raises(ValueError, match="labels must lie in"):
        model(ids, mask, labels=labels + 2)


# ----------------------------------------------------------------------------- on a GPU: real captures

def _graphed_step(backend, dropout, B=16, S=128, random_op=None):
    """(model, eager step, graphed step, inputs): a bf16 classifier's loss on `backend`, and the
    same step with its forward and backward captured by make_graphed_callables. random_op
    ("attention" or "add_layernorm") keeps dropout in that op only: PyTorch's own dropouts (the
    embeddings', the head's) draw new masks per replay whatever fastbert's kernels do."""
    if backend == "cuda":
        skip_without_extension(torch.device("cuda"))
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(_config(dropout, True), num_labels=2).to("cuda", torch.bfloat16)
    if random_op is not None:
        model.dropout_p = model.bert.embeddings.dropout_p = 0.0
        for layer in model.bert.layers:
            if random_op == "attention":
                layer.dropout_p = 0.0            # add_layernorm's
            else:
                layer.attention.dropout_p = 0.0
    inputs = _batch(torch.device("cuda"), B, S)

    def eager_step(ids, mask, labels):
        with ops.use_backend(backend):
            return model(ids, mask, labels=labels).loss

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, mask, labels):
            return eager_step(ids, mask, labels)

    graphed = torch.cuda.make_graphed_callables(Step(), inputs)   # warm-up runs, then the captures
    return model, eager_step, graphed, inputs


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_graphed_step_matches_eager_without_dropout(backend):
    model, eager_step, graphed, inputs = _graphed_step(backend, dropout=0.0)
    for _ in range(2):  # the first replay and a later one
        model.zero_grad()
        loss = graphed(*inputs)
        loss.backward()
        graphed_loss, graphed_grads = loss.detach().float().clone(), _grads(model)  # the graph's buffers
    model.zero_grad()
    loss = eager_step(*inputs)
    loss.backward()
    # The same kernels, up to cuBLAS picking others on the capture's side stream: bf16 rounding apart.
    torch.testing.assert_close(graphed_loss, loss.detach().float(), rtol=2e-2, atol=1e-3)
    for name, g in _grads(model).items():
        if name.endswith("attention.key.bias"):
            continue  # exactly zero in exact arithmetic: rounding noise on both sides
        err = ((graphed_grads[name].float() - g.float()).norm() / g.float().norm()).item()
        assert err <= 2e-2, f"{name}: graphed gradient off the eager one by {err:.2e} (relative)"


@pytest.mark.gpu
@pytest.mark.parametrize("random_op", ["attention", "add_layernorm"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_graph_replays_draw_new_dropout_masks(backend, random_op):
    """Each replay draws new dropout masks in `random_op`, the graph's only random op, from torch's
    generator (a seed drawn on the host would be baked in: every replay one loss); manual_seed
    before a replay reproduces it."""
    model, _, graphed, inputs = _graphed_step(backend, dropout=0.1, random_op=random_op)

    def replay(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        model.zero_grad()
        loss = graphed(*inputs)
        loss.backward()
        return loss.detach().clone(), _grads(model)

    first, second = replay(), replay()
    assert not torch.equal(first[0], second[0]), "two replays gave one loss: the dropout masks were baked in"
    (a, grads_a), (b, grads_b), (c, _) = replay(5), replay(5), replay(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), f"{name}: one seed, two replays, two gradients"
