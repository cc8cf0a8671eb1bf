"""fastbert.Tokenizer against transformers' BertTokenizerFast on the MiniLM vocabulary."""
import csv
import json
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings, strategies as st

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
    for stride in (-1, 1.5, "2", True):  # -1: tokenizers' OverflowError; 1.5: a TypeError naming nothing
        with pytest.raises(ValueError, match=r"stride must be an int >= 0 \(tokens shared by consecutive windows\)"):
            ours(["a b c"], ["d e f"], max_length=6, truncation="only_second", stride=stride, return_overflowing=True)


def test_decode_bounds_and_pair_room(both):
    """decode takes ids 0..vocab_size-1 (the last id decodes, vocab_size is refused: tokenizers skips
    an unknown id without a word); a pair needs room for its 3 special tokens."""
    ours, theirs = both
    last = ours.vocab_size - 1
    assert ours.decode([last]) == theirs.decode([last])
    with pytest.raises(ValueError, match=rf"ids\[1\] = {ours.vocab_size} is outside the vocabulary"):
        ours.decode([101, ours.vocab_size])
    with pytest.raises(ValueError, match="max_length must leave room for the special tokens, got 3"):
        ours(["a"], ["b"], max_length=3)
    assert ours(["a"], ["b"], max_length=4, padding=False, return_tensors=False)["input_ids"] == \
        theirs(["a"], ["b"], max_length=4, truncation=True)["input_ids"]


def test_vocab_txt_fallback_matches(tmp_path, both):
    ours, _ = both
    folder = fastbert.default_model_path()
    (tmp_path / "vocab.txt").write_bytes((folder / "vocab.txt").read_bytes())
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    from_vocab = fastbert.Tokenizer.from_pretrained(tmp_path)
    firsts, seconds = _sentences(40)
    _same(from_vocab(firsts, seconds, max_length=48), ours(firsts, seconds, max_length=48))


@pytest.mark.parametrize("settings", [{"do_lower_case": True}, {"do_lower_case": True, "strip_accents": False},
                                      {"do_lower_case": False}, {"do_lower_case": False, "strip_accents": True},
                                      {"tokenize_chinese_chars": False}])
