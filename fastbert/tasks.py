"""Task presets: for each application, how to read its data, which head to put
on the encoder and how to score it.

    kind         head                                   metric
    single/pair  BertForSequenceClassification          accuracy / F1 / Matthews
    regression   BertForSequenceClassification(1)       Pearson, Spearman
    tagging      BertForTokenClassification             token accuracy (first sub-words); with IOB-style
                                                        tags, entity F1/precision/recall (conlleval)
    qa           BertForQuestionAnswering               SQuAD exact match and F1 (v2.0: also split by
                                                        answerable or not, and the best no-answer threshold)
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import torch

from . import data, heads, metrics
from .data.tagging import read_tagged

PRESETS = {
    "sst2": "single", "cola": "single", "mrpc": "pair", "rte": "pair", "stsb": "regression",
    "pos": "tagging", "ner": "tagging", "squad": "qa", "squad_v2": "qa",
}
KINDS = ("single", "pair", "regression", "tagging", "qa")


@dataclasses.dataclass
class TaskSpec:
    """What a saved model needs to be used again: stored in its config.json as `fastbert_task`."""
    name: str
    kind: str
    labels: list[str] | None = None
    max_seq_len: int | None = None     # None: 384 for qa (transformers' run_qa), 128 otherwise
    doc_stride: int = 128
    max_answer_len: int = 30
    max_question_len: int = 64        # qa: question tokens kept (the original BERT recipe's cut)
    text_cols: list | None = None
    label_col: str | int | None = None
    # TSV tasks: whether the first row names the columns. None: the GLUE preset's setting (CoLA's
    # files have none), a header for other data. False: columns are given by 0-based index.
    # (Specs saved before this field existed load as None, which is how they were read.)
    header: bool | None = None
    # qa: whether a question may have no answer (SQuAD v2.0). None until the training file says (a
    # question without an answer in it: True); the squad preset says False, squad_v2 True; specs saved
    # before the field load as False, the only kind there was.
    no_answer: bool | None = None
    # qa with no_answer: answer "" when the null score ([CLS]) beats the best span's by more than this
    # (BERT's and transformers' null_score_diff_threshold; evaluate reports the best one on its data)
    null_score_diff_threshold: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {KINDS}, got {self.kind!r}")
        if self.max_seq_len is None:
            # A SQuAD window holds the question, 3 special tokens and doc_stride + some passage
            # tokens: 128 with a stride of 128 leaves no room at all.
            self.max_seq_len = 384 if self.kind == "qa" else 128

    @classmethod
    def preset(cls, name: str, **overrides) -> "TaskSpec":
        if name not in PRESETS:
            raise ValueError(f"--task must be one of {sorted(PRESETS)}, got {name!r} (or use --task-type)")
        labels = {"pos": list(data.UPOS_TAGS), "ner": list(data.CONLL2003_NER_TAGS)}.get(name)
        if name in data.TASKS and data.TASKS[name].labels is not None:
            labels = list(data.TASKS[name].labels)
        spec = cls(name=name, kind=PRESETS[name], labels=labels,
                   no_answer={"squad": False, "squad_v2": True}.get(name))
        return dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})


@dataclasses.dataclass
class TaskData:
    features: list[dict]
    examples: Sequence = ()      # SQuAD examples (for answer text), tagged sentences, or GLUE rows

    @property
    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]


def read(spec: TaskSpec, path, tokenizer, max_examples: int | None = None, labels_from=None) -> TaskData:
    """Read and encode one data file for the task."""
    if spec.kind in ("single", "pair", "regression"):
        preset = spec.name if spec.name in data.TASKS else None
        kwargs = {}
        if spec.text_cols:
            kwargs["text_cols"] = spec.text_cols
        if spec.label_col is not None:
            kwargs["label_col"] = spec.label_col
        if spec.header is not None:
            kwargs["header"] = spec.header
        if preset is None:
            kwargs["regression"] = spec.kind == "regression"
            if spec.labels:
                kwargs["labels"] = spec.labels
        rows = data.read_glue(path, preset, max_rows=max_examples, **kwargs)
        if spec.labels is None and not rows.is_regression:
            spec.labels = list(rows.label_names)
        return TaskData(data.encode_glue(rows, tokenizer, spec.max_seq_len), rows)
    if spec.kind == "tagging":
        # CoNLL-U (UPOS) or CoNLL-2003 (the last column), told apart by the content, not the name
        sentences = read_tagged(path, max_sentences=max_examples)
        if spec.labels is None:
            spec.labels = data.tag_names(sentences)
            if metrics.is_chunk_scheme(spec.labels):  # B-LOC for a dev file whose training file had I-LOC only
                spec.labels = metrics.complete_chunk_tags(spec.labels)
        return TaskData(data.encode_tagging(sentences, tokenizer, spec.labels, spec.max_seq_len), sentences)
    examples = data.read_squad(path, max_examples=max_examples)
    unanswerable = sum(not e.answers for e in examples)
    if spec.no_answer is None:
        spec.no_answer = unanswerable > 0
    elif unanswerable and not spec.no_answer:
        # trained to always answer, and scored by v1.1's rules, which have no right answer for these
        raise data.DataFormatError(f"{path}: {unanswerable} of {len(examples)} questions have no answer (SQuAD "
                                   f"v2.0), and task {spec.name!r} answers every question (SQuAD v1.1, or a "
                                   "--task-type qa whose training questions all have answers): fine-tune with "
                                   "--task squad_v2 for such questions")
    return TaskData(data.build_squad_features(examples, tokenizer, spec.max_seq_len, spec.doc_stride,
                                              max_question_tokens=spec.max_question_len), examples)


def build_model(spec: TaskSpec, model_path, backend=None, fine_tuned=False):
    """The task's head on the checkpoint at model_path. fine_tuned: the checkpoint must hold that head
    (predict, evaluate); otherwise a new head is what fine-tuning starts from, and not warned about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", heads.NewHeadWarning)  # expected, or refused below
        model = _build_head(spec, model_path, backend)
    if fine_tuned and not model.head_loaded:
        raise ValueError(f"{model_path} holds no {model.head_name} weights for its task ({spec.kind}, "
                         f"{model.head.out_features} outputs): an encoder saved without its head is no fine-tuned "
                         "model (save the task model, as `fastbert finetune` does)")
    saved = dataclasses.asdict(spec)
    if not spec.no_answer:
        # SQuAD v1.1 and every other task save what they did before v2.0's fields, so an older fastbert,
        # which refuses fields it does not know, still loads them (a v2.0 model it could not use anyway)
        del saved["no_answer"], saved["null_score_diff_threshold"]
    model.config.extra["fastbert_task"] = saved
    return model


