"""fastbert.data.collate and LengthBucketSampler on generated features: padding against transformers'
DataCollatorWithPadding / DataCollatorForTokenClassification (the collators run_glue and run_ner use),
and the sampler's promises (every row once, batch sizes, len(), determinism, no more padding than
without bucketing)."""
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st

from fastbert.checkpoint import resolve_model_path
from fastbert.data import LengthBucketSampler, collate

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def hf_tokenizer():
    folder = resolve_model_path("default")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="[PAD]")


@st.composite
def features(draw):
    """1-6 unpadded features of 1-20 tokens, with one kind of label: a class, a score, one class per
    token (-100 on some), none, or answer positions."""
    kind = draw(st.sampled_from(["class", "score", "tokens", "none", "qa"]))
    out = []
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.integers(1, 20))
        f = {"input_ids": draw(st.lists(st.integers(1, 999), min_size=n, max_size=n)),
             "token_type_ids": draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))}
        if kind == "class":
            f["labels"] = draw(st.integers(0, 4))
        elif kind == "score":
            f["labels"] = draw(st.sampled_from([0.0, 2.4, 5.0, 3.0]))  # 0.0, 3.0: float still
        elif kind == "tokens":
            f["labels"] = draw(st.lists(st.sampled_from([-100, 0, 1, 7]), min_size=n, max_size=n))
        elif kind == "qa":
            f["start_positions"], f["end_positions"] = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        out.append(f)
    return kind, out


