"""fastbert.data: readers on the real shared datasets (small slices) and on tiny
malformed files, tagging labels against transformers' word_ids(), SQuAD answer
mapping, collation and bucketing."""
import dataclasses
import json
import math
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import fastbert
from fastbert.data import (UPOS_TAGS, DataFormatError, LengthBucketSampler, TaggedSentence, build_squad_features,
                           collate, encode_glue, encode_tagging, encode_words, make_loader, predict_answers,
                           read_conll2003, read_conllu, read_glue, read_squad, sample_path, tag_names)
from fastbert.data.squad import SquadExample
from fastbert.metrics import squad_scores

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"needs the shared datasets at {DATA}")
    return path


@pytest.fixture(scope="module")
def tok():
    return fastbert.Tokenizer.from_pretrained("default")


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.BertTokenizerFast.from_pretrained(str(fastbert.default_model_path()))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- GLUE TSV ---------------------------------------------------------------------------------

def test_sst2_preset_slice():
    data = read_glue(shared("sst2/train.tsv"), "sst2", max_rows=200)
    assert len(data) == 200 and data.pairs is None
    assert data.label_names == ["0", "1"] and data.num_labels == 2 and not data.is_regression
    assert data.texts[0] == "hide new secretions from the parental units "  # the space before the tab stays
    assert data.labels[:3] == [0, 0, 1]
    assert data.lines[:2] == [2, 3]


def test_rte_quotes_counts_and_discovered_labels():
    # RTE sentences hold unmatched quote characters: default csv quoting would merge rows.
    train = read_glue(shared("rte/train.tsv"), "rte")
    assert len(train) == 2490 and any('"' in t for t in train.texts + train.pairs)
    assert train.labels.count(0) == 1249 and train.labels.count(1) == 1241  # entailment / not_entailment
    dev = read_glue(shared("rte/dev.tsv"), text_cols=("sentence1", "sentence2"), label_col="label")
    assert dev.label_names == ["entailment", "not_entailment"]  # discovered, sorted
    assert (dev.labels.count(0), dev.labels.count(1)) == (146, 131)
    assert dev.texts[0].startswith("Dana Reeve") and dev.pairs[0].startswith("Christopher Reeve")


def test_stsb_regression_by_name_and_index():
    by_name = read_glue(shared("stsb/train.tsv"), "stsb")
    assert len(by_name) == 5749 and by_name.is_regression and by_name.num_labels == 1
    assert by_name.labels[:2] == [5.0, 3.8] and all(0.0 <= x <= 5.0 for x in by_name.labels)
    assert (by_name.texts[0], by_name.pairs[0]) == ("A plane is taking off.", "An air plane is taking off.")
    by_index = read_glue(shared("stsb/train.tsv"), text_cols=(7, 8), label_col=9, regression=True, max_rows=50)
    assert by_index.texts == by_name.texts[:50] and by_index.labels == by_name.labels[:50]


def test_cola_and_mrpc_presets(tmp_path):
    cola = write(tmp_path, "cola.tsv", 'gj04\t1\t\tOur friends won\'t buy this analysis, let alone the next one.\n'
                                       'gj04\t0\t*\tThe "more you eat, the fatter you get.\n')
    data = read_glue(cola, "cola")
    assert data.labels == [1, 0] and data.texts[1] == 'The "more you eat, the fatter you get.'
    mrpc = write(tmp_path, "mrpc.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                       "1\t702876\t702977\tAmrozi accused his brother.\tHe accused \"the witness.\n")
    data = read_glue(mrpc, "mrpc")
    assert (data.texts, data.pairs, data.labels) == (["Amrozi accused his brother."], ['He accused "the witness.'], [1])


def test_label_discovery_numeric_order_and_unlabeled(tmp_path):
    path = write(tmp_path, "x.tsv", "text\tgold\na\t10\nb\t2\nc\t2\n\n")
    data = read_glue(path, text_cols=("text",), label_col="gold")
    assert data.label_names == ["2", "10"] and data.labels == [1, 0, 0]
    fixed = read_glue(path, text_cols=(0,), label_col=1, labels=[10, 2, 7])
    assert fixed.labels == [0, 1, 1] and fixed.num_labels == 3
    unlabeled = read_glue(path, text_cols=("text",), label_col=None)
    assert unlabeled.labels is None and unlabeled.texts == ["a", "b", "c"]


def test_byte_order_mark(tmp_path):
    tsv = tmp_path / "bom.tsv"
    tsv.write_text("sentence\tlabel\nfine \t1\n", encoding="utf-8-sig")
    assert read_glue(tsv, "sst2").labels == [1]
    conllu = tmp_path / "bom.conllu"
    conllu.write_text("# text = a\n1\ta\ta\tDET\tDT\t_\t0\troot\t_\t_\n", encoding="utf-8-sig")
    assert read_conllu(conllu)[0].words == ["a"]


@pytest.mark.parametrize("body, kwargs, match", [
    ("sentence\tlabel\ngood\t1\nbad\t0\textra\n", {"task": "sst2"}, r"bad\.tsv:3: expected 2 .*got 3"),
    ("sentence\tlabel\ngood\t1\nbad\tneutral\n", {"task": "sst2"}, r"bad\.tsv:3: label 'neutral' is not one of"),
    ("s1\ts2\tscore\na\tb\t1.5\na\tb\thigh\n", {"text_cols": ("s1", "s2"), "label_col": "score",
                                                "regression": True}, r"bad\.tsv:3: label 'high' is not a number"),
    ("a\t1\nb\n", {"text_cols": (0,), "label_col": 1, "header": False}, r"bad\.tsv:2: expected 2"),
    # float() reads these; a NaN or infinite score poisons the MSE loss and every correlation
    ("s1\ts2\tscore\na\tb\t1.5\na\tb\tnan\n", {"text_cols": ("s1", "s2"), "label_col": "score",
                                                "regression": True}, r"bad\.tsv:3: label 'nan' is not finite"),
    ("s1\ts2\tscore\na\tb\t-inf\n", {"text_cols": (0, 1), "label_col": 2, "regression": True},
     r"bad\.tsv:2: label '-inf' is not finite"),
])
def test_glue_malformed_rows_name_file_and_line(tmp_path, body, kwargs, match):
    path = write(tmp_path, "bad.tsv", body)
    with pytest.raises(DataFormatError, match=match):
        read_glue(path, **kwargs)


def test_glue_bad_arguments(tmp_path):
    path = write(tmp_path, "x.tsv", "a\t1\n")
    with pytest.raises(ValueError, match="without a header"):
        read_glue(path, text_cols=("sentence",), label_col=1, header=False)
    with pytest.raises(ValueError, match="not a column"):
        read_glue(path, text_cols=("sentence",), label_col="a")
    with pytest.raises(ValueError, match="task must be one of"):
        read_glue(path, "mnli")
    with pytest.raises(ValueError, match="one or two"):
        read_glue(path, text_cols=(0, 0, 0), label_col=1, header=False)
    with pytest.raises(ValueError, match="out of range"):
        read_glue(path, text_cols=(5,), label_col=1, header=False)
    # the bounds themselves: index == width is one past the last column (past the check it would be an
    # IndexError on the first row), -width is the first column
    with pytest.raises(ValueError, match=r"column 2 is out of range: .*x\.tsv has 2 columns"):
        read_glue(path, text_cols=(2,), label_col=1, header=False)
    with pytest.raises(ValueError, match=r"column -3 is out of range"):
        read_glue(path, text_cols=(0,), label_col=-3, header=False)
    assert read_glue(path, text_cols=(-2,), label_col=-1, header=False).texts == ["a"]


def test_glue_user_mistakes(tmp_path):
    """Indices as the command line gives them ("2"), a file that is not a TSV (a JSON file: one
    field over csv's limit) or not UTF-8, and max_rows < 1 (read one row before)."""
    path = write(tmp_path, "nli.tsv", "id\tpremise\thypothesis\tgold\n1\tA\tB\tyes\n")
    data = read_glue(path, text_cols=("1", "2"), label_col="3")
    assert (data.texts, data.pairs, data.label_names) == (["A"], ["B"], ["yes"])
    from_end = read_glue(path, text_cols=("-3", "-2"), label_col="-1")  # `--label-col -1`: the last column
    assert (from_end.texts, from_end.pairs, from_end.label_names) == (["A"], ["B"], ["yes"])
    json_file = write(tmp_path, "squad.json", '{"data": "' + "x" * 200_000 + '"}\n')
    with pytest.raises(DataFormatError, match=r"squad\.json:1: not a readable tab-separated line"):
        read_glue(json_file, "sst2")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes(b"sentence\tlabel\nfine\t1\ncaf\xe9\t1\n")
    with pytest.raises(DataFormatError, match=r"latin\.tsv:3: not valid utf-8 text"):
        read_glue(latin, "sst2")
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        read_glue(path, text_cols=(1,), label_col=3, max_rows=0)


