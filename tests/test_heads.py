"""Task heads against transformers' classes of the same names: logits, losses and checkpoints both ways."""
import json

import pytest
import torch
import transformers

import fastbert
from fastbert import heads

CONFIG = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=24)


def _batch():
    torch.manual_seed(5)
    ids = torch.randint(1, 120, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 9:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


CASES = [
    (lambda c: heads.BertForSequenceClassification(c, num_labels=3), transformers.BertForSequenceClassification,
     dict(num_labels=3), lambda: {"labels": torch.tensor([0, 2, 1])}),
    (lambda c: heads.BertForSequenceClassification(c, num_labels=1), transformers.BertForSequenceClassification,
     dict(num_labels=1), lambda: {"labels": torch.tensor([0.5, 4.2, 3.0])}),
    (lambda c: heads.BertForTokenClassification(c, num_labels=5), transformers.BertForTokenClassification,
     dict(num_labels=5), lambda: {"labels": torch.randint(0, 5, (3, 11)).masked_fill(torch.rand(3, 11) < 0.3, -100)}),
    (lambda c: heads.BertForQuestionAnswering(c), transformers.BertForQuestionAnswering,
     dict(), lambda: {"start_positions": torch.tensor([1, 3, 0]), "end_positions": torch.tensor([2, 5, 0])}),
]


def _assert_same_logits_and_loss(ours, theirs, batch):
    """Our head's output against transformers' (QA: its start/end logits stacked as our (B, S, 2)),
    at real tokens only for per-token logits."""
    logits_b = (torch.stack([theirs.start_logits, theirs.end_logits], -1) if hasattr(theirs, "start_logits")
                else theirs.logits)
    real = batch["attention_mask"].bool()
    diff = (ours.logits - logits_b).abs()
    assert (diff[real] if diff.dim() > 2 else diff).max() <= 1e-5
    assert abs(ours.loss.item() - theirs.loss.item()) <= 1e-5


@pytest.mark.parametrize("make_ours, hf_class, hf_kwargs, make_targets", CASES)
def test_head_matches_transformers_both_ways(tmp_path, make_ours, hf_class, hf_kwargs, make_targets):
    torch.manual_seed(0)
    ours = make_ours(fastbert.BertConfig(**CONFIG)).eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs = hf_class.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager", **hf_kwargs).eval()
    batch, targets = _batch(), make_targets()
    with torch.no_grad():
        a = ours(**batch, **targets)
        b = theirs(**batch, **targets)
    _assert_same_logits_and_loss(a, b, batch)

    theirs.save_pretrained(str(tmp_path / "theirs"))
    again = type(ours).from_pretrained(tmp_path / "theirs").eval()
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, a.logits, atol=1e-6)


@pytest.mark.parametrize("make_ours, hf_class, hf_kwargs, make_targets", CASES)
def test_outputs_read_as_transformers_outputs_are_read(tmp_path, make_ours, hf_class, hf_kwargs, make_targets):
    """Code written for transformers' outputs: by position over the fields that are set (out[0] is the
    loss with targets, the logits without; QA: start_logits then end_logits), by name, to_tuple() and
    tuple unpacking; a name that is None or missing is a KeyError, as in a ModelOutput."""
    torch.manual_seed(0)
    ours = make_ours(fastbert.BertConfig(**CONFIG)).eval()
    ours.save_pretrained(tmp_path)
    theirs = hf_class.from_pretrained(str(tmp_path), attn_implementation="eager", **hf_kwargs).eval()
    batch, targets = _batch(), make_targets()
    real = batch["attention_mask"].bool()[..., None]
    for given in (targets, {}):
        with torch.no_grad():
            a, b = ours(**batch, **given), theirs(**batch, **given)
        assert len(a.to_tuple()) == len(b.to_tuple()) and len(a[:]) == len(b[:])
        for x, y in zip(a.to_tuple(), b.to_tuple()):
            if x.dim() > 1 and x.shape[1] == real.shape[1]:  # per-token logits: at real tokens (padding differs)
                keep = real.view(*real.shape[:2], *[1] * (x.dim() - 2))
                x, y = x * keep, y * keep
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        first, *rest = a
        assert torch.equal(first, a[0]) and len(rest) == len(a.to_tuple()) - 1
        for name in ("logits", "start_logits", "end_logits", "loss"):
            if getattr(b, name, None) is not None:
                assert torch.equal(a[name], getattr(a, name))
            elif not (name == "logits" and isinstance(a, heads.QuestionAnsweringOutput)):   # ours has (B, S, 2) too
                with pytest.raises(KeyError):
                    a[name]
    if isinstance(a, heads.QuestionAnsweringOutput):
        assert torch.equal(torch.stack([a.start_logits, a.end_logits], -1), a.logits)


