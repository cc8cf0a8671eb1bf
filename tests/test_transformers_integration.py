"""fastbert.patch_transformers: a transformers BERT on fastbert's kernels matches the same
transformers model unpatched (in float64: the reference), forward and every gradient, with
padding honoured; every kernel is really called; bad uses raise."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastbert
import fastbert.ops
import fastbert.transformers_integration
from conftest import DEVICE, ON_GPU, assert_close_to_ref

transformers = pytest.importorskip("transformers")
if not fastbert.transformers_integration.transformers_supported():
    pytest.skip("patch_transformers needs transformers >= 5 (test_older_transformers_is_refused checks "
                "the error it gives otherwise, under 5.x)", allow_module_level=True)


def _tiny_config(family="bert", **overrides):
    # max_position_embeddings 40: RoBERTa's positions start after its padding index.
    settings = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    settings.update(overrides)
    if family == "distilbert":  # the same model under its own names
        names = dict(hidden_size="dim", num_hidden_layers="n_layers", num_attention_heads="n_heads",
                     intermediate_size="hidden_dim", hidden_dropout_prob="dropout",
                     attention_probs_dropout_prob="attention_dropout")
        settings = {names.get(k, k): v for k, v in settings.items()}
    return transformers.AutoConfig.for_model(family, **settings)


def _batch(device, batch=4, seqlen=21):
    """ids and a mask with mixed lengths: row 1 padded after 13 tokens, row 2 one token, row 3 after 20."""
    torch.manual_seed(1)
    ids = torch.randint(1, 100, (batch, seqlen), device=device)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    mask[2, 1:] = 0
    mask[3, 20:] = 0
    return ids, mask


def _classifier(config, device, dtype=torch.float32):
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(config).to(device, dtype)


def _logits_and_grads(model, ids, mask, labels, autocast_dtype=None):
    model.zero_grad()
    with torch.autocast(ids.device.type, dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach().double(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _check_patched_matches(backend, device, autocast_dtype=None, family="bert", **config_overrides):
    """Patched on `backend` against the unpatched model in float64, allowed twice the error of
    the unpatched model in the test's precision (float32, or autocast) plus a floor."""
    config = _tiny_config(family, **config_overrides)
    ids, mask = _batch(device)
    labels = torch.tensor([0, 1, 1, 0], device=device)
    ref_logits, ref_grads = _logits_and_grads(_classifier(config, device, torch.float64), ids, mask, labels)
    base_logits, base_grads = _logits_and_grads(_classifier(config, device), ids, mask, labels, autocast_dtype)
    model = fastbert.patch_transformers(_classifier(config, device), backend=backend)
    logits, grads = _logits_and_grads(model, ids, mask, labels, autocast_dtype)
    floor = 1e-5 if autocast_dtype is None else 1e-3
    assert_close_to_ref(logits, ref_logits, base_logits, "logits", floor=floor)
    _assert_grads_close(grads, ref_grads, base_grads, floor, "unpatched", zero_below=1e-10)


def _assert_grads_close(grads, ref_grads, base_grads, floor, baseline, zero_below):
    """Every gradient's relative (Frobenius) error against ref <= 2x the baseline's + floor,
    except those whose reference norm is below zero_below: the key bias's, exactly zero in exact
    arithmetic, rounding noise on every side."""
    for name, g in grads.items():
        if ref_grads[name].norm() < zero_below:
            continue
        ref = ref_grads[name].to(g.dtype)
        ours_err = ((g - ref).norm() / ref.norm()).item()
        base_err = ((base_grads[name] - ref).norm() / ref.norm()).item()
        assert ours_err <= 2 * base_err + floor, f"{name}: relative error {ours_err:.3e}, {baseline} {base_err:.3e}"


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_patched_matches_unpatched_forward_and_backward(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    _check_patched_matches(backend, DEVICE)


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "camembert", "electra", "ernie", "distilbert"])
def test_patched_family_matches_unpatched(family):
    """The rest of the BERT family: the same modules under other names (DistilBERT: its own block)."""
    _check_patched_matches("torch", DEVICE, family=family)