def test_glue_blank_lines_label_whitespace_and_crlf(tmp_path):
    """A line of spaces is a blank line (skipped, not a 1-column row); a label keeps no surrounding
    spaces, and a file saved with Windows line ends reads like the same file with '\\n'."""
    data = read_glue(write(tmp_path, "ws.tsv", "sentence\tlabel\ngood\t1 \n   \nbad\t 0\n"), "sst2")
    assert (data.texts, data.labels, data.lines) == (["good", "bad"], [1, 0], [2, 4])
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(b"sentence\tlabel\r\ngood\t1\r\nbad\t0\r\n")
    data = read_glue(crlf, "sst2")
    assert (data.texts, data.labels) == (["good", "bad"], [1, 0])


def test_unlabeled_file_keeps_the_fixed_label_list(tmp_path):
    """A GLUE test set has no label column: its rows carry no labels, but the head still needs the
    task's classes (an unlabeled SST-2 file is still a 2-class problem, not a 1-wide regression)."""
    path = write(tmp_path, "test.tsv", "index\tsentence\n0\tfine\n1\tdull\n")
    data = read_glue(path, "sst2", label_col=None)
    assert data.labels is None and data.label_names == ["0", "1"] and data.num_labels == 2
    assert not data.is_regression
    custom = read_glue(path, text_cols=("sentence",), label_col=None, labels=["neg", "pos"])
    assert custom.label_names == ["neg", "pos"] and custom.num_labels == 2
    assert read_glue(path, text_cols=("sentence",), label_col=None).label_names is None


def test_explicit_regression_overrides_the_preset_labels(tmp_path):
    """Any keyword given explicitly overrides the preset: regression=True on a classification preset
    reads the labels as scores (the preset's class list must not come along and clash with it)."""
    path = write(tmp_path, "sst2.tsv", "sentence\tlabel\nfine\t1\ndull\t0\n")
    data = read_glue(path, "sst2", regression=True)
    assert data.labels == [1.0, 0.0] and data.is_regression and data.label_names is None
    with pytest.raises(ValueError, match="exclude each other"):
        read_glue(path, "sst2", regression=True, labels=["0", "1"])


def test_encode_glue_truncates_the_longer_text_of_a_pair(tok, hf_tok):
    """Pairs are cut longest_first, as transformers' run_glue does (truncation=True): a short first
    text and a long second one lose tokens from the second (RTE's long premise hides the strategy:
    there the longer text is the first)."""
    long = "the film drags on and on without a single idea worth keeping " * 3
    texts, pairs = ["Fine.", "Is it good?", long], [long, "No.", long]
    data = dataclasses.replace(read_glue(sample_path("sst2_sample_dev.tsv"), "sst2", max_rows=3),
                               texts=texts, pairs=pairs)
    feats = encode_glue(data, tok, max_length=24)
    ref = hf_tok(texts, pairs, truncation=True, max_length=24)
    assert [f["input_ids"] for f in feats] == ref["input_ids"]
    assert [f["token_type_ids"] for f in feats] == ref["token_type_ids"]
    assert [len(f["input_ids"]) for f in feats] == [24, len(ref["input_ids"][1]), 24]
    assert feats[0]["token_type_ids"].count(0) == len(tok.tokenize("Fine.")) + 2  # the first text whole


def test_encode_glue_pairs(tok):
    data = read_glue(shared("rte/dev.tsv"), "rte", max_rows=40)
    feats = encode_glue(data, tok, max_length=64, chunk=16)
    ref = tok(data.texts, data.pairs, max_length=64, padding=False, return_tensors=False)
    assert [f["input_ids"] for f in feats] == ref["input_ids"]
    assert [f["token_type_ids"] for f in feats] == ref["token_type_ids"]
    assert [f["labels"] for f in feats] == data.labels
    assert max(len(f["input_ids"]) for f in feats) == 64  # some RTE pairs are longer: truncated


# --- shipped SST-2 sample ---------------------------------------------------------------------

def test_sst2_sample_files():
    train = read_glue(sample_path("sst2_sample.tsv"), "sst2")
    dev = read_glue(sample_path("sst2_sample_dev.tsv"), "sst2")
    assert (len(train), len(dev)) == (4000, 500)
    assert not set(train.texts) & set(dev.texts)
    size = sample_path("sst2_sample.tsv").stat().st_size + sample_path("sst2_sample_dev.tsv").stat().st_size
    assert size < 300_000
    source = DATA / "sst2" / "train.tsv"
    if source.exists():  # redraw as fastbert/data/README.md says and compare bytes
        lines = source.read_text(encoding="utf-8").split("\n")
        header, rows = lines[0], [line for line in lines[1:] if line]
        idx = list(range(len(rows)))
        random.Random(0).shuffle(idx)
        for name, part in (("sst2_sample.tsv", idx[:4000]), ("sst2_sample_dev.tsv", idx[4000:4500])):
            expected = "\n".join([header] + [rows[i] for i in part]) + "\n"
            assert sample_path(name).read_text(encoding="utf-8") == expected, name


# --- CoNLL-U / CoNLL-2003 ---------------------------------------------------------------------

def test_conllu_dev_counts_and_first_sentence():
    sents = read_conllu(shared("ud_ewt/en_ewt-ud-dev.conllu"))
    assert len(sents) == 2001 and sum(len(s.words) for s in sents) == 25147  # SOURCES.md
    assert sents[0].words == ["From", "the", "AP", "comes", "this", "story", ":"]
    assert sents[0].tags == ["ADP", "DET", "PROPN", "VERB", "DET", "NOUN", "PUNCT"]
    assert sents[0].line == 5
    # sorted, not a set's order (which changes with PYTHONHASHSEED): the label ids of a model trained
    # without a fixed tag list are positions in this list
    assert tag_names(sents) == sorted(UPOS_TAGS)
    xpos = read_conllu(shared("ud_ewt/en_ewt-ud-dev.conllu"), tag="xpos", max_sentences=1)
    assert len(xpos) == 1 and xpos[0].tags == ["IN", "DT", "NNP", "VBZ", "DT", "NN", ":"]
    for n in (2, 7):  # `--max-train-examples`: exactly n sentences, the first n
        assert [s.words for s in read_conllu(shared("ud_ewt/en_ewt-ud-dev.conllu"), max_sentences=n)] == \
            [s.words for s in sents[:n]]
    # "didn't" is the range 29-30 over "did" + "n't": the range line is skipped
    assert any(s.words[28:30] == ["did", "n't"] for s in sents)
    assert not any("didn't" in s.words for s in sents)


def test_conllu_train_counts():
    sents = read_conllu(shared("ud_ewt/en_ewt-ud-train.conllu"), tag="xpos")
    assert len(sents) == 12544 and sum(len(s.words) for s in sents) == 204577  # SOURCES.md: empty nodes skipped
    assert len(tag_names(sents)) == 49


CONLLU = """# sent_id = 1
# text = Today's test
1-2\tToday's\t_\t_\t_\t_\t_\t_\t_\t_
1\tToday\ttoday\tNOUN\tNN\t_\t0\troot\t_\t_
2\t's\t's\tPART\tPOS\t_\t1\tcase\t_\t_
2.1\tgone\tgo\tVERB\tVBN\t_\t_\t_\t1:dep\t_
3\ttest\ttest\tNOUN\tNN\t_\t1\tdep\t_\t_

1\tLast\tlast\tADJ\tJJ\t_\t0\troot\t_\t_"""


def test_conllu_synthetic_ranges_empty_nodes_no_final_blank(tmp_path):
    sents = read_conllu(write(tmp_path, "s.conllu", CONLLU))
    assert [s.words for s in sents] == [["Today", "'s", "test"], ["Last"]]
    assert [s.tags for s in sents] == [["NOUN", "PART", "NOUN"], ["ADJ"]]
    assert [s.line for s in sents] == [4, 9]


