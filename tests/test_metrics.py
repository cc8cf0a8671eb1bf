"""fastbert.metrics against sklearn/scipy, hand-computed cases, and the official SQuAD v1.1 scorer."""
import collections
import math
import re
import string

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
import torch

from fastbert import metrics
from fastbert.metrics import (accuracy, f1_score, glue_metrics, matthews_corrcoef, normalize_answer, pearson,
                              spearman, squad_exact_match, squad_f1, squad_scores, squad_v2_scores,
                              token_accuracy)


def _cases(seed=0):
    rng = np.random.default_rng(seed)
    for n, k in [(2, 2), (7, 2), (100, 2), (257, 3), (1000, 5)]:
        labels = rng.integers(0, k, n)
        noisy = np.where(rng.random(n) < 0.3, rng.integers(0, k, n), labels)
        yield noisy, labels


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: f"n{len(c[0])}k{c[1].max() + 1}")
def test_classification_vs_sklearn(case):
    preds, labels = case
    assert accuracy(preds, labels) == pytest.approx(sklearn.metrics.accuracy_score(labels, preds), abs=1e-12)
    assert matthews_corrcoef(preds, labels) == pytest.approx(sklearn.metrics.matthews_corrcoef(labels, preds),
                                                             abs=1e-12)
    assert f1_score(preds, labels, average="macro") == pytest.approx(
        sklearn.metrics.f1_score(labels, preds, average="macro", zero_division=0), abs=1e-12)
    if labels.max() <= 1 and preds.max() <= 1:
        assert f1_score(preds, labels) == pytest.approx(
            sklearn.metrics.f1_score(labels, preds, zero_division=0), abs=1e-12)


def test_classification_by_hand():
    # tp=3 fp=1 fn=2 tn=2
    preds = [1, 1, 1, 1, 0, 0, 0, 0]
    labels = [1, 1, 1, 0, 1, 1, 0, 0]
    assert accuracy(preds, labels) == 5 / 8
    assert f1_score(preds, labels) == pytest.approx(6 / 9)
    assert f1_score(preds, labels, pos_label=0) == pytest.approx(4 / 7)  # tp=2 fp=2 fn=1
    assert f1_score(preds, labels, average="macro") == pytest.approx((6 / 9 + 4 / 7) / 2)
    assert matthews_corrcoef(preds, labels) == pytest.approx((3 * 2 - 1 * 2) / np.sqrt(4 * 5 * 3 * 4))
    assert matthews_corrcoef([1, 0, 1], [1, 0, 1]) == 1.0
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # one predicted class: defined as 0 (sklearn)
    assert f1_score([0, 0], [0, 0]) == 0.0  # no positive anywhere


def test_logits_and_tensors():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    labels = torch.tensor([0, 1, 1])
    assert accuracy(logits, labels) == pytest.approx(2 / 3)
    assert accuracy(logits.half(), labels.numpy()) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same shape"):
        accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="average"):
        f1_score([1], [1], average="micro")
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


def test_correlations_vs_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=500)
    y = 0.6 * x + rng.normal(size=500)
    assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
    # STS-B-like scores with many ties, and float32 tensors of shape (n, 1)
    gold = rng.integers(0, 26, 300) / 5.0
    pred = torch.tensor(gold + rng.normal(scale=1.0, size=300), dtype=torch.float32)[:, None]
    p32 = pred.numpy().ravel().astype(np.float64)
    assert pearson(pred, gold) == pytest.approx(scipy.stats.pearsonr(p32, gold)[0], abs=1e-12)
    assert spearman(pred, gold) == pytest.approx(scipy.stats.spearmanr(p32, gold)[0], abs=1e-12)
    ties = [1, 2, 2, 3, 3, 3]
    assert spearman(ties, [1, 3, 2, 5, 4, 6]) == pytest.approx(scipy.stats.spearmanr(ties, [1, 3, 2, 5, 4, 6])[0])
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="at least 2"):
        pearson([1], [1])


def test_token_accuracy_ignores_minus_100():
    labels = torch.tensor([[-100, 3, -100, 1, -100], [-100, 2, 2, -100, -100]])
    preds = torch.tensor([[7, 3, 7, 0, 7], [7, 2, 1, 7, 7]])
    assert token_accuracy(preds, labels) == 2 / 4
    logits = torch.nn.functional.one_hot(preds, 8).float()
    assert token_accuracy(logits, labels) == 2 / 4
    with pytest.raises(ValueError, match="nothing to score"):
        token_accuracy([1, 2], [-100, -100])