def _build_head(spec: TaskSpec, model_path, backend):
    if spec.kind == "qa":
        model = heads.BertForQuestionAnswering.from_pretrained(model_path, backend=backend)
    elif spec.kind == "tagging":
        model = heads.BertForTokenClassification.from_pretrained(model_path, labels=spec.labels, backend=backend)
    elif spec.kind == "regression":
        model = heads.BertForSequenceClassification.from_pretrained(model_path, num_labels=1, backend=backend)
    else:
        model = heads.BertForSequenceClassification.from_pretrained(model_path, labels=spec.labels, backend=backend)
    return model


def load_finetuned(model_dir, backend=None):
    """A model saved by `fastbert finetune`, with its TaskSpec."""
    from .checkpoint import resolve_model_path
    from .config import BertConfig

    folder = resolve_model_path(model_dir)
    saved = BertConfig.from_json(folder / "config.json").extra.get("fastbert_task")
    if not saved:
        raise ValueError(f"{folder} was not saved by `fastbert finetune` (its config.json has no fastbert_task)")
    known = {f.name for f in dataclasses.fields(TaskSpec)}
    if not isinstance(saved, dict) or (unknown := sorted(set(saved) - known)):
        what = f"fields {unknown}" if isinstance(saved, dict) else f"a {type(saved).__name__}"
        raise ValueError(f"{folder / 'config.json'}: fastbert_task holds {what} this fastbert does not know "
                         f"(known: {sorted(known)}); was it saved by another version?")
    try:
        spec = TaskSpec(**saved)
    except TypeError as err:  # a required field missing
        raise ValueError(f"{folder / 'config.json'}: fastbert_task is incomplete: {err}") from None
    if spec.kind == "qa" and spec.no_answer is None:  # saved before SQuAD v2.0: trained to answer every question
        spec.no_answer = False
    return build_model(spec, folder, backend, fine_tuned=True), spec