@pytest.mark.parametrize("bad, match", [
    ("1\tword\tword\tNOUN\n", r"bad\.conllu:3: a CoNLL-U token line has 10"),
    ("x\tword\tword\tNOUN\tNN\t_\t0\troot\t_\t_\n", r"bad\.conllu:3: bad token id 'x'"),
    ("1-b\tword\t_\t_\t_\t_\t_\t_\t_\t_\n", r"bad\.conllu:3: bad token id '1-b'"),
    # the next sentence without the blank line before it: read as one, it would have merged the two
    ("# sent_id = 2\n1\tGo\tgo\tVERB\tVB\t_\t0\troot\t_\t_\n", r"bad\.conllu:4: token id 1 where word 2"),
    ("3\tgap\tgap\tNOUN\tNN\t_\t1\tdep\t_\t_\n", r"bad\.conllu:3: token id 3 where word 2"),
])
def test_conllu_malformed(tmp_path, bad, match):
    path = write(tmp_path, "bad.conllu", "# c\n1\tok\tok\tADJ\tJJ\t_\t0\troot\t_\t_\n" + bad)
    with pytest.raises(DataFormatError, match=match):
        read_conllu(path)
    with pytest.raises(ValueError, match="upos"):
        read_conllu(path, tag="lemma")


CONLL2003 = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
-DOCSTART- -X- -X- O

Blackburn NNP B-NP B-PER
"""


def test_conll2003(tmp_path):
    path = write(tmp_path, "ner.txt", CONLL2003)
    sents = read_conll2003(path)
    assert [s.words for s in sents] == [["EU", "rejects", "German"], ["Peter"], ["Blackburn"]]
    assert [s.tags for s in sents] == [["B-ORG", "O", "B-MISC"], ["B-PER"], ["B-PER"]]
    assert [s.line for s in sents] == [3, 7, 10]
    assert read_conll2003(path, tag_col=1)[0].tags == ["NNP", "VBZ", "JJ"]
    assert len(read_conll2003(path, max_sentences=2)) == 2
    assert [s.words for s in read_conll2003(path, max_sentences=1)] == [["EU", "rejects", "German"]]  # mid-file
    with pytest.raises(DataFormatError, match=r"ner\.txt:3: tag_col=7"):
        read_conll2003(path, tag_col=7)
    # the bounds: 4 columns hold tag_col -4..3 (0 is the word); 4 is one past the last (an IndexError
    # on the first token line if the check let it through)
    with pytest.raises(DataFormatError, match=r"ner\.txt:3: tag_col=4 but the line has 4 columns"):
        read_conll2003(path, tag_col=4)
    with pytest.raises(DataFormatError, match=r"ner\.txt:3: tag_col=-5"):
        read_conll2003(path, tag_col=-5)
    assert read_conll2003(path, tag_col=3)[0].tags == read_conll2003(path)[0].tags
    bad = write(tmp_path, "bad.txt", "EU NNP B-NP B-ORG\nrejects VBZ O\n")
    with pytest.raises(DataFormatError, match=r"bad\.txt:2: expected 4 .*got 3"):
        read_conll2003(bad)


def test_tagging_format_from_content_not_name(tmp_path, tok):
    """The tagging reader goes by the content: a real UD file named .txt is CoNLL-U (it was read as
    CoNLL-2003 and failed on its comment lines), a CoNLL-2003 file is CoNLL-2003 whatever its
    name, and a malformed line's error says which format was assumed and why."""
    from fastbert import tasks
    from fastbert.data.tagging import detect_tagging_format, read_tagged

    real = shared("ud_ewt/en_ewt-ud-dev.conllu")
    renamed = tmp_path / "ewt-dev.txt"
    renamed.write_bytes(real.read_bytes())
    fmt, why = detect_tagging_format(renamed)
    assert fmt == "conllu" and "10 tab-separated fields" in why
    spec = tasks.TaskSpec.preset("pos")
    found = tasks.read(spec, renamed, tok, max_examples=20).examples
    expected = read_conllu(real, max_sentences=20)
    assert [s.words for s in found] == [s.words for s in expected] and [s.tags for s in found] == [s.tags for s in expected]

    for name in ("ner.txt", "ner.conllu"):                                 # the name is no longer the judge
        path = write(tmp_path, name, CONLL2003)
        assert detect_tagging_format(path)[0] == "conll2003"
        assert [s.tags for s in read_tagged(path)] == [["B-ORG", "O", "B-MISC"], ["B-PER"], ["B-PER"]]
    plain = write(tmp_path, "pos.txt", "EU NNP\nrejects VBZ\n\n#hashtag NN\nPeter NNP\n")  # no -DOCSTART-
    assert [s.words for s in read_tagged(plain)] == [["EU", "rejects"], ["#hashtag", "Peter"]]
    assert detect_tagging_format(write(tmp_path, "empty.conllu", "\n"))[0] == "conllu"  # nothing to go by: the name

    broken = write(tmp_path, "broken.txt", "# sent_id = 1\n# text = ok word\n"
                   "1\tok\tok\tADJ\tJJ\t_\t0\troot\t_\t_\n2\tword\tword\tNOUN\n")
    with pytest.raises(DataFormatError, match=r"broken\.txt:4: a CoNLL-U token line has 10 tab-separated fields, "
                                              r"got 4 \(read as CoNLL-U: line 3 has 10 tab-separated fields"):
        tasks.read(spec, broken, tok)
    first_broken = write(tmp_path, "first.txt", "# sent_id = 1\n1\tok\tok\tADJ\n")
    with pytest.raises(DataFormatError, match=r"read as CoNLL-U: line 1 is a CoNLL-U comment \('# sent_id = 1'\)"):
        read_tagged(first_broken)
    ragged = write(tmp_path, "ragged.conllu", "EU NNP B-NP B-ORG\nrejects VBZ O\n")
    with pytest.raises(DataFormatError, match=r"ragged\.conllu:2: expected 4 whitespace-separated columns, got 3 "
                                              r"\(read as CoNLL-2003: line 1 has 4 whitespace-separated fields, not "
                                              r"CoNLL-U's 10"):
        read_tagged(ragged)


def test_tagging_format_edge_cases(tmp_path):
    """Where the content is nearly CoNLL-U: a tab-separated CoNLL-2003-style file whose first word is a
    number (a token id to the eye) is CoNLL-2003 unless the name says .conllu; only exactly 10 fields
    make a CoNLL-U token line; the reason names the first CoNLL-U comment."""
    from fastbert.data.tagging import detect_tagging_format, read_tagged

    years = "1984\tNUM\nwas\tAUX\n\nfine\tADJ\n"
    fmt, why = detect_tagging_format(write(tmp_path, "years.txt", years))
    assert fmt == "conll2003" and "line 1 has 2 tab-separated fields" in why
    assert [s.words for s in read_tagged(tmp_path / "years.txt")] == [["1984", "was"], ["fine"]]
    fmt, why = detect_tagging_format(write(tmp_path, "years.conllu", years))
    assert fmt == "conllu" and "named .conllu" in why
    eleven = "1\t" + "\t".join(["x"] * 10) + "\n"
    fmt, why = detect_tagging_format(write(tmp_path, "eleven.txt", eleven))
    assert fmt == "conll2003" and "line 1 has 11 tab-separated fields" in why
    two_comments = write(tmp_path, "two.txt", "# sent_id = 1\n# text = ok\n1\tok\tok\tADJ\n")
    assert detect_tagging_format(two_comments) == ("conllu", "line 1 is a CoNLL-U comment ('# sent_id = 1')")


# --- tagging encoder --------------------------------------------------------------------------

def test_tagging_first_subword_matches_transformers(tok, hf_tok):
    """Each feature is transformers' encoding (is_split_into_words, truncated to max_length) of
    the words it starts at; a sentence cut there goes on in a next feature from the word after
    the last one it holds, so every word carries its tag once (truncation dropped the rest)."""
    sents = read_conllu(shared("ud_ewt/en_ewt-ud-dev.conllu"), max_sentences=300)
    feats = encode_tagging(sents, tok, UPOS_TAGS, max_length=32)  # 32: some sentences are cut
    ids = {t: i for i, t in enumerate(UPOS_TAGS)}
    assert [f["sentence"] for f in feats] == sorted(f["sentence"] for f in feats)
    tagged = {i: [] for i in range(len(sents))}
    for feat in feats:
        sent, first = sents[feat["sentence"]], feat["first_word"]
        ref = hf_tok(sent.words[first:], is_split_into_words=True, truncation=True, max_length=32)
        assert feat["input_ids"] == ref["input_ids"]
        assert feat["word_ids"] == ref.word_ids()
        expected, seen = [], set()
        for w in ref.word_ids():
            expected.append(-100 if w is None or w in seen else ids[sent.tags[first + w]])
            seen.add(w)
        assert feat["labels"] == expected
        tagged[feat["sentence"]] += [first + w for w in sorted(seen - {None})]
    assert all(tagged[i] == list(range(len(s.words))) for i, s in enumerate(sents))   # each word once, in order
    assert len(feats) > len(sents)                                                       # some were cut
    assert any(len(f["input_ids"]) > len(sents[f["sentence"]].words) + 2 for f in feats)  # real sub-words