def test_encoder_output_reads_by_position_and_name():
    model = fastbert.BertModel(fastbert.BertConfig(**CONFIG)).eval()
    with torch.no_grad():
        out = model(**_batch())
    hidden, pooled = out
    assert hidden is out[0] is out["last_hidden_state"] and pooled is out[1] is out.pooler_output
    assert out[-1] is pooled and len(out.to_tuple()) == 2


def test_new_head_is_initialised_like_bert():
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification.from_pretrained("default", num_labels=4)
    assert model.classifier.weight.shape == (4, 384)
    assert abs(model.classifier.weight.std().item() - 0.02) < 0.005 and model.classifier.bias.abs().max() == 0
    assert model.config.extra["id2label"]["3"] == "LABEL_3"


def test_labels_recorded_and_reloaded(tmp_path):
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2)
    heads._resolve_labels(model.config, None, ["negative", "positive"])
    model.save_pretrained(tmp_path)
    again = heads.BertForSequenceClassification.from_pretrained(tmp_path)
    assert again.num_labels == 2 and again.config.extra["id2label"] == {"0": "negative", "1": "positive"}
    assert torch.equal(again.classifier.weight, model.classifier.weight)


def test_classifier_dropout_zero_is_kept():
    """classifier_dropout=0.0 means no dropout on the head, as in transformers (it fell back to
    hidden_dropout_prob before); None falls back."""
    config = fastbert.BertConfig(**CONFIG, hidden_dropout_prob=0.2)
    assert heads.BertForTokenClassification(config).dropout_p == 0.2
    config.extra["classifier_dropout"] = 0.0                      # as from_json puts a config.json's key
    assert heads.BertForSequenceClassification(config).dropout_p == 0.0


def test_bad_head_arguments():
    with pytest.raises(ValueError, match="num_labels must be >= 1"):
        heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=0)
    with pytest.raises(ValueError, match="num_labels=3 but 2 label names"):
        heads.BertForSequenceClassification.from_pretrained("default", num_labels=3, labels=["a", "b"])


def test_bad_labels_are_named_before_the_encoder_runs():
    """cross_entropy's own errors name neither the argument nor the head (and on a GPU an
    out-of-range class is a device-side assert)."""
    import fastbert
    from fastbert.heads import BertForSequenceClassification, BertForTokenClassification

    config = fastbert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16)
    ids = torch.randint(1, 50, (2, 5))
    cls = BertForSequenceClassification(config, num_labels=3)
    assert cls(ids, labels=torch.tensor([0, 2])).loss is not None
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_labels=3\).*\[0, 5\]"):
        cls(ids, labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"labels must lie in .*\[-1, 0\]"):
        cls(ids, labels=torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="labels must be integer class ids"):
        cls(ids, labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must be shaped \(2,\)"):
        cls(ids, labels=torch.tensor([0, 1, 2]))
    reg = BertForSequenceClassification(config, num_labels=1)
    assert reg(ids, labels=torch.tensor([0.5, 4.0])).loss is not None
    with pytest.raises(TypeError, match="regression head"):
        reg(ids, labels=torch.tensor([1, 2]))
    tag = BertForTokenClassification(config, num_labels=4)
    labels = torch.full((2, 5), -100)
    labels[:, 1] = 3
    assert tag(ids, labels=labels).loss is not None                     # -100 is ignored, not out of range
    labels[0, 2] = 4
    with pytest.raises(ValueError, match=r"num_labels=4.*\[0, 4\]"):
        tag(ids, labels=labels)


def test_regression_labels_and_qa_positions_shaped_b_by_1():
    """transformers takes (B, 1) regression labels and answer positions. Regression labels of that
    shape were accepted here but broadcast against the (B,) predictions into a (B, B) loss; (B, 1)
    positions raised cross_entropy's "multi-target not supported"."""
    torch.manual_seed(0)
    batch = _batch()
    reg = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=1).eval()
    labels = torch.tensor([0.5, 4.2, 3.0])
    with torch.no_grad():
        assert reg(**batch, labels=labels[:, None]).loss.item() == pytest.approx(reg(**batch, labels=labels).loss.item())
    qa = heads.BertForQuestionAnswering(fastbert.BertConfig(**CONFIG)).eval()
    start, end = torch.tensor([1, 30, -2]), torch.tensor([2, 40, 0])     # out of range: clamped and ignored
    with torch.no_grad():
        expected = qa(**batch, start_positions=start, end_positions=end).loss.item()
        assert qa(**batch, start_positions=start[:, None], end_positions=end[:, None]).loss.item() == pytest.approx(expected)


