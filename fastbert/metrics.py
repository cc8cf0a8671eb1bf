"""Evaluation metrics for the four applications, in plain numpy.

Classification and regression (GLUE): accuracy, f1_score (binary or macro),
matthews_corrcoef, pearson, spearman, and glue_metrics(task, ...) picking a
task's official ones. Tagging: token_accuracy, ignoring label -100, and for named entities
(IOB-style tags) entity_scores, conlleval's chunk precision/recall/F1. SQuAD v1.1:
normalize_answer, squad_exact_match, squad_f1 and squad_scores, following the
official evaluate-v1.1.py (percent, max over the gold answers). SQuAD v2.0 (questions
may have no answer): squad_v2_scores, the official evaluate-v2.0.py's scores, split by
answerable or not, and its best no-answer threshold.

Predictions may be class ids or logits (one more trailing dimension, argmax
taken); inputs may be lists, numpy arrays or torch tensors. Values match
sklearn/scipy (tests/test_metrics.py, tests/test_metrics_fuzz.py), which are not
needed at run time.

Undefined values follow the library each metric comes from, so a score reads as it
would there: Pearson/Spearman of a constant side (every prediction or every gold
score equal), or of NaN predictions, are NaN, as scipy's (to_json writes them as
null; the CLI says "undefined"); MCC with one class on either side is 0.0, and F1
of a class never predicted nor present 0.0, as sklearn's (zero_division=0). No
values at all (an empty set, every tagging label ignored, one value for a
correlation) is a ValueError: there is no score to report.
"""
from __future__ import annotations

import collections
import json
import math
import re
import string
from typing import Mapping, Sequence

import numpy as np

IGNORE_INDEX = -100


def _array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x
        x = x.numpy()
    out = np.asarray(x)
    if out.dtype == object:
        raise TypeError(f"{name} must be numeric, got an array of objects")
    return out


def _class_ids(preds, labels) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = _array(preds, "preds"), _array(labels, "labels")
    if preds.ndim == labels.ndim + 1:  # logits
        preds = preds.argmax(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels must have the same shape (or preds one more logits dimension), "
                         f"got {preds.shape} and {labels.shape}")
    if preds.size == 0:
        raise ValueError("no predictions to score")
    return preds.reshape(-1), labels.reshape(-1)


def accuracy(preds, labels) -> float:
    """Fraction of predictions equal to the label, in [0, 1]."""
    preds, labels = _class_ids(preds, labels)
    return float((preds == labels).mean())


def _f1(preds: np.ndarray, labels: np.ndarray, positive) -> float:
    tp = np.sum((preds == positive) & (labels == positive))
    fp = np.sum((preds == positive) & (labels != positive))
    fn = np.sum((preds != positive) & (labels == positive))
    return 0.0 if tp == 0 else float(2 * tp / (2 * tp + fp + fn))


