"""BertModel against transformers' BertModel: outputs and every gradient, on the
embedded MiniLM checkpoint and on a random bert-base-shaped config."""
import pytest
import torch
import transformers
import torch.nn.functional as F

import fastbert
from conftest import assert_close_to_ref
from fastbert import checkpoint

SENTENCES = ["The cat sat on the mat.", "hello", "A considerably longer sentence, with punctuation; and more words in it!"]
PAIRS = ["Another one.", "pair here ok", "short"]


def hf_model(config: fastbert.BertConfig, state=None):
    hf_config = transformers.BertConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    hf_config._attn_implementation = "eager"
    model = transformers.BertModel(hf_config, add_pooling_layer=True).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
    return model


@pytest.fixture(scope="module")
def minilm():
    ours = fastbert.BertModel.from_pretrained("default").eval()
    theirs = transformers.BertModel.from_pretrained(str(fastbert.default_model_path()), attn_implementation="eager").eval()
    return ours, theirs


@pytest.fixture(scope="module")
def bert_base():
    torch.manual_seed(0)
    config = fastbert.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    theirs = hf_model(config)
    ours = fastbert.BertModel(config).eval()
    checkpoint.load_encoder(ours, theirs.state_dict())
    return ours, theirs


def batch_of(tokenizer_texts, pairs):
    tok = fastbert.Tokenizer.from_pretrained("default")
    return tok(tokenizer_texts, pairs) if pairs else tok(tokenizer_texts)


def random_batch(vocab_size, lengths, seqlen, pair_at=None):
    ids = torch.randint(1000, vocab_size, (len(lengths), seqlen))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    if pair_at is not None:
        types[:, pair_at:] = 1
        types[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def compare_outputs(ours, theirs, batch):
    with torch.no_grad():
        a = ours(**batch)
        b = theirs(**batch)
    real = batch["attention_mask"].bool()
    # The bar: 1e-5 absolute on every real token and on the pooled output.
    assert (a.last_hidden_state - b.last_hidden_state)[real].abs().max() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-5
    # Padded positions carry no meaning, but are still computed: hold them to the
    # style rule against float64 (within 3x transformers' own float32 error + floor).
    ours64 = type(ours)(ours.config).double().eval()
    ours64.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ref = ours64(**batch).last_hidden_state
    theirs_err = (b.last_hidden_state.double() - ref).abs().max().item()
    ours_err = (a.last_hidden_state.double() - ref).abs().max().item()
    assert ours_err <= 3 * theirs_err + 1e-5, (ours_err, theirs_err)


@pytest.mark.parametrize("paired", [False, True])
def test_minilm_matches_transformers(minilm, paired):
    ours, theirs = minilm
    compare_outputs(ours, theirs, batch_of(SENTENCES, PAIRS if paired else None))


@pytest.mark.parametrize("paired", [False, True])
def test_bert_base_random_matches_transformers(bert_base, paired):
    ours, theirs = bert_base
    torch.manual_seed(1)
    compare_outputs(ours, theirs, random_batch(30522, [37, 12, 1, 40], 40, pair_at=20 if paired else None))


def grads_agree(ours, theirs, batch):
    torch.manual_seed(2)
    weight = torch.randn(*batch["input_ids"].shape, ours.config.hidden_size)
    pool_weight = torch.randn(ours.config.hidden_size)
    real = batch["attention_mask"][..., None].float()

    def loss_of(out):
        return (out.last_hidden_state * weight * real).sum() + (out.pooler_output * pool_weight).sum()

    ours.zero_grad(), theirs.zero_grad()
    loss_of(ours(**batch)).backward()
    loss_of(theirs(**batch)).backward()
    theirs_grads = dict(theirs.named_parameters())
    largest = max(p.grad.norm().item() for p in theirs.parameters())
    checked = 0
    for name, param in ours.named_parameters():
        g_ours, g_theirs = param.grad, theirs_grads[checkpoint.to_hf_key(name)].grad
        if name.endswith("attention.key.bias"):
            # Softmax ignores a shift shared by all keys, so this gradient is exactly
            # zero in exact arithmetic: both sides hold rounding noise only.
            assert g_ours.norm() <= 1e-5 * largest and g_theirs.norm() <= 1e-5 * largest
        else:
            rel = ((g_ours - g_theirs).norm() / g_theirs.norm()).item()
            assert rel <= 1e-4, f"{name}: relative gradient error {rel:.2e}"
        checked += 1
    assert checked == len(theirs_grads)


def test_minilm_gradients_match(minilm):
    ours, theirs = minilm
    grads_agree(ours, theirs, batch_of(SENTENCES, PAIRS))


def test_bert_base_gradients_match(bert_base):
    ours, theirs = bert_base
    torch.manual_seed(3)
    grads_agree(ours, theirs, random_batch(30522, [24, 9, 31], 31, pair_at=12))


def test_dropout_is_active_in_training_and_off_in_eval():
    torch.manual_seed(0)
    config = fastbert.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=16)
    model = fastbert.BertModel(config)
    ids = torch.randint(0, 100, (2, 8))
    model.train()
    a, b = model(ids).last_hidden_state, model(ids).last_hidden_state
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)


