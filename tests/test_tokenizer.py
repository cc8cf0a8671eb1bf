"""fastbert.Tokenizer against transformers' BertTokenizerFast on the MiniLM vocabulary."""
import csv
from pathlib import Path

import pytest
import torch
import transformers

import fastbert

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _sentences(n=200):
    rte = DATA / "rte" / "dev.tsv"
    if not rte.exists():
        pytest.skip(f"needs the shared datasets at {DATA}")
    with open(rte, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[1] for r in rows[:n]], [r[2] for r in rows[:n]]


@pytest.fixture(scope="module")
def both():
    path = str(fastbert.default_model_path())
    return fastbert.Tokenizer.from_pretrained("default"), transformers.BertTokenizerFast.from_pretrained(path)


def _same(ours, theirs):
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key


def test_single_texts(both):
    ours, theirs = both
    firsts, _ = _sentences()
    for start in range(0, 200, 50):
        batch = firsts[start:start + 50]
        _same(ours(batch), theirs(batch, padding="longest", return_tensors="pt"))


@pytest.mark.parametrize("strategy", ["longest_first", "only_second"])
@pytest.mark.parametrize("max_length", [24, 64, 512])
def test_pairs_with_truncation(both, strategy, max_length):
    ours, theirs = both
    firsts, seconds = _sentences()
    if strategy == "only_second":  # the first text must fit, as transformers also requires
        firsts = [" ".join(f.split()[:6]) for f in firsts]
    _same(ours(firsts, seconds, max_length=max_length, truncation=strategy),
          theirs(firsts, seconds, max_length=max_length, truncation=strategy, padding="longest", return_tensors="pt"))


def test_offsets_and_windows(both):
    ours, theirs = both
    question, context = "Who wrote it?", " ".join(f"word{i} is here." for i in range(120))
    a = ours([question], [context], max_length=64, truncation="only_second", stride=16,
             return_overflowing=True, return_offsets=True)
    b = theirs([question], [context], max_length=64, truncation="only_second", stride=16,
               return_overflowing_tokens=True, return_offsets_mapping=True, padding="longest", return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["offsets"], b["offset_mapping"])
    assert a["sample_index"] == b["overflow_to_sample_mapping"].tolist()
    start, end = a["offsets"][0, a["sequence_ids"][0].index(1)].tolist()
    assert context[start:end] == ours.tokenize(context)[0] == "word"


def test_padding_to_max_length_and_bad_calls(both):
    ours, _ = both
    out = ours(["a b c"], max_length=16, padding="max_length")
    assert out["input_ids"].shape == (1, 16) and out["attention_mask"].sum() == 5
    with pytest.raises(ValueError, match="one entry per text"):
        ours(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        ours(["a", 3])
    with pytest.raises(ValueError, match="truncation must be one of"):
        ours(["a"], truncation="middle")
    with pytest.raises(ValueError, match="enable truncation"):
        ours(["word " * 600], truncation=False)


def test_vocab_txt_fallback_matches(tmp_path, both):
    ours, _ = both
    folder = fastbert.default_model_path()
    (tmp_path / "vocab.txt").write_bytes((folder / "vocab.txt").read_bytes())
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    from_vocab = fastbert.Tokenizer.from_pretrained(tmp_path)
    firsts, seconds = _sentences(40)
    _same(from_vocab(firsts, seconds, max_length=48), ours(firsts, seconds, max_length=48))


def test_malformed_tokenizer_files_raise_value_errors_naming_the_file(tmp_path):
    folder = fastbert.default_model_path()
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a readable tokenizers file"):
        fastbert.Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"vocab\.txt has no \[CLS\] token"):
        fastbert.Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_bytes((folder / "vocab.txt").read_bytes())
    for text, message in (("{oops", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                          ('{"model_max_length": "long"}', "model_max_length .* must be a positive number"),
                          ('{"model_max_length": 0}', "model_max_length .* must be a positive number")):
        (tmp_path / "tokenizer_config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            fastbert.Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 1000000000000000019884624838656}')
    assert fastbert.Tokenizer.from_pretrained(tmp_path).model_max_length == 512  # transformers' "no limit"
