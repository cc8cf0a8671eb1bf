"""Checkpoints move both ways between fastbert and transformers; broken ones fail clearly."""
import json
import os
import re
import stat

import pytest
from hypothesis import given, settings, strategies as st
import torch
import transformers
from safetensors.torch import load_file, save_file

import fastbert
from fastbert import checkpoint, heads

CONFIG = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=24)


def test_key_map_covers_every_parameter_both_ways():
    model = fastbert.BertModel(fastbert.BertConfig(**CONFIG))
    hf = transformers.BertModel(transformers.BertConfig(**CONFIG))
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in hf.state_dict().items() if not k.endswith("_ids")}
    assert {checkpoint.to_hf_key(k): s for k, s in ours.items()} == theirs
    assert {checkpoint.from_hf_key(k): s for k, s in theirs.items()} == ours


def _inputs():
    torch.manual_seed(4)
    ids = torch.randint(1, 120, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def test_fastbert_save_transformers_load(tmp_path):
    torch.manual_seed(0)
    model = fastbert.BertModel(fastbert.BertConfig(**CONFIG)).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.BertModel.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids, mask = _inputs()
    with torch.no_grad():
        a, b = model(ids, mask), hf(input_ids=ids, attention_mask=mask)
    assert (a.last_hidden_state - b.last_hidden_state)[mask.bool()].abs().max() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-5
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


@pytest.mark.parametrize("safe_serialization", [True, False])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_transformers_save_fastbert_load(tmp_path, safe_serialization, with_prefix):
    torch.manual_seed(0)
    config = transformers.BertConfig(**CONFIG)
    hf = (transformers.BertForSequenceClassification(config) if with_prefix else transformers.BertModel(config)).eval()
    hf.save_pretrained(str(tmp_path), safe_serialization=safe_serialization)
    if not safe_serialization:  # transformers 5 may still write safetensors: force the .bin path
        for f in tmp_path.glob("*.safetensors"):
            torch.save(load_file(str(f)), tmp_path / "pytorch_model.bin")
            f.unlink()
    model = fastbert.BertModel.from_pretrained(tmp_path).eval()
    encoder = hf.bert if with_prefix else hf
    ids, mask = _inputs()
    with torch.no_grad():
        a, b = model(ids, mask), encoder(input_ids=ids, attention_mask=mask)
    assert (a.last_hidden_state - b.last_hidden_state)[mask.bool()].abs().max() <= 1e-5


def _saved(tmp_path):
    model = fastbert.BertModel(fastbert.BertConfig(**CONFIG))
    model.save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


def test_missing_tensor_is_named(tmp_path):
    path = _saved(tmp_path)
    state = load_file(str(path))
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing: encoder\.layer\.1\.output\.dense\.weight"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_misshaped_tensor_is_named(tmp_path):
    path = _saved(tmp_path)
    state = load_file(str(path))
    state["pooler.dense.bias"] = torch.zeros(31)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"mis-shaped: pooler\.dense\.bias: checkpoint \(31,\), model \(32,\)"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    path = _saved(tmp_path)
    state = load_file(str(path))
    state["encoder.layer.2.output.dense.weight"] = torch.zeros(32, 64)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"unexpected: encoder\.layer\.2\.output\.dense\.weight"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_one_weight_given_twice_is_named_and_nothing_is_half_loaded(tmp_path):
    """The same weight with and without "bert.", or a legacy gamma beside its weight: the last one
    read won silently. And a NaN found partway through the copy left a model half loaded."""
    path = _saved(tmp_path)
    state = load_file(str(path))
    state["bert.embeddings.word_embeddings.weight"] = torch.zeros_like(state["embeddings.word_embeddings.weight"])
    state["encoder.layer.0.output.LayerNorm.gamma"] = state["encoder.layer.0.output.LayerNorm.weight"].clone()
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"one weight given twice: bert\.embeddings\.word_embeddings\.weight and "
                                         r"embeddings\.word_embeddings\.weight; encoder\.layer\.0\.output\."
                                         r"LayerNorm\.gamma and encoder\.layer\.0\.output\.LayerNorm\.weight"):
        fastbert.BertModel.from_pretrained(tmp_path)
    model = fastbert.BertModel(fastbert.BertConfig(**CONFIG))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = load_file(str(_saved(tmp_path / "nan")))
    last = sorted(state)[-1]
    state[last] = torch.full_like(state[last], float("nan"))
    with pytest.raises(ValueError, match=f"tensor {re.escape(last)} holds NaN"):
        checkpoint.load_encoder(model, state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_corrupt_safetensors(tmp_path):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_pickle_with_code_is_refused(tmp_path):
    fastbert.BertConfig(**CONFIG).to_json(tmp_path / "config.json")
    torch.save({"weights": torch.zeros(2), "payload": print}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_missing_folder_and_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        fastbert.BertModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fastbert.BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_config_round_trip_keeps_unknown_keys(tmp_path):
    config = fastbert.BertConfig.from_dict({**CONFIG, "id2label": {"0": "neg", "1": "pos"}})
    config.to_json(tmp_path / "config.json")
    again = fastbert.BertConfig.from_json(tmp_path / "config.json")
    assert again.to_dict() == config.to_dict() and again.extra["id2label"] == {"0": "neg", "1": "pos"}


def test_default_model_is_embedded():
    folder = fastbert.default_model_path()
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert fastbert.BertModel.from_pretrained("default").config.hidden_size == 384


def test_sequence_classification_from_a_model_without_pooler(tmp_path):
    """A token-classification (or QA) model has no pooler: loading it for sequence classification
    initialises a fresh pooler as BERT does, with a warning naming it (it failed with
    "missing: pooler.dense.*" before); any other missing encoder weight is still an error."""
    from fastbert import heads

    torch.manual_seed(0)
    tagger = heads.BertForTokenClassification(fastbert.BertConfig(**CONFIG, initializer_range=0.5), num_labels=5)
    tagger.save_pretrained(tmp_path)
    assert not any(k.startswith("bert.pooler") for k in load_file(str(tmp_path / "model.safetensors")))
    with pytest.warns(UserWarning, match=r"has no pooler weights pooler\.dense\.weight, pooler\.dense\.bias .*newly initialised"), \
            pytest.warns(UserWarning, match=r"head weights .*do not fit"):          # the tagger's 5-label head
        model = heads.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    for name, tensor in tagger.bert.state_dict().items():                     # the encoder is the tagger's
        assert torch.equal(model.bert.state_dict()[name], tensor), name
    weight, bias = model.bert.pooler.weight, model.bert.pooler.bias
    assert torch.all(bias == 0) and abs(weight.std().item() - 0.5) < 0.1 and abs(weight.mean().item()) < 0.05
    ids, mask = _inputs()
    assert model(ids, mask).logits.shape == (2, 2)

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["bert.encoder.layer.0.attention.self.key.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing: encoder\.layer\.0\.attention\.self\.key\.weight, pooler\.dense"):
        heads.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    with pytest.raises(ValueError, match=r"missing: encoder\.layer\.0\.attention\.self\.key\.weight$"):
        heads.BertForTokenClassification.from_pretrained(tmp_path, num_labels=5)


_ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=8), st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                                         st.integers(), max_size=2))
_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
           "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
           "layer_norm_eps", "initializer_range", "pad_token_id", "position_embedding_type", "is_decoder",
           "add_cross_attention"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(overrides=st.dictionaries(st.sampled_from(_FIELDS), _ANY_VALUE, max_size=4))