@pytest.mark.parametrize("family, act", [("bert", "gelu_new"), ("bert", "gelu_pytorch_tanh"),
                                         ("distilbert", "gelu_new")])
def test_patched_tanh_gelu_matches_unpatched(family, act):
    """The tanh GELU forms go to bias_gelu with approximate="tanh": erf's GELU there differs by
    up to ~1e-3, far above the float32 floor."""
    key = "activation" if family == "distilbert" else "hidden_act"
    _check_patched_matches("torch", DEVICE, family=family, **{key: act})


def test_key_padding_masks_of_every_form():
    """The mask hook and the attention entry read a 2D 0/1 integer mask, a bool one and a 4D
    additive one (0 keeps, finfo.min masks) as the same key padding mask, True = real token."""
    from fastbert.transformers_integration import _key_padding_bool, key_padding_mask

    real = torch.tensor([[True, True, False], [True, False, False]])
    additive = torch.zeros(2, 1, 1, 3).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
    for mask in (real, real.long(), real.int(), additive):
        assert torch.equal(_key_padding_bool(mask, 2, 3), real), mask
    assert torch.equal(key_padding_mask(2, 3, 3, attention_mask=real.long()), real)
    assert key_padding_mask(2, 3, 3) is None
    # one mask for every row, broadcast as transformers' attention broadcasts it (refused before, as
    # a "per-query" mask, naming the shape after slicing)
    for shared in (real[:1], real[:1, None, None, :]):
        assert torch.equal(_key_padding_bool(shared, 2, 3), real[:1].expand(2, 3))
    with pytest.raises(ValueError, match=r"got \(3, 1, 1, 3\): per-query masks"):
        _key_padding_bool(torch.ones(3, 1, 1, 3, dtype=torch.bool), 2, 3)


def test_patched_distilbert_with_another_activation():
    """DistilBERT with ReLU: the block's LayerNorms are fused, its FFN runs as it is."""
    _check_patched_matches("torch", DEVICE, family="distilbert", activation="relu")


@pytest.mark.slow
def test_patched_triton_under_autocast():
    """The interpreter has no bf16: float16 autocast on the CPU, bfloat16 on a GPU."""
    pytest.importorskip("triton")
    _check_patched_matches("triton", DEVICE, torch.bfloat16 if ON_GPU else torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patched_on_gpu_under_autocast(backend, dtype):
    if backend not in fastbert.ops.available_backends(DEVICE):
        pytest.skip(f"fastbert backend {backend!r} is not usable here")
    _check_patched_matches(backend, DEVICE, dtype)


def test_padding_reaches_the_kernel():
    """A padded row gives what the same tokens give unpadded: were the mask dropped on its way
    (no mask hook), the padding keys would change it."""
    model = fastbert.patch_transformers(_classifier(_tiny_config(), DEVICE).eval(), backend="torch")
    ids, mask = _batch(DEVICE)
    with torch.no_grad():
        padded = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model.base_model(input_ids=ids[1:2, :13]).last_hidden_state
    torch.testing.assert_close(padded[1, :13], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "distilbert"])