def test_a_word_longer_than_a_piece_keeps_its_first_pieces_and_the_next_piece_goes_on(tok):
    words = ["a", "antidisestablishmentarianism" * 3, "b", "c"]
    feats = encode_tagging([TaggedSentence(words, ["DET", "NOUN", "X", "X"], 1)], tok, UPOS_TAGS, max_length=6)
    labelled = [(f["first_word"] + w, label) for f in feats for w, label in zip(f["word_ids"], f["labels"])
                if label != -100]
    assert labelled == [(0, UPOS_TAGS.index("DET")), (1, UPOS_TAGS.index("NOUN")), (2, UPOS_TAGS.index("X")),
                        (3, UPOS_TAGS.index("X"))]
    assert all(len(f["input_ids"]) <= 6 for f in feats)


def test_words_without_a_wordpiece_token_after_the_last_real_word_add_no_empty_piece(tok, hf_tok):
    """U+200B and the soft hyphen vanish in BERT's normaliser. A sentence that fits stays one feature
    (it used to gain a second, [CLS] [SEP] only), and a cut sentence whose remaining words are all
    such words ends with the piece that was cut."""
    fits = TaggedSentence(["Hello", "world", "\u200b"], ["INTJ", "NOUN", "X"], 1)
    feats = encode_tagging([fits], tok, UPOS_TAGS, max_length=128)
    ref = hf_tok(fits.words, is_split_into_words=True, truncation=True, max_length=128)
    assert [f["input_ids"] for f in feats] == [ref["input_ids"]]
    cut = TaggedSentence(["a", "b", "c", "d", "\u00ad", "\u200b"], ["X"] * 6, 2)
    feats = encode_tagging([cut], tok, UPOS_TAGS, max_length=4)
    assert [f["first_word"] for f in feats] == [0, 2]
    assert all(any(label != -100 for label in f["labels"]) for f in feats)


def test_encode_words_and_unknown_tag(tok):
    out = encode_words(tok, [["Unbelievably", "fine"], []], max_length=16)
    assert out[0]["word_ids"][0] is None and out[0]["word_ids"][-1] is None
    assert out[0]["word_ids"].count(0) > 1 and out[1]["input_ids"] == [tok.cls_token_id, tok.sep_token_id]
    with pytest.raises(ValueError, match="line 7 has tag 'ZZZ'"):
        encode_tagging([TaggedSentence(["a"], ["ZZZ"], 7)], tok, UPOS_TAGS)
    with pytest.raises(TypeError, match=r"word_lists\[0\]\[1\]"):
        encode_words(tok, [["a", 3]])
    # encode_words sets truncation on the tokenizers object it shares with the Tokenizer; it must take
    # it off again (tokenize() and the SQuAD question cut encode through that object without resetting)
    long = "word " * 40
    encode_words(tok, [long.split()], max_length=8)
    assert tok._tok.truncation is None and len(tok.tokenize(long)) == 40


def test_unknown_tag_names_the_file(tmp_path, tok):
    """A dev file's tag outside the training labels: the message names the file (only a line before)."""
    path = write(tmp_path, "dev.conllu", "# c\n1\tok\tok\tADJ\tJJ\t_\t0\troot\t_\t_\n\n"
                                         "1\tno\tno\tFOO\tJJ\t_\t0\troot\t_\t_\n")
    with pytest.raises(DataFormatError, match=r"dev\.conllu:4: the sentence starting here has tag 'FOO'"):
        encode_tagging(read_conllu(path), tok, UPOS_TAGS)
    with pytest.raises(ValueError, match="max_sentences must be >= 1"):
        read_conllu(path, max_sentences=0)


# --- SQuAD ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def squad():
    return read_squad(shared("squad/train-from-dev-v1.1.json"))


def test_read_squad_counts(squad):
    assert len(squad) == 5665 and sum(len(e.answers) for e in squad) == 18471  # SOURCES.md
    assert len({e.title for e in squad}) == 24 and len({e.id for e in squad}) == 5665
    first = squad[0]
    assert first.id == "56be4db0acb8001400a502ec" and first.title == "Super_Bowl_50"
    assert first.answers[0] == "Denver Broncos" and first.answer_starts[0] == 177
    assert first.context[177:177 + 14] == "Denver Broncos"


def test_read_squad_malformed(tmp_path):
    bad = write(tmp_path, "bad.json", '{"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": '
                                      '"abc def", "qas": [{"id": "q7", "question": "?", "answers": '
                                      '[{"text": "def", "answer_start": 1}]}]}]}]}')
    with pytest.raises(DataFormatError, match=r"bad\.json: question id q7: answer 'def' is not at answer_start=1"):
        read_squad(bad)
    with pytest.raises(DataFormatError, match=r"bad2\.json: expected a JSON object"):
        read_squad(write(tmp_path, "bad2.json", "[]"))
    # not JSON at all, or JSON lines: the file and line (only json's message before)
    with pytest.raises(DataFormatError, match=r"lines\.json:2: not valid JSON \(Extra data"):
        read_squad(write(tmp_path, "lines.json", '{"data": []}\n{"data": []}\n'))
    # a layout error below 'data' (AttributeError traceback before)
    with pytest.raises(DataFormatError, match=r"bad3\.json: data\[0\] must be an object with a 'paragraphs' list"):
        read_squad(write(tmp_path, "bad3.json", '{"data": [{"title": "T", "paragraphs": {"context": "x"}}]}'))
    # a negative answer_start that slices to the answer text from the end (accepted before)
    with pytest.raises(DataFormatError, match=r"answer 'de' is not at answer_start=-3"):
        read_squad(write(tmp_path, "bad4.json", '{"data": [{"title": "T", "paragraphs": [{"context": "abc def", '
                                                '"qas": [{"id": "q", "question": "?", "answers": '
                                                '[{"text": "de", "answer_start": -3}]}]}]}]}'))


def _window_examples(squad, n=240):
    # the longest contexts (several windows each) and the first n plain ones
    longest = sorted(range(len(squad)), key=lambda i: -len(squad[i].context))[:60]
    return [squad[i] for i in sorted(set(longest) | set(range(n)))]


def test_squad_features_answer_mapping(tok, squad):
    examples = _window_examples(squad)
    feats = build_squad_features(examples, tok, max_length=256, stride=128)
    assert len(feats) > len(examples)  # long passages give several windows
    positive, exact = set(), 0
    for f in feats:
        ex = examples[f["example_index"]]
        n = len(f["input_ids"])
        assert n <= 256 and len(f["offsets"]) == n and len(f["context_mask"]) == n
        ctx = [i for i, m in enumerate(f["context_mask"]) if m]
        assert ctx == list(range(ctx[0], n - 1))  # passage tokens run up to the final [SEP]
        assert all(f["token_type_ids"][i] == 1 for i in ctx)
        # question and special tokens: (0, 0), as documented (their own offsets point into the question)
        assert all(o == (0, 0) for o, m in zip(f["offsets"], f["context_mask"]) if not m)
        char_start = ex.answer_starts[0]
        char_end = char_start + len(ex.answers[0])
        inside = f["offsets"][ctx[0]][0] <= char_start and char_end <= f["offsets"][ctx[-1]][1]
        s, e = f["start_positions"], f["end_positions"]
        if not inside:
            assert (s, e) == (0, 0)
            continue
        assert 0 < s <= e and f["context_mask"][s] and f["context_mask"][e]
        span = ex.context[f["offsets"][s][0]:f["offsets"][e][1]]
        assert ex.answers[0] in span
        # the span is the tightest: dropping its first or last token loses part of the answer
        assert f["offsets"][s][1] > char_start and f["offsets"][e][0] < char_end
        exact += span == ex.answers[0]
        positive.add(f["example_index"])
    assert positive == set(range(len(examples)))  # every answer lies whole in some window
    # an answer_start may point inside a longer word ('8' in '18'; SOURCES.md): the span is then wider
    assert exact >= 0.97 * sum(f["start_positions"] > 0 for f in feats)


def test_squad_windows_share_stride_tokens(tok, squad):
    examples = sorted(squad, key=lambda e: -len(e.context))[:10]
    feats = build_squad_features(examples, tok, max_length=192, stride=48)
    by_example = {}
    for f in feats:
        by_example.setdefault(f["example_index"], []).append(f)
    assert all(len(v) >= 3 for v in by_example.values())
    for windows in by_example.values():
        for a, b in zip(windows, windows[1:]):
            ctx_a = [t for t, m in zip(a["input_ids"], a["context_mask"]) if m]
            ctx_b = [t for t, m in zip(b["input_ids"], b["context_mask"]) if m]
            assert ctx_a[-48:] == ctx_b[:48]