def test_glue_metrics():
    assert glue_metrics("sst2", [1, 0, 1], [1, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}
    assert set(glue_metrics("mrpc", [1, 0], [1, 0])) == {"accuracy", "f1"}
    assert set(glue_metrics("cola", [1, 0], [1, 0])) == {"matthews"}
    out = glue_metrics("stsb", torch.tensor([[0.1], [0.5], [0.2]]), [1.0, 4.0, 2.5])
    assert out["pearson"] > 0.9 and out["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="task must be one of"):
        glue_metrics("mnli", [0], [0])


# --- SQuAD: the official evaluate-v1.1.py functions, copied as the reference ----------------------

def _official_normalize(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_f1(prediction, ground_truth):
    prediction_tokens = _official_normalize(prediction).split()
    ground_truth_tokens = _official_normalize(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


STRINGS = ["The Cat!", "cat", "a  Denver   Broncos.", "Denver Broncos", "the 1973 oil crisis", "An apple a day",
           "anthem", "thelonious", "Tesla's coil", "teslas coil", "(Santa Clara, California)", "", "  ", "The",
           "Warsaw—Poland", "50–50", "U.S.A.", "usa", "the the the", "Them and their anthem"]


def test_normalize_answer_known_cases():
    assert normalize_answer("The Cat!") == "cat"
    assert squad_exact_match("The Cat!", "cat") == 1.0
    assert normalize_answer("  An   apple,  a day. ") == "apple day"
    assert normalize_answer("anthem thelonious") == "anthem thelonious"  # articles only as whole words
    assert normalize_answer("U.S.A.") == "usa"
    for s in STRINGS:
        assert normalize_answer(s) == _official_normalize(s), s


def test_squad_em_f1_by_hand_and_vs_official():
    assert squad_exact_match("Denver Broncos", ["Broncos", "the Denver Broncos"]) == 1.0
    assert squad_exact_match("Denver", ["Denver Broncos"]) == 0.0
    # "the big cat" -> [big, cat]: vs "cat" p=1/2 r=1 f1=2/3; vs "big dog" p=r=1/2; max 2/3
    assert squad_f1("the big cat", ["cat", "big dog"]) == pytest.approx(2 / 3)
    assert squad_f1("", ["cat"]) == 0.0 and squad_f1("the", ["a"]) == 0.0  # v1.1: nothing in common scores 0
    for p in STRINGS:
        for g in STRINGS[:8]:
            assert squad_f1(p, g) == pytest.approx(_official_f1(p, g))
            assert squad_exact_match(p, [g]) == float(_official_normalize(p) == _official_normalize(g))


def test_squad_v2_scores_by_hand():
    """Two answerable questions and two without an answer; the odds put q_none_1 below the threshold."""
    refs = {"a": ["Denver Broncos"], "b": ["cat", "black cat"], "n1": [], "n2": []}
    preds = {"a": "the Denver Broncos", "b": "a dog", "n1": "", "n2": "Panthers"}
    plain = squad_v2_scores(preds, refs)
    assert plain == {"exact_match": 50.0, "f1": 50.0, "has_answer_exact_match": 50.0, "has_answer_f1": 50.0,
                     "no_answer_exact_match": 50.0, "no_answer_f1": 50.0}
    # odds above 1.0 (the default threshold) make the answer "": n2 right, b and a wrong if theirs are high
    odds = {"a": -3.0, "b": 2.0, "n1": 0.5, "n2": 4.0}
    scored = squad_v2_scores(preds, refs, odds)
    assert (scored["exact_match"], scored["no_answer_exact_match"], scored["has_answer_f1"]) == (75.0, 100.0, 50.0)
    # the sweep over thresholds, answering in increasing odds a (+1), n1 (0), b (+0), n2 (-1): best 3 of 4
    # right from a's threshold on, where the official script stops at its first best (-3.0)
    assert (scored["best_exact_match"], scored["best_exact_match_threshold"]) == (75.0, -3.0)
    assert (scored["best_f1"], scored["best_f1_threshold"]) == (75.0, -3.0)
    assert squad_v2_scores(preds, refs, odds, -3.0)["exact_match"] == 75.0          # the threshold gives it
    # answering nothing is best: the threshold lies just below every odds (the official script says 0.0,
    # which would answer n1 here, at odds -1)
    nothing = squad_v2_scores({"a": "x", "n1": "y"}, {"a": ["z"], "n1": []}, {"a": 2.0, "n1": -1.0})
    assert nothing["best_f1"] == 50.0 and -1.0 - 1e-12 < nothing["best_f1_threshold"] < -1.0
    assert squad_v2_scores({"a": "x", "n1": "y"}, {"a": ["z"], "n1": []}, {"a": 2.0, "n1": -1.0},
                           nothing["best_f1_threshold"])["f1"] == 50.0
    # a gold answer that normalises to nothing is no answer; a prediction of "the" is no answer too
    assert squad_v2_scores({"x": "the"}, {"x": ["a", "An"]})["exact_match"] == 100.0
    assert squad_v2_scores({"x": ""}, {"x": ["cat"]})["f1"] == 0.0
    assert squad_v2_scores({"x": "cat"}, {"x": ["cat"]}, {"x": math.inf}, 5.0)["f1"] == 0.0    # no span: inf odds
    assert math.isnan(squad_v2_scores({"x": "cat"}, {"x": ["cat"]})["no_answer_f1"])   # no such question


def test_squad_v2_scores_refuse_what_the_official_script_drops():
    with pytest.raises(ValueError, match=r"no prediction for 1 of 2 questions \(e\.g\. id 'n'\); SQuAD v2\.0 "
                                         r"scores every question: predict \"\" for no answer"):
        squad_v2_scores({"a": "x"}, {"a": ["x"], "n": []})
    with pytest.raises(ValueError, match=r"no_answer_odds has no value for 1 questions \(e\.g\. id 'n'\)"):
        squad_v2_scores({"a": "x", "n": ""}, {"a": ["x"], "n": []}, {"a": 1.0})
    for bad in (math.nan, -math.inf):
        with pytest.raises(ValueError, match=rf"no_answer_odds\['a'\] is {bad} \(a diverged model's logits\?\): "
                                             r"the odds must be numbers or \+inf"):
            squad_v2_scores({"a": "x"}, {"a": ["x"]}, {"a": bad})
    with pytest.raises(TypeError, match=r"predictions\['a'\] must be an answer text \(str\), got NoneType"):
        squad_v2_scores({"a": None}, {"a": ["x"]})
    with pytest.raises(ValueError, match="references is empty"):
        squad_v2_scores({}, {})


def test_squad_scores_percent_and_missing():
    refs = {"a": ["Denver Broncos"], "b": ["cat", "the cat"], "c": ["Santa Clara"], "d": ["x"]}
    preds = {"a": "the Denver Broncos!", "b": "a black cat", "c": "Clara"}  # d unanswered: 0
    out = squad_scores(preds, refs)
    assert out["exact_match"] == pytest.approx(100 * 1 / 4)
    # a: 1, b: [black, cat] vs [cat] -> 2/3, c: [clara] vs [santa, clara] -> 2/3, d: 0
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3) / 4)
    with pytest.raises(ValueError, match="empty"):
        squad_scores({}, {})
    with pytest.raises(ValueError, match="at least one gold"):
        squad_f1("x", [])
    with pytest.raises(ValueError, match="question id q9 has no gold answer"):   # which one: not said before
        squad_scores({"q9": "x"}, {"a": ["y"], "q9": []})


def test_module_exports():
    for name in ("accuracy", "f1_score", "matthews_corrcoef", "pearson", "spearman", "token_accuracy",
                 "normalize_answer", "squad_exact_match", "squad_f1", "squad_scores", "glue_metrics"):
        assert callable(getattr(metrics, name))


# -- audit: the values glue_metrics reports, and the range of a correlation --------------------------


def test_glue_metrics_values_are_each_tasks_official_metric():
    """glue_metrics was checked for its keys only: MRPC's F1 is the binary F1 of the positive class
    (label 1, as GLUE and sklearn's default), not the macro average over both classes. Here
    tp=3 fp=1 fn=1: binary F1 6/8; class 0 scores 2/4, so macro F1 would read 5/8."""
    preds, labels = [1, 1, 1, 0, 0, 1], [1, 0, 1, 0, 1, 1]
    mrpc = glue_metrics("mrpc", preds, labels)
    assert mrpc == {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx(6 / 8)}
    assert mrpc["f1"] == pytest.approx(sklearn.metrics.f1_score(labels, preds))
    assert mrpc["f1"] != pytest.approx(sklearn.metrics.f1_score(labels, preds, average="macro"))
    assert glue_metrics("cola", preds, labels) == {
        "matthews": pytest.approx(sklearn.metrics.matthews_corrcoef(labels, preds), abs=1e-12)}
    for task in ("sst2", "rte"):
        assert glue_metrics(task, preds, labels) == {"accuracy": pytest.approx(4 / 6)}
    pred, gold = [0.3, 2.0, 1.1, 4.5, 3.9], [0.4, 1.8, 2.0, 5.0, 3.2]
    assert glue_metrics("stsb", pred, gold) == {"pearson": pytest.approx(scipy.stats.pearsonr(pred, gold)[0], abs=1e-12),
                                                "spearman": pytest.approx(scipy.stats.spearmanr(pred, gold)[0], abs=1e-12)}


@pytest.mark.parametrize("x_scale, y_scale", [(1e80, 1e80), (1e155, 1.0), (1e-90, 1e-90), (1e-170, 1.0), (1e300, 1e-300)])
def test_pearson_of_very_large_or_small_values_is_scipys(x_scale, y_scale):
    """A diverged regression model's huge outputs: the sums of squares overflowed to inf and the
    correlation came out 0.0 (tiny values: underflow, nan), where it is well defined."""
    x, y = np.array([1.0, 2.0, 3.0, 5.0]) * x_scale, np.array([1.0, 2.0, 3.0, 4.0]) * y_scale
    assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert pearson(x, y) == pytest.approx(pearson([1.0, 2.0, 3.0, 5.0], [1.0, 2.0, 3.0, 4.0]), abs=1e-12)
    assert math.isnan(pearson([1.0, float("inf"), 2.0], [1.0, 2.0, 3.0]))


def test_pearson_of_exactly_linear_values_stays_within_minus_one_one():
    """Rounding can put the quotient a hair past 1 (here 1.0000000000000002 before the clip): scipy
    clips, and so must we; a score above 1 breaks whatever takes it as a correlation (arctanh of the
    Fisher transform is NaN there). Found by search over small exactly linear pairs."""
    x = [0.0, 9.0, 1.0]
    for y in ([1.0, 1.9, 1.1], [2.5 * v + 1 for v in x]):
        r = pearson(x, y)
        assert -1.0 <= r <= 1.0 and r == pytest.approx(1.0)
        assert pearson([-v for v in x], y) >= -1.0


def test_entity_chunks_by_hand():
    """conlleval's reading of each scheme: IOB1 (CoNLL-2003's own files) starts a chunk at I- after O
    and uses B- only between two chunks of one type; BIO at B-; IOBES ends one at E- and S-."""
    assert metrics.chunks(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC"]) == \
        {("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 5)}                                      # IOB1
    assert metrics.chunks(["B-PER", "I-PER", "B-PER", "O", "B-ORG", "I-LOC"]) == \
        {("PER", 0, 1), ("PER", 2, 2), ("ORG", 4, 4), ("LOC", 5, 5)}                      # a type change ends one
    assert metrics.chunks(["S-PER", "B-LOC", "I-LOC", "E-LOC", "E-LOC", "O"]) == \
        {("PER", 0, 0), ("LOC", 1, 3), ("LOC", 4, 4)}                                      # IOBES
    assert metrics.chunks(["B-MISC"]) == {("MISC", 0, 0)} and metrics.chunks(["O", "O"]) == set()


def test_entity_scores_by_hand():
    """A chunk counts only with its type and both ends right: of 3 gold entities, 2 predicted
    exactly; a third prediction has the right type but one word too many, a fourth the wrong type."""
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    assert metrics.entity_scores(pred, gold) == {"precision": 1 / 3, "recall": 1 / 3, "f1": pytest.approx(1 / 3)}
    by_type = metrics.entity_scores(pred, gold, by_type=True)
    assert by_type["f1_PER"] == 1.0 and by_type["f1_LOC"] == 0.0 and by_type["precision_ORG"] == 0.0
    assert metrics.entity_scores(gold, gold)["f1"] == 1.0
    nothing = [["O"] * 4, ["O"] * 4]
    assert metrics.entity_scores(nothing, gold) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert metrics.entity_scores(gold, nothing) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_entity_scores_refuse_mismatched_sentences():
    with pytest.raises(ValueError, match="same number of sentences, got 1 and 2"):
        metrics.entity_scores([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="sentence 1: 2 predicted tags for 3 gold tags"):
        metrics.entity_scores([["O"], ["O", "O"]], [["O"], ["O", "O", "B-PER"]])
    with pytest.raises(ValueError, match="no sentences to score"):
        metrics.entity_scores([], [])
    # seqeval reads any first letter as a prefix (B alone: a chunk of type "_"; NOUN: N of type OUN)
    for tag in ("B", "B-", "b-PER", "_", "NOUN", "X-PER"):
        with pytest.raises(ValueError, match=f"pred_tags sentence 0: tag '{tag}' is no chunk tag"):
            metrics.entity_scores([["O", tag]], [["O", "B-LOC"]])


@pytest.mark.parametrize("tags, chunked", [
    (["O", "B-PER", "I-PER"], True), (["I-LOC", "O", "B-LOC"], True), (["S-X", "E-X", "O"], True),
    (["B-NP", "I-NP", "B-VP"], True),                              # CoNLL-2000 chunks: no O needed
    (["O"], False), (["NOUN", "VERB", "X"], False),                 # UPOS
    (["NN", "IN", "-LRB-", "PRP$"], False), (["O", "B-PER", "NOUN"], False), (["O", "B-"], False),
    (["N-SG", "V-PST"], False), (["O", "b-PER", "i-PER"], False), (["O", "B-ORG-X", "I-ORG-X"], True)])
def test_is_chunk_scheme(tags, chunked):
    assert metrics.is_chunk_scheme(tags) is chunked