@torch.no_grad()
def predict_logits(model, features: Sequence[dict], batch_size: int = 64, shard: bool = False) -> list[torch.Tensor]:
    """Logits of each feature (unpadded for per-token tasks), in order.

    shard: under torchrun, called by every process, each predicts every world-th feature (of similar
    lengths: the order is by length) and all get every logit (a gather)."""
    from . import distributed

    model.eval()
    device = next(model.parameters()).device
    out = []
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))  # little padding
    rank, world = distributed.rank_and_world() if shard else (0, 1)
    order = order[rank::world]
    results = [None] * len(features)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = data.collate([features[i] for i in idx])
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")}
        logits = model(**inputs).logits.float().cpu()
        for row, i in enumerate(idx):
            n = len(features[i]["input_ids"])
            results[i] = logits[row, :n] if logits.dim() == 3 else logits[row]
    if world > 1:
        # One packed tensor a process: a row is a view of its whole batch, which pickling would send
        # along with every row (SQuAD's dev set: 1 GB where 17 MB is the data).
        mine = (order, [tuple(results[i].shape) for i in order],
                torch.cat([results[i].reshape(-1) for i in order]) if order else torch.zeros(0))
        for indices, shapes, flat in distributed.gather_to_all(mine):
            pieces = flat.split([math.prod(shape) for shape in shapes])
            for i, shape, piece in zip(indices, shapes, pieces):
                results[i] = piece.view(shape)
    out.extend(results)
    return out


def metric_names(spec: TaskSpec) -> tuple[str, ...]:
    """What evaluate() reports for the task, its main metric first (GLUE's: Matthews for CoLA, F1
    for MRPC, Pearson for STS-B; F1 for SQuAD)."""
    if spec.kind == "regression":
        return ("pearson", "spearman")
    if spec.kind == "tagging":
        if metrics.is_chunk_scheme(spec.labels or ()):  # named entities: conlleval's scores first, then per type
            return ("entity_f1", "entity_precision", "entity_recall", "token_accuracy") + \
                tuple(f"entity_{score}_{kind}" for score in ("f1", "precision", "recall")
                      for kind in metrics.chunk_types(spec.labels))
        return ("token_accuracy",)
    if spec.kind == "qa":
        if spec.no_answer:  # the official v2.0 script's scores, in its order
            return ("f1", "exact_match", "has_answer_f1", "has_answer_exact_match", "no_answer_f1",
                    "no_answer_exact_match", "best_f1", "best_f1_threshold", "best_exact_match",
                    "best_exact_match_threshold")
        return ("f1", "exact_match")
    names = ("accuracy", "f1", "matthews") if len(spec.labels or []) == 2 else ("accuracy",)
    main = {"cola": "matthews", "mrpc": "f1"}.get(spec.name, "accuracy")
    return (main,) + tuple(n for n in names if n != main)


def evaluate(model, spec: TaskSpec, dev: TaskData, batch_size: int = 64, shard: bool = False) -> dict[str, float]:
    """The task's metrics on dev (fractions; SQuAD in percent). Undefined values (a correlation of
    constant predictions or gold scores) are NaN: metrics.to_json writes them as null. shard: under
    torchrun, called by every process, which share the predictions (predict_logits)."""
    return _evaluate(model, spec, dev, batch_size, with_predictions=False, shard=shard)[0]


def evaluate_and_predict(model, spec: TaskSpec, dev: TaskData, batch_size: int = 64, return_null_odds: bool = False):
    """evaluate()'s metrics and the predictions they score, example by example in file order: a label
    name (classification) or score (regression) per row, a tag per word of each sentence read by
    tasks.read (tagging), the answer text per question id (qa). return_null_odds (SQuAD v2.0 specs):
    (metrics, answers, odds), odds = each question's null score minus its best span's, what the
    official evaluate-v2.0.py takes as --na-prob-file."""
    if return_null_odds and not (spec.kind == "qa" and spec.no_answer):
        raise ValueError(f"return_null_odds is for SQuAD v2.0 tasks (no_answer=True), not task {spec.name!r}")
    return _evaluate(model, spec, dev, batch_size, with_predictions=True, with_null_odds=return_null_odds)