def f1_score(preds, labels, average: str = "binary", pos_label=1) -> float:
    """F1 in [0, 1]: of class pos_label ("binary"), or the unweighted mean over the
    classes seen in labels or preds ("macro"). A class never predicted nor present
    scores 0 precision/recall, like sklearn's zero_division=0.

    "binary" refuses more than two classes, or two that do not include pos_label, as sklearn
    does: one class's F1 reported as the task's would read as a binary score it is not.
    """
    preds, labels = _class_ids(preds, labels)
    if average == "binary":
        classes = np.union1d(preds, labels)
        if len(classes) > 2:
            raise ValueError(f"binary F1 needs at most 2 classes, got {classes.tolist()}; "
                             "use average='macro' for more")
        if len(classes) == 2 and pos_label not in classes:
            raise ValueError(f"pos_label={pos_label!r} is not one of the classes {classes.tolist()}")
        return _f1(preds, labels, pos_label)
    if average == "macro":
        return float(np.mean([_f1(preds, labels, c) for c in np.union1d(preds, labels)]))
    raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation (multiclass form of Gorodkin 2004, as sklearn), in [-1, 1];
    0 when either side holds a single class."""
    preds, labels = _class_ids(preds, labels)
    classes, codes = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    t, p = codes[:len(labels)], codes[len(labels):]
    k = len(classes)
    confusion = np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.float64)
    t_sum, p_sum = confusion.sum(1), confusion.sum(0)
    n, correct = confusion.sum(), np.trace(confusion)
    cov_tp = correct * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_tt = n * n - t_sum @ t_sum
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def _floats(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = _array(x, "x").astype(np.float64).reshape(-1), _array(y, "y").astype(np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same number of values, got {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError(f"a correlation needs at least 2 values, got {x.size}")
    return x, y


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if np.isnan(x).any() or np.isnan(y).any():
        return float("nan")  # NaN predictions (a diverged model): scipy propagates NaN too
    # A constant side has no correlation (scipy also gives nan). Tested on the values, as scipy does:
    # the deviations from the mean are not zero for most constants (the mean of three 0.2s is not
    # 0.2), and their rounding noise gave a correlation of about 1e-17 instead.
    if (x == x[0]).all() or (y == y[0]).all():
        return float("nan")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")  # inf values (scipy: nan too)
    # Scaled to at most 1 first (the correlation does not change): the sums of squares of values
    # near 1e80 overflowed to inf (giving 0.0) and of values near 1e-90 underflowed to 0 (nan).
    x, y = x / np.abs(x).max(), y / np.abs(y).max()
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt(dx @ dx) * np.sqrt(dy @ dy)
    if not denom > 0:  # values that differ by a few ulps
        return float("nan")
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0))


def pearson(x, y) -> float:
    """Pearson correlation of two sequences of numbers; nan if either is constant or holds a NaN."""
    return _pearson(*_floats(x, y))


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson of average ranks); nan if either is constant or holds a
    NaN (ranking would give each NaN a rank of its own, and a finite correlation)."""
    x, y = _floats(x, y)
    if np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    return _pearson(_rank(x), _rank(y))


def token_accuracy(preds, labels, ignore_index: int = IGNORE_INDEX) -> float:
    """Accuracy over the positions whose label is not ignore_index (padding, special
    tokens and non-first sub-words in tagging)."""
    preds, labels = _class_ids(preds, labels)
    keep = labels != ignore_index
    if not keep.any():
        raise ValueError(f"every label is ignore_index={ignore_index}: nothing to score")
    return float((preds[keep] == labels[keep]).mean())


# --- Named entities: chunks of IOB-style tags, scored as conlleval does --------------------------

_CHUNK_PREFIXES = ("B", "I", "E", "S")


def is_chunk_scheme(tag_names: Sequence[str]) -> bool:
    """Whether tags name chunks (entities): every tag is O or PREFIX-TYPE with PREFIX one of
    B I E S (IOB1, IOB2/BIO, IOE, IOBES/BILOU's letters), and some tag begins or is inside one.
    POS tag sets (NOUN, NN, ...) are not; a tagset of O only has no chunk to score."""
    names = set(tag_names)
    chunk_tags = [t for t in names if t != "O"]
    return bool(chunk_tags) and all(len(t) > 2 and t[1] == "-" and t[0] in _CHUNK_PREFIXES for t in chunk_tags)


def chunk_types(tag_names: Sequence[str]) -> list[str]:
    """The entity types of a chunk tagset, sorted: PER for B-PER and I-PER."""
    return sorted({t[2:] for t in tag_names if t != "O"})


def complete_chunk_tags(tag_names: Sequence[str]) -> list[str]:
    """A chunk tagset with every prefix of its scheme for every type it has, sorted: CoNLL-2003's IOB1
    files use B- only between two entities of one type, so a training file may hold I-LOC but no
    B-LOC (or no B- at all) where the dev file has one. I- brings B- (IOB1, BIO); E- or S- bring all
    four (IOBES)."""
    prefixes = {t[0] for t in tag_names if t != "O"}
    if "I" in prefixes:
        prefixes.add("B")
    if prefixes & {"E", "S"}:
        prefixes |= set(_CHUNK_PREFIXES)
    return sorted({t for t in tag_names if t == "O"} | {f"{p}-{kind}" for p in prefixes for kind in chunk_types(tag_names)})


