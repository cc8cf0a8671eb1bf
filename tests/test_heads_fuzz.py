"""The task heads' losses against transformers' BertFor* classes on the same weights, on generated
targets: class labels with -100 among them (all of them, too), regression scores, answer positions
inside, at and past the window's end and negative; and the degenerate targets a real run can hand
a head (other integer dtypes, (B, 1) shapes, floats for classes, positions of the wrong kind).

Where fastbert differs from transformers on purpose:
- a regression head (num_labels=1) refuses integer labels (transformers takes them into its MSE):
  class ids given to a head loaded as regression by mistake would train silently on squared error;
- out-of-range class labels are a ValueError naming the range (transformers: IndexError on the CPU,
  a device-side assert on a GPU);
- int32/int16/uint8 class labels and answer positions are taken as class ids (cross_entropy
  refuses int32 with "expected target dtype to be Long or Byte", and so does transformers).
Where every target is ignored the loss is NaN in both (mean over nothing); Trainer skips such a
batch (train.loss_items counts no term).
"""
import math

import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st

import fastbert
from fastbert import heads

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
CONFIG = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32, max_position_embeddings=16)
SEQ = 9


def _pair(tmp_path_factory, make_ours, hf_class, **hf_kwargs):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    ours = make_ours(fastbert.BertConfig(**CONFIG)).eval()
    folder = tmp_path_factory.mktemp(type(ours).__name__)
    ours.save_pretrained(folder)
    theirs = hf_class.from_pretrained(str(folder), attn_implementation="eager", **hf_kwargs).eval()
    return ours, theirs


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return _pair(tmp_path_factory, lambda c: heads.BertForSequenceClassification(c, num_labels=3),
                 transformers.BertForSequenceClassification, num_labels=3)


@pytest.fixture(scope="module")
def regressor(tmp_path_factory):
    return _pair(tmp_path_factory, lambda c: heads.BertForSequenceClassification(c, num_labels=1),
                 transformers.BertForSequenceClassification, num_labels=1)


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return _pair(tmp_path_factory, lambda c: heads.BertForTokenClassification(c, num_labels=4),
                 transformers.BertForTokenClassification, num_labels=4)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    return _pair(tmp_path_factory, heads.BertForQuestionAnswering, transformers.BertForQuestionAnswering)


@st.composite
def batches(draw, max_batch=4):
    """input_ids, attention_mask (padding at the end of some rows; batch 1 included)."""
    b = draw(st.integers(1, max_batch))
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(1, 63), min_size=SEQ, max_size=SEQ),
                                     min_size=b, max_size=b)))
    lengths = draw(st.lists(st.integers(2, SEQ), min_size=b, max_size=b))
    mask = (torch.arange(SEQ)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def _losses(pair, batch, **targets):
    ours, theirs = pair
    with torch.no_grad():
        return ours(**batch, **targets).loss.item(), theirs(**batch, **targets).loss.item()


def _agree(a, b):
    if math.isnan(b):
        return math.isnan(a)
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


@SETTINGS
@given(batch=batches(), data=st.data())
def test_classification_loss_matches_transformers(classifier, batch, data):
    b = len(batch["input_ids"])
    labels = torch.tensor(data.draw(st.lists(st.sampled_from([-100, 0, 1, 2]), min_size=b, max_size=b)))
    a, t = _losses(classifier, batch, labels=labels)
    assert _agree(a, t), (labels, a, t)
    assert math.isnan(a) == bool((labels == -100).all())        # every label ignored: NaN in both
    a2, t2 = _losses(classifier, batch, labels=labels[:, None])   # (B, 1), as transformers takes it
    assert _agree(a2, t) and _agree(t2, t)


@SETTINGS
@given(batch=batches(), data=st.data())
def test_regression_loss_matches_transformers(regressor, batch, data):
    b = len(batch["input_ids"])
    scores = torch.tensor(data.draw(st.lists(st.floats(0, 5, width=32), min_size=b, max_size=b)))
    a, t = _losses(regressor, batch, labels=scores)
    assert _agree(a, t)
    a2, t2 = _losses(regressor, batch, labels=scores[:, None])
    assert _agree(a2, t) and _agree(t2, t)


@SETTINGS
@given(batch=batches(), data=st.data())
def test_tagging_loss_matches_transformers_with_ignored_labels(tagger, batch, data):
    b = len(batch["input_ids"])
    labels = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([-100, -100, 0, 1, 2, 3]), min_size=SEQ,
                                                      max_size=SEQ), min_size=b, max_size=b)))
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)   # padding ignored, as collate pads
    a, t = _losses(tagger, batch, labels=labels)
    assert _agree(a, t), (labels, a, t)
    assert math.isnan(a) == bool((labels == -100).all())