def test_every_patched_module_calls_its_kernel(family, monkeypatch):
    config = _tiny_config(family, num_hidden_layers=3)
    model = fastbert.patch_transformers(_classifier(config, DEVICE).eval(), backend="torch")
    model = fastbert.patch_transformers(model, backend="torch")  # twice: still one kernel per step
    calls = {"attention": 0, "add_layernorm": 0, "bias_gelu": 0}
    for name in calls:
        real = getattr(fastbert.ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(fastbert.ops, name, spy)
    ids, mask = _batch(DEVICE)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert calls == {"attention": 3, "add_layernorm": 6, "bias_gelu": 3}
    assert model.config._attn_implementation == "fastbert"


def test_dropout_in_training_is_seeded_and_active():
    config = _tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = fastbert.patch_transformers(_classifier(config, DEVICE), backend="torch").train()
    ids, mask = _batch(DEVICE)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(model(input_ids=ids, attention_mask=mask).logits.detach())
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    with torch.no_grad():
        evaluated = model.eval()(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(runs[0], evaluated), "dropout had no effect in training mode"


def test_from_pretrained_with_attn_implementation(tmp_path):
    """After register(), transformers loads a checkpoint straight onto the fastbert attention;
    the embedded MiniLM's last hidden state matches transformers' own attention."""
    from fastbert import transformers_integration
    transformers_integration.register()
    path = fastbert.default_model_path()
    ours = transformers.BertModel.from_pretrained(path, attn_implementation="fastbert").eval()
    theirs = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = fastbert.Tokenizer.from_pretrained("default")
    batch = tokenizer(["a short one", "a somewhat longer sentence with more tokens in it"])
    with torch.no_grad(), fastbert.ops.use_backend("torch"):
        a = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        b = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


def test_bad_uses_raise():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastbert.patch_transformers(_classifier(_tiny_config(), DEVICE), backend="fast")
    with pytest.raises(ValueError, match="decoder"):
        fastbert.patch_transformers(_classifier(_tiny_config(is_decoder=True), DEVICE))
    with pytest.raises(ValueError, match="BERT family"):
        fastbert.patch_transformers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="chunk_size_feed_forward"):
        fastbert.patch_transformers(_classifier(_tiny_config("distilbert", chunk_size_feed_forward=4), DEVICE))
    relative = _classifier(_tiny_config(), DEVICE)
    relative.config.position_embedding_type = "relative_key"   # what transformers before 5.17 could run
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key' is not supported"):
        fastbert.patch_transformers(relative)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        fastbert.patch_transformers(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    model = fastbert.patch_transformers(_classifier(_tiny_config(), DEVICE).eval(), backend="torch")
    ids, mask = _batch(DEVICE)
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)
    per_query = torch.ones(ids.shape[0], 1, ids.shape[1], ids.shape[1], dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="key padding mask"):
        model(input_ids=ids, attention_mask=per_query)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_output_attentions_from_the_config_is_refused(family):
    """A model configured with output_attentions=True on eager, then patched: transformers asks
    for the weights through the config, not the call; returning none would make
    `outputs.attentions` an empty tuple."""
    config = _tiny_config(family, output_attentions=True, attn_implementation="eager")
    model = fastbert.patch_transformers(_classifier(config, DEVICE).eval(), backend="torch")
    ids, mask = _batch(DEVICE)
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():  # the call's False wins over the config, as in transformers
        assert model(input_ids=ids, attention_mask=mask, output_attentions=False).attentions is None


class _LoraLinear(torch.nn.Module):
    """peft's lora.Linear in miniature: `weight` and `bias` are the wrapped Linear's, the forward
    adds a low-rank term that F.linear on `weight` would not see."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def _unpatched_and_patched_logits(family, change):
    """Logits of the unpatched and of the patched classifier, change(model) applied to each after
    patching (a wrapper, a hook: what a user may add to a patched model)."""
    config = _tiny_config(family)
    ids, mask = _batch(DEVICE)
    logits = []
    for patch in (False, True):
        model = _classifier(config, DEVICE).eval()
        if patch:
            fastbert.patch_transformers(model, backend="torch")
        change(model)
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=mask).logits)
    return logits


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_a_wrapped_ffn_linear_keeps_its_forward(family):
    """LoRA on the FFN's linears (peft's "all-linear"), put in after patching: the fused
    bias + GELU must not take the wrapper's weight and skip its forward."""
    def wrap(model):
        torch.manual_seed(2)
        for module in list(model.modules()):
            if hasattr(module, "intermediate_act_fn"):  # BERT's Intermediate
                module.dense = _LoraLinear(module.dense)
            elif hasattr(module, "lin1"):  # DistilBERT's FFN
                module.lin1, module.lin2 = _LoraLinear(module.lin1), _LoraLinear(module.lin2)

    unpatched, patched = _unpatched_and_patched_logits(family, wrap)
    torch.testing.assert_close(patched, unpatched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, path", [("bert", "bert.encoder.layer.0.output.LayerNorm"),
                                          ("bert", "bert.encoder.layer.1.attention.output.LayerNorm"),
                                          ("bert", "bert.encoder.layer.0.output.dropout"),
                                          ("bert", "bert.encoder.layer.0.intermediate.intermediate_act_fn"),
                                          ("distilbert", "distilbert.transformer.layer.1.ffn.activation"),
                                          ("distilbert", "distilbert.transformer.layer.0.ffn"),
                                          ("distilbert", "distilbert.transformer.layer.0.sa_layer_norm"),
                                          ("distilbert", "distilbert.transformer.layer.1.output_layer_norm")])