# -- bad input ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    config = fastbert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=8)
    return fastbert.BertModel(config).eval()


@pytest.mark.parametrize("make_ids, match", [
    (lambda: torch.ones(2, 4), "int64 or int32"),
    (lambda: [[1, 2, 3]], "torch.Tensor"),
    (lambda: torch.ones(2, 4, 3, dtype=torch.long), r"\(batch, seqlen\)"),
    (lambda: torch.full((2, 4), 50), r"vocab_size=50"),
    (lambda: torch.full((2, 4), -1), r"vocab_size=50"),
    (lambda: torch.ones(2, 9, dtype=torch.long), "max_position_embeddings = 8"),
])
def test_bad_input_ids(tiny, make_ids, match):
    with pytest.raises((TypeError, ValueError), match=match):
        tiny(make_ids())


def test_id_check_holds_where_dynamo_runs_the_checking_frame_eagerly(tiny):
    """Dynamo runs a frame eagerly when it gives up on it (a graph break it cannot resume, the
    recompile limit) and still compiles the frames that one calls. host_sync_allowed, compiled on its
    own, read is_compiling() as True there: the id check of an eager frame was skipped and the ids
    reached the embedding unchecked (garbage on the CPU, a device-side assert on a GPU)."""
    checked_inputs = torch._dynamo.disable(tiny._checked_inputs, recursive=False)
    torch._dynamo.reset()
    try:
        run = torch.compile(lambda ids: checked_inputs(ids, None, None)[0] + 0, backend="eager")
        with pytest.raises(ValueError, match="vocab_size=50"):
            run(torch.full((2, 4), 50))
    finally:
        torch._dynamo.reset()