@SETTINGS
@given(case=features(), multiple=st.sampled_from([None, 1, 8]))
def test_collate_pads_as_transformers_collators_do(hf_tokenizer, case, multiple):
    kind, feats = case
    ours = collate(feats, pad_token_id=hf_tokenizer.pad_token_id, pad_to_multiple_of=multiple)
    if kind in ("tokens",):
        collator = transformers.DataCollatorForTokenClassification(hf_tokenizer, pad_to_multiple_of=multiple,
                                                                   return_tensors="pt")
    else:
        collator = transformers.DataCollatorWithPadding(hf_tokenizer, pad_to_multiple_of=multiple,
                                                        return_tensors="pt")
    theirs = collator([dict(f) for f in feats])
    for key, value in theirs.items():
        assert ours[key].dtype == (torch.float32 if key == "labels" and kind == "score" else torch.long), key
        assert torch.equal(ours[key], value.to(ours[key].dtype)), key
    assert set(ours) == set(theirs)
    width = max(len(f["input_ids"]) for f in feats)
    assert ours["input_ids"].shape[1] == (width if not multiple else -(-width // multiple) * multiple)


def test_collate_takes_numpy_and_torch_labels():
    """Features built from numpy/pandas or torch data: a numpy float32 score raised "cannot be
    interpreted as an integer", a 0-dim tensor "only integer tensors of a single element"; a 1-D
    array of per-token labels went to torch.tensor whole, unpadded and unchecked (a feature with 3
    labels for 2 tokens came out as a 3-wide row of a 3-wide batch)."""
    base = [{"input_ids": [1, 2]}, {"input_ids": [1, 2, 3]}]
    for scores in [(np.float32(3.8), np.float32(0.4)), (torch.tensor(3.8), torch.tensor(0.4)),
                   (np.array(3.8), 0.4)]:
        out = collate([dict(base[0], labels=scores[0]), dict(base[1], labels=scores[1])])["labels"]
        assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([3.8, 0.4]))
    out = collate([dict(base[0], labels=np.int64(2)), dict(base[1], labels=torch.tensor(0))])["labels"]
    assert out.dtype == torch.long and out.tolist() == [2, 0]
    tags = collate([dict(base[0], labels=np.array([0, -100])), dict(base[1], labels=torch.tensor([1, 2, -100]))])
    assert tags["labels"].tolist() == [[0, -100, -100], [1, 2, -100]]
    with pytest.raises(ValueError, match="feature 0 has 3 labels for 2 tokens"):
        collate([dict(base[0], labels=np.array([0, -100, 1])), dict(base[1], labels=np.array([1, 2, -100]))])
    with pytest.raises(ValueError, match="feature 1 has one label for 3 tokens"):
        collate([dict(base[0], labels=[0, 1]), dict(base[1], labels=1)])
    with pytest.raises(TypeError, match="feature 0: per-token labels must be integer class ids"):
        collate([dict(base[0], labels=[0.5, 1.0])])
    with pytest.raises(ValueError, match="feature 1 has no labels"):
        collate([dict(base[0], labels=1), base[1]])


def test_collate_pad_ids_given_masks_and_mixed_labels():
    """What the generated cases above leave at one value: the pad id (BERT's [PAD] is 0, the default,
    so a collate that ignored pad_token_id would pass them), the label pad id, an attention_mask the
    features bring (kept, as transformers' DataCollatorWithPadding keeps it), and int and float scores
    mixed in one batch (a regression batch: float32, not cut to int64)."""
    feats = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 0], "labels": [0, -100, 2]},
             {"input_ids": [5], "labels": [1]}]
    out = collate(feats, pad_token_id=9, label_pad_id=-1)
    assert out["input_ids"].tolist() == [[5, 6, 7], [5, 9, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert out["labels"].tolist() == [[0, -100, 2], [1, -1, -1]]
    assert out["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    mixed = collate([{"input_ids": [1], "labels": 3}, {"input_ids": [1], "labels": 2.5}])["labels"]
    assert mixed.dtype == torch.float32 and mixed.tolist() == [3.0, 2.5]


def test_bucket_sampler_seeds_do_not_share_epochs():
    """Each (seed, epoch) has its own order: with seed + epoch as the stream, seed 0's second epoch
    would be seed 1's first, and two runs meant to differ by seed would train on the same batch orders."""
    lengths = [(7 * i) % 23 + 1 for i in range(40)]

    def order(seed, epoch):
        s = LengthBucketSampler(lengths, 4, shuffle=True, bucket=True, chunk_batches=2, seed=seed)
        s.set_epoch(epoch)
        return s.batches()

    orders = [order(seed, epoch) for seed in range(3) for epoch in range(3)]
    assert all(a != b for i, a in enumerate(orders) for b in orders[i + 1:])


@SETTINGS
@given(lengths=st.lists(st.integers(1, 64), max_size=120), batch_size=st.integers(1, 9),
       chunk_batches=st.integers(1, 4), shuffle=st.booleans(), bucket=st.booleans(), drop_last=st.booleans(),
       seed=st.integers(0, 3), epoch=st.integers(0, 2))
def test_bucket_sampler_promises(lengths, batch_size, chunk_batches, shuffle, bucket, drop_last, seed, epoch):
    def make(bucket_=bucket):
        s = LengthBucketSampler(lengths, batch_size, shuffle=shuffle, bucket=bucket_, chunk_batches=chunk_batches,
                                seed=seed, drop_last=drop_last)
        s.set_epoch(epoch)
        return s

    sampler = make()
    batches = sampler.batches()
    assert batches == make().batches() == list(sampler)            # same seed and epoch: same batches
    assert len(batches) == len(sampler)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))                              # no row twice
    n = len(lengths)
    if drop_last:
        assert all(len(b) == batch_size for b in batches) and len(seen) == n - n % batch_size
    else:
        assert sorted(seen) == list(range(n))
        assert sum(len(b) < batch_size for b in batches) <= 1 and all(b for b in batches)
    if not shuffle and not bucket:
        assert seen == list(range(len(seen)))                       # file order, for prediction
    if bucket:
        for b in batches:                                           # each batch cut from one sorted chunk
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    if bucket and not drop_last:
        # the same rows, cut after sorting each chunk by length: never more padding than without
        def padded(bs):
            return sum(len(b) * max(lengths[i] for i in b) for b in bs)
        assert padded(batches) <= padded(make(bucket_=False).batches())


def test_bucket_sampler_with_no_rows_or_fewer_than_a_batch():
    assert LengthBucketSampler([], 4).batches() == [] and len(LengthBucketSampler([], 4)) == 0
    short = LengthBucketSampler([3, 5], 4, drop_last=True)
    assert short.batches() == [] and len(short) == 0
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        LengthBucketSampler([3], 0)
