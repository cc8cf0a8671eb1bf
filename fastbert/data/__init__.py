"""Data for the four fine-tuning applications: readers, encoders, batching.

    glue.py      GLUE-style TSV (sst2, cola, mrpc, rte, stsb presets): read_glue, encode_glue
    tagging.py   CoNLL-U / CoNLL-2003 readers, first-sub-word labels: read_conllu, encode_tagging
    squad.py     SQuAD v1.1 reader, windowed features, answer extraction: read_squad,
                 build_squad_features, predict_answers
    collate.py   dynamic padding and length bucketing: collate, LengthBucketSampler, make_loader

`sst2_sample.tsv` / `sst2_sample_dev.tsv` (4,000 / 500 rows of GLUE SST-2) ship
with the package for the README demo: sample_path("sst2_sample.tsv").
"""
from pathlib import Path


class DataFormatError(ValueError):
    """A line of a data file that does not fit its format; the message starts with `file:line:`."""


def not_text_error(path, err: UnicodeDecodeError) -> DataFormatError:
    """The error for a file that does not decode: names the first line that fails (text files
    are decoded a block at a time, so the decoder's own position is no line)."""
    line = 0
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                raw.decode(err.encoding)
            except UnicodeDecodeError:
                break
    return DataFormatError(f"{path}:{line}: not valid {err.encoding} text ({err.reason}); save the file as UTF-8")


def sample_path(name: str = "sst2_sample.tsv") -> Path:
    """Path of a data file shipped inside fastbert/data."""
    path = Path(__file__).parent / name
    if not path.exists():
        raise FileNotFoundError(f"no shipped data file {name!r} in {path.parent}")
    return path


# Submodules import DataFormatError from here, so they come after it.
from .collate import LengthBucketSampler, collate, make_loader  # noqa: E402
from .glue import TASKS, GlueData, GlueTask, encode_glue, read_glue  # noqa: E402
from .squad import SquadExample, build_squad_features, predict_answers, read_squad  # noqa: E402
from .tagging import (CONLL2003_NER_TAGS, UPOS_TAGS, TaggedSentence, encode_tagging, encode_words,  # noqa: E402
                      encode_words_in_pieces, first_subword_labels, read_conll2003, read_conllu, tag_names)

__all__ = ["DataFormatError", "sample_path", "collate", "LengthBucketSampler", "make_loader", "TASKS", "GlueData",
           "GlueTask", "read_glue", "encode_glue", "SquadExample", "read_squad", "build_squad_features",
           "predict_answers", "UPOS_TAGS", "CONLL2003_NER_TAGS", "TaggedSentence", "read_conllu", "read_conll2003", "tag_names",
           "encode_words", "encode_words_in_pieces", "encode_tagging", "first_subword_labels"]
