"""Token tagging data: CoNLL-U and CoNLL-2003 readers, and word -> WordPiece labels.

    sents = read_conllu("en_ewt-ud-train.conllu", tag="upos")
    feats = encode_tagging(sents, tokenizer, UPOS_TAGS, max_length=128)

A word becomes one or more WordPiece tokens; only the first carries the word's
tag id. The other pieces, [CLS], [SEP] and (after collate) padding carry -100,
which cross-entropy and token_accuracy ignore. A sentence longer than max_length
tokens becomes consecutive pieces (encode_words_in_pieces), so every word keeps its
label; encode_words alone truncates.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import DataFormatError, not_text_error

IGNORE_INDEX = -100

# The 17 universal part-of-speech tags of UD v2, in the order of the UD docs.
UPOS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
             "PUNCT", "SCONJ", "SYM", "VERB", "X")

# CoNLL-2003's named-entity tags, in the order of the Hugging Face `conll2003` dataset's ids (the
# original files use IOB1: I- throughout, B- only between two entities of one type).
CONLL2003_NER_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")

_CONLLU_TAG_COLUMN = {"upos": 3, "xpos": 4}  # 0-based: ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC


@dataclass
class TaggedSentence:
    words: list[str]
    tags: list[str]
    line: int  # 1-based line of the sentence's first token, for messages
    source: str = ""  # the file it was read from, for messages


def read_conllu(path: str | os.PathLike, tag: str = "upos", max_sentences: int | None = None) -> list[TaggedSentence]:
    """Read a CoNLL-U file: one sentence per blank-line-separated block.

    tag: "upos" (column 4) or "xpos" (column 5). Comment lines (`#`), multiword
    token ranges (`1-2`) and empty nodes (`8.1`) are skipped, so the words are
    the syntactic words the tags belong to.
    """
    if tag not in _CONLLU_TAG_COLUMN:
        raise ValueError(f"tag must be 'upos' or 'xpos', got {tag!r}")
    col = _CONLLU_TAG_COLUMN[tag]
    path = Path(path)
    _check_max(max_sentences)
    sents: list[TaggedSentence] = []
    words, tags, first = [], [], 0
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in _numbered(f, path):
            line = line.rstrip("\r\n")
            if not line.strip():
                if words:
                    sents.append(TaggedSentence(words, tags, first, str(path)))
                    if max_sentences is not None and len(sents) >= max_sentences:
                        return sents
                words, tags = [], []
                continue
            if line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) != 10:
                raise DataFormatError(f"{path}:{line_no}: a CoNLL-U token line has 10 tab-separated fields, "
                                      f"got {len(fields)}")
            ident = fields[0]
            if "-" in ident or "." in ident:
                lo, _, hi = ident.replace(".", "-").partition("-")
                if not (lo.isdigit() and hi.isdigit()):
                    raise DataFormatError(f"{path}:{line_no}: bad token id {ident!r}")
                continue  # multiword token range or empty node
            if not ident.isdigit():
                raise DataFormatError(f"{path}:{line_no}: bad token id {ident!r}")
            if int(ident) != len(words) + 1:
                # ids run 1, 2, ... within a sentence; a restart means a missing blank line, which would
                # otherwise merge two sentences silently
                raise DataFormatError(f"{path}:{line_no}: token id {ident} where word {len(words) + 1} of the "
                                      "sentence was expected (CoNLL-U words are numbered from 1 and every "
                                      "sentence ends with a blank line)")
            if not words:
                first = line_no
            words.append(fields[1])
            tags.append(fields[col])
    if words:
        sents.append(TaggedSentence(words, tags, first, str(path)))
    return sents[:max_sentences] if max_sentences is not None else sents


def _check_max(max_sentences):
    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1 (or None for all), got {max_sentences}")


def _numbered(f, path: Path):
    """enumerate(f, 1), with a byte sequence that is not UTF-8 as a DataFormatError naming the line."""
    try:
        yield from enumerate(f, 1)
    except UnicodeDecodeError as err:
        raise not_text_error(path, err) from None


def read_conll2003(path: str | os.PathLike, tag_col: int = -1,
                   max_sentences: int | None = None) -> list[TaggedSentence]:
    """Read a CoNLL-2003-style file: `word col1 col2 ... tag` per line (whitespace-separated).

    tag_col: the column of the tag (0 is the word; -1, the default, the last:
    NER in CoNLL-2003; 1 is POS, 2 chunk). Blank lines end sentences and
    `-DOCSTART-` lines are skipped. Every token line must have the same number of
    columns as the first one.
    """
    path = Path(path)
    if tag_col == 0:
        raise ValueError("tag_col=0 is the word column")
    _check_max(max_sentences)
    sents: list[TaggedSentence] = []
    words, tags, first, width = [], [], 0, None
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in _numbered(f, path):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if words:
                    sents.append(TaggedSentence(words, tags, first, str(path)))
                    if max_sentences is not None and len(sents) >= max_sentences:
                        return sents
                words, tags = [], []
                continue
            if width is None:
                width = len(fields)
                if not -width <= tag_col < width:
                    raise DataFormatError(f"{path}:{line_no}: tag_col={tag_col} but the line has {width} columns")
            if len(fields) != width:
                raise DataFormatError(f"{path}:{line_no}: expected {width} whitespace-separated columns, "
                                      f"got {len(fields)}")
            if not words:
                first = line_no
            words.append(fields[0])
            tags.append(fields[tag_col])
    if words:
        sents.append(TaggedSentence(words, tags, first, str(path)))
    return sents[:max_sentences] if max_sentences is not None else sents


# A CoNLL-U token id: a word (3), a multiword token range (1-2) or an empty node (8.1).
_CONLLU_ID = re.compile(r"\d+(-\d+|\.\d+)?")
# CoNLL-U comments as treebanks write them: `# sent_id = 1`, `# text = ...`, `# newdoc`, `# newpar`.
_CONLLU_COMMENT = re.compile(r"#\s*(newdoc|newpar)\b|#\s*[\w.:-]+\s*=")
_SNIFF_LINES = 1000


def detect_tagging_format(path: str | os.PathLike) -> tuple[str, str]:
    """("conllu" | "conll2003", why): the format of a tagging file, from its content.

    The first token line decides: 10 tab-separated fields starting with a token id (`1`, `1-2`,
    `8.1`) is CoNLL-U; a `-DOCSTART-` line is CoNLL-2003. Any other token line means CoNLL-2003
    (a word and its tags, whitespace-separated), unless a CoNLL-U comment (`# sent_id = ...`,
    `# text = ...`) came before it: then it is a CoNLL-U file with a broken line. Other lines
    starting with `#` decide nothing (CoNLL-2003-style files may tag `#hashtag` words). The
    name is a hint only where the content is ambiguous: a tab-separated line starting with a
    token id but without 10 fields, or no token line in the first lines (`.conllu`: CoNLL-U).
    """
    path = Path(path)
    named_conllu = path.suffix.lower() == ".conllu"
    comment = None                                   # (line number, text) of the first CoNLL-U comment
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in _numbered(f, path):
            if line_no > _SNIFF_LINES:
                break
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split()
            if fields[0] == "-DOCSTART-":
                return "conll2003", f"line {line_no} is a CoNLL-2003 '-DOCSTART-' line"
            if line.startswith("#"):
                if comment is None and _CONLLU_COMMENT.match(line):
                    comment = (line_no, line if len(line) <= 40 else line[:37] + "...")
                continue
            tabbed = line.split("\t")
            has_id = _CONLLU_ID.fullmatch(tabbed[0]) is not None
            if len(tabbed) == 10 and has_id:
                return "conllu", f"line {line_no} has 10 tab-separated fields starting with token id {tabbed[0]!r}"
            if comment is not None:
                return "conllu", f"line {comment[0]} is a CoNLL-U comment ({comment[1]!r})"
            if len(tabbed) > 1 and has_id and named_conllu:
                return "conllu", (f"the file is named .conllu and line {line_no} starts with token id {tabbed[0]!r} "
                                  "(the content alone is ambiguous)")
            count, sep = (len(tabbed), "tab") if len(tabbed) > 1 else (len(fields), "whitespace")
            return "conll2003", (f"line {line_no} has {count} {sep}-separated field{'s' * (count != 1)}, "
                                 "not CoNLL-U's 10 tab-separated fields starting with a token id")
    none = f"no token line in the first {_SNIFF_LINES} lines"
    if named_conllu:
        return "conllu", f"{none}, and the file is named .conllu"
    if comment is not None:
        return "conllu", f"{none}, and line {comment[0]} is a CoNLL-U comment"
    return "conll2003", f"{none}, and the file is not named .conllu"


_FORMAT_NAMES = {"conllu": "CoNLL-U", "conll2003": "CoNLL-2003"}


def read_tagged(path: str | os.PathLike, max_sentences: int | None = None) -> list[TaggedSentence]:
    """A tagging file in either format, found from its content (detect_tagging_format): CoNLL-U
    gives UPOS tags, CoNLL-2003 the last column. A malformed line's error says which format was
    assumed and why."""
    _check_max(max_sentences)
    fmt, why = detect_tagging_format(path)
    reader = read_conllu if fmt == "conllu" else read_conll2003
    try:
        return reader(path, max_sentences=max_sentences)
    except DataFormatError as err:
        raise DataFormatError(f"{err} (read as {_FORMAT_NAMES[fmt]}: {why})") from None


def tag_names(sentences: Sequence[TaggedSentence]) -> list[str]:
    """The sorted distinct tags of some sentences: a label list when no fixed one exists."""
    return sorted({t for s in sentences for t in s.tags})


def encode_words(tokenizer, word_lists: Sequence[Sequence[str]], max_length: int = 128) -> list[dict]:
    """WordPiece-encode pre-split words (like transformers' is_split_into_words=True).

    tokenizer: a fastbert.Tokenizer. Returns one dict per sentence with lists
    `input_ids`, `token_type_ids` and `word_ids` (the word each token came from,
    None for [CLS]/[SEP]), truncated to max_length tokens.
    """
    if max_length < 3:
        raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
    word_lists = [list(words) for words in word_lists]
    for i, words in enumerate(word_lists):
        for j, w in enumerate(words):
            if not isinstance(w, str):
                raise TypeError(f"word_lists[{i}][{j}] must be a str, got {type(w).__name__}")
    # the tokenizers.Tokenizer: fastbert.Tokenizer has no pre-split entry point
    encodings = tokenizer.truncating(max_length).encode_batch(word_lists, is_pretokenized=True)
    return [{"input_ids": list(e.ids), "token_type_ids": list(e.type_ids), "word_ids": list(e.word_ids)}
            for e in encodings]


def encode_words_in_pieces(tokenizer, word_lists: Sequence[Sequence[str]], max_length: int = 128) -> list[dict]:
    """encode_words over every word: a sentence longer than max_length tokens becomes consecutive
    pieces, each a feature of its own, instead of losing its last words to truncation (those
    would be neither trained on nor scored). A word cut at the end of a piece keeps its first
    pieces there (they carry its label) and the next piece starts at the word after it.

    Features come sentence by sentence, each sentence's pieces in order; each also holds
    `sentence` (its index in word_lists) and `first_word` (the sentence's index of its word 0).
    """
    pieces: list[list[dict]] = [[] for _ in word_lists]
    pending = [(i, 0) for i in range(len(word_lists))]            # (sentence, its first word not yet encoded)
    while pending:
        features = encode_words(tokenizer, [list(word_lists[i])[first:] for i, first in pending], max_length)
        following = []
        for (i, first), feat in zip(pending, features):
            last = max((w for w in feat["word_ids"] if w is not None), default=-1)
            if last < 0 and first > 0:
                continue        # the words left after a cut have no WordPiece token: nothing to tag
            feat.update(sentence=i, first_word=first)
            pieces[i].append(feat)
            # Only a full piece was cut: words after `last` in one that is not full have no
            # WordPiece token at all (U+200B, a soft hyphen) and need no piece of their own.
            cut = len(feat["input_ids"]) >= max_length
            if cut and last >= 0 and first + last + 1 < len(word_lists[i]):
                following.append((i, first + last + 1))
        pending = following
    return [feat for sentence in pieces for feat in sentence]


def first_subword_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Label of each token: its word's label on the word's first piece, IGNORE_INDEX elsewhere."""
    out, previous = [], None
    for w in word_ids:
        out.append(IGNORE_INDEX if w is None or w == previous else word_labels[w])
        previous = w
    return out


def encode_tagging(sentences: Sequence[TaggedSentence], tokenizer, labels: Sequence[str],
                   max_length: int = 128) -> list[dict]:
    """Features for token classification: `input_ids`, `token_type_ids`, `labels`
    (one per token: the tag id on each word's first piece, -100 elsewhere) and `word_ids`
    (relative to the feature's first word). A sentence longer than max_length tokens gives
    several features (encode_words_in_pieces), so every word is trained on and scored.

    labels: the tag list (tag id = position), e.g. UPOS_TAGS or tag_names(train).
    """
    ids = {t: i for i, t in enumerate(labels)}
    feats = encode_words_in_pieces(tokenizer, [s.words for s in sentences], max_length)
    for feat in feats:
        sent = sentences[feat["sentence"]]
        try:
            tag_ids = [ids[t] for t in sent.tags]
        except KeyError as e:
            where = f"{sent.source}:{sent.line}: the sentence starting here" if sent.source else \
                f"the sentence at line {sent.line}"
            raise DataFormatError(f"{where} has tag {e.args[0]!r}, not in labels {list(labels)}") from None
        feat["labels"] = first_subword_labels(feat["word_ids"], tag_ids[feat["first_word"]:])
    return feats