def test_a_hooked_fused_submodule_keeps_its_hook(family, path):
    """A fused step reads its submodules' weights instead of calling them: a forward hook there (a
    probe, activation steering) was dropped without a word. Such a module now runs unfused."""
    def hook(model):
        # features moved along one place: a change the next LayerNorm cannot undo (a scale it would)
        model.get_submodule(path).register_forward_hook(lambda module, args, out: out.roll(1, dims=-1))

    unpatched, patched = _unpatched_and_patched_logits(family, hook)
    unhooked = _unpatched_and_patched_logits(family, lambda model: None)[0]
    assert (unhooked - unpatched).abs().max() > 1e-4, "the hook must change the logits well past the tolerance below"
    torch.testing.assert_close(patched, unpatched, atol=1e-5, rtol=1e-5)


def test_patched_model_survives_pickling():
    """torch.save(model) / torch.load: the patched forwards come back bound to the loaded modules
    (a bound method pickles as a lookup of its name, which the module does not have)."""
    import io

    model = fastbert.patch_transformers(_classifier(_tiny_config(), DEVICE).eval(), backend="torch")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids, mask = _batch(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    layer = loaded.bert.encoder.layer[0]
    assert all(vars(m)["forward"].args == (m,) for m in (layer.attention.output, layer.intermediate, layer.output))


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_patched_model_loads_in_a_fresh_process(tmp_path, family):
    """torch.load of a pickled patched model in a process that never imported fastbert: its
    config names attn_implementation "fastbert", unknown to that process's transformers until
    fastbert registers it; loading the patched forwards does that (before, the forward failed
    until the user called fastbert.transformers_integration.register())."""
    import subprocess
    import sys

    model = fastbert.patch_transformers(_classifier(_tiny_config(family), "cpu").eval(), backend="torch")
    ids, mask = _batch("cpu")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    torch.save(model, tmp_path / "model.pt")
    torch.save({"ids": ids, "mask": mask, "expected": expected}, tmp_path / "batch.pt")
    script = (
        "import sys, torch\n"
        "model = torch.load(sys.argv[1], weights_only=False)\n"
        "batch = torch.load(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    logits = model(input_ids=batch['ids'], attention_mask=batch['mask']).logits\n"
        "torch.testing.assert_close(logits, batch['expected'], atol=0, rtol=0)\n"
        "print('ok', model.config._attn_implementation)\n")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt"), str(tmp_path / "batch.pt")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0 and run.stdout.split() == ["ok", "fastbert"], run.stderr[-2000:]


@pytest.mark.parametrize("family, kind", [("bert", "subclass"), ("bert", "instance"), ("distilbert", "subclass")])
def test_a_module_with_a_forward_of_its_own_is_left_unfused(family, kind):
    """Adapter libraries swap in subclasses of BertOutput & co whose forward adds the adapter, and
    others set a forward on the instance: the patch replaced that forward with the fused one, so
    the adapter vanished without a word. Such a module keeps its forward (and is named in a warning)."""
    import warnings

    def steer(hidden):
        return hidden.roll(1, dims=-1)  # a change the next LayerNorm cannot undo

    def change(model, patch):
        for name, module in list(model.named_modules()):
            cls = type(module).__name__
            if cls not in ("BertOutput", "BertIntermediate", "TransformerBlock"):
                continue
            if kind == "subclass":
                steered = type(f"Steered{cls}", (type(module),),
                               {"forward": lambda self, *a, **k: _steered(super(type(self), self).forward(*a, **k))})
                module.__class__ = steered
            else:
                module.forward = lambda *a, _m=module, _f=module.forward, **k: _steered(_f(*a, **k))

    def _steered(out):
        return (steer(out[0]), *out[1:]) if isinstance(out, tuple) else steer(out)

    config = _tiny_config(family)
    ids, mask = _batch(DEVICE)
    logits = []
    for patch in (False, True):
        model = _classifier(config, DEVICE).eval()
        change(model, patch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if patch:
                fastbert.patch_transformers(model, backend="torch")
        if patch:
            assert any("left unfused" in str(w.message) and w.filename == __file__ for w in caught), caught
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=mask).logits)
    plain = _unpatched_and_patched_logits(family, lambda model: None)[0]
    assert (plain - logits[0]).abs().max() > 1e-4, "the steering must change the logits well past the tolerance"
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_the_encoder_of_an_encoder_decoder_model():
    """EncoderDecoderModel gives its encoder a config of its own while the layers keep the one they
    were built with: the patch switched the mask to fastbert's (batch, seqlen) key mask and left
    the layers on SDPA, which read it as (1, 1, batch, seqlen): other rows' padding when batch ==
    seqlen, a shape error otherwise. Every attention module now follows."""
    c = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.EncoderDecoderModel(
        encoder=transformers.BertModel(transformers.BertConfig(**c)),
        decoder=transformers.BertLMHeadModel(transformers.BertConfig(**c, is_decoder=True, add_cross_attention=True)))
    model = model.to(DEVICE).eval()
    for batch, seqlen in ((4, 4), (3, 5)):
        ids = torch.randint(3, 100, (batch, seqlen), device=DEVICE)
        mask = torch.ones_like(ids)
        mask[1, 2:] = 0
        with torch.no_grad():
            expected = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        import copy

        patched = copy.deepcopy(model)
        fastbert.patch_transformers(patched.encoder, backend="torch")
        with torch.no_grad():
            got = patched.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_a_submodule_is_refused_before_anything_is_patched():
    """model.bert.encoder has a config too: its FFNs were fused and its backend set before an
    AttributeError (no set_attn_implementation) stopped the patch half way."""
    model = _classifier(_tiny_config(), DEVICE)
    with pytest.raises(ValueError, match="expects a transformers model of the BERT family .*got BertEncoder"):
        fastbert.patch_transformers(model.bert.encoder, backend="torch")
    assert not any(hasattr(m, "fastbert_backend") or "forward" in vars(m) for m in model.modules())


