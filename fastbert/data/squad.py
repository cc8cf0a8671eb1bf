"""SQuAD v1.1 and v2.0: the JSON reader, windowed features for training, and answer extraction.

    examples = read_squad("train-from-dev-v1.1.json")
    feats = build_squad_features(examples, tokenizer, max_length=384, stride=128)
    # model -> start_logits, end_logits: (num_features, seqlen)
    answers = predict_answers(examples, feats, start_logits, end_logits)   # {id: text}
    squad_scores(answers, {e.id: e.answers for e in examples})              # fastbert.metrics
    # SQuAD v2.0 (questions may have no answer): "" where the [CLS] null score wins by the threshold
    answers = predict_answers(examples, feats, start_logits, end_logits, null_score_diff_threshold=0.0)

Each question is packed with its passage as `[CLS] question [SEP] passage [SEP]`.
A passage longer than the room left is cut into overlapping windows (only the
passage is truncated); `stride` is the number of passage tokens consecutive
windows share (the `tokenizers` meaning, as in transformers' run_qa). Training
uses the first answer: its character span maps to the first and last token
covering it; a window that does not hold the whole answer, and every window of a
question without one (v2.0), points both positions at 0, the [CLS] token.
"""
from __future__ import annotations

import json
import math
import os
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import DataFormatError, not_text_error


@dataclass
class SquadExample:
    id: str
    title: str
    question: str
    context: str
    answers: list[str]          # every gold answer text (scoring takes the max over them)
    answer_starts: list[int]    # character offset of each answer in context


def read_squad(path: str | os.PathLike, max_examples: int | None = None) -> list[SquadExample]:
    """Read the official SQuAD v1.1 or v2.0 JSON layout (data -> paragraphs -> qas -> answers).

    A question with no answer (v2.0: `"is_impossible": true`, `"answers": []`) comes back with
    empty answers; whether its task admits one is tasks.read's call (`--task squad_v2`).
    Raises DataFormatError naming the file and question id when a field is missing,
    an answer's text is empty or not at its answer_start in the context, an is_impossible
    question has answers, or two questions share an id (answers are returned and scored by id).
    """
    path = Path(path)
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 (or None for all), got {max_examples}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            root = json.load(f)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}); "
                              "expected the SQuAD layout (one JSON object, not JSON lines)") from None
    except UnicodeDecodeError as err:
        raise not_text_error(path, err) from None
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise DataFormatError(f"{path}: expected a JSON object with a 'data' list (the SQuAD v1.1/v2.0 layout)")
    out: list[SquadExample] = []
    seen: dict = {}  # question id -> where it was first read
    for number, article in enumerate(root["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs", []), list):
            raise DataFormatError(f"{path}: data[{number}] must be an object with a 'paragraphs' list")
        title = article.get("title", "")
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas", []), list):
                raise DataFormatError(f"{path}: article {title!r}, paragraph {p}: expected an object with a "
                                      "'context' string and a 'qas' list")
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise DataFormatError(f"{path}: article {title!r} has a paragraph without a 'context' string")
            for q, qa in enumerate(paragraph.get("qas", [])):
                qid = qa.get("id", "?") if isinstance(qa, dict) else "?"
                try:
                    texts = [a["text"] for a in qa["answers"]]
                    starts = [int(a["answer_start"]) for a in qa["answers"]]
                    question = qa["question"]
                    if not isinstance(question, str) or not all(isinstance(t, str) for t in texts):
                        raise TypeError("question and answer texts must be strings")
                    impossible = qa.get("is_impossible", False)
                    if not isinstance(impossible, bool):
                        raise TypeError(f"'is_impossible' must be true or false, got {impossible!r}")
                except (KeyError, TypeError, ValueError) as e:
                    raise DataFormatError(f"{path}: question id {qid}: missing or bad field {e}") from None
                if impossible and texts:
                    # v2.0 keeps an unanswerable question's near misses in plausible_answers, never in answers
                    raise DataFormatError(f"{path}: question id {qid}: is_impossible is true but it has "
                                          f"{len(texts)} answers; SQuAD v2.0 gives such a question 'answers': []")
                where = f"article {title!r}, paragraph {p}"
                # predict_answers returns {id: text} and squad_scores reads gold answers by id: a missing
                # id (read as '?') or a repeated one merged two questions into one answer, silently
                if isinstance(qid, bool) or not isinstance(qa.get("id"), (str, int)) or qid == "":
                    raise DataFormatError(f"{path}: {where}: question {q} ({question!r}) has no 'id' string, got "
                                          f"{qa.get('id')!r}; SQuAD answers are returned and scored by id")
                if qid in seen:
                    raise DataFormatError(f"{path}: question id {qid!r} appears twice ({seen[qid]} and {where}); "
                                          "ids must be unique: answers are returned and scored by id")
                seen[qid] = where
                for text, start in zip(texts, starts):
                    if not text.strip():
                        # an empty text matches the context at any start, even past its end, and
                        # maps to no token (build_squad_features would label an unrelated one)
                        raise DataFormatError(f"{path}: question id {qid}: an answer text is empty; a SQuAD "
                                              "answer is a span of its context (no answer: 'answers': [], v2.0)")
                    if start < 0 or context[start:start + len(text)] != text:
                        raise DataFormatError(f"{path}: question id {qid}: answer {text!r} is not at "
                                              f"answer_start={start} of its context")
                out.append(SquadExample(qid, title, question, context, texts, starts))
                if max_examples is not None and len(out) >= max_examples:
                    return out
    return out