def test_vocab_txt_fallback_follows_tokenizer_config_like_transformers(tmp_path, settings):
    """Every BertTokenizer setting of tokenizer_config.json counts, not do_lower_case alone: with
    strip_accents false, accented words are other tokens (here [UNK]) than their stripped forms."""
    folder = fastbert.default_model_path()
    (tmp_path / "vocab.txt").write_bytes((folder / "vocab.txt").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", **settings}))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = fastbert.Tokenizer.from_pretrained(tmp_path)
    for text in ("Café naïve RÉSUMÉ", "Cafe\u0301 au lait", "北京大学 in Beijing", "Ünïcödé ß and İstanbul"):
        assert ours.tokenize(text) == theirs.tokenize(text), text


@pytest.mark.parametrize("settings", [{"do_lower_case": False}, {"do_lower_case": True, "strip_accents": False},
                                      {"tokenize_chinese_chars": False}, {}])
def test_saved_tokenizer_tokenises_the_same_in_transformers(tmp_path, settings):
    """Tokenizer.save wrote tokenizer_config.json without BertTokenizer's settings; transformers 5
    rebuilds the normaliser from that file and took a cased model's tokenizer as lower-cased."""
    folder = fastbert.default_model_path()
    source, saved = tmp_path / "source", tmp_path / "saved" / "new"       # save makes its folder
    source.mkdir()
    (source / "vocab.txt").write_bytes((folder / "vocab.txt").read_bytes())
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", **settings}))
    ours = fastbert.Tokenizer.from_pretrained(source)
    ours.save(saved)
    theirs = transformers.AutoTokenizer.from_pretrained(str(saved))
    reloaded = fastbert.Tokenizer.from_pretrained(saved)
    for text in ("Hello World", "Café naïve RÉSUMÉ", "北京大学 in Beijing"):
        ids = ours([text])["input_ids"][0].tolist()
        assert ids == theirs(text)["input_ids"] == reloaded([text])["input_ids"][0].tolist(), text


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
                          ('{"model_max_length": 0}', "model_max_length .* must be a positive number"),
                          ('{"strip_accents": "no"}', "strip_accents .* must be true or false or null, got 'no'"),
                          ('{"do_lower_case": 1}', "do_lower_case .* must be true or false, got 1")):
        (tmp_path / "tokenizer_config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            fastbert.Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 1000000000000000019884624838656}')
    assert fastbert.Tokenizer.from_pretrained(tmp_path).model_max_length == 512  # transformers' "no limit"


# --- property test: nasty unicode, every truncation setting, windows ---------------------------------

# Pieces where BERT normalisation and WordPiece have edge cases: accents (precomposed, combining,
# stripped by the uncased normaliser), letters that lowercase or decompose to another length (İ, ß, ﬁ,
# the Ångström and Kelvin signs), CJK (one token per character), emoji with a skin-tone modifier,
# controls and zero-width or format characters (dropped by clean_text), odd whitespace, special-token
# text typed by a user. Offsets must still point into the original text.
NASTY = ("e\u0301", "\u00e9", "\u00df", "\u0130", "\ufb01", "\u212b", "\u212a", "\u0300", "\u0327", "\u4e2d\u6587",
         "\u3042", "\uac00", "\U00020000", "\U0001f600", "\U0001f44d\U0001f3fd", "\u200b", "\u200d", "\ufeff", "\u00ad",
         "\x00", "\x07", "\x7f", "\x9b", "\ufffd", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "  ", ".", "?",
         "'", "-", "$", "\u2019", "\u00bf", "\u0661", "\u05d0", "\u0627", "\u0e01", "\u2160", "[SEP]", "[CLS]", "[UNK]",
         "##")
WORDS = ("the", "question", "Denver", "Broncos", "unbelievably", "na\u00efve", "caf\u00e9", "1984", "e-mail", "don't")
_piece = st.one_of(st.sampled_from(NASTY), st.sampled_from(WORDS), st.text(min_size=1, max_size=6),
                   # words over WordPiece's 100-character limit become one [UNK] spanning the word
                   # (a run of CJK characters is not one word: each character is its own)
                   st.builds(lambda c, n: c * n, st.sampled_from(["a", "\u00e9", "\u5b57", "ab"]),
                             st.integers(95, 130)))
_text = st.one_of(st.sampled_from(["", " ", "\t\n ", "\u200b", "\u3000\u00a0"]),  # nothing left after normalising
                  st.lists(_piece, max_size=30).map("".join),
                  st.lists(_piece, max_size=30).map(" ".join))
_LONG_TEXT = st.lists(_piece, min_size=10, max_size=80).map(" ".join)
_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,  # the same cases every run
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _same_as_transformers(ours, theirs, texts, pairs, *, max_length, truncation, stride, overflow, padding):
    """Encode with both and compare everything a QA or classification batch uses. Where transformers
    refuses the settings (the kept text alone is longer than max_length, a cut leaves no more than
    `stride` tokens), fastbert must refuse with a ValueError: before, it let through tokenizers' bare
    Exception and its Rust PanicException, a BaseException that `except Exception` and the CLI miss."""
    kwargs = dict(max_length=max_length, truncation=truncation, stride=stride)
    try:
        b = theirs(texts, pairs, **kwargs, return_overflowing_tokens=overflow, return_offsets_mapping=True,
                   padding=padding, return_tensors="pt")
    except BaseException:  # noqa: B036 -- tokenizers' PanicException is no Exception
        with pytest.raises(ValueError):
            ours(texts, pairs, **kwargs, return_overflowing=overflow, return_offsets=True, padding=padding)
        return "refused"
    if not truncation and b["attention_mask"].sum(1).max() > (max_length or ours.model_max_length):
        # transformers returns the over-long rows (with a warning); fastbert refuses them on purpose
        with pytest.raises(ValueError, match="enable truncation"):
            ours(texts, pairs, **kwargs, return_overflowing=overflow, return_offsets=True, padding=padding)
        return "too long"
    a = ours(texts, pairs, **kwargs, return_overflowing=overflow, return_offsets=True, padding=padding)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert a[key].tolist() == b[key].tolist(), key
    assert a["offsets"].tolist() == b["offset_mapping"].tolist()
    assert a["sequence_ids"] == [b.sequence_ids(i) for i in range(len(a["sequence_ids"]))]
    if overflow:
        assert a["sample_index"] == b["overflow_to_sample_mapping"].tolist()
    return "same"


@_SETTINGS
@given(data=st.data())
def test_nasty_unicode_texts_and_pairs_match_transformers(both, data):
    ours, theirs = both
    n = data.draw(st.integers(1, 4), label="batch")
    texts = data.draw(st.lists(_text, min_size=n, max_size=n), label="texts")
    pairs = data.draw(st.none() | st.lists(_text, min_size=n, max_size=n), label="pairs")
    truncation = data.draw(st.sampled_from([True, False, "longest_first", "only_first"]
                                           + (["only_second"] if pairs is not None else [])), label="truncation")
    max_length = data.draw(st.sampled_from([5, 6, 8, 11, 16, 32, None]), label="max_length")
    stride = data.draw(st.integers(0, 8), label="stride")
    _same_as_transformers(ours, theirs, texts, pairs, max_length=max_length, truncation=truncation, stride=stride,
                          overflow=data.draw(st.booleans(), label="overflow"),
                          padding=data.draw(st.sampled_from(["longest", "max_length"]), label="padding"))


@_SETTINGS
@given(question=_text, context=_LONG_TEXT, max_length=st.sampled_from([12, 16, 24, 32, 64]),
       stride=st.integers(0, 20), padding=st.sampled_from(["longest", "max_length"]))
def test_nasty_unicode_qa_windows_match_transformers(both, question, context, max_length, stride, padding):
    """The SQuAD path: question + passage, only the passage cut, overlapping windows with a stride,
    offsets back into the passage."""
    ours, theirs = both
    _same_as_transformers(ours, theirs, [question, "Who?"], [context, context[::-1]], max_length=max_length,
                          truncation="only_second", stride=stride, overflow=True, padding=padding)


def test_impossible_cut_is_a_value_error(both):
    """Fixed cases of the refusals above (and one window that fits), covered whatever hypothesis draws."""
    ours, theirs = both
    assert _same_as_transformers(ours, theirs, [""], ["unbelievably"], max_length=5, truncation=True, stride=2,
                                 overflow=False, padding="longest") == "refused"  # PanicException before
    assert _same_as_transformers(ours, theirs, ["a b c d e f g"], ["x"], max_length=8, truncation="only_second",
                                 stride=0, overflow=True, padding="longest") == "refused"  # bare Exception before
    assert _same_as_transformers(ours, theirs, ["a b c"], ["x y z w v u"], max_length=8, truncation="only_second",
                                 stride=1, overflow=True, padding="longest") == "same"


def test_threads_sharing_a_tokenizer_each_get_their_own_cut():
    """An inference server's threads share one Tokenizer. tokenizers keeps truncation as state of
    its Tokenizer and encode_batch releases the GIL, so a per-call setting on one shared object
    let a call run with another thread's max_length or with none (203-token rows asked for 16).
    Three threads, three lengths, words cut and pre-split (tagging), and tokenize() beside them."""
    import sys
    import threading

    from fastbert.data.tagging import encode_words

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a loaded server would
    tok = fastbert.Tokenizer.from_pretrained("default")
    text, words = " ".join(["word"] * 200), ["word"] * 200
    wrong = []

    def worker(max_length, calls=60):
        for _ in range(calls):
            width = tok([text] * 8, max_length=max_length)["input_ids"].shape[1]
            pieces = {len(f["input_ids"]) for f in encode_words(tok, [words] * 4, max_length)}
            if width != max_length or pieces != {max_length}:
                wrong.append((max_length, width, pieces))

    def plain(calls=200):
        for _ in range(calls):
            if len(tok.tokenize(text)) != 200:
                wrong.append(("tokenize", len(tok.tokenize(text))))

    try:
        threads = [threading.Thread(target=worker, args=(m,)) for m in (16, 128, 64)]
        threads.append(threading.Thread(target=plain))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not wrong, f"{len(wrong)} calls cut to another thread's length, e.g. {wrong[:3]}"
    assert tok([text], max_length=20)["input_ids"].shape[1] == 20
    assert tok([text], truncation=False, max_length=512)["input_ids"].shape[1] == 202
    import pickle  # spawn DataLoader workers get the tokenizer pickled: its lock and copies stay behind

    again = pickle.loads(pickle.dumps(tok))
    assert torch.equal(again([text], max_length=16)["input_ids"], tok([text], max_length=16)["input_ids"])


def test_truncating_copies_are_reused_and_few():
    """Each truncation setting holds a whole copy of the vocabulary (about 6 MB for BERT): one per
    setting is reused, and only the few most recent settings are kept."""
    tok = fastbert.Tokenizer.from_pretrained("default")
    first = tok.truncating(16)
    assert tok.truncating(16) is first and tok.truncating(16, stride=4) is not first
    for max_length in range(20, 40):
        tok.truncating(max_length)
    assert len(tok._truncators) == tok._MAX_TRUNCATORS <= 4
    assert tok.truncating(39) is tok.truncating(39)
    assert tok([" ".join(["word"] * 50)], max_length=16)["input_ids"].shape[1] == 16
