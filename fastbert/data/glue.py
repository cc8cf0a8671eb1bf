"""GLUE-style tab-separated files: sentence (pair) classification and regression.

    data = read_glue("sst2/train.tsv", task="sst2")            # preset columns and labels
    dev = read_glue("sst2/dev.tsv", task="sst2")
    feats = encode_glue(data, tokenizer, max_length=128)         # unpadded token ids + label

    # any other TSV: columns by header name or by index, labels discovered from the file
    data = read_glue("my.tsv", text_cols=("premise", "hypothesis"), label_col="gold")
    dev = read_glue("my_dev.tsv", text_cols=(...), label_col="gold", labels=data.label_names)

GLUE files hold unbalanced quote characters (`"` opens a sentence and never
closes), so they are read with csv.QUOTE_NONE: a tab always separates columns
and a newline always ends a row. A malformed row (wrong column count, unknown
or unparsable label) raises DataFormatError naming the file and the line.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import DataFormatError, not_text_error

Column = str | int
_FROM_TASK = object()  # label_col default: take it from the task preset (None means "no label column")


@dataclass(frozen=True)
class GlueTask:
    """How to read one task's files.

    text_cols: one column (single sentence) or two (a pair), by header name or 0-based index.
    label_col: the label column, or None for unlabeled files (GLUE test sets).
    header: whether the first line names the columns.
    labels: the fixed label list (label id = position); None means regression.
    """
    name: str
    text_cols: tuple[Column, ...]
    label_col: Column | None
    header: bool
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        return self.labels is None


# The label order follows GLUE's own (and the `datasets` glue configs), so label
# ids agree with published checkpoints.
TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("sst2", ("sentence",), "label", True, ("0", "1"), ("accuracy",)),
    "cola": GlueTask("cola", (3,), 1, False, ("0", "1"), ("matthews",)),
    "mrpc": GlueTask("mrpc", ("#1 String", "#2 String"), "Quality", True, ("0", "1"), ("accuracy", "f1")),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), "label", True, ("entailment", "not_entailment"), ("accuracy",)),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), "score", True, None, ("pearson", "spearman")),
}


@dataclass
class GlueData:
    """The rows of one file.

    texts: first sentence of every row; pairs: second sentence (None for single-sentence tasks).
    labels: int label ids (classification), floats (regression) or None (unlabeled file).
    label_names: label id -> the label's string in the file (None for regression).
    """
    texts: list[str]
    pairs: list[str] | None
    labels: list[int] | list[float] | None
    label_names: list[str] | None
    path: Path
    task: str | None = None
    lines: list[int] = field(default_factory=list)  # 1-based line number of every row, for messages

    @property
    def is_regression(self) -> bool:
        return self.labels is not None and self.label_names is None

    @property
    def num_labels(self) -> int:
        """Output width of the head: number of classes, or 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)


def is_column_index(col) -> bool:
    """An index rather than a name: an int, or digits as the command line gives them ("3")."""
    return isinstance(col, int) or str(col).strip().lstrip("-").isdigit()


def _column_index(col: Column, names: list[str] | None, path: Path, what: str) -> int:
    if isinstance(col, bool) or not isinstance(col, (int, str)):
        raise TypeError(f"{what} must be a column name or index, got {col!r}")
    if isinstance(col, int):
        return col
    if names is not None and col in names:
        return names.index(col)
    if is_column_index(col):
        return int(col)
    if names is None:
        raise ValueError(f"{what}={col!r} names a column but {path} is read without a header; give a 0-based index")
    raise ValueError(f"{what}={col!r} is not a column of {path}; its header has {names}")


def _sorted_labels(found: set[str]) -> list[str]:
    # "0", "1", "2" sort as numbers, anything else as strings
    try:
        return sorted(found, key=lambda s: (float(s), s))
    except ValueError:
        return sorted(found)