def _truncate_questions(tokenizer, questions: list[str], max_tokens: int) -> tuple[list[str], int]:
    """Cut each question after its first max_tokens WordPiece tokens (at a character offset).

    Returns the questions and how many were cut."""
    out, cut = [], 0
    for q, enc in zip(questions, tokenizer._tok.encode_batch(questions, add_special_tokens=False)):
        out.append(q if len(enc.ids) <= max_tokens else q[:enc.offsets[max_tokens - 1][1]])
        cut += len(enc.ids) > max_tokens
    return out, cut


def build_squad_features(examples: Sequence[SquadExample], tokenizer, max_length: int = 384, stride: int = 128,
                         max_question_tokens: int = 64, chunk: int = 1024) -> list[dict]:
    """Tokenize examples into windows; one dict per window (feature):

    input_ids, token_type_ids: lists of int, unpadded (collate() pads);
    start_positions, end_positions: token index of the first answer's first and
        last token in this window, 0 and 0 ([CLS]) when the window does not hold it;
    example_index: position of the window's example in `examples`;
    offsets: (start, end) character span in the context of every token ((0, 0)
        for question and special tokens);
    context_mask: True for passage tokens (the only valid answer positions).

    Questions longer than max_question_tokens are cut (the original BERT recipe
    uses 64) so that question + specials leave more than `stride` passage tokens;
    one warning says how many (`fastbert finetune --max-question-len` sets it).
    """
    if stride < 0:
        raise ValueError(f"stride must be >= 0, got {stride}")
    if max_question_tokens < 1:
        raise ValueError(f"max_question_tokens must be >= 1, got {max_question_tokens}")
    room = max_length - 3 - max_question_tokens  # passage tokens per window in the worst case
    if room <= stride:
        raise ValueError(f"max_length={max_length} (--max-seq-len) leaves {room} passage tokens after a "
                         f"{max_question_tokens}-token question (--max-question-len) and 3 special tokens; the "
                         f"windows need more than stride={stride} (--doc-stride): raise the first or lower the others")
    feats: list[dict] = []
    cut = 0
    for begin in range(0, len(examples), chunk):
        batch = examples[begin:begin + chunk]
        questions, cut_here = _truncate_questions(tokenizer, [e.question for e in batch], max_question_tokens)
        cut += cut_here
        enc = tokenizer(questions, [e.context for e in batch], max_length=max_length, truncation="only_second",
                        padding=False, stride=stride, return_overflowing=True, return_offsets=True,
                        return_tensors=False)
        for w, sample in enumerate(enc["sample_index"]):
            ex = batch[sample]
            seq_ids = enc["sequence_ids"][w]
            offsets = [tuple(o) if s == 1 else (0, 0) for o, s in zip(enc["offsets"][w], seq_ids)]
            context_mask = [s == 1 for s in seq_ids]
            if not ex.context.isascii():
                offsets = _cover_dropped_marks(ex.context, offsets, context_mask)
            start_tok, end_tok = 0, 0
            if ex.answers:
                char_start = ex.answer_starts[0]
                char_end = char_start + len(ex.answers[0])
                start_tok, end_tok = _answer_tokens(offsets, context_mask, char_start, char_end)
            feats.append({"input_ids": enc["input_ids"][w], "token_type_ids": enc["token_type_ids"][w],
                          "start_positions": start_tok, "end_positions": end_tok,
                          "example_index": begin + sample, "offsets": offsets, "context_mask": context_mask})
    if cut:
        # the model never sees the end of these questions, which can change what they ask
        warnings.warn(f"{cut} of {len(examples)} questions have more than max_question_tokens={max_question_tokens} "
                      f"tokens and are cut to their first {max_question_tokens} (`fastbert finetune "
                      "--max-question-len` sets it; a longer question leaves less of the passage per window)",
                      stacklevel=2)
    return feats