def test_squad_long_question_and_bad_sizes(tok):
    ex = SquadExample("q", "t", " ".join(["why"] * 300), "the answer is here " * 60, ["here"], [14])
    with pytest.warns(UserWarning, match="1 of 1 questions have more than max_question_tokens=64"):
        feats = build_squad_features([ex], tok, max_length=128, stride=32, max_question_tokens=64)
    assert all(sum(t == 0 for t in f["token_type_ids"]) == 64 + 2 for f in feats)  # [CLS] 64 question [SEP]
    assert feats[0]["start_positions"] > 0
    with pytest.raises(ValueError, match="stride=128"):
        build_squad_features([ex], tok, max_length=192, stride=128)


def test_squad_window_room_bound_is_exact(tok):
    """The windows need more passage tokens than the stride after a question of max_question_tokens
    and the 3 special tokens: room == stride is refused with the flags to change, room == stride + 1
    works even for a question of the full max_question_tokens."""
    context = " ".join(f"w{i}" for i in range(80))
    short = SquadExample("s", "t", "Who?", context, ["w40"], [context.index("w40")])
    with pytest.raises(ValueError, match=r"max_length=27 \(--max-seq-len\) leaves 16 passage tokens after a "
                                         r"8-token question"):
        build_squad_features([short], tok, max_length=3 + 8 + 16, stride=16, max_question_tokens=8)
    full = SquadExample("f", "t", "one two three four five six seven eight", context, ["w40"],
                        [context.index("w40")])
    assert len(tok.tokenize(full.question)) == 8
    for ex in (short, full):
        feats = build_squad_features([ex], tok, max_length=3 + 8 + 17, stride=16, max_question_tokens=8)
        assert len(feats) > 1 and all(len(f["input_ids"]) <= 28 for f in feats)
        ctx = [[t for t, m in zip(f["input_ids"], f["context_mask"]) if m] for f in feats]
        assert all(a[-16:] == b[:16] for a, b in zip(ctx, ctx[1:]))  # consecutive windows share the stride


def test_squad_features_do_not_depend_on_the_chunk(tok, squad):
    """Examples are tokenized chunk by chunk; example_index is the position in `examples`, not in the
    chunk (a chunk-relative index would point example 5's windows at example 1 with chunk=4, and take
    their answers from another passage; the default chunk of 1024 hides it in every other test)."""
    examples = _window_examples(squad, n=6)[:9]
    whole = build_squad_features(examples, tok, max_length=128, stride=32)
    assert max(f["example_index"] for f in whole) == len(examples) - 1
    for chunk in (1, 4):
        assert build_squad_features(examples, tok, max_length=128, stride=32, chunk=chunk) == whole
    one_by_one = [dict(f, example_index=i) for i, ex in enumerate(examples)
                  for f in build_squad_features([ex], tok, max_length=128, stride=32)]
    assert one_by_one == whole


def test_n_best_lists_only_real_spans(tok):
    """A short passage holds fewer spans than n_best: the list has just those (span_score pads its top-k
    with (-1, -1, -inf); such a slot read as a span would add an empty answer at -inf)."""
    ex = SquadExample("q", "t", "Which?", "red blue", [], [])
    feat, = build_squad_features([ex], tok, max_length=16, stride=2, max_question_tokens=4)
    g, width = torch.Generator().manual_seed(0), len(feat["input_ids"])
    start, end = torch.randn(1, width, generator=g), torch.randn(1, width, generator=g)
    got = predict_answers([ex], [feat], start, end, n_best=20, return_n_best=True)["q"]
    assert sorted(text for text, _ in got) == ["blue", "red", "red blue"]
    assert all(score > float("-inf") for _, score in got)


def test_predict_answers_from_gold_positions(tok, squad):
    examples = _window_examples(squad, n=100)
    feats = build_squad_features(examples, tok, max_length=256, stride=128)
    width = max(len(f["input_ids"]) for f in feats)
    start = torch.randn(len(feats), width)
    end = torch.randn(len(feats), width)
    expected = {}
    for i, f in enumerate(feats):
        if f["start_positions"] > 0:
            start[i, f["start_positions"]] = 50.0
            end[i, f["end_positions"]] = 50.0
            ex = examples[f["example_index"]]
            expected[ex.id] = ex.context[f["offsets"][f["start_positions"]][0]:f["offsets"][f["end_positions"]][1]]
    start[:, 0] = end[:, 0] = 100.0  # [CLS] is never a passage answer
    got = predict_answers(examples, feats, start, end)
    assert got == expected
    scores = squad_scores(got, {e.id: e.answers for e in examples})
    # below 100 only where answer_start points inside a longer word ('8' in '18', 'gold' in 'golden')
    assert scores["exact_match"] > 95 and scores["f1"] > 95
    with pytest.raises(ValueError, match="one row per feature"):
        predict_answers(examples, feats, start[:-1], end)
    for bad in (0, 33, 2.5):  # a window's candidates come from one span_score call: topk <= 32
        with pytest.raises(ValueError, match=r"n_best must be an int in 1\.\.32"):
            predict_answers(examples, feats, start, end, n_best=bad)
    n_best = predict_answers(examples, feats, start, end, n_best=32, return_n_best=True)
    assert all(len(c) == 32 for c in n_best.values() if c), "32 candidates where the windows hold that many"
    assert {i: c[0][0] for i, c in n_best.items() if i in expected} == expected


@pytest.mark.parametrize("context, answer", [
    ("We met at the Cafe\u0301 yesterday.", "Cafe\u0301"),                     # NFD: e + combining acute
    ("We met at the Cafe\u0301", "Cafe\u0301"),                               # ... ending the passage
    ("\u092f\u0947 \u0915\u093f\u0924\u093e\u092c\u0947\u0902 \u0939\u0948\u0902", "\u0939\u0948\u0902"),  # Hindi, vowel signs
    ("Les mots " * 12 + "de\u0301ja\u0300 vu\u0327 et fin", "de\u0301ja\u0300 vu\u0327"),  # several windows
])
def test_squad_answers_keep_the_combining_marks_the_normaliser_drops(tok, context, answer):
    """The uncased normaliser strips combining marks, and the tokenizer's offsets stop before a
    trailing one: answers came back without it (EM 0 for a perfect model), and an answer ending a
    window or passage was labelled as not in it. Every window that holds all of the answer's
    tokens labels them; logits at those labels give the gold text back exactly."""
    example = SquadExample("q", "", "Where?", context, [answer], [context.index(answer)])
    feats = build_squad_features([example], tok, max_length=24, stride=4, max_question_tokens=4)
    char_start, char_end = example.answer_starts[0], example.answer_starts[0] + len(answer)
    labelled = 0
    for f in feats:
        ctx = [t for t, inside in enumerate(f["context_mask"]) if inside]
        holds = f["offsets"][ctx[0]][0] <= char_start and char_end <= f["offsets"][ctx[-1]][1]
        assert (f["start_positions"] > 0) == holds
        if holds:
            labelled += 1
            start, end = torch.full((1, len(f["input_ids"])), -9.0), torch.full((1, len(f["input_ids"])), -9.0)
            start[0, f["start_positions"]] = end[0, f["end_positions"]] = 9.0
            assert predict_answers([example], [f], start, end) == {"q": answer}
    assert labelled >= 1


def test_squad_empty_answer_text_is_refused(tmp_path, tok):
    """An empty answer text matches the context at any answer_start (even past its end): the reader took
    it, then build_squad_features raised a bare StopIteration (answer at the passage end) or labelled the
    word the empty span sat in."""
    context = "The cat sat on the mat."
    for start in (len(context), 5, 500):
        path = write(tmp_path, "empty.json", json.dumps({"data": [{"title": "T", "paragraphs": [{
            "context": context, "qas": [{"id": "q3", "question": "Who?",
                                         "answers": [{"text": "cat", "answer_start": 4},
                                                     {"text": "", "answer_start": start}]}]}]}]}))
        with pytest.raises(DataFormatError, match=r"empty\.json: question id q3: an answer text is empty"):
            read_squad(path)
    for start in (len(context), 5):  # examples built in code: the window points at [CLS]
        ex = SquadExample("q", "t", "Who?", context, [""], [start])
        feat, = build_squad_features([ex], tok, max_length=32, stride=4, max_question_tokens=8)
        assert (feat["start_positions"], feat["end_positions"]) == (0, 0)


