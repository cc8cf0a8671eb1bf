"""The readers on damaged files: whatever the bytes, a reader returns examples or raises a
ValueError (DataFormatError for a line that does not fit) that names the file, never another
exception (IndexError, KeyError, TypeError...) from deep inside. Inputs are real samples
from ../shared/data cut short, with characters and lines deleted, duplicated or replaced by
the format's own separators, so most of them are nearly valid: where parsers break."""
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fastbert import data
from fastbert.data import squad, tagging

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,  # the same cases on every run
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _sample(relative: str, lines: int) -> str:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs the shared datasets at {SHARED}")
    with open(path, encoding="utf-8") as f:
        return "".join(next(f) for _ in range(lines))


def _squad_sample() -> str:
    import json

    path = SHARED / "squad" / "train-from-dev-v1.1.json"
    if not path.exists():
        pytest.skip(f"needs the shared datasets at {SHARED}")
    root = json.loads(path.read_text(encoding="utf-8"))
    article = root["data"][0]
    small = {"version": root.get("version", "1.1"),
             "data": [{"title": article["title"], "paragraphs": [
                 {"context": p["context"][:400], "qas": [q for q in p["qas"]
                                                         if all(a["answer_start"] + len(a["text"]) <= 400
                                                                for a in q["answers"])][:3]}
                 for p in article["paragraphs"][:2]]}]}
    return json.dumps(small, indent=1, ensure_ascii=False)


@st.composite
def damaged(draw, text: str, separators: str):
    """`text` with up to four edits: cut short, a span deleted or duplicated, or characters
    replaced with one of the format's separators or odd characters."""
    for _ in range(draw(st.integers(0, 4))):
        if not text:
            break
        edit = draw(st.sampled_from(["cut", "delete", "duplicate", "replace", "insert"]))
        i = draw(st.integers(0, len(text) - 1))
        j = draw(st.integers(i, min(len(text), i + 40)))
        junk = draw(st.text(alphabet=separators + "\x00\ufeff\u00e9\r-0123456789.", min_size=1, max_size=4))
        if edit == "cut":
            text = text[:i]
        elif edit == "delete":
            text = text[:i] + text[j:]
        elif edit == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif edit == "replace":
            text = text[:i] + junk + text[j:]
        else:
            text = text[:i] + junk + text[i:]
    return text


def _read(reader, path: Path, text: str, binary_tail: bytes = b""):
    path.write_bytes(text.encode("utf-8") + binary_tail)
    try:
        reader(path)
    except ValueError as err:  # DataFormatError, UnicodeDecodeError turned into one, a bad column...
        assert path.name in str(err), f"the error does not name the file: {err!r}"


@pytest.fixture(scope="module")
def samples():
    return {"sst2": _sample("sst2/train.tsv", 12), "rte": _sample("rte/dev.tsv", 6),
            "stsb": _sample("stsb/train.tsv", 8), "conllu": _sample("ud_ewt/en_ewt-ud-dev.conllu", 40),
            "squad": _squad_sample()}


@SETTINGS
@given(data_=st.data(), task=st.sampled_from(["sst2", "rte", "stsb"]), tail=st.sampled_from([b"", b"\xff\xfe"]))
def test_glue_reader_on_damaged_files(tmp_path, samples, data_, task, tail):
    text = data_.draw(damaged(samples[task], "\t\n\"'"))
    _read(lambda p: data.read_glue(p, task), tmp_path / f"{task}.tsv", text, tail)


@SETTINGS
@given(data_=st.data(), tag=st.sampled_from(["upos", "xpos"]))
def test_conllu_reader_on_damaged_files(tmp_path, samples, data_, tag):
    text = data_.draw(damaged(samples["conllu"], "\t\n#_-"))
    _read(lambda p: tagging.read_conllu(p, tag=tag), tmp_path / "ud.conllu", text)
    _read(tagging.read_tagged, tmp_path / "ud2.conllu", text)


@SETTINGS
@given(data_=st.data())
def test_conll2003_reader_on_damaged_files(tmp_path, samples, data_):
    # the CoNLL-U sample as a CoNLL-2003-style file: word and tag columns, blank lines between sentences
    rows = [line.split("\t") for line in samples["conllu"].splitlines()]
    text = "\n".join(f"{r[1]} {r[4]} O {r[3]}" if len(r) == 10 else "" for r in rows if not r[0].startswith("#"))
    text = data_.draw(damaged("-DOCSTART- -X- -X- O\n\n" + text + "\n", " \n\t-"))
    _read(tagging.read_conll2003, tmp_path / "ner.txt", text)
    _read(tagging.read_tagged, tmp_path / "ner2.txt", text)


@SETTINGS
@given(data_=st.data())
def test_squad_reader_on_damaged_files(tmp_path, samples, data_):
    text = data_.draw(damaged(samples["squad"], '{}[]":,\n0123456789'))
    _read(squad.read_squad, tmp_path / "squad.json", text)