def _cover_dropped_marks(context: str, offsets: list, context_mask: list) -> list:
    """Offsets whose passage tokens also cover the combining marks that follow them.

    An uncased BERT normaliser strips combining marks (the accents of NFD text, Indic and Thai
    vowel signs), so the tokenizer's offsets stop before them (as transformers' do): an answer
    ending in one lost it ('Cafe\u0301' came back 'Cafe', 'हैं' as 'ह'), and one ending a window
    was labelled as not in it. A mark belongs to the character before it, so to that token."""
    passage = [t for t, inside in enumerate(context_mask) if inside]
    out = list(offsets)
    for t, after in zip(passage, passage[1:] + [None]):
        start, end = offsets[t]
        limit = offsets[after][0] if after is not None else len(context)
        while end < limit and unicodedata.category(context[end]) in ("Mn", "Me"):
            end += 1
        out[t] = (start, end)
    return out


def _answer_tokens(offsets, context_mask, char_start: int, char_end: int) -> tuple[int, int]:
    """First and last passage token overlapping [char_start, char_end), or (0, 0) if the window misses part of it."""
    ctx = [i for i, m in enumerate(context_mask) if m]
    if char_end <= char_start:  # an empty answer covers no token (the searches below would find none)
        return 0, 0
    if not ctx or offsets[ctx[0]][0] > char_start or offsets[ctx[-1]][1] < char_end:
        return 0, 0
    start = next(i for i in ctx if offsets[i][1] > char_start)
    end = next(i for i in reversed(ctx) if offsets[i][0] < char_end)
    return (start, end) if start <= end else (0, 0)


SPAN_ROWS = 1024  # features per span_score call in predict_answers