def _chunk_tag(tag: str, where) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    if len(tag) < 3 or tag[1] != "-" or tag[0] not in _CHUNK_PREFIXES:
        # seqeval reads any first letter as a prefix ("B", "NOUN", "_"), with a warning only
        raise ValueError(f"{where}: tag {tag!r} is no chunk tag (O, or B-, I-, E-, S- and a type)")
    return tag[0], tag[2:]


def chunks(tags: Sequence[str], where: str = "tags") -> set[tuple[str, int, int]]:
    """The (type, first, last) word spans one sentence's tags name, under conlleval's rules with
    seqeval's additions for E- and S-: a chunk begins at B- or S-, at I-/E- after O, E- or S-, or
    after a chunk of another type (IOB1's I-PER after O); it ends before B-, S-, O or another type,
    and after E- or S-. Ill-formed sequences (B-PER E-LOC) read as seqeval's default mode reads them;
    a tag that is not O or PREFIX-TYPE is a ValueError naming `where`."""
    spans, begin, prev, prev_type = set(), 0, "O", ""
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, kind = _chunk_tag(tag, where)
        ends = prev in ("E", "S") or (prev in ("B", "I") and prefix in ("B", "S", "O")) or \
            (prev != "O" and kind != prev_type)
        if ends:
            spans.add((prev_type, begin, i - 1))
        starts = prefix in ("B", "S") or (prev in ("E", "S", "O") and prefix in ("I", "E")) or \
            (prefix != "O" and kind != prev_type)
        if starts:
            begin = i
        prev, prev_type = prefix, kind
    return spans


def entity_scores(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]],
                  by_type: bool = False) -> dict[str, float]:
    """Named-entity precision, recall and F1 (fractions) over the sentences' chunks, micro-averaged
    as conlleval and seqeval (its default mode) do: a predicted entity counts when its type and its
    first and last word all equal a gold one's. pred_tags/gold_tags: one list of tag strings per
    sentence, of equal lengths. Nothing predicted gives precision 0.0, nothing gold recall 0.0, as
    seqeval's zero_division=0. by_type adds f1_<TYPE> (and precision_/recall_) per gold or
    predicted type."""
    if len(pred_tags) != len(gold_tags):
        raise ValueError(f"pred_tags and gold_tags must hold the same number of sentences, got "
                         f"{len(pred_tags)} and {len(gold_tags)}")
    if not gold_tags:
        raise ValueError("no sentences to score")
    found, gold, right = collections.Counter(), collections.Counter(), collections.Counter()
    for i, (p, g) in enumerate(zip(pred_tags, gold_tags)):
        if len(p) != len(g):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(g)} gold tags")
        p_chunks, g_chunks = chunks(p, f"pred_tags sentence {i}"), chunks(g, f"gold_tags sentence {i}")
        found.update(c[0] for c in p_chunks)
        gold.update(c[0] for c in g_chunks)
        right.update(c[0] for c in p_chunks & g_chunks)

    def prf(n_right, n_found, n_gold, suffix=""):
        precision = n_right / n_found if n_found else 0.0
        recall = n_right / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {f"precision{suffix}": precision, f"recall{suffix}": recall, f"f1{suffix}": f1}

    scores = prf(sum(right.values()), sum(found.values()), sum(gold.values()))
    if by_type:
        for kind in sorted(set(found) | set(gold)):
            scores.update(prf(right[kind], found[kind], gold[kind], f"_{kind}"))
    return scores


GLUE_METRICS = {
    "sst2": ("accuracy",), "rte": ("accuracy",), "mrpc": ("accuracy", "f1"),
    "cola": ("matthews",), "stsb": ("pearson", "spearman"),
}