def test_saved_heads_load_in_transformers_auto_classes(tmp_path):
    """transformers sizes a head from config.json's id2label and picks the loss by problem_type. A head
    built from a bare config saved no id2label (AutoModelForSequenceClassification then built 2 labels
    and refused the 3-label weights); a QA head from a 3-label classifier kept its id2label (a 3-output
    qa_outputs there); a regression head from a classifier kept problem_type
    "single_label_classification" (a config.json transformers refuses with num_labels=1)."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    batch = _batch()
    ours = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=3).eval()
    ours.save_pretrained(tmp_path / "cls")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "cls"), attn_implementation="eager").eval()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        a, b = ours(**batch, labels=labels), theirs(**batch, labels=labels)
    assert (a.logits - b.logits).abs().max() <= 1e-5 and abs(a.loss.item() - b.loss.item()) <= 1e-5
    theirs.save_pretrained(str(tmp_path / "theirs"))                 # with problem_type single_label_classification

    with pytest.warns(UserWarning, match="do not fit"):
        qa = heads.BertForQuestionAnswering.from_pretrained(tmp_path / "theirs")
    qa.save_pretrained(tmp_path / "qa")
    assert transformers.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "qa")).qa_outputs.out_features == 2

    with pytest.warns(UserWarning, match="problem_type 'single_label_classification' is not this head's loss"), \
            pytest.warns(UserWarning, match="do not fit"):                    # the 3-label head, too
        reg = heads.BertForSequenceClassification.from_pretrained(tmp_path / "theirs", num_labels=1).eval()
    reg.save_pretrained(tmp_path / "reg")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "reg"), attn_implementation="eager").eval()
    labels = torch.tensor([0.5, 4.2, 3.0])
    with torch.no_grad():
        a, b = reg(**batch, labels=labels), theirs(**batch, labels=labels)
    assert (a.logits - b.logits).abs().max() <= 1e-5 and abs(a.loss.item() - b.loss.item()) <= 1e-5


def test_a_config_with_num_labels_and_no_id2label_sizes_the_head_as_in_transformers(tmp_path):
    """A hand-written config.json may give num_labels alone: transformers builds that many labels
    and loads the head; fastbert built 2 and replaced the fine-tuned 3-label head by a random one."""
    import json
    import warnings

    transformers.logging.set_verbosity_error()
    ours = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=3)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["id2label"], config["label2id"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_labels": 3}))
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # the head fits: no warning
        again = heads.BertForSequenceClassification.from_pretrained(tmp_path)
    assert again.num_labels == theirs.num_labels == 3
    assert torch.equal(again.classifier.weight, ours.classifier.weight)
    again.save_pretrained(tmp_path / "again")                          # id2label says it from here on
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "num_labels" not in saved and len(saved["id2label"]) == 3
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_labels": "3"}))
    with pytest.raises(ValueError, match="config.json's num_labels must be a positive int, got '3'"):
        heads.BertForSequenceClassification.from_pretrained(tmp_path)


def test_head_weights_that_do_not_fit_are_reported(tmp_path):
    """A fine-tuned head of another shape (num_labels other than the checkpoint's), half a head or
    another task's head was replaced by a random one without a word; transformers says so too."""
    from safetensors.torch import load_file, save_file

    heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=3).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=rf"checkpoint {tmp_path}: its head weights \(classifier\.bias \(3,\), "
                                         r"classifier\.weight \(3, 32\)\) do not fit .*classifier\.weight \(5, 32\)"):
        model = heads.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    assert model.classifier.bias.abs().max() == 0
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["classifier.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match=r"its head weights \(classifier\.weight \(3, 32\)\) do not fit"):
        heads.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # a head that fits: silent
        heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2).save_pretrained(tmp_path / "b")
        assert heads.BertForSequenceClassification.from_pretrained(tmp_path / "b").head_loaded
    with pytest.warns(heads.NewHeadWarning, match="has no head weights"):  # none at all: said, as transformers does
        heads.BertForSequenceClassification.from_pretrained("default", num_labels=3)


# -- audit: initialisation range and training-mode dropout ------------------------------------------


@pytest.mark.parametrize("make", [lambda c: heads.BertForSequenceClassification(c, num_labels=3),
                                  lambda c: heads.BertForTokenClassification(c, num_labels=3),
                                  heads.BertForQuestionAnswering], ids=["sequence", "token", "qa"])