def test_a_compiled_model_refuses_a_mask_that_is_not_additive():
    """A float (batch, 1, 1, seqlen) mask of 0/1 is refused in eager mode (read as additive it masks
    the real tokens); under torch.compile the check (a host read) was skipped and the 0/1 mask
    silently read that way. The compiled graph now checks it where the mask is, on the CPU (on a GPU
    a device-side assert: the next test)."""
    cpu = torch.device("cpu")
    model = fastbert.patch_transformers(_classifier(_tiny_config(), cpu).eval(), backend="torch")
    ids, mask = _batch(cpu)
    zero_one = mask[:, None, None, :].float()
    additive = (1.0 - zero_one) * torch.finfo(torch.float32).min
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(input_ids=ids, attention_mask=additive).logits,
                                       model(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=1e-6)
            with pytest.raises(RuntimeError, match="attention_mask is additive and must hold 0"):
                compiled(input_ids=ids, attention_mask=zero_one)
    finally:
        torch._dynamo.reset()


def test_the_mask_check_holds_where_dynamo_runs_the_checking_frame_eagerly():
    """Dynamo runs a frame eagerly when it gives up on it (a graph break it cannot resume, the
    recompile limit) and still compiles the frames that one calls. host_sync_allowed, compiled on its
    own, read is_compiling() as True while the frame's own read was False: both the host check and
    the in-graph one were skipped, and a 0/1 float mask masked the real tokens, silently."""
    key_padding_bool = torch._dynamo.disable(fastbert.transformers_integration._key_padding_bool, recursive=False)
    zero_one = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 0, 0, 0]])[:, None, None, :]
    torch._dynamo.reset()
    try:
        run = torch.compile(lambda mask: key_padding_bool(mask, 2, 5).float() * 2, backend="eager")
        with pytest.raises(ValueError, match="attention_mask is additive and must hold 0"):
            run(zero_one)
    finally:
        torch._dynamo.reset()