def predict_answers(examples: Sequence[SquadExample], features: Sequence[dict], start_logits, end_logits,
                    n_best: int = 20, max_answer_tokens: int = 30, return_n_best: bool = False, device=None,
                    return_spans: bool = False, null_score_diff_threshold: float | None = None,
                    return_null_odds: bool = False):
    """Best answer text per example id from per-feature start/end logits.

    start_logits, end_logits: (num_features, seqlen) tensors (rows may be longer than
    their feature; the extra positions are ignored). Each window's exact top spans
    come from fastbert.ops.span_score: both ends inside the passage (context_mask),
    s <= e < s + max_answer_tokens, score start_logits[s] + end_logits[e]; the
    windows of one passage are merged by score (a span found in several windows counts
    once, at its best score). With return_n_best, each id maps to its n_best (text, score)
    candidates, best first; with return_spans, its n_best {"answer", "start", "end", "score"}
    (the answer's character span in the context, end exclusive), best first. device: where the span
    score runs (default: the logits' device; tasks.evaluate passes the model's, so a GPU uses the kernel).

    SQuAD v2.0 (questions may have no answer in the passage): give null_score_diff_threshold, a
    number. An example's null score is the lowest start_logits[0] + end_logits[0] (the [CLS] token,
    where training points a window without the answer) over its windows, as in BERT's run_squad and
    transformers' run_qa; its answer is "" when the null score minus the best span's score is above the
    threshold (0.0: whichever scores higher; an example with no span at all answers ""). Its n-best
    lists then also hold the null candidate ("", span (-1, -1), the null score): the answer the
    threshold chose first, then the others by score. return_null_odds: also return {id: null score -
    best span score} (inf without a span), what metrics.squad_v2_scores searches a threshold over.
    """
    from ..ops import span_score
    from ..ops.span import MAX_TOPK

    if isinstance(n_best, bool) or not isinstance(n_best, int) or not 1 <= n_best <= MAX_TOPK:
        # each window's candidates come from one span_score call, which keeps at most MAX_TOPK
        raise ValueError(f"n_best must be an int in 1..{MAX_TOPK}, got {n_best!r}")
    with_null = null_score_diff_threshold is not None
    if with_null and (isinstance(null_score_diff_threshold, bool) or not isinstance(null_score_diff_threshold, (int, float))
                      or math.isnan(null_score_diff_threshold)):
        raise ValueError(f"null_score_diff_threshold must be a number (or None: every question has an answer), got "
                         f"{null_score_diff_threshold!r}")
    if return_null_odds and not with_null:
        raise ValueError("return_null_odds needs null_score_diff_threshold: the null score is SQuAD v2.0's")
    first_of: dict = {}
    for i, ex in enumerate(examples):  # the result is keyed by id: two examples with one id would merge
        if first_of.setdefault(ex.id, i) != i:
            raise ValueError(f"examples[{first_of[ex.id]}] and examples[{i}] share the id {ex.id!r}; the answers "
                             "are returned by id, so each example needs its own")
    start_logits, end_logits = torch.as_tensor(start_logits), torch.as_tensor(end_logits)
    device = torch.device(device) if device is not None else start_logits.device
    start_logits, end_logits = start_logits.float().to(device), end_logits.float().to(device)
    if start_logits.shape[0] != len(features) or end_logits.shape != start_logits.shape:
        raise ValueError(f"expected logits with one row per feature ({len(features)}), "
                         f"got {tuple(start_logits.shape)} and {tuple(end_logits.shape)}")
    allowed = torch.zeros(start_logits.shape, dtype=torch.bool)
    for f, feat in enumerate(features):
        allowed[f, :len(feat["context_mask"])] = torch.tensor(feat["context_mask"], dtype=torch.bool)
    allowed = allowed.to(device)
    # In row blocks: the torch backend (the CPU's) holds a (rows, seqlen, max_answer_len) grid and its
    # sort, about 200 KB a row at 384 x 30, so a whole dev set at once took gigabytes. (No features still
    # makes one call, which checks the logits' shape.)
    found = [span_score(start_logits[r:r + SPAN_ROWS], end_logits[r:r + SPAN_ROWS], allowed[r:r + SPAN_ROWS],
                        max_answer_len=max_answer_tokens, topk=n_best)
             for r in range(0, max(len(features), 1), SPAN_ROWS)]
    starts, ends, scores = (torch.cat([part[k].cpu() for part in found]) for k in range(3))
    # per example: best score of each passage span (char_start, char_end). Overlapping windows find
    # the same span; it is one candidate, kept at its best score, not n-best entries repeated.
    candidates: dict[int, dict[tuple[int, int], float]] = {}
    null_scores: dict[int, float] = {}
    if with_null:
        # no features still passes here: the rows were checked above, and an example without one has no null
        window_null = (start_logits[:, 0] + end_logits[:, 0]).cpu().tolist() if len(features) else []
    for f, feat in enumerate(features):
        if with_null:
            i, here = feat["example_index"], window_null[f]
            lowest = null_scores.get(i, math.inf)
            # NaN wins (min() would keep or drop it by order): a NaN null score is no odds to report
            null_scores[i] = here if here < lowest or math.isnan(here) else lowest
        spans = candidates.setdefault(feat["example_index"], {})
        for s, e, score in zip(starts[f].tolist(), ends[f].tolist(), scores[f].tolist()):
            if s < 0:  # fewer allowed spans than topk
                break
            span = (feat["offsets"][s][0], feat["offsets"][e][1])
            if span not in spans or score > spans[span]:
                spans[span] = score
    result, odds = {}, {}
    for i, ex in enumerate(examples):
        ranked = sorted(candidates.get(i, {}).items(), key=lambda c: -c[1])[:n_best]
        if with_null:
            null = null_scores.get(i, math.inf)
            odds[ex.id] = null - ranked[0][1] if ranked else math.inf
            # the threshold's choice first: BERT's rule, not the plain ranking, picks the answer
            null_first = odds[ex.id] > null_score_diff_threshold
            ranked = [((-1, -1), null)] + ranked if null_first else \
                ranked[:1] + sorted(ranked[1:] + [((-1, -1), null)], key=lambda c: -c[1])
        if return_spans:
            result[ex.id] = [{"answer": ex.context[a:b] if a >= 0 else "", "start": a, "end": b, "score": score}
                             for (a, b), score in ranked]
            continue
        ranked = [(ex.context[a:b] if a >= 0 else "", score) for (a, b), score in ranked]
        result[ex.id] = ranked if return_n_best else (ranked[0][0] if ranked else "")
    return (result, odds) if return_null_odds else result
