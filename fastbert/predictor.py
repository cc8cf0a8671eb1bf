"""A fine-tuned model as a function of raw inputs: what a service built on our wheels calls.

    predict = fastbert.Predictor.from_pretrained("out/model")     # a `fastbert finetune` model folder
    predict("a gripping film")             # {"label": "1", "score": 0.948, "scores": {"0": 0.052, "1": 0.948}}
    predict(["a", "b"])                    # a list in, a list out
    predict("A man sings.", "Someone sings.")       # a pair model: text and text_pair (lists too)
    predict("John lives in Paris")         # tagging: words, tags and, for IOB tags, the entities
    predict(question="Who?", context="...")         # qa: the answer, its character span and score
                                                    # (SQuAD v2.0 models: "" for no answer, null_score_diff)

Each result is plain Python (str, float, int, list, dict), ready for JSON. The model runs as
`fastbert evaluate` and `predict` run it: under torch.no_grad, in the autocast `finetune`
trained under (bf16 on a GPU, float32 on the CPU; `precision`), batched by length.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from . import data, metrics, tasks
from .tokenizer import Tokenizer


class Predictor:
    def __init__(self, model, spec: tasks.TaskSpec, tokenizer: Tokenizer, batch_size: int = 64,
                 precision: str = "auto", n_best: int = 1, null_score_diff_threshold: float | None = None):
        from .train import _autocast_dtype

        from .ops.span import MAX_TOPK

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        if isinstance(n_best, bool) or not isinstance(n_best, int) or not 1 <= n_best <= MAX_TOPK:
            raise ValueError(f"n_best must be an int in 1..{MAX_TOPK}, got {n_best!r}")
        self.model, self.spec, self.tokenizer, self.batch_size = model.eval(), spec, tokenizer, batch_size
        self.device = next(model.parameters()).device
        self.autocast = _autocast_dtype(precision, self.device)
        self.n_best = n_best
        if null_score_diff_threshold is not None:
            if spec.kind != "qa" or not spec.no_answer:
                raise ValueError(f"null_score_diff_threshold is for a question-answering model that may answer no "
                                 f"answer (SQuAD v2.0, --task squad_v2); this one is {spec.kind} ({spec.name})")
            if isinstance(null_score_diff_threshold, bool) or not isinstance(null_score_diff_threshold, (int, float)) \
                    or null_score_diff_threshold != null_score_diff_threshold:
                raise ValueError(f"null_score_diff_threshold must be a number, got {null_score_diff_threshold!r}")
            self.spec = dataclasses.replace(spec, null_score_diff_threshold=float(null_score_diff_threshold))

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device | None = None, backend: str | None = None,
                        **kwargs) -> "Predictor":
        """The model, task and tokenizer `fastbert finetune` saved to OUT/model. device: default a GPU
        when there is one, else the CPU. backend: "torch", "triton" or "cuda" for this model's ops."""
        from .checkpoint import resolve_model_path

        folder = resolve_model_path(path)
        if not ((folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists()):
            hint = (" (a training checkpoint keeps no tokenizer: use the finished run's model folder)"
                    if (folder / "trainer_state.pt").exists() else "")
            raise ValueError(f"{str(folder)!r} holds no tokenizer (tokenizer.json or vocab.txt){hint}")
        model, spec = tasks.load_finetuned(folder, backend)
        device = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), spec, Tokenizer.from_pretrained(folder), **kwargs)

    def _context(self):
        from .train import autocast

        return autocast(self.device, self.autocast)

    def __call__(self, texts=None, text_pairs=None, *, question=None, context=None, words=None):
        """texts: a str (one result) or a list of them (a list of results). text_pairs: the second
        text of a pair model, alike. Tagging: texts are split at whitespace, or give words (a list of
        words, or a list of such lists). QA: question and context, each a str or a list. Scores that
        are not finite (no answer in an empty context; a diverged model's NaN) come out as None,
        so json.dumps writes strict JSON."""
        return metrics.json_safe(self._predict(texts, text_pairs, question, context, words))

    def _predict(self, texts, text_pairs, question, context, words):
        kind = self.spec.kind
        if kind == "qa":
            if texts is not None or text_pairs is not None or words is not None:
                raise ValueError("a question-answering model takes question=... and context=..., not texts")
            return self._answers(question, context)
        if question is not None or context is not None:
            raise ValueError(f"question/context are for a question-answering model; this one is {kind} ({self.spec.name})")
        if kind == "tagging":
            if text_pairs is not None:
                raise ValueError("a tagging model takes one text (or words) per input, not text_pairs")
            if (texts is None) == (words is None):
                raise ValueError("a tagging model takes texts or words=..., one of them")
            if words is not None:
                if isinstance(words, str):
                    raise TypeError("words must be a list of words (str), or a list of such lists; give a text "
                                    "as texts=..., split at whitespace")
                single = bool(words) and all(isinstance(w, str) for w in words)
                word_lists = [list(words)] if single else [list(w) for w in _strings_lists(words, "words")]
            else:
                single = isinstance(texts, str)
                word_lists = [t.split() for t in _strings(texts, "texts")]
            found = self._tags(word_lists)
            return found[0] if single else found
        if texts is None:
            raise ValueError("give texts: a str or a list of str")
        single = isinstance(texts, str)
        texts = _strings(texts, "texts")
        pair = takes_pair(self.spec)
        if pair != (text_pairs is not None):
            raise ValueError(f"this {self.spec.name} model takes "
                             + ("text pairs: give text_pairs too" if pair else "one text per input, not text_pairs"))
        pairs = _strings(text_pairs, "text_pairs") if pair else None
        if pairs is not None and (isinstance(text_pairs, str) != single or len(pairs) != len(texts)):
            raise ValueError("texts and text_pairs must match: " + (
                f"{len(texts)} and {len(pairs)}" if isinstance(text_pairs, str) == single else
                "a str and a list" if single else "a list and a str"))
        found = self._sentences(texts, pairs)
        return found[0] if single else found

    def _logits(self, features):
        with self._context():
            return tasks.predict_logits(self.model, features, self.batch_size)

    def _sentences(self, texts, pairs):
        enc = self.tokenizer(texts, pairs, max_length=self.spec.max_seq_len, padding=False, return_tensors=False)
        features = [{"input_ids": i, "token_type_ids": t} for i, t in zip(enc["input_ids"], enc["token_type_ids"])]
        logits = self._logits(features)
        if self.spec.kind == "regression":
            return [{"score": float(l.float().squeeze())} for l in logits]
        out = []
        for l in logits:
            probs = torch.softmax(l.float(), -1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            out.append({"label": self.spec.labels[best], "score": probs[best],
                        "scores": dict(zip(self.spec.labels, probs))})
        return out

    def _tags(self, word_lists):
        features = data.encode_words_in_pieces(self.tokenizer, word_lists, self.spec.max_seq_len)
        tags = tasks.tags_from_logits(self.spec, [len(w) for w in word_lists], features, self._logits(features))
        entities = metrics.is_chunk_scheme(self.spec.labels or ())
        out = []
        for words, sentence_tags in zip(word_lists, tags):
            result = {"words": words, "tags": sentence_tags}  # None: a word that tokenizes to nothing
            if entities:
                found = metrics.chunks([t or "O" for t in sentence_tags])
                result["entities"] = [{"type": kind, "first": first, "last": last,
                                       "text": " ".join(words[first:last + 1])}
                                      for kind, first, last in sorted(found, key=lambda c: (c[1], c[2]))]
            out.append(result)
        return out

    def _answers(self, question, context):
        if question is None or context is None:
            raise ValueError("a question-answering model needs question=... and context=...")
        single = isinstance(question, str)
        questions, contexts = _strings(question, "question"), _strings(context, "context")
        if isinstance(context, str) != single or len(questions) != len(contexts):
            raise ValueError(f"question and context must match: {len(questions)} and {len(contexts)}")
        examples = [data.SquadExample(id=str(i), title="", question=q, context=c, answers=[], answer_starts=[])
                    for i, (q, c) in enumerate(zip(questions, contexts))]
        features = data.build_squad_features(examples, self.tokenizer, self.spec.max_seq_len, self.spec.doc_stride,
                                             max_question_tokens=self.spec.max_question_len)
        ranked = tasks.answers_from_logits(self.model, self.spec, examples, features, self._logits(features),
                                           n_best=self.n_best, return_spans=True,
                                           **({"return_null_odds": True} if self.spec.no_answer else {}))
        ranked, odds = ranked if self.spec.no_answer else (ranked, None)
        out = []
        for ex in examples:
            spans = ranked[ex.id]
            best = spans[0] if spans else {"answer": "", "start": -1, "end": -1, "score": None}  # nothing to answer from
            # v2.0: "" (span -1, -1) for no answer; the odds let a caller pick its own threshold
            out.append({**best, **({"null_score_diff": odds[ex.id]} if odds is not None else {}),
                        **({"n_best": spans} if self.n_best > 1 else {})})
        return out[0] if single else out


def _strings(value, name) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(t, str) for t in items):
        raise TypeError(f"{name} must be a str or a non-empty list of str, got {type(value).__name__}")
    return list(items)


def _strings_lists(value, name) -> list[list[str]]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(ws, (list, tuple)) and all(isinstance(w, str) for w in ws) for ws in value):
        raise TypeError(f"{name} must be a list of words (str) or a non-empty list of such lists")
    return value


def takes_pair(spec) -> bool:
    """Whether a sentence task's model reads text pairs: its text columns (given, or its preset's)."""
    if spec.text_cols:
        return len(spec.text_cols) == 2
    if spec.name in data.TASKS:
        return len(data.TASKS[spec.name].text_cols) == 2
    return spec.kind == "pair"