_GPU_MASK_SCRIPT = """
import torch, fastbert
from test_transformers_integration import DEVICE, _batch, _classifier, _tiny_config
model = fastbert.patch_transformers(_classifier(_tiny_config(), DEVICE).eval(), backend="torch")
ids, mask = _batch(DEVICE)
zero_one = mask[:, None, None, :].float()
compiled = torch.compile(model, backend="eager")
with torch.no_grad():
    torch.testing.assert_close(compiled(input_ids=ids, attention_mask=(1.0 - zero_one) * -1e9).logits,
                               model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    print("additive mask: the 2D mask's logits", flush=True)
    compiled(input_ids=ids, attention_mask=zero_one)
    torch.cuda.synchronize()
print("ran on with a 0/1 mask", flush=True)
"""


@pytest.mark.gpu
def test_a_compiled_model_on_the_gpu_stops_at_a_mask_that_is_not_additive():
    """On a GPU the compiled check is a device-side assert (it ends the CUDA context, so it runs in a
    subprocess): the process must fail rather than return logits with the real tokens masked; an
    additive mask gives the 2D mask's logits."""
    run = subprocess.run([sys.executable, "-c", _GPU_MASK_SCRIPT], cwd=Path(__file__).parent,
                         capture_output=True, text=True, timeout=300)
    assert "additive mask: the 2D mask's logits" in run.stdout, run.stderr[-3000:]
    assert "ran on with a 0/1 mask" not in run.stdout and run.returncode != 0, run.stderr[-3000:]
    assert "device-side assert" in run.stderr, run.stderr[-3000:]