def test_n_best_counts_a_span_found_in_two_windows_once(tok):
    """Overlapping windows hold the same passage spans; n-best listed each once per window, so a span
    in the overlap took two of the n slots. It is one candidate, at its best score over the windows."""
    words = ("apple bread chair dance eagle field grape house island jacket kettle lemon mountain needle "
             "orange pencil queen river summer table uncle violin window yellow zebra anchor butter candle "
             "doctor engine forest garden hammer").split()
    ex = SquadExample("q", "t", "Which?", " ".join(words), [], [])
    feats = build_squad_features([ex], tok, max_length=24, stride=8, max_question_tokens=4)
    assert len(feats) >= 3
    width = max(len(f["input_ids"]) for f in feats)
    word_score = torch.randn(len(ex.context), generator=torch.Generator().manual_seed(0))
    start, end = torch.full((len(feats), width), -50.0), torch.full((len(feats), width), -50.0)
    expected = {}                   # (char start, char end) -> best score over the windows
    for i, f in enumerate(feats):   # one score per passage word, whichever window holds it; later windows a bit more
        ctx = [t for t, m in enumerate(f["context_mask"]) if m]
        for t in ctx:
            start[i, t] = word_score[f["offsets"][t][0]] + 0.01 * i
            end[i, t] = word_score[f["offsets"][t][0]]
        for s in ctx:
            for e in ctx[ctx.index(s):ctx.index(s) + 3]:
                span = (f["offsets"][s][0], f["offsets"][e][1])
                expected[span] = max(expected.get(span, -1e9), (start[i, s] + end[i, e]).item())
    best = sorted(expected.items(), key=lambda c: -c[1])[:10]
    got = predict_answers([ex], feats, start, end, n_best=10, max_answer_tokens=3, return_n_best=True)["q"]
    assert [text for text, _ in got] == [ex.context[a:b] for (a, b), _ in best]
    assert [score for _, score in got] == pytest.approx([score for _, score in best])


def test_predict_answers_scores_spans_in_row_blocks(tok, monkeypatch):
    """span_score's torch backend (the CPU's) holds a (rows, seqlen, max_answer_len) grid and its sort,
    about 200 KB a row at SQuAD's sizes: predict_answers sent every feature in one call (over 1 GB
    for this repo's 5,665 questions). Blocks of SPAN_ROWS rows give the same answers."""
    import fastbert.ops
    from fastbert.data import squad

    examples = [SquadExample(str(i), "t", "Which?", f"The code is {i} and the name is item {i % 7}.", [], [])
                for i in range(squad.SPAN_ROWS + 40)]
    feats = build_squad_features(examples, tok, max_length=32, stride=4, max_question_tokens=4)
    width = max(len(f["input_ids"]) for f in feats)
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(len(feats), width, generator=g), torch.randn(len(feats), width, generator=g)
    rows, span_score = [], fastbert.ops.span_score
    monkeypatch.setattr(fastbert.ops, "span_score",
                        lambda s, *a, **k: rows.append(s.shape[0]) or span_score(s, *a, **k))
    got = predict_answers(examples, feats, start, end, return_n_best=True)
    assert max(rows) <= squad.SPAN_ROWS and sum(rows) == len(feats)
    monkeypatch.setattr(squad, "SPAN_ROWS", len(feats))
    assert predict_answers(examples, feats, start, end, return_n_best=True) == got


def _squad_file(tmp_path, name, qas_by_article):
    """A SQuAD v1.1 file: one article per entry, each one paragraph with the given questions."""
    context = "The cat sat on the mat."
    articles = [{"title": f"A{n}", "paragraphs": [{"context": context, "qas": [
        dict({"question": "Who sat?", "answers": [{"text": "cat", "answer_start": 4}]}, **qa) for qa in qas]}]}
        for n, qas in enumerate(qas_by_article)]
    return write(tmp_path, name, json.dumps({"version": "1.1", "data": articles}))


def test_duplicate_question_ids_are_refused(tmp_path, tok):
    """predict_answers returns {id: text}: two questions with one id came back as one answer (the
    last), and squad_scores scored it against the last question's gold answers, with no word said."""
    path = _squad_file(tmp_path, "dup.json", [[{"id": "q1"}, {"id": "q2"}], [{"id": "q1", "question": "Where?"}]])
    with pytest.raises(DataFormatError, match=r"dup\.json: question id 'q1' appears twice \(article 'A0', "
                                              r"paragraph 0 and article 'A1', paragraph 0\)"):
        read_squad(path)
    # a question without an id was read with the id '?', so two of them collided too
    with pytest.raises(DataFormatError, match=r"noid\.json: article 'A0', paragraph 0: question 1 "
                                              r"\('Who sat\?'\) has no 'id'"):
        read_squad(_squad_file(tmp_path, "noid.json", [[{"id": "q1"}, {}]]))
    ok = read_squad(_squad_file(tmp_path, "ok.json", [[{"id": "q1"}], [{"id": "q2"}]]))
    assert [e.id for e in ok] == ["q1", "q2"]
    three = _squad_file(tmp_path, "three.json", [[{"id": "q1"}, {"id": "q2"}], [{"id": "q3"}]])
    assert [[e.id for e in read_squad(three, max_examples=n)] for n in (1, 2, 3, 4)] == \
        [["q1"], ["q1", "q2"], ["q1", "q2", "q3"], ["q1", "q2", "q3"]]  # `--max-train-examples`
    # examples built in code: predict_answers refuses the collision itself
    examples = [SquadExample("q1", "t", "Who sat?", "The cat sat on the mat.", [], []),
                SquadExample("q1", "t", "Where?", "The cat sat on the mat.", [], [])]
    feats = build_squad_features(examples, tok, max_length=32, stride=4, max_question_tokens=8)
    logits = torch.zeros(len(feats), max(len(f["input_ids"]) for f in feats))
    with pytest.raises(ValueError, match=r"examples\[0\] and examples\[1\] share the id 'q1'"):
        predict_answers(examples, feats, logits, logits)


def test_long_questions_are_cut_with_one_warning(tok):
    """A question over max_question_tokens loses its end (the original BERT recipe's 64): it was cut
    silently. One warning per call, with the count and how to keep more, however many chunks."""
    long_question = " ".join(["why"] * 80)
    examples = [SquadExample(str(i), "t", long_question if i % 3 == 0 else "Who?", "the answer is here " * 10,
                             ["here"], [14]) for i in range(7)]
    with pytest.warns(UserWarning) as record:
        build_squad_features(examples, tok, max_length=128, stride=32, chunk=2)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and re.search(r"3 of 7 questions have more than max_question_tokens=64 tokens and are "
                                            r"cut to their first 64 \(`fastbert finetune --max-question-len` sets it",
                                            messages[0]), messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_squad_features(examples, tok, max_length=192, stride=32, max_question_tokens=80)
        build_squad_features(examples[1:3], tok, max_length=128, stride=32)


def test_max_question_len_reaches_the_windows_from_the_cli(tmp_path):
    """`finetune --max-question-len` is saved in the task spec and read by train, evaluate and predict."""
    from fastbert import cli, tasks

    args = cli.build_parser().parse_args(["finetune", "--task", "squad", "--train", "t.json", "--out", "o",
                                          "--max-question-len", "8"])
    assert args.max_question_len == 8
    spec = tasks.TaskSpec.preset("squad", max_seq_len=64, doc_stride=16, max_question_len=args.max_question_len)
    assert tasks.TaskSpec(**dataclasses.asdict(spec)) == spec
    path = _squad_file(tmp_path, "long.json", [[{"id": "q1", "question": "why " * 30 + "who sat?"}]])
    with pytest.warns(UserWarning, match="1 of 1 questions have more than max_question_tokens=8"):
        feat, = tasks.read(spec, path, fastbert.Tokenizer.from_pretrained("default")).features
    assert feat["token_type_ids"].count(0) == 8 + 2  # [CLS] 8 question tokens [SEP]
    saved = {k: v for k, v in dataclasses.asdict(spec).items() if k != "max_question_len"}
    assert tasks.TaskSpec(**saved).max_question_len == 64  # specs saved before the flag: the old cut


# --- SQuAD post-processing against transformers' run_qa --------------------------------------