def test_malformed_config_values_raise_value_error_naming_the_key(overrides):
    """config.json is user input: any value of any known key either gives a config a model can be
    built from, or a ValueError that names the key; never another exception (a TypeError,
    ZeroDivisionError, nn.Embedding's AssertionError) and never a model that computes NaN."""
    values = {**CONFIG, **overrides}
    try:
        config = fastbert.BertConfig.from_dict(values)
    except ValueError as err:
        assert any(key in str(err) for key in overrides), (overrides, err)
        return
    model = fastbert.BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, min(5, config.max_position_embeddings)))
    with torch.no_grad():
        out = model(ids).last_hidden_state
    assert torch.isfinite(out).all(), overrides


def test_a_decoder_bert_is_refused(tmp_path):
    """transformers runs a BERT whose config says is_decoder with causal attention (cross-attention
    too with add_cross_attention); it loaded here and ran bidirectionally, 0.03 off, without a word."""
    transformers.logging.set_verbosity_error()
    transformers.BertModel(transformers.BertConfig(**CONFIG, is_decoder=True)).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="BertConfig: is_decoder is true: that BERT is a decoder"):
        fastbert.BertModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BertConfig: add_cross_attention is true: .*cross-attention"):
        fastbert.BertConfig.from_dict({**CONFIG, "add_cross_attention": True})
    assert fastbert.BertConfig.from_dict({**CONFIG, "is_decoder": False, "add_cross_attention": False})