def test_bad_masks_and_types(tiny):
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask must be"):
        tiny(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        tiny(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="token_type_ids must be"):
        tiny(ids, token_type_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="type_vocab_size=2"):
        tiny(ids, token_type_ids=torch.full((2, 4), 2))


def test_input_on_wrong_device(tiny):
    ids = torch.ones(2, 4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        tiny(ids)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        fastbert.BertConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="hidden_act"):
        fastbert.BertConfig(hidden_act="relu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_minilm_under_autocast_matches_transformers(minilm, dtype):
    """Mixed precision, how the Trainer runs on a GPU: Linear outputs in bf16/fp16 while the
    residual stream stays float32 (add_layernorm promotes, as transformers' `dense(h) + input`
    does). Outputs and every gradient against the float32 model without autocast, allowed
    twice the error transformers makes under the same autocast. (Found broken: a dtype error
    in the first add_layernorm, so the GPU fine-tuning default, bf16 autocast, could not run.)"""
    ours, theirs = minilm
    batch = batch_of(SENTENCES, PAIRS)
    real = batch["attention_mask"].bool()
    torch.manual_seed(0)
    weight = torch.randn(*batch["input_ids"].shape, ours.config.hidden_size)

    def run(model, autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(**batch)
        hidden, pooled = out.last_hidden_state, out.pooler_output
        ((hidden.float() * weight)[real].sum() + pooled.float().sum()).backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        return hidden.detach(), pooled.detach(), grads

    hidden, pooled, grads = run(ours, True)
    ref_hidden, ref_pooled, ref_grads = run(ours, False)
    hf_hidden, hf_pooled, hf_grads = run(theirs, True)
    assert hidden.dtype == hf_hidden.dtype == torch.float32  # the stream after each LayerNorm
    assert_close_to_ref(hidden[real], ref_hidden[real], hf_hidden[real], "last_hidden_state")
    assert_close_to_ref(pooled.float(), ref_pooled, hf_pooled.float(), "pooler_output")
    # Gradients sum bf16/fp16-rounded terms over every token: where single roundings land
    # differs between two correct implementations, so each gradient is held by its relative
    # (Frobenius) error, the precision of the whole tensor, to twice transformers' + 1e-3.
    for name, g in grads.items():
        if name.endswith("attention.key.bias"):
            continue  # exactly zero in exact arithmetic: rounding noise on every side
        ref = ref_grads[name]
        ours_err = ((g - ref).norm() / ref.norm()).item()
        hf_err = ((hf_grads[checkpoint.to_hf_key(name)] - ref).norm() / ref.norm()).item()
        assert ours_err <= 2 * hf_err + 1e-3, f"{name}: relative error {ours_err:.3e}, transformers {hf_err:.3e}"


# -- config fields, defaults and edges against transformers ------------------------------------


def _tiny_pair(**overrides):
    """A seeded tiny fastbert model and transformers' BertModel with its weights, both float64."""
    settings = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=12)
    settings.update(overrides)
    config = fastbert.BertConfig(**settings)
    torch.manual_seed(0)
    ours = fastbert.BertModel(config, backend="torch").double().eval()
    # BERT's init puts LayerNorm at ones/zeros: perturb them so that eps and the affine both count.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    theirs = hf_model(config).double()
    missing, unexpected = theirs.load_state_dict(checkpoint.encoder_to_hf(ours), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return ours, theirs


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_config_activation_and_layer_norm_eps_reach_every_layer(hidden_act):
    """hidden_act picks erf or tanh GELU and layer_norm_eps is every LayerNorm's eps (a large one
    here, so that a LayerNorm left on BERT's 1e-12 or torch's 1e-5 moves the output): in float64
    the two models agree to rounding. The tanh GELU differs from erf's by up to ~1e-3, far above it."""
    ours, theirs = _tiny_pair(hidden_act=hidden_act, layer_norm_eps=0.5)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 2)
    with torch.no_grad():
        a, b = ours(ids, token_type_ids=types), theirs(input_ids=ids, token_type_ids=types)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-10, rtol=0)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-10, rtol=0)


def test_defaults_full_length_rows_and_left_padding_match_transformers():
    """No token_type_ids means segment 0 and no attention_mask means every token is real, as in
    transformers; a row of exactly max_position_embeddings tokens is accepted (the last position
    exists). Left padding keeps each token's absolute position in its row, padded model and
    unpad=True alike: a packed path that counted positions from each row's first real token
    would agree on right-padded rows only."""
    ours, theirs = _tiny_pair()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (3, 12), generator=gen)             # 12 = max_position_embeddings
    with torch.no_grad():
        a, b = ours(ids), theirs(input_ids=ids)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-10, rtol=0)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                                  # left-padded
    mask[2, :3] = 0
    mask[2, 9:] = 0                                                  # padded on both sides
    types = (torch.arange(12) >= 6).long().expand(3, 12).contiguous()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        for unpad in (False, True):
            ours.unpad = unpad
            got = ours(ids, mask, types).last_hidden_state
            real = mask.bool()
            torch.testing.assert_close(got[real], expected[real], atol=1e-10, rtol=0, msg=f"unpad={unpad}")
            if unpad:
                assert torch.equal(got[~real], torch.zeros_like(got[~real])), "padded positions are not zeros"
    ours.unpad = False