def test_new_head_std_is_the_configs_initializer_range(make):
    """BERT (transformers' _init_weights) draws a new head from normal(0, initializer_range): a config
    with another range gets that std, not a hard-coded 0.02 (the default model's range, so
    test_new_head_is_initialised_like_bert cannot tell the two apart). 64-96 draws of std 0.5 here."""
    torch.manual_seed(0)
    model = make(fastbert.BertConfig(**CONFIG, initializer_range=0.5))
    weight = model.head.weight
    assert 0.25 < weight.std().item() < 0.75 and abs(weight.mean().item()) < 0.25, weight.std().item()   # 0.02: far off
    assert model.head.bias.abs().max() == 0


@pytest.mark.parametrize("make_ours, hf_class, hf_kwargs, make_targets", CASES[:1] + CASES[2:],
                         ids=["sequence", "token", "qa"])
def test_training_mode_head_dropout_is_transformers(tmp_path, make_ours, hf_class, hf_kwargs, make_targets):
    """In training, transformers drops out the encoder output before the classifier of sequence and
    token classification (p = classifier_dropout, else hidden_dropout_prob) and applies none before
    qa_outputs. With the encoder's own dropout off and the head's at 0.5, one seed draws the same
    mask in both: the logits and loss must agree, so a head that skips its dropout (tagging) or adds
    one (question answering) shows. Eval-mode tests cannot see either."""
    config = fastbert.BertConfig(**CONFIG, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config.extra["classifier_dropout"] = 0.5
    torch.manual_seed(0)
    ours = make_ours(config).train()
    ours.save_pretrained(tmp_path)
    theirs = hf_class.from_pretrained(str(tmp_path), attn_implementation="eager", **hf_kwargs).train()
    batch, targets = _batch(), make_targets()
    torch.manual_seed(3)
    a = ours(**batch, **targets)
    torch.manual_seed(3)
    b = theirs(**batch, **targets)
    _assert_same_logits_and_loss(a, b, batch)
    with torch.no_grad():
        dropped = not torch.allclose(ours.eval()(**batch).logits, a.logits, atol=1e-6)
    assert dropped == (hf_class is not transformers.BertForQuestionAnswering)   # the check above saw dropout


def test_from_pretrained_returns_the_model_in_eval_mode_as_transformers_does(tmp_path):
    """transformers' from_pretrained calls eval(); a model left training ran dropout, so the README's
    first example gave other embeddings on every call (2.3 apart at MiniLM's 0.1)."""
    encoder = fastbert.BertModel.from_pretrained("default")
    assert not encoder.training
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(encoder(ids).last_hidden_state, encoder(ids).last_hidden_state)
    head = heads.BertForSequenceClassification.from_pretrained("default", num_labels=2)
    assert not any(m.training for m in head.modules())
    head.save_pretrained(tmp_path)
    assert not heads.BertForSequenceClassification.from_pretrained(tmp_path).training


def test_non_finite_regression_labels_are_named():
    """A NaN target made the loss NaN, which the Trainer blamed on the learning rate."""
    reg = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=1)
    ids = torch.randint(1, CONFIG["vocab_size"], (2, 5))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"regression head \(num_labels=1\) must be finite, got (nan|inf)"):
            reg(ids, labels=torch.tensor([bad, 1.0]))


@pytest.mark.parametrize("value", [True, 1.0, 1.5, -0.5, float("nan"), "0.1"])
def test_bad_classifier_dropout_is_refused_when_loaded(value):
    """True ran as p=1 (the head saw zeros, loss ln 2), 1.5 and NaN failed at the first forward in
    torch's words, "0.1" as a str comparison."""
    with pytest.raises(ValueError, match="classifier_dropout must be a probability in"):
        heads.BertForSequenceClassification.from_pretrained("default", num_labels=2, classifier_dropout=value)


def test_heads_name_input_ids_that_are_not_a_batch_of_ids():
    """The heads read input_ids' shape to check labels before the encoder checks the ids."""
    config = fastbert.BertConfig(**CONFIG)
    cases = [(heads.BertForSequenceClassification(config, 3), dict(labels=torch.tensor([0]))),
             (heads.BertForTokenClassification(config, 3), dict(labels=torch.tensor([[0, 1, 2]]))),
             (heads.BertForQuestionAnswering(config), dict(start_positions=torch.tensor([0]),
                                                           end_positions=torch.tensor([1])))]
    for model, targets in cases:
        with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got list"):
            model([[1, 2, 3]], **targets)
        with pytest.raises(ValueError, match=r"input_ids must be \(batch, seqlen\), got shape \(3,\)"):
            model(torch.tensor([1, 2, 3]), **targets)