@pytest.mark.parametrize("where", ["encoder", "head"])
def test_non_finite_weight_is_named(tmp_path, where):
    """One NaN in a checkpoint would make every output NaN: it is refused, naming the tensor."""
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    key = "bert.encoder.layer.1.output.dense.weight" if where == "encoder" else "classifier.bias"
    assert key in state, sorted(state)
    state[key][0] = float("nan") if where == "encoder" else float("inf")
    save_file(state, str(path))
    with pytest.raises(ValueError, match=rf"tensor {key} holds NaN or infinite values"):
        heads.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=2)


def test_config_overrides_are_checked_and_reach_extra_keys(tmp_path):
    heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2).save_pretrained(tmp_path)
    model = heads.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=2, classifier_dropout=0.0,
                                                                   hidden_dropout_prob=0.2)
    assert model.dropout_p == 0.0 and model.config.hidden_dropout_prob == 0.2  # classifier_dropout has no field
    with pytest.raises(ValueError, match="hidden_dropout_prob must be a probability"):
        heads.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=2, hidden_dropout_prob=1.5)


def test_sharded_checkpoints_load(tmp_path):
    """transformers shards large models (model.safetensors.index.json + shards; pytorch_model.bin.index.json
    in older releases): they failed with "no model.safetensors or pytorch_model.bin". A shard that lacks a
    tensor its index places there, or a shard that is not there, is named."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIG, num_labels=3)).eval()
    hf.save_pretrained(str(tmp_path / "st"), max_shard_size="20KB")
    assert (tmp_path / "st" / "model.safetensors.index.json").exists() and not (tmp_path / "st" / "model.safetensors").exists()
    ids, mask = _inputs()
    model = heads.BertForSequenceClassification.from_pretrained(tmp_path / "st").eval()
    with torch.no_grad():
        assert (model(ids, mask).logits - hf(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-5

    bins = tmp_path / "bin"                                             # the same shards as pytorch_model-*.bin
    bins.mkdir()
    (bins / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    renamed = {name: name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for name in set(index["weight_map"].values())}
    for name, new in renamed.items():
        torch.save(load_file(str(tmp_path / "st" / name)), bins / new)
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    again = heads.BertForSequenceClassification.from_pretrained(bins).eval()
    with torch.no_grad():
        assert torch.equal(again(ids, mask).logits, model(ids, mask).logits)

    shard = index["weight_map"]["classifier.weight"]
    state = torch.load(bins / shard, weights_only=True)
    del state["classifier.weight"]
    torch.save(state, bins / shard)
    with pytest.raises(ValueError, match=rf"shard {bins / shard} lacks tensors .*: classifier\.weight"):
        heads.BertForSequenceClassification.from_pretrained(bins)
    (bins / shard).unlink()
    with pytest.raises(ValueError, match=rf"names shard '{shard}', which is not a file"):
        heads.BertForSequenceClassification.from_pretrained(bins)
    (bins / "pytorch_model.bin.index.json").write_text("{}")
    with pytest.raises(ValueError, match="pytorch_model.bin.index.json must be JSON with a \"weight_map\""):
        heads.BertForSequenceClassification.from_pretrained(bins)


def test_legacy_layernorm_names_load(tmp_path):
    """Original BERT checkpoints (bert-base-uncased's) name LayerNorm parameters gamma/beta; transformers
    renames them on load. Here they were "missing"/"unexpected"."""
    torch.manual_seed(0)
    model = fastbert.BertModel(fastbert.BertConfig(**CONFIG)).eval()
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in load_file(str(path)).items()}
    assert sum(k.endswith(".gamma") for k in state) == 5
    save_file(state, str(path))
    again = fastbert.BertModel.from_pretrained(tmp_path).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(again(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state)


def test_saved_config_names_the_saved_dtype(tmp_path):
    """transformers loads in the dtype config.json names. A float16 checkpoint's "dtype" was written back
    unchanged after fastbert loaded (float32) and saved it, so transformers cast the float32 weights to
    float16."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**CONFIG)).half().save_pretrained(str(tmp_path / "half"))
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "float16"
    fastbert.BertModel.from_pretrained(tmp_path / "half").save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "float32"
    assert transformers.AutoModel.from_pretrained(str(tmp_path / "ours")).dtype == torch.float32


# -- audit: atomic writes, which file is read, weights_only -------------------------------------------


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A write that fails part way (disk full at the fsync) leaves the previous file whole and no
    .tmp file beside it: checkpoint folders are kept, and each failed save would leave one behind."""
    import os

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_atomic_write_makes_the_data_durable_before_the_rename(tmp_path, monkeypatch):
    """The rename is atomic, but without an fsync of the file first a power cut can leave the new
    name pointing at an empty or partial file (ext4's delayed allocation): the data is synced, then
    renamed."""
    import os
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.atomic_write_bytes(tmp_path / "latest", b"checkpoint-6\n")
    assert [kind for kind, _ in events] == ["fsync", "replace"] and events[0][1] == events[1][1], events
    assert (tmp_path / "latest").read_bytes() == b"checkpoint-6\n"


def test_safetensors_is_read_before_a_pytorch_model_bin_in_the_same_folder(tmp_path):
    """A folder can hold both (an old pytorch_model.bin left beside the model.safetensors a later save
    wrote): transformers reads model.safetensors, and so must we, or the two would load other weights."""
    torch.manual_seed(0)
    model = fastbert.BertModel(fastbert.BertConfig(**CONFIG)).eval()
    model.save_pretrained(tmp_path)
    stale = {k: torch.zeros_like(v) for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    torch.save(stale, tmp_path / "pytorch_model.bin")
    again = fastbert.BertModel.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_pickle_with_code_is_refused_even_where_torch_would_unpickle_it(tmp_path, monkeypatch):
    """weights_only=True must be passed, not left to torch's default: the default is False before
    torch 2.6, and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns it off in any version."""
    fastbert.BertConfig(**CONFIG).to_json(tmp_path / "config.json")
    torch.save({"weights": torch.zeros(2), "payload": print}, tmp_path / "pytorch_model.bin")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="could not be loaded with weights_only=True"):
        fastbert.BertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_mode_the_umask_gives(tmp_path, umask):
    """mkstemp's 0600 reached every saved file (config, weights, tokenizer, metrics): another user
    could not read the model whatever the umask."""
    from fastbert.checkpoint import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o666 & ~umask


def test_saving_never_sets_the_process_umask(tmp_path, monkeypatch):
    """The umask is process-wide and reading it means setting it: a save that read it changed, for
    a moment, the mode of every file another thread created (a private 0600 file came out 0644),
    and two at once could leave the process with 0022 for good. The kernel applies it instead."""
    from fastbert.checkpoint import atomic_write_files

    def no_umask(mask):
        raise AssertionError(f"os.umask({mask:#o}) called while saving")

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", no_umask)
        atomic_write_files(tmp_path, {"a.json": b"{}", "b.bin": b"x"})
        monkeypatch.undo()
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"], "temporary files left behind"


@pytest.mark.parametrize("save", ["task", "encoder"])
def test_a_failed_save_pretrained_keeps_the_previous_model_whole(tmp_path, monkeypatch, save):
    """config.json was renamed in before the weights were written: a full disk then left a config of
    2 labels in float16 beside the old 3-label float32 weights. Both files are written first now."""
    old = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=3)
    (old if save == "task" else old.bert).save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2).half()
    calls = []

    def full_on_the_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_on_the_second_file)
    with pytest.raises(OSError, match="No space left"):
        (new if save == "task" else new.bert).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