def _run_qa_postprocess(examples, features, start_logits, end_logits, n_best_size=20, max_answer_length=30,
                        every_start_and_end=False):
    """transformers' examples/pytorch/question-answering/utils_qa.py `postprocess_qa_predictions`, the
    SQuAD v1 path, restated: per example, over each of its windows, the n_best_size best start and end
    indexes by argsort; pairs skipped where either end lies outside the window's context (offset_mapping
    None for question, special and padding tokens, or past the feature), end < start, or the span is longer
    than max_answer_length tokens; score = start + end logit; all windows' candidates sorted by score
    (a span in two windows is listed twice), text cut from the context by offsets.

    Returns {id: [((char_start, char_end), text, score), ...]}, best first; run_qa's final cut to
    n_best_size (and its "empty" answer when there is no candidate) is left to the caller.
    every_start_and_end: every index instead of the top n_best_size (transformers' rules made exhaustive).
    """
    import numpy as np

    windows = {}
    for f, feat in enumerate(features):
        windows.setdefault(feat["example_index"], []).append(f)
    out = {}
    for example_index, example in enumerate(examples):
        prelim = []
        for f in windows.get(example_index, []):
            start, end = start_logits[f], end_logits[f]
            offset_mapping = [o if m else None for o, m in zip(features[f]["offsets"], features[f]["context_mask"])]
            top = len(start) if every_start_and_end else n_best_size
            start_indexes = np.argsort(start)[-1:-top - 1:-1].tolist()
            end_indexes = np.argsort(end)[-1:-top - 1:-1].tolist()
            for s in start_indexes:
                for e in end_indexes:
                    if s >= len(offset_mapping) or e >= len(offset_mapping) or offset_mapping[s] is None \
                            or offset_mapping[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    span = (offset_mapping[s][0], offset_mapping[e][1])
                    prelim.append((span, example.context[span[0]:span[1]], float(start[s] + end[e])))
        out[example.id] = sorted(prelim, key=lambda p: p[2], reverse=True)
    return out


@pytest.fixture(scope="module")
def squad_windows(tok, squad):
    """About 440 real windows (180 questions, the 60 longest passages among them) and seeded random
    logits over every position of each padded row, as a model's output on a padded batch would be."""
    examples = _window_examples(squad, n=120)
    feats = build_squad_features(examples, tok, max_length=192, stride=64)
    width = max(len(f["input_ids"]) for f in feats)
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(len(feats), width, generator=g), torch.randn(len(feats), width, generator=g)
    return examples, feats, start, end


def test_predict_answers_best_span_matches_run_qa_where_its_heuristic_is_exact(squad_windows):
    """run_qa only pairs the top-20 starts with the top-20 ends, so it can miss the best span; fastbert's
    span_score finds it exactly. They must agree wherever run_qa's answer is certainly the best: when its
    best score beats every span it did not look at, whose start is at most the 21st start logit (and its end
    at most the best end), or whose end is at most the 21st end logit. Elsewhere fastbert's answer must
    score at least as high as run_qa's."""
    import numpy as np

    examples, feats, start, end = squad_windows
    start_np, end_np = start.numpy(), end.numpy()
    theirs = _run_qa_postprocess(examples, feats, start_np, end_np)
    ours = predict_answers(examples, feats, start, end, return_n_best=True)
    windows = {}
    for f, feat in enumerate(feats):
        windows.setdefault(feat["example_index"], []).append(f)
    assert len(feats) >= 400 and max(map(len, windows.values())) >= 3  # long passages: several windows
    certain = differ = 0
    for i, ex in enumerate(examples):
        # no candidate at all: run_qa answers "empty" (its 20 best starts or ends all outside the passage)
        _, their_text, their_score = theirs[ex.id][0] if theirs[ex.id] else (None, "empty", float("-inf"))
        our_text, our_score = ours[ex.id][0]
        unseen = max(max(np.sort(start_np[f])[-21] + end_np[f].max(), start_np[f].max() + np.sort(end_np[f])[-21])
                     for f in windows[i])
        if their_score > unseen:
            certain += 1
            assert (our_text, our_score) == (their_text, their_score), ex.id
        else:
            assert our_score >= their_score, ex.id
            differ += our_text != their_text
    # 159 of 180 certain, 3 where run_qa misses the best span: both branches run, the first is the comparison
    assert certain >= 0.75 * len(examples) and differ >= 1
    assert predict_answers(examples, feats, start, end) == {k: v[0][0] for k, v in ours.items()}


def test_predict_answers_n_best_matches_exhaustive_run_qa(squad_windows):
    """run_qa's rules with every start and end (so exact): fastbert's n-best list is its first 20 spans,
    texts and fp32 scores equal, once a span that two overlapping windows both hold is counted once at its
    best score (run_qa lists it twice, taking two of the 20 slots; see
    test_n_best_counts_a_span_found_in_two_windows_once)."""
    examples, feats, start, end = squad_windows
    exhaustive = _run_qa_postprocess(examples, feats, start.numpy(), end.numpy(), every_start_and_end=True)
    ours = predict_answers(examples, feats, start, end, n_best=20, return_n_best=True)
    repeated = 0
    for ex in examples:
        best = {}
        for span, text, score in exhaustive[ex.id]:
            repeated += span in best
            best.setdefault(span, (text, score))  # sorted best first: the first is the best score
        assert ours[ex.id] == sorted(best.values(), key=lambda c: -c[1])[:20], ex.id
    assert repeated > 0  # the overlap case is in the data


# --- SQuAD v2.0: questions without an answer ---------------------------------------------------

def test_read_squad_v2_layout(tmp_path, tok):
    """The official v2.0 layout: an unanswerable question has is_impossible true, answers [] and its near
    misses in plausible_answers (ignored); every window of it points at [CLS], as run_qa's do."""
    context = "The cat sat on the mat. " * 12
    qas = [{"id": "a", "question": "Who sat?", "answers": [{"text": "cat", "answer_start": 4}], "is_impossible": False},
           {"id": "n", "question": "Who flew?", "answers": [], "is_impossible": True,
            "plausible_answers": [{"text": "cat", "answer_start": 4}]}]
    path = write(tmp_path, "v2.json", json.dumps({"version": "v2.0", "data": [
        {"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}))
    answerable, unanswerable = read_squad(path)
    assert (answerable.answers, answerable.answer_starts) == (["cat"], [4])
    assert (unanswerable.answers, unanswerable.answer_starts) == ([], [])
    feats = build_squad_features([unanswerable, answerable], tok, max_length=32, stride=8, max_question_tokens=4)
    mine = [f for f in feats if f["example_index"] == 0]
    assert len(mine) > 2 and all((f["start_positions"], f["end_positions"]) == (0, 0) for f in mine)
    assert any(f["start_positions"] > 0 for f in feats if f["example_index"] == 1)
    qas[1]["answers"] = [{"text": "cat", "answer_start": 4}]   # an impossible question with an answer
    path = write(tmp_path, "both.json", json.dumps({"data": [{"title": "T", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    with pytest.raises(DataFormatError, match=r"both\.json: question id n: is_impossible is true but it has 1 "
                                              r"answers; SQuAD v2\.0 gives such a question 'answers': \[\]"):
        read_squad(path)
    qas[1].update(answers=[], is_impossible="yes")
    path = write(tmp_path, "flag.json", json.dumps({"data": [{"title": "T", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    with pytest.raises(DataFormatError, match=r"flag\.json: question id n: missing or bad field 'is_impossible' "
                                              r"must be true or false, got 'yes'"):
        read_squad(path)


def _logits_row(width, values):
    row = torch.full((width,), -20.0)
    for position, value in values.items():
        row[position] = value
    return row


def test_null_answer_by_the_threshold_over_every_window(tok):
    """SQuAD v2.0: the null score is the lowest [CLS] start + end over the question's windows (BERT's
    run_squad, transformers' run_qa); the answer is "" when null - best span > the threshold."""
    ex = SquadExample("q", "t", "Which?", "red blue green " * 12, [], [])
    feats = build_squad_features([ex], tok, max_length=24, stride=4, max_question_tokens=4)
    assert len(feats) >= 3
    width = max(len(f["input_ids"]) for f in feats)
    first = next(t for t, inside in enumerate(feats[1]["context_mask"]) if inside)
    start = torch.stack([_logits_row(width, {0: 3.0 + f, first: 2.0 if f == 1 else -5.0}) for f in range(len(feats))])
    end = torch.stack([_logits_row(width, {0: 1.0, first: 1.5 if f == 1 else -5.0}) for f in range(len(feats))])
    span_text = ex.context[slice(feats[1]["offsets"][first][0], feats[1]["offsets"][first][1])]
    # null = min over windows (3 + 0) + 1 = 4; best span = 2 + 1.5 = 3.5; odds 0.5
    answers, odds = predict_answers([ex], feats, start, end, null_score_diff_threshold=0.0, return_null_odds=True)
    assert answers == {"q": ""} and odds == {"q": pytest.approx(0.5)}
    assert predict_answers([ex], feats, start, end, null_score_diff_threshold=0.5) == {"q": span_text}
    assert predict_answers([ex], feats, start, end, null_score_diff_threshold=0.49) == {"q": ""}
    assert predict_answers([ex], feats, start, end) == {"q": span_text}       # v1.1: always a span
    # the n-best lists hold the null candidate, the threshold's choice first, then by score
    spans = predict_answers([ex], feats, start, end, n_best=3, return_spans=True, null_score_diff_threshold=1.0)["q"]
    assert spans[0]["answer"] == span_text and spans[1] == {"answer": "", "start": -1, "end": -1, "score": 4.0}
    assert len(spans) == 4 and spans[2]["score"] >= spans[3]["score"]
    n_best = predict_answers([ex], feats, start, end, n_best=2, return_n_best=True, null_score_diff_threshold=-9.0)["q"]
    assert n_best[0] == ("", 4.0) and [t for t, _ in n_best[1:]] == [span_text, n_best[2][0]] and len(n_best) == 3
    for f in (0, len(feats) - 1):   # a NaN null score in any window is NaN odds, whatever the order
        nan_start = start.clone()
        nan_start[f, 0] = float("nan")
        answers, odds = predict_answers([ex], feats, nan_start, end, null_score_diff_threshold=0.0,
                                        return_null_odds=True)
        assert math.isnan(odds["q"]), f
    for bad in (float("nan"), "0", True):
        with pytest.raises(ValueError, match="null_score_diff_threshold must be a number"):
            predict_answers([ex], feats, start, end, null_score_diff_threshold=bad)
    with pytest.raises(ValueError, match="return_null_odds needs null_score_diff_threshold"):
        predict_answers([ex], feats, start, end, return_null_odds=True)


def _run_qa_v2(examples, features, start_logits, end_logits, threshold, n_best_size=20):
    """transformers' utils_qa.py `postprocess_qa_predictions` with version_2_with_negative, restated over
    _run_qa_postprocess's exhaustive candidates: min_null_prediction is the lowest start_logits[0] +
    end_logits[0] over the example's features; score_diff = null_score - the best non-null prediction's
    start_logit - end_logit; the answer is "" where score_diff > null_score_diff_threshold."""
    candidates = _run_qa_postprocess(examples, features, start_logits, end_logits, n_best_size,
                                     every_start_and_end=True)
    answers, diffs = {}, {}
    for i, ex in enumerate(examples):
        null = min(start_logits[f][0] + end_logits[f][0] for f, feat in enumerate(features)
                   if feat["example_index"] == i)
        (_, text, score), *_ = candidates[ex.id]
        diffs[ex.id] = float(null - score)
        answers[ex.id] = "" if diffs[ex.id] > threshold else text
    return answers, diffs


@pytest.mark.parametrize("threshold", [0.0, 1.5, -2.0])
def test_null_answers_match_run_qa_version_2_with_negative(squad_windows, threshold):
    examples, feats, start, end = squad_windows
    start, end = start.clone(), end.clone()
    g = torch.Generator().manual_seed(1)
    start[:, 0] += torch.empty(len(feats)).uniform_(3, 11, generator=g)   # about half the questions answered ""
    theirs, their_diffs = _run_qa_v2(examples, feats, start.numpy(), end.numpy(), threshold)
    ours, odds = predict_answers(examples, feats, start, end, null_score_diff_threshold=threshold,
                                 return_null_odds=True)
    assert odds == {k: pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in their_diffs.items()}
    close = {k for k, v in odds.items() if abs(v - threshold) < 1e-5}
    assert {k: v for k, v in ours.items() if k not in close} == {k: v for k, v in theirs.items() if k not in close}
    assert 0.1 < sum(a == "" for a in ours.values()) / len(ours) < 0.9  # both answers happen


# --- collation and bucketing ------------------------------------------------------------------

def test_collate_classification_regression_tagging_qa():
    feats = [{"input_ids": [101, 7, 8, 102], "token_type_ids": [0, 0, 0, 0], "labels": 1},
             {"input_ids": [101, 9, 102], "token_type_ids": [0, 0, 0], "labels": 0}]
    b = collate(feats)
    assert b["input_ids"].tolist() == [[101, 7, 8, 102], [101, 9, 102, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"].dtype == torch.long and b["labels"].tolist() == [1, 0]
    assert all(v.dtype == torch.long for k, v in b.items())
    reg = collate([dict(feats[0], labels=4.5), dict(feats[1], labels=2.0)], pad_to_multiple_of=8)
    assert reg["labels"].dtype == torch.float32 and reg["input_ids"].shape == (2, 8)
    tag = collate([dict(feats[0], labels=[-100, 3, -100, -100]), dict(feats[1], labels=[-100, 5, -100])],
                  pad_token_id=0)
    assert tag["labels"].tolist() == [[-100, 3, -100, -100], [-100, 5, -100, -100]]
    qa = collate([{"input_ids": [1, 2, 3], "token_type_ids": [0, 1, 1], "start_positions": 1, "end_positions": 2,
                   "example_index": 4, "offsets": [(0, 0)] * 3}])
    assert qa["start_positions"].tolist() == [1] and qa["example_index"].tolist() == [4] and "offsets" not in qa
    assert qa["token_type_ids"].tolist() == [[0, 1, 1]]
    with pytest.raises(ValueError, match="feature 1 has 2 labels for 3 tokens"):
        collate([dict(feats[0], labels=[0, 0, 0, 0]), dict(feats[1], labels=[0, 0])])
    with pytest.raises(ValueError, match="at least one"):
        collate([])


def test_bucket_sampler_deterministic_complete_and_tighter():
    rng = random.Random(1)
    lengths = [rng.randint(3, 120) for _ in range(1003)]
    sampler = LengthBucketSampler(lengths, batch_size=16, shuffle=True, bucket=True, chunk_batches=5, seed=3)
    first = sampler.batches()
    assert first == LengthBucketSampler(lengths, 16, True, True, 5, seed=3).batches()
    assert sorted(i for b in first for i in b) == list(range(1003)) and len(first) == len(sampler) == 63
    sampler.set_epoch(1)
    assert sampler.batches() != first
    plain = LengthBucketSampler(lengths, 16, shuffle=True, bucket=False, seed=3).batches()

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(first) < 0.75 * padded(plain)
    for b in first:  # each batch is cut from one sorted chunk
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    dropped = LengthBucketSampler(lengths, 16, True, True, 5, seed=3, drop_last=True)
    assert len(dropped) == 62 and all(len(b) == 16 for b in dropped)
    ordered = LengthBucketSampler(lengths, 16, shuffle=False, bucket=False).batches()
    assert [i for b in ordered for i in b] == list(range(1003))


def test_make_loader_end_to_end(tok):
    data = read_glue(sample_path("sst2_sample_dev.tsv"), "sst2")
    feats = encode_glue(data, tok, max_length=64)
    loader = make_loader(feats, batch_size=32, shuffle=False)
    rows = [row for batch in loader for row in batch["labels"].tolist()]
    assert rows == data.labels
    loader = make_loader(feats, batch_size=32, shuffle=True, bucket=True, seed=0, chunk_batches=4)
    batches = list(loader)
    assert sum(len(b["labels"]) for b in batches) == 500
    for b in batches:
        assert b["input_ids"].shape[1] == b["attention_mask"].sum(1).max()  # padded to the batch's longest


def test_make_loader_passes_its_options_on():
    """make_loader's pad_token_id, pad_to_multiple_of and drop_last reach collate and the sampler
    (BERT's [PAD] id is 0, collate's default: a pad id left behind would look right elsewhere)."""
    feats = [{"input_ids": [101] + [7] * n + [102], "labels": n % 2} for n in range(5)]
    loader = make_loader(feats, batch_size=2, pad_token_id=3, pad_to_multiple_of=4)
    first = next(iter(loader))
    assert first["input_ids"].tolist() == [[101, 102, 3, 3], [101, 7, 102, 3]]
    assert [b["input_ids"].shape[0] for b in loader] == [2, 2, 1] and len(loader) == 3
    dropped = make_loader(feats, batch_size=2, drop_last=True)
    assert [b["labels"].tolist() for b in dropped] == [[0, 1], [0, 1]] and len(dropped) == 2


def test_squad_preset_defaults_make_windows(tok):
    """`finetune --task squad` with no length flags: the preset's window (384, transformers' run_qa)
    leaves room for the question and more passage than the stride; 128 with a stride of 128 did not."""
    from fastbert import tasks

    spec = tasks.TaskSpec.preset("squad")
    assert (spec.max_seq_len, spec.doc_stride) == (384, 128)
    assert tasks.TaskSpec.preset("sst2").max_seq_len == 128
    assert tasks.TaskSpec(name="qa", kind="qa", max_seq_len=200).max_seq_len == 200
    found = tasks.read(spec, shared("squad/train-from-dev-v1.1.json"), tok, max_examples=3)
    assert found.features and max(found.lengths) <= 384