def _evaluate(model, spec: TaskSpec, dev: TaskData, batch_size: int, with_predictions: bool, shard: bool = False,
              with_null_odds: bool = False):
    if not dev.features:
        raise ValueError(f"no dev features to evaluate for task {spec.name!r}: the dev data is empty")
    logits = predict_logits(model, dev.features, batch_size, shard=shard)
    if spec.kind in ("single", "pair", "regression"):
        preds = torch.stack(logits)
        labels = [f["labels"] for f in dev.features]
        if spec.kind == "regression":
            p = preds.squeeze(-1).numpy()
            return ({"pearson": metrics.pearson(p, labels), "spearman": metrics.spearman(p, labels)},
                    [float(x) for x in p])
        p = preds.argmax(-1).numpy()
        scores = {"accuracy": metrics.accuracy(p, labels)}
        if len(spec.labels or []) == 2:
            scores["f1"] = metrics.f1_score(p, labels)
            scores["matthews"] = metrics.matthews_corrcoef(p, labels)
        return scores, [spec.labels[int(i)] for i in p]
    if spec.kind == "tagging":
        preds = torch.cat([l.argmax(-1) for l in logits]).numpy()
        labels = [x for f in dev.features for x in f["labels"]]
        scores = {"token_accuracy": metrics.token_accuracy(preds, labels)}
        entities = metrics.is_chunk_scheme(spec.labels or ())
        if not (entities or with_predictions):
            return scores, None
        if not dev.examples:
            raise ValueError("dev.examples must hold the tagged sentences (as tasks.read gives them): "
                             + ("entity scores are counted over whole words" if entities else "predictions are per word"))
        tags = tags_from_logits(spec, [len(s.words) for s in dev.examples], dev.features, logits)
        if entities:
            # Scored on words as conlleval does, gold from the file: a word that tokenizes to nothing
            # has no piece to tag and counts as predicted O.
            found = metrics.entity_scores([[t or "O" for t in s] for s in tags], [s.tags for s in dev.examples],
                                          by_type=True)
            # every type of the tagset, each evaluation alike (--keep-best entity_f1_PER); one neither in
            # the gold tags nor predicted has no score: NaN (null in JSON), never the best
            scores = {"entity_f1": found["f1"], "entity_precision": found["precision"],
                      "entity_recall": found["recall"], **scores,
                      **{f"entity_{score}_{kind}": found.get(f"{score}_{kind}", math.nan)
                         for score in ("f1", "precision", "recall") for kind in metrics.chunk_types(spec.labels)}}
        return scores, tags if with_predictions else None
    gold = {e.id: e.answers for e in dev.examples}
    if not spec.no_answer:
        answers = answers_from_logits(model, spec, dev.examples, dev.features, logits)
        return metrics.squad_scores(answers, gold), answers
    # every question's best span and its no-answer odds: the threshold is applied by the scoring,
    # which also searches the best one over these spans
    spans, odds = answers_from_logits(model, spec, dev.examples, dev.features, logits,
                                      null_score_diff_threshold=math.inf, return_null_odds=True)
    threshold = spec.null_score_diff_threshold
    answers = {qid: "" if odds[qid] > threshold else text for qid, text in spans.items()}
    if any(math.isnan(v) or v == -math.inf for v in odds.values()):
        # a diverged model: no score (NaN, null in JSON), as a correlation of NaN predictions, not a crash
        scores = dict.fromkeys(metric_names(spec), math.nan)
    else:
        scores = metrics.squad_v2_scores(spans, gold, odds, threshold)
    return (scores, answers, odds) if with_null_odds else (scores, answers)


def tags_from_logits(spec: TaskSpec, sentence_lengths: Sequence[int], features, logits) -> list[list[str]]:
    """Tagging: each word's tag, from the logits of its first piece (a long sentence's pieces are
    consecutive features, data.encode_words_in_pieces)."""
    tags = [[None] * n for n in sentence_lengths]
    for feat, feature_logits in zip(features, logits):
        last = -1
        for pos, w in enumerate(feat["word_ids"]):
            if w is not None and w > last:                                # a word's first piece
                tags[feat["sentence"]][feat["first_word"] + w] = spec.labels[int(feature_logits[pos].argmax())]
                last = w
    return tags


def answers_from_logits(model, spec: TaskSpec, examples, features, logits, **options) -> dict:
    """QA: the best answer text per example id from predict_logits' per-feature (seqlen_i, 2)
    logits; the span score runs on the model's device (the kernel on a GPU). options go to
    data.predict_answers (n_best, return_spans: the Predictor's spans and scores); a SQuAD v2.0
    task (spec.no_answer) answers "" by its null_score_diff_threshold unless options set another."""
    width = max(l.shape[0] for l in logits)
    start = torch.zeros(len(logits), width)
    end = torch.zeros(len(logits), width)
    for i, l in enumerate(logits):                                   # l: (seqlen_i, 2)
        start[i, :l.shape[0]], end[i, :l.shape[0]] = l[:, 0], l[:, 1]
    if spec.no_answer:
        options.setdefault("null_score_diff_threshold", spec.null_score_diff_threshold)
    return data.predict_answers(examples, features, start, end, max_answer_tokens=spec.max_answer_len,
                                device=next(model.parameters()).device, **options)