def read_glue(path: str | os.PathLike, task: str | None = None, *, text_cols: Sequence[Column] | None = None,
              label_col: Column | None = _FROM_TASK, header: bool | None = None,
              labels: Sequence[str | int] | None = None, regression: bool | None = None,
              max_rows: int | None = None, encoding: str = "utf-8-sig") -> GlueData:
    """Read a GLUE-style TSV.

    task: a preset from TASKS (sst2, cola, mrpc, rte, stsb); any keyword given
        explicitly overrides the preset's value.
    text_cols: one or two columns (names need a header; indices are 0-based).
    label_col: the label column; None reads an unlabeled file.
    header: whether the first line is a header (default True without a task).
    labels: fixed label list (id = position). Without it, classification labels
        are discovered: the sorted distinct values (numerically if all numbers).
    regression: float labels (default: the task's kind, else False).
    max_rows: stop after this many data rows.
    encoding: the default also drops a byte-order mark, so a header name still matches.
    """
    path = Path(path)
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 (or None for all), got {max_rows}")
    preset = None
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
        preset = TASKS[task]
    if text_cols is None:
        if preset is None:
            raise ValueError("give text_cols (or a task preset)")
        text_cols = preset.text_cols
    text_cols = tuple(text_cols)
    if len(text_cols) not in (1, 2):
        raise ValueError(f"text_cols must name one or two columns, got {text_cols!r}")
    if label_col is _FROM_TASK:
        if preset is None:
            raise ValueError("give label_col (None for an unlabeled file) or a task preset")
        label_col = preset.label_col
    if header is None:
        header = preset.header if preset is not None else True
    if regression is None:
        regression = preset.is_regression if preset is not None else False
    if labels is None and preset is not None and not regression:
        labels = preset.labels
    if regression and labels is not None:
        raise ValueError("labels (a class list) and regression=True exclude each other")
    fixed = [str(x) for x in labels] if labels is not None else None
    if fixed is not None and len(set(fixed)) != len(fixed):
        raise ValueError(f"labels has duplicates: {fixed}")

    texts, pairs, raw_labels, lines = [], [], [], []
    with open(path, newline="", encoding=encoding) as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        names, width, cols, lab = None, None, None, None
        for row in _rows(reader, path):
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line (usually the last)
            if width is None:
                width = len(row)
                if header:
                    names = row
                cols = [_column_index(c, names, path, "text_cols") for c in text_cols]
                lab = None if label_col is None else _column_index(label_col, names, path, "label_col")
                for c in cols + ([lab] if lab is not None else []):
                    if not -width <= c < width:
                        raise ValueError(f"column {c} is out of range: {path} has {width} columns")
                if header:
                    continue
            if len(row) != width:
                raise DataFormatError(f"{path}:{line}: expected {width} tab-separated columns, got {len(row)}")
            texts.append(row[cols[0]])
            if len(cols) == 2:
                pairs.append(row[cols[1]])
            if lab is not None:
                raw_labels.append(row[lab].strip())
            lines.append(line)
            if max_rows is not None and len(texts) >= max_rows:
                break
    if width is None:
        raise DataFormatError(f"{path}:1: the file is empty")

    out_labels, label_names = None, None
    if label_col is not None:
        if regression:
            out_labels = []
            for text, line in zip(raw_labels, lines):
                try:
                    value = float(text)
                except ValueError:
                    raise DataFormatError(f"{path}:{line}: label {text!r} is not a number") from None
                if not math.isfinite(value):
                    raise DataFormatError(f"{path}:{line}: label {text!r} is not finite")
                out_labels.append(value)
        else:
            label_names = fixed if fixed is not None else _sorted_labels(set(raw_labels))
            ids = {name: i for i, name in enumerate(label_names)}
            out_labels = []
            for text, line in zip(raw_labels, lines):
                if text not in ids:
                    raise DataFormatError(f"{path}:{line}: label {text!r} is not one of {label_names}")
                out_labels.append(ids[text])
    elif not regression:
        label_names = fixed
    return GlueData(texts, pairs if len(cols) == 2 else None, out_labels, label_names, path, task, lines)


def _rows(reader, path: Path):
    """The csv reader's rows, its own errors (a field over csv.field_size_limit(), a NUL byte:
    usually a file that is not a TSV) as DataFormatError naming the file and line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataFormatError(f"{path}:{reader.line_num}: not a readable tab-separated line ({err}); "
                                  "is this a TSV file?") from None
        except UnicodeDecodeError as err:
            raise not_text_error(path, err) from None
        yield row


def encode_glue(data: GlueData, tokenizer, max_length: int = 128, chunk: int = 4096) -> list[dict]:
    """Tokenize every row (pairs packed `[CLS] a [SEP] b [SEP]`, truncation longest_first).

    Returns one dict per row with unpadded `input_ids`, `token_type_ids` (lists of
    int) and, for labeled data, `labels` (int, or float for regression); collate()
    pads them per batch.
    """
    feats = []
    for start in range(0, len(data), chunk):
        stop = min(start + chunk, len(data))
        enc = tokenizer(data.texts[start:stop], None if data.pairs is None else data.pairs[start:stop],
                        max_length=max_length, truncation="longest_first", padding=False, return_tensors=False)
        for i in range(stop - start):
            feat = {"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i]}
            if data.labels is not None:
                feat["labels"] = data.labels[start + i]
            feats.append(feat)
    return feats