def test_patched_model_compiles_with_fullgraph():
    """torch.compile(fullgraph=True) of the patched model: no graph break in the hooks, the
    patched modules' backend kept (around the call, a scope that cannot run on the CPU), the
    result the eager patched model's."""
    model = fastbert.patch_transformers(_classifier(_tiny_config(), DEVICE).eval(), backend="torch")
    ids, mask = _batch(DEVICE)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad(), fastbert.ops.use_backend("torch" if ON_GPU else "cuda"):
            logits = compiled(input_ids=ids, attention_mask=mask).logits
    finally:
        torch._dynamo.reset()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_patched_model_under_inductor_matches_eager(backend):
    """On a GPU: inductor compiles the patched model with the kernels inside (the registered ops),
    training step under bf16 autocast, logits and gradients as the eager patched model's."""
    if backend not in fastbert.ops.available_backends(DEVICE):
        pytest.skip(f"fastbert backend {backend!r} is not usable here")
    model = fastbert.patch_transformers(_classifier(_tiny_config(), DEVICE), backend=backend)
    ids, mask = _batch(DEVICE)
    labels = torch.tensor([0, 1, 1, 0], device=DEVICE)
    torch._dynamo.reset()
    try:
        logits, grads = _logits_and_grads(torch.compile(model, fullgraph=True), ids, mask, labels, torch.bfloat16)
        grads = {name.removeprefix("_orig_mod."): g for name, g in grads.items()}
    finally:
        torch._dynamo.reset()
    eager_logits, eager_grads = _logits_and_grads(model, ids, mask, labels, torch.bfloat16)
    # The float32 reference unpatched (the same weights): the cuda backend has no float32 attention.
    ref_logits, ref_grads = _logits_and_grads(_classifier(_tiny_config(), DEVICE), ids, mask, labels)
    assert_close_to_ref(logits, ref_logits, eager_logits, "logits", floor=1e-3)
    _assert_grads_close(grads, ref_grads, eager_grads, 1e-3, "eager", zero_below=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_gradient_checkpointing_reruns_the_same_dropout(backend):
    """transformers' gradient checkpointing reruns the patched layers in the backward, outside
    any use_backend scope of the forward: the patched modules keep their backend there and the
    dropout seeds come back with the generators' states, so the gradients are the ones without
    checkpointing, bit for bit."""
    if backend == "triton":
        pytest.importorskip("triton")
    config = _tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = fastbert.patch_transformers(_classifier(config, DEVICE), backend=backend).train()
    ids, mask = _batch(DEVICE)
    labels = torch.tensor([0, 1, 1, 0], device=DEVICE)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        torch.manual_seed(3)
        grads.append(_logits_and_grads(model, ids, mask, labels)[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_reruns_on_the_backend_of_the_forward(reentrant):
    """Patched with no backend of its own, the model follows use_backend; a scope around the forward
    alone has closed when checkpointing reruns the layers in backward(). The reruns went to the
    backend chosen then (here torch where the forward ran triton: other dropout masks): gradients
    2x off with use_reentrant=True, a CheckpointError without. Checkpointing enabled before the
    patch, after it, on a deep copy and on a pickled copy."""
    pytest.importorskip("triton")
    import copy
    import pickle

    config = _tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    ids, mask = _batch(DEVICE)
    labels = torch.tensor([0, 1, 1, 0], device=DEVICE)

    def grads(model):
        model.zero_grad()
        torch.manual_seed(3)
        with fastbert.ops.use_backend("triton"):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()                                   # outside the scope, as a training loop may
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def enable(model):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        return model

    reference = grads(fastbert.patch_transformers(_classifier(config, DEVICE)).train())
    before = fastbert.patch_transformers(enable(_classifier(config, DEVICE)).train())
    after = enable(fastbert.patch_transformers(_classifier(config, DEVICE)).train())
    copied = enable(copy.deepcopy(fastbert.patch_transformers(_classifier(config, DEVICE)).train()))
    # torch.save of a whole model pickles it (transformers' own hooks leave a checkpointing one unpicklable)
    unpickled = enable(pickle.loads(pickle.dumps(fastbert.patch_transformers(_classifier(config, DEVICE)).train())))
    for model in (before, after, copied, unpickled):
        assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        got = grads(model)
        assert got.keys() == reference.keys()
        for name, g in reference.items():
            torch.testing.assert_close(got[name], g, atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_fused_dropout_is_the_models(family, monkeypatch):
    """In training the fused add_layernorm gets the dropout transformers applies before that
    residual add (BERT: both; DistilBERT: the FFN's only), and none in eval."""
    config = _tiny_config(family, hidden_dropout_prob=0.25, attention_probs_dropout_prob=0.0)
    model = fastbert.patch_transformers(_classifier(config, DEVICE), backend="torch")
    seen = []
    real = fastbert.ops.add_layernorm

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("dropout_p", 0.0))
        return real(*args, **kwargs)
    monkeypatch.setattr(fastbert.ops, "add_layernorm", spy)
    ids, mask = _batch(DEVICE)
    expected = [0.25, 0.25] if family == "bert" else [0.0, 0.25]
    model.train()(input_ids=ids, attention_mask=mask)
    assert seen == expected * config.num_hidden_layers
    seen.clear()
    with torch.no_grad():
        model.eval()(input_ids=ids, attention_mask=mask)
    assert seen == [0.0, 0.0] * config.num_hidden_layers


@pytest.mark.parametrize("version", ["4.50.3", "5.0.0", "5.3.1"])
def test_older_transformers_is_refused(monkeypatch, version):
    """5.0 to 5.3 call the mask hook with another signature: they were taken, and failed inside
    transformers with a TypeError at the first forward."""
    import sys

    # Built first: the first model built in a process can put another module object in
    # sys.modules["transformers"]. The version is then set on sys.modules' entry, which
    # `import transformers` inside fastbert finds.
    model = _classifier(_tiny_config(), DEVICE)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(ImportError, match=r"transformers >= 5\.4 \(found " + version.replace(".", r"\.")):
        fastbert.patch_transformers(model)


@pytest.mark.parametrize("version", ["5.4.0", "5.10.2", "5.24.0.dev0", "6.0.0"])
def test_supported_transformers_versions(monkeypatch, version):
    import sys

    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    assert fastbert.transformers_integration.transformers_supported()


def test_a_compiled_wrapper_is_patched():
    """torch.compile(model) forwards config and set_attn_implementation to the model: it was patched
    before the PreTrainedModel check refused it."""
    model = _classifier(_tiny_config(), DEVICE).eval()
    torch._dynamo.reset()
    try:
        wrapper = torch.compile(model, backend="eager")
        fastbert.patch_transformers(wrapper, backend="torch")
        assert model.config._attn_implementation == "fastbert"
    finally:
        torch._dynamo.reset()