def test_num_labels_and_label_names_are_checked(tmp_path):
    config = fastbert.BertConfig(**CONFIG)
    for make in (heads.BertForSequenceClassification, heads.BertForTokenClassification):
        for bad in (2.5, 2.0, True, "3"):
            with pytest.raises(TypeError, match="num_labels must be an int"):
                make(config, bad)
    with pytest.raises(TypeError, match="num_labels must be an int"):
        heads.BertForSequenceClassification.from_pretrained("default", num_labels=2.5)
    # "abc" gave three labels a, b, c; repeated names collapsed label2id
    for bad in ("abc", ["a", "a"], [1, 2]):
        with pytest.raises(ValueError, match="labels must be a list of distinct label names"):
            heads.BertForSequenceClassification.from_pretrained("default", labels=bad)
    model = heads.BertForSequenceClassification(config, 2)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for bad in (5, "abc", ["x", "y"]):
        (tmp_path / "config.json").write_text(json.dumps({**saved, "id2label": bad}))
        with pytest.raises(ValueError, match="id2label must be an object of label names by id"):
            heads.BertForSequenceClassification.from_pretrained(tmp_path)


def test_an_encoder_saved_alone_is_no_task_model(tmp_path):
    """model.bert.save_pretrained wrote the task model's config (fastbert_task, id2label, architectures
    BertForSequenceClassification), so `fastbert predict` and transformers' Auto classes took the folder
    for a fine-tuned model and ran a new random head on it, silently."""
    from fastbert import tasks

    spec = tasks.TaskSpec(name="x", kind="single", labels=["no", "yes"])
    model = tasks.build_model(spec, "default")        # fine-tuning starts from an encoder: no warning here
    assert not model.head_loaded
    model.save_pretrained(tmp_path / "task")
    loaded, _ = tasks.load_finetuned(tmp_path / "task")
    assert loaded.head_loaded
    model.bert.save_pretrained(tmp_path / "encoder")
    saved = json.loads((tmp_path / "encoder" / "config.json").read_text())
    assert saved["architectures"] == ["BertModel"]
    assert not {"fastbert_task", "id2label", "label2id", "problem_type"} & saved.keys()
    assert "fastbert_task" in model.config.extra                        # the task model's config is untouched
    with pytest.raises(ValueError, match="was not saved by `fastbert finetune`"):
        tasks.load_finetuned(tmp_path / "encoder")
    with pytest.warns(heads.NewHeadWarning, match="has no head weights: classifier is newly initialised"):
        heads.BertForSequenceClassification.from_pretrained(tmp_path / "encoder", num_labels=2)
    # a task config over encoder-only weights (hand-assembled): refused, not run with a random head
    (tmp_path / "encoder" / "config.json").write_text((tmp_path / "task" / "config.json").read_text())
    with pytest.raises(ValueError, match="holds no classifier weights for its task"):
        tasks.load_finetuned(tmp_path / "encoder")


@pytest.mark.parametrize("make", [heads.BertForSequenceClassification, heads.BertForTokenClassification])
def test_a_loaded_head_follows_its_label_names(tmp_path, make):
    """Labels given in another order than the checkpoint's (fastbert reads a dataset's labels sorted)
    renamed the head's rows without moving them: each label scored as another one."""
    torch.manual_seed(0)
    saved = make(fastbert.BertConfig(**CONFIG), 3)
    saved.config.extra["id2label"] = {"0": "contradiction", "1": "neutral", "2": "entailment"}
    saved.config.extra["label2id"] = {"contradiction": 0, "neutral": 1, "entailment": 2}
    saved.save_pretrained(tmp_path)
    ids = torch.randint(1, CONFIG["vocab_size"], (2, 6))
    before = saved.eval()(ids).logits
    names = ["contradiction", "entailment", "neutral"]                   # sorted, as a TSV's labels are read
    loaded = make.from_pretrained(tmp_path, labels=names)
    after = loaded(ids).logits
    for new, name in enumerate(names):
        old = ["contradiction", "neutral", "entailment"].index(name)
        assert torch.allclose(after[..., new], before[..., old], atol=1e-6), name
    assert loaded.config.extra["id2label"] == {"0": "contradiction", "1": "entailment", "2": "neutral"}
    with pytest.warns(UserWarning, match=r"its head's labels \['contradiction', 'neutral', 'entailment'\] are not"):
        kept = make.from_pretrained(tmp_path, labels=["a", "b", "c"])
    assert torch.allclose(kept(ids).logits, before, atol=1e-6)                # rows kept in order