def test_dropout_probabilities_are_the_configs(monkeypatch):
    """In training the embeddings and each residual add drop with hidden_dropout_prob and attention
    with attention_probs_dropout_prob (two different values here, so a swap shows); none in eval."""
    config = fastbert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=8,
                                 hidden_dropout_prob=0.25, attention_probs_dropout_prob=0.125)
    model = fastbert.BertModel(config, backend="torch")
    seen = {"embeddings": [], "attention": [], "add_layernorm": []}
    real_attention, real_add_ln = fastbert.ops.attention, fastbert.ops.add_layernorm

    class ModelF:  # fastbert.model's F, its dropout spied (the ops' own F.dropout calls are not counted)
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def dropout(x, p=0.5, training=True, *args, **kwargs):
            seen["embeddings"].append(p if training else 0.0)
            return F.dropout(x, p, training, *args, **kwargs)

    def attention(*args, dropout_p=0.0, **kwargs):
        seen["attention"].append(dropout_p)
        return real_attention(*args, dropout_p=dropout_p, **kwargs)

    def add_layernorm(*args, **kwargs):
        if len(args) > 5:  # the layers' calls; the embeddings' own has no dropout (F.dropout follows)
            seen["add_layernorm"].append(args[5])
        return real_add_ln(*args, **kwargs)
    monkeypatch.setattr(fastbert.model, "F", ModelF())
    monkeypatch.setattr(fastbert.ops, "attention", attention)
    monkeypatch.setattr(fastbert.ops, "add_layernorm", add_layernorm)
    ids = torch.randint(0, 50, (2, 6))
    model.train()(ids, torch.ones_like(ids))
    assert seen == {"embeddings": [0.25], "attention": [0.125] * 2, "add_layernorm": [0.25] * 4}
    for calls in seen.values():
        calls.clear()
    with torch.no_grad():
        model.eval()(ids, torch.ones_like(ids))
    assert seen == {"embeddings": [0.0], "attention": [0.0] * 2, "add_layernorm": [0.0] * 4}


def test_new_model_is_initialised_like_bert():
    """A model built from a config (no checkpoint) starts as transformers' does: every Linear and
    Embedding weight normal with std initializer_range (0.5 here, far from torch's defaults and
    BERT's 0.02), Linear biases zero, LayerNorms ones/zeros, and the padding token's embedding
    row zero (so [PAD] adds nothing before training moves it)."""
    config = fastbert.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=128, max_position_embeddings=64, initializer_range=0.5,
                                 pad_token_id=3)
    torch.manual_seed(0)
    model = fastbert.BertModel(config)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            weight = module.weight.detach()
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                assert torch.equal(weight[3], torch.zeros_like(weight[3])), f"{name}: padding row not zero"
                weight = torch.cat([weight[:3], weight[4:]])
            # Five standard errors of the sample's std and mean: token_type's 128 draws are few.
            n = weight.numel()
            assert abs(weight.std().item() - 0.5) < 5 * 0.5 / (2 * n) ** 0.5, name
            assert abs(weight.mean().item()) < 5 * 0.5 / n ** 0.5, name
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), f"{name}: bias not zero"
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)) and not module.bias.any(), name


def test_edge_ids_and_masks_are_refused_by_name(tiny):
    """Negative segment ids would index before the token-type table (a device-side assert on a
    GPU) and an int32 mask holding -10000 (an additive mask) would read as "real token": each is
    named as a ValueError, whatever the integer dtype."""
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="type_vocab_size=2"):
        tiny(ids, token_type_ids=torch.full((2, 4), -1))
    with pytest.raises(ValueError, match="attention_mask must hold 0/1"):
        tiny(ids, attention_mask=torch.tensor([[0, 0, 0, 0], [0, 0, -10000, -10000]], dtype=torch.int32))
    with pytest.raises(ValueError, match="attention_mask must hold 0/1"):
        tiny(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 2, 0, 0]], dtype=torch.int8))
