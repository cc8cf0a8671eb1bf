"""fastbert.metrics against the field's own implementations on generated inputs: sklearn
(accuracy_score, f1_score, matthews_corrcoef), scipy.stats (pearsonr, spearmanr, ties included) and
the official SQuAD v1.1 evaluate script (restated below), including the degenerate inputs a real run
produces: one example, one class, constant predictions or gold scores, NaN predictions.

Where a value is undefined the reference libraries disagree on what to return, and so do we, on
purpose (fastbert/metrics.py's docstring): Pearson/Spearman -> NaN as scipy (written as null by
metrics.to_json), MCC -> 0.0 and F1 -> 0.0 as sklearn (zero_division=0); no values at all -> ValueError.
"""
import json
import math
import string
import warnings

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
from hypothesis import given, settings, strategies as st

from fastbert import metrics
from test_metrics import _official_f1, _official_normalize

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)  # the same cases on every run


def _quiet(fn, *args, **kwargs):
    """sklearn/scipy warn on undefined values (UndefinedMetricWarning, ConstantInputWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@st.composite
def class_ids(draw, max_classes=5):
    """(preds, labels): 1 to 40 examples; often a single class on one side, often the preds a noisy
    copy of the labels."""
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, max_classes))
    labels = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    how = draw(st.sampled_from(["random", "noisy", "constant", "equal"]))
    if how == "random":
        preds = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    elif how == "noisy":
        preds = [draw(st.integers(0, k - 1)) if draw(st.booleans()) else y for y in labels]
    elif how == "constant":
        preds = [draw(st.integers(0, k - 1))] * n
    else:
        preds = list(labels)
    return np.array(preds), np.array(labels)


@SETTINGS
@given(case=class_ids())
def test_accuracy_macro_f1_and_mcc_match_sklearn(case):
    preds, labels = case
    assert metrics.accuracy(preds, labels) == pytest.approx(sklearn.metrics.accuracy_score(labels, preds), abs=1e-12)
    assert metrics.f1_score(preds, labels, average="macro") == pytest.approx(
        _quiet(sklearn.metrics.f1_score, labels, preds, average="macro", zero_division=0), abs=1e-12)
    # sklearn returns 0.0 where MCC is undefined (one class predicted, or one in the gold labels)
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(
        _quiet(sklearn.metrics.matthews_corrcoef, labels, preds), abs=1e-12)


@SETTINGS
@given(case=class_ids(max_classes=3), pos_label=st.sampled_from([0, 1]))
def test_binary_f1_matches_sklearn_or_refuses_as_it_does(case, pos_label):
    """Binary F1 over three classes is one class's F1 given as if it were the task's: sklearn refuses
    it ("Target is multiclass but average='binary'"), and so do we now (it was computed silently)."""
    preds, labels = case
    try:
        expected = _quiet(sklearn.metrics.f1_score, labels, preds, pos_label=pos_label, zero_division=0)
    except ValueError:
        with pytest.raises(ValueError, match="binary|pos_label"):
            metrics.f1_score(preds, labels, pos_label=pos_label)
        return
    assert metrics.f1_score(preds, labels, pos_label=pos_label) == pytest.approx(expected, abs=1e-12)


def test_binary_f1_refuses_more_than_two_classes():
    with pytest.raises(ValueError, match=r"binary F1 needs at most 2 classes.*\[0, 1, 2\].*average='macro'"):
        metrics.f1_score([0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match=r"pos_label=1 is not one of the classes \[0, 2\]"):
        metrics.f1_score([0, 2], [2, 0])
    assert metrics.f1_score([0, 0], [0, 0]) == 0.0   # no positive anywhere: 0, as sklearn's zero_division=0


# --- correlations ---------------------------------------------------------------------------------

# STS-B gold scores are multiples of 0.2 in [0, 5] (many ties); predictions are float32 regression outputs.
gold_scores = st.integers(0, 25).map(lambda i: i / 5.0)
float32s = st.floats(-5, 10, width=32, allow_nan=False)


@st.composite
def score_pairs(draw):
    n = draw(st.integers(2, 40))
    gold = draw(st.lists(gold_scores, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["random", "ties", "constant_pred", "constant_gold", "linear"]))
    if kind == "random":
        pred = draw(st.lists(float32s, min_size=n, max_size=n))
    elif kind == "ties":
        pred = draw(st.lists(st.sampled_from([0.5, 1.25, 3.0]), min_size=n, max_size=n))
    elif kind == "constant_pred":
        pred = [draw(float32s)] * n
    elif kind == "constant_gold":
        gold = [draw(gold_scores)] * n
        pred = draw(st.lists(float32s, min_size=n, max_size=n))
    else:
        pred = [2 * g - 1 for g in gold]
    return np.array(pred, dtype=np.float32), gold


def _same(ours, theirs):
    if math.isnan(theirs):
        return math.isnan(ours)
    return ours == pytest.approx(theirs, abs=1e-9)


@SETTINGS
@given(case=score_pairs())
def test_pearson_and_spearman_match_scipy_ties_and_constants_included(case):
    """scipy gives NaN where a side is constant (ConstantInputWarning): so must we, exactly there.
    A constant gold list like [0.2] * 3 used to score about 1e-17 instead: numpy's mean of three
    0.2s is not 0.2, so the deviations were rounding noise, not zero."""
    pred, gold = case
    p64 = pred.astype(np.float64)
    assert _same(metrics.pearson(pred, gold), _quiet(scipy.stats.pearsonr, p64, gold)[0])
    assert _same(metrics.spearman(pred, gold), _quiet(scipy.stats.spearmanr, p64, gold)[0])


@pytest.mark.parametrize("value", [0.1, 0.2, 0.7, 1 / 3, 3.8])
@pytest.mark.parametrize("n", [3, 7, 100, 1500])
def test_constant_float64_values_are_undefined_not_rounding_noise(value, n):
    rng = np.random.default_rng(n)
    varied = rng.normal(size=n)
    for x, y in [([value] * n, varied), (varied, [value] * n)]:
        assert math.isnan(metrics.pearson(x, y)), (value, n, metrics.pearson(x, y))
        assert math.isnan(metrics.spearman(x, y))


def test_nan_predictions_give_nan_as_scipy():
    """A diverged regression model predicts NaN: Spearman ranked each NaN as a value of its own and
    gave a finite correlation (0.4 here); scipy propagates NaN, as our Pearson does."""
    pred, gold = [1.0, float("nan"), 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]
    assert math.isnan(scipy.stats.spearmanr(pred, gold)[0]) and math.isnan(scipy.stats.pearsonr(pred, gold)[0])
    assert math.isnan(metrics.spearman(pred, gold))
    assert math.isnan(metrics.pearson(pred, gold))
    assert math.isnan(metrics.spearman(gold, pred))


def test_undefined_metrics_are_null_in_json():
    scores = metrics.glue_metrics("stsb", [2.5, 2.5, 2.5], [1.0, 2.0, 4.0])
    assert math.isnan(scores["pearson"]) and math.isnan(scores["spearman"])
    text = metrics.to_json({"epoch": 1, **scores, "history": [scores]})
    assert json.loads(text) == {"epoch": 1, "pearson": None, "spearman": None,
                                "history": [{"pearson": None, "spearman": None}]}
    # the same constant predictions on a classification task: MCC 0 (sklearn), a number in the JSON
    cola = metrics.glue_metrics("cola", [1, 1, 1], [1, 0, 1])
    assert cola == {"matthews": 0.0} == {"matthews": sklearn.metrics.matthews_corrcoef([1, 0, 1], [1, 1, 1])}
    with pytest.raises(ValueError):
        json.dumps({"x": float("nan")}, allow_nan=False)   # what to_json's allow_nan=False guards


def test_single_example_and_empty_inputs():
    assert metrics.accuracy([1], [1]) == sklearn.metrics.accuracy_score([1], [1]) == 1.0
    assert metrics.matthews_corrcoef([1], [0]) == _quiet(sklearn.metrics.matthews_corrcoef, [0], [1]) == 0.0
    assert metrics.f1_score([1], [1]) == sklearn.metrics.f1_score([1], [1]) == 1.0
    for fn in (metrics.accuracy, metrics.f1_score, metrics.matthews_corrcoef, metrics.token_accuracy):
        with pytest.raises(ValueError, match="no predictions"):
            fn([], [])
    for fn in (metrics.pearson, metrics.spearman):   # scipy raises too: "at least 2"
        with pytest.raises(ValueError, match="at least 2"):
            fn([1.0], [2.0])
        with pytest.raises(ValueError, match="at least 2"):
            fn([], [])


@SETTINGS
@given(n=st.integers(1, 30), k=st.integers(2, 6), data=st.data())
def test_token_accuracy_is_sklearn_accuracy_over_the_kept_labels(n, k, data):
    labels = np.array(data.draw(st.lists(st.sampled_from([-100] + list(range(k))), min_size=n, max_size=n)))
    preds = np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    keep = labels != -100
    if not keep.any():   # every position ignored (padding, special tokens): nothing to score
        with pytest.raises(ValueError, match="nothing to score"):
            metrics.token_accuracy(preds, labels)
        return
    expected = sklearn.metrics.accuracy_score(labels[keep], preds[keep])
    assert metrics.token_accuracy(preds, labels) == pytest.approx(expected, abs=1e-12)
    logits = np.eye(k)[preds]                      # (n, k) one-hot logits: argmax taken
    assert metrics.token_accuracy(logits, labels) == pytest.approx(expected, abs=1e-12)


# --- SQuAD v1.1: the official evaluate-v1.1.py, restated ------------------------------------------

# _official_normalize and _official_f1: evaluate-v1.1.py's, copied once in test_metrics.py


def _official_em(prediction, ground_truth):
    return _official_normalize(prediction) == _official_normalize(ground_truth)


def _official_max(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def _official_evaluate(dataset, predictions):
    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue   # the script prints "Unanswered question ... will receive score 0."
                ground_truths = list(map(lambda x: x["text"], qa["answers"]))
                prediction = predictions[qa["id"]]
                exact_match += _official_max(_official_em, prediction, ground_truths)
                f1 += _official_max(_official_f1, prediction, ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


# Words and separators where normalisers go wrong: articles inside words and next to punctuation,
# Unicode punctuation (not in string.punctuation: kept, as the official script keeps it), Unicode
# whitespace and case (İ lowers to two code points), accents, digits.
PIECES = ["the", "The", "THE", "a", "A", "an", "An", "anthem", "theater", "a.", "(the", "an'", "the-end", "cat",
          "Cat", "Denver", "Broncos", "1973", "U.S.", "İstanbul", "straße", "café", "naïve", "é", "—", "–", "“",
          "”", "«", "»", "…", "’s", "'s", "¿", "¡", "。", "、", "!", "?", ",", ".", "-", "_", "$", "%", "§",
          "\u00a0", "\u2009", "\u3000", "\t", "\n", " ", "  "]
answer_text = st.lists(st.sampled_from(PIECES), max_size=8).map(lambda parts: "".join(
    p if p.isspace() or p in string.punctuation else " " + p for p in parts)) | st.text(max_size=12)


@SETTINGS
@given(text=answer_text)
def test_normalize_answer_is_the_official_one(text):
    assert metrics.normalize_answer(text) == _official_normalize(text)


@SETTINGS
@given(prediction=answer_text, golds=st.lists(answer_text, min_size=1, max_size=4))
def test_squad_em_and_f1_are_the_official_max_over_gold_answers(prediction, golds):
    assert metrics.squad_exact_match(prediction, golds) == float(_official_max(_official_em, prediction, golds))
    assert metrics.squad_f1(prediction, golds) == pytest.approx(_official_max(_official_f1, prediction, golds),
                                                                abs=1e-12)


@SETTINGS
@given(questions=st.lists(st.tuples(st.one_of(st.none(), answer_text), st.lists(answer_text, min_size=1,
                                                                                 max_size=3)),
                          min_size=1, max_size=6))
def test_squad_scores_is_the_official_evaluate(questions):
    """None: a question without a prediction (scores 0 and still counts); "" an empty prediction."""
    dataset = [{"paragraphs": [{"qas": [{"id": f"q{i}", "answers": [{"text": g} for g in golds]}
                                        for i, (_, golds) in enumerate(questions)]}]}]
    predictions = {f"q{i}": p for i, (p, _) in enumerate(questions) if p is not None}
    ours = metrics.squad_scores(predictions, {f"q{i}": golds for i, (_, golds) in enumerate(questions)})
    theirs = _official_evaluate(dataset, predictions)
    assert ours == {k: pytest.approx(v, abs=1e-9) for k, v in theirs.items()}


def test_squad_empty_prediction_and_empty_normalised_gold():
    """The official script's corner cases, kept: an empty prediction scores 0 F1 even against a gold
    answer that normalises to nothing (no token in common), while EM calls the two equal."""
    assert metrics.squad_f1("", ["cat"]) == _official_f1("", "cat") == 0
    assert metrics.squad_exact_match("", ["the"]) == float(_official_em("", "the")) == 1.0
    assert metrics.squad_f1("", ["the"]) == _official_f1("", "the") == 0
    assert metrics.squad_f1("The  cat—dog", ["cat—dog", "a cat"]) == pytest.approx(
        max(_official_f1("The  cat—dog", "cat—dog"), _official_f1("The  cat—dog", "a cat")))


# --- SQuAD v2.0 against transformers' copy of the official script --------------------------------

_V2_NAMES = {"exact": "exact_match", "f1": "f1", "HasAns_exact": "has_answer_exact_match",
             "HasAns_f1": "has_answer_f1", "NoAns_exact": "no_answer_exact_match", "NoAns_f1": "no_answer_f1",
             "best_exact": "best_exact_match", "best_exact_thresh": "best_exact_match_threshold",
             "best_f1": "best_f1", "best_f1_thresh": "best_f1_threshold"}


@st.composite
def v2_questions(draw):
    """(golds, prediction, odds) per question: often no gold answer (v2's unanswerable), often the
    empty prediction, odds drawn from a few values so that ties happen, and a threshold among them."""
    n = draw(st.integers(1, 8))
    if draw(st.booleans()):   # every question its own odds: the best threshold must give the best scores
        odds = draw(st.lists(st.floats(-20, 20, allow_nan=False), min_size=n, max_size=n, unique=True))
    else:                     # a few values: ties
        odds = draw(st.lists(st.sampled_from(draw(st.lists(st.floats(-20, 20, allow_nan=False, width=32),
                                                             min_size=1, max_size=3))), min_size=n, max_size=n))
    rows = []
    for o in odds:
        golds = draw(st.lists(answer_text, max_size=3) | st.just([]))
        prediction = draw(st.just("") | st.sampled_from(golds or [""]) | answer_text)
        rows.append((golds, prediction, o))
    return rows, draw(st.sampled_from(odds) | st.floats(-30, 30, allow_nan=False))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(case=v2_questions())
def test_squad_v2_scores_are_the_official_evaluate(case):
    from types import SimpleNamespace

    import squad_v2_reference as reference

    rows, threshold = case
    references = {f"q{i}": golds for i, (golds, _, _) in enumerate(rows)}
    predictions = {f"q{i}": p for i, (_, p, _) in enumerate(rows)}
    odds = {f"q{i}": o for i, (_, _, o) in enumerate(rows)}
    examples = [SimpleNamespace(qas_id=qid, answers=[{"text": g} for g in golds]) for qid, golds in references.items()]
    # an answer that normalises to nothing ("."): scored as no answer by both, and fastbert's threshold
    # search counts it as no answer too, where the official one takes it for an answer
    as_scored = {qid: p if metrics.normalize_answer(p) else "" for qid, p in predictions.items()}
    theirs = reference.squad_evaluate(examples, as_scored, odds, threshold)
    as_given = reference.squad_evaluate(examples, predictions, odds, threshold)
    assert {k: v for k, v in as_given.items() if "best" not in k} == {k: v for k, v in theirs.items() if "best" not in k}
    ours = metrics.squad_v2_scores(predictions, references, odds, threshold)
    expected = {_V2_NAMES[k]: v for k, v in theirs.items() if k in _V2_NAMES}
    all_none = 100.0 * sum(not golds for golds in references.values()) / len(rows)
    for metric in ("exact_match", "f1"):
        if theirs[f"best_{metric.split('_')[0]}"] == all_none:
            # answering nothing is best: the official 0.0 would answer every question of odds <= 0
            expected[f"best_{metric}_threshold"] = math.nextafter(min(odds.values()), -math.inf)
    for split in ("has_answer", "no_answer"):  # the reference leaves out a split with no question
        for metric in ("exact_match", "f1"):
            expected.setdefault(f"{split}_{metric}", math.nan)
    assert ours == {k: pytest.approx(v, abs=1e-9, nan_ok=True) for k, v in expected.items()}
    if len(set(odds.values())) == len(odds):
        # without ties, the best threshold gives the best scores when applied (what evaluate reports it for)
        for metric in ("exact_match", "f1"):
            applied = metrics.squad_v2_scores(predictions, references, odds, ours[f"best_{metric}_threshold"])
            assert applied[metric] == pytest.approx(ours[f"best_{metric}"], abs=1e-9)
    # without odds: the scores of the predictions as they are, no threshold search
    plain = metrics.squad_v2_scores(predictions, references, no_answer_threshold=1.0)
    theirs = reference.squad_evaluate(examples, predictions)
    assert plain == {k: pytest.approx(ours_v, abs=1e-9, nan_ok=True) for k, ours_v in
                     {**{f"{s}_{m}": math.nan for s in ("has_answer", "no_answer") for m in ("exact_match", "f1")},
                      **{_V2_NAMES[k]: v for k, v in theirs.items() if k in _V2_NAMES and "best" not in k}}.items()}


# --- named entities against seqeval (default mode, conlleval's rules) ---------------------------

_SCHEMES = {"iob1": ("O", "I-PER", "I-LOC", "B-PER", "B-LOC", "I-MISC"),
            "iob2": ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"),
            "iobes": ("O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC")}


@st.composite
def tagged_sentences(draw):
    """(pred, gold): 1 to 6 sentences of 1 to 9 tags of one scheme, ill-formed sequences included
    (I- after O, E- without B-, types changing inside a chunk), the predictions often a noisy copy."""
    tags = _SCHEMES[draw(st.sampled_from(sorted(_SCHEMES)))]
    gold = draw(st.lists(st.lists(st.sampled_from(tags), min_size=1, max_size=9), min_size=1, max_size=6))
    if draw(st.booleans()):
        pred = [[draw(st.sampled_from(tags)) if draw(st.booleans()) else t for t in s] for s in gold]
    else:
        pred = [draw(st.lists(st.sampled_from(tags), min_size=len(s), max_size=len(s))) for s in gold]
    return pred, gold


@settings(max_examples=300, deadline=None, derandomize=True)
@given(case=tagged_sentences())
def test_entity_scores_match_seqeval(case):
    """Every value bitwise seqeval's: micro precision, recall, F1 and the per-type report; the chunks
    of every sentence its get_entities."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.metrics.sequence_labeling import get_entities

    pred, gold = case
    scores = metrics.entity_scores(pred, gold, by_type=True)
    assert (scores["precision"], scores["recall"], scores["f1"]) == (
        _quiet(precision_score, gold, pred), _quiet(recall_score, gold, pred), _quiet(f1_score, gold, pred))
    report = _quiet(classification_report, gold, pred, output_dict=True)
    types = {k for k in report if not k.endswith(" avg")}
    assert {k[3:] for k in scores if k.startswith("f1_")} == types
    for kind in types:
        assert (scores[f"precision_{kind}"], scores[f"recall_{kind}"], scores[f"f1_{kind}"]) == (
            report[kind]["precision"], report[kind]["recall"], report[kind]["f1-score"])
    for sentence in pred + gold:
        assert metrics.chunks(sentence) == set(get_entities(sentence))