@SETTINGS
@given(batch=batches(), data=st.data())
def test_qa_loss_matches_transformers_positions_out_of_range_included(reader, batch, data):
    """transformers clamps positions to [0, S] and ignores S: a position past the window is ignored,
    a negative one becomes [CLS]. Both ignored for every row: NaN in both."""
    b = len(batch["input_ids"])
    positions = st.lists(st.integers(-3, SEQ + 4), min_size=b, max_size=b)
    start, end = torch.tensor(data.draw(positions)), torch.tensor(data.draw(positions))
    a, t = _losses(reader, batch, start_positions=start, end_positions=end)
    assert _agree(a, t), (start, end, a, t)
    a2, _ = _losses(reader, batch, start_positions=start[:, None], end_positions=end[:, None])
    assert _agree(a2, t)


def test_other_integer_dtypes_are_class_ids(classifier, tagger, reader):
    """int32 labels passed _check_labels ("integer class ids") and then failed in cross_entropy with
    "expected target dtype to be Long or Byte, but got Int" (transformers fails the same way)."""
    batch = {"input_ids": torch.randint(1, 64, (3, SEQ))}

    def ours(pair, **targets):
        with torch.no_grad():
            return pair[0](**batch, **targets).loss.item()

    labels = torch.tensor([0, 2, 1])
    expected = _losses(classifier, batch, labels=labels)[1]
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert _agree(ours(classifier, labels=labels.to(dtype)), expected), dtype
    tags = torch.randint(0, 4, (3, SEQ))
    assert _agree(ours(tagger, labels=tags.int()), _losses(tagger, batch, labels=tags)[1])
    start, end = torch.tensor([1, 3, 20]), torch.tensor([2, 5, 0])
    expected = _losses(reader, batch, start_positions=start, end_positions=end)[1]
    assert _agree(ours(reader, start_positions=start.int(), end_positions=end.int()), expected)


def test_positions_of_the_wrong_kind_are_named(reader):
    """Answer positions had no check: float positions, (B, 2) or a wrong batch size raised
    cross_entropy's messages, which name neither the argument nor the head."""
    ours, _ = reader
    ids = torch.randint(1, 64, (3, SEQ))
    good = torch.tensor([1, 2, 3])
    with pytest.raises(TypeError, match=r"start_positions must be integer token indices, got torch.float32"):
        ours(ids, start_positions=good.float(), end_positions=good)
    with pytest.raises(TypeError, match=r"end_positions must be integer token indices, got torch.bool"):
        ours(ids, start_positions=good, end_positions=good > 1)
    with pytest.raises(ValueError, match=r"end_positions must be shaped \(3,\) or \(3, 1\), got \(3, 2\)"):
        ours(ids, start_positions=good, end_positions=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"start_positions must be shaped \(3,\) or \(3, 1\), got \(1,\)"):
        ours(ids, start_positions=good[:1], end_positions=good)
    with pytest.raises(TypeError, match="start_positions must be a tensor, got list"):
        ours(ids, start_positions=[1, 2, 3], end_positions=good)


def test_float_labels_for_classes_and_int_labels_for_regression(classifier, regressor, tagger):
    ids = torch.randint(1, 64, (2, SEQ))
    with pytest.raises(TypeError, match="labels must be integer class ids, got torch.float32"):
        classifier[0](ids, labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="labels must be integer class ids, got torch.float32"):
        tagger[0](ids, labels=torch.zeros(2, SEQ))
    with pytest.raises(TypeError, match="regression head"):        # on purpose: transformers takes them
        regressor[0](ids, labels=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_labels=3\).*\[0, 3\]"):
        classifier[0](ids, labels=torch.tensor([0, 3]))
    # uint8 wraps -100 to 156: a label 156 passed the check as "ignored" and reached cross_entropy
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_labels=3\).*\[1, 156\]"):
        classifier[0](ids, labels=torch.tensor([156, 1], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"labels must be shaped \(2,\)"):
        classifier[0](ids, labels=torch.tensor([[0, 1], [1, 0]]))