def glue_metrics(task: str, preds, labels) -> dict[str, float]:
    """The task's official GLUE metrics: {"accuracy": ..., "f1": ..., ...} (fractions, not percent)."""
    if task not in GLUE_METRICS:
        raise ValueError(f"task must be one of {sorted(GLUE_METRICS)}, got {task!r}")
    fns = {"accuracy": accuracy, "f1": f1_score, "matthews": matthews_corrcoef, "pearson": pearson,
           "spearman": spearman}
    if task == "stsb":
        preds = _array(preds, "preds").reshape(-1)  # (batch, 1) regression outputs are fine
    return {name: fns[name](preds, labels) for name in GLUE_METRICS[task]}


# --- SQuAD v1.1: the official evaluate-v1.1.py logic -----------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _exact(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def _token_f1(prediction: str, truth: str) -> float:
    pred_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((collections.Counter(pred_tokens) & collections.Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_list(ground_truths) -> list[str]:
    golds = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    if not golds:
        raise ValueError("need at least one gold answer")
    return golds


def squad_exact_match(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    return max(_exact(prediction, g) for g in _gold_list(ground_truths))


def squad_f1(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """Best bag-of-tokens F1 (in [0, 1]) of the normalised prediction against the gold answers."""
    return max(_token_f1(prediction, g) for g in _gold_list(ground_truths))


def squad_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over every question of references (id -> gold
    answers); a question without a prediction scores 0, as in the official script."""
    if not references:
        raise ValueError("references is empty")
    em = f1 = 0.0
    for qid, golds in references.items():
        if not isinstance(golds, str) and len(golds) == 0:
            raise ValueError(f"question id {qid} has no gold answer: SQuAD v1.1 scoring needs at least one "
                             "(a question without an answer is SQuAD v2.0's: squad_v2_scores)")
        if qid in predictions:
            em += squad_exact_match(predictions[qid], golds)
            f1 += squad_f1(predictions[qid], golds)
    return {"exact_match": 100.0 * em / len(references), "f1": 100.0 * f1 / len(references)}


# --- SQuAD v2.0: the official evaluate-v2.0.py logic ------------------------------------------

def _v2_f1(prediction: str, truth: str) -> float:
    # v2.0's F1 differs from v1.1's where either side is empty: no answer against no answer is 1
    pred_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred_tokens or not truth_tokens:
        return float(pred_tokens == truth_tokens)
    return _token_f1(prediction, truth)


def _best_threshold(answers: Mapping[str, str], raw: Mapping[str, float], odds: Mapping[str, float],
                    has_answer: Mapping[str, bool]) -> tuple[float, float]:
    """The official find_best_thresh: start from every question answered with no answer, then answer
    them one by one in increasing no-answer odds, keeping the total at its best; the threshold is the
    odds of the last question answered at that best (ties in odds split as the official sort leaves them).
    Where answering nothing is best, the official 0.0 would answer every question of odds <= 0, so
    the threshold is just below the lowest odds instead. An answer that normalises to nothing ("."),
    which the scores count as no answer, counts as no answer here too (the official sweep takes it for
    an answer, so its best could differ from the scores its threshold gives)."""
    total = best = float(sum(not has for has in has_answer.values()))
    threshold = math.nextafter(min(odds.values()), -math.inf)
    for qid in sorted(odds, key=lambda k: odds[k]):
        if has_answer[qid]:
            total += raw[qid]
        elif normalize_answer(answers[qid]):
            total -= 1
        if total > best:
            best, threshold = total, odds[qid]
    return 100.0 * best / len(raw), threshold


def squad_v2_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                    no_answer_odds: Mapping[str, float] | None = None,
                    no_answer_threshold: float = 0.0) -> dict[str, float]:
    """SQuAD v2.0's official scores, in percent, of every question of references (id -> gold answer
    texts; an empty list: the question has no answer, and only the empty prediction is right).

    predictions: id -> answer text, "" for no answer. no_answer_odds: id -> how strongly the model
    says no answer (fastbert: the null score minus the best span's score); a question whose odds
    are above no_answer_threshold counts as answered with "" (default 0.0, for odds that are score
    differences; the official script's 1.0 is for probabilities). With odds, best_f1/best_exact_match
    are the scores at the best threshold and best_*_threshold is that threshold (pass the model's
    best span for every question, never "", and these are the scores `--null-score-diff-threshold
    <best_f1_threshold>` gives, unless questions of equal odds fall on both sides of the best). has_answer_* and no_answer_* split the scores by
    the gold side; NaN where the references hold no such question.
    """
    if not references:
        raise ValueError("references is empty")
    missing = [qid for qid in references if qid not in predictions]
    if missing:  # the official script drops them from the total: a silent change of denominator
        raise ValueError(f"no prediction for {len(missing)} of {len(references)} questions (e.g. id {missing[0]!r}); "
                         'SQuAD v2.0 scores every question: predict "" for no answer')
    if no_answer_odds is not None:
        absent = [qid for qid in references if qid not in no_answer_odds]
        if absent:
            raise ValueError(f"no_answer_odds has no value for {len(absent)} questions (e.g. id {absent[0]!r})")
        # +inf is fine (no span at all: always no answer); NaN and -inf have no threshold to sort them by
        bad = [qid for qid in references if math.isnan(no_answer_odds[qid]) or no_answer_odds[qid] == -math.inf]
        if bad:
            raise ValueError(f"no_answer_odds[{bad[0]!r}] is {no_answer_odds[bad[0]]} (a diverged model's logits?): "
                             "the odds must be numbers or +inf")
    exact, f1, has_answer = {}, {}, {}
    for qid, golds in references.items():
        golds = [golds] if isinstance(golds, str) else list(golds)
        if not isinstance(predictions[qid], str):
            raise TypeError(f"predictions[{qid!r}] must be an answer text (str), got {type(predictions[qid]).__name__}")
        has_answer[qid] = bool(golds)
        # as the official script: a gold answer that normalises to nothing is no answer
        golds = [g for g in golds if normalize_answer(g)] or [""]
        exact[qid] = max(_exact(predictions[qid], g) for g in golds)
        f1[qid] = max(_v2_f1(predictions[qid], g) for g in golds)
    odds = {qid: float(no_answer_odds[qid]) for qid in references} if no_answer_odds is not None else \
        dict.fromkeys(references, 0.0)
    said_none = {qid: odds[qid] > no_answer_threshold for qid in references}
    exact_at = {qid: float(not has_answer[qid]) if said_none[qid] else s for qid, s in exact.items()}
    f1_at = {qid: float(not has_answer[qid]) if said_none[qid] else s for qid, s in f1.items()}

    def mean(values, which) -> float:
        chosen = [values[qid] for qid in references if which(qid)]
        return 100.0 * sum(chosen) / len(chosen) if chosen else math.nan

    scores = {"exact_match": mean(exact_at, lambda q: True), "f1": mean(f1_at, lambda q: True),
              "has_answer_exact_match": mean(exact_at, has_answer.get), "has_answer_f1": mean(f1_at, has_answer.get),
              "no_answer_exact_match": mean(exact_at, lambda q: not has_answer[q]),
              "no_answer_f1": mean(f1_at, lambda q: not has_answer[q])}
    if no_answer_odds is not None:
        scores["best_exact_match"], scores["best_exact_match_threshold"] = \
            _best_threshold(predictions, exact, odds, has_answer)
        scores["best_f1"], scores["best_f1_threshold"] = _best_threshold(predictions, f1, odds, has_answer)
    return scores


def json_safe(value):
    """value with every non-finite float (a correlation of constant values is NaN) as None: JSON
    has no NaN, and json.dumps would write the bare `NaN` that strict parsers refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value, **kwargs) -> str:
    """JSON text of metrics, undefined values as null; allow_nan=False, so a NaN that gets past
    json_safe (in a type it does not know) raises instead of writing invalid JSON."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)
