"""Batches: dynamic padding, and a length-bucketing batch sampler.

    loader = make_loader(features, batch_size=32, shuffle=True, seed=0, bucket=True)
    for epoch in range(3):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader: ...    # dict of tensors, padded to the longest row of the batch

Features are the dicts made by encode_glue / encode_tagging / build_squad_features:
unpadded `input_ids` and `token_type_ids` lists, plus `labels` (int, float or a
per-token list) or `start_positions`/`end_positions`.
"""
from __future__ import annotations

import functools
import random
from typing import Iterator, Sequence

import torch

IGNORE_INDEX = -100

# Keys that become int64 tensors as they are (one int per feature).
_SCALAR_KEYS = ("start_positions", "end_positions", "example_index")


def collate(features: Sequence[dict], pad_token_id: int = 0, label_pad_id: int = IGNORE_INDEX,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of features to the longest one (rounded up to pad_to_multiple_of).

    Returns int64 tensors input_ids, token_type_ids, attention_mask: (batch, seqlen);
    labels: (batch,) int64 for classes, (batch,) float32 for regression, or
    (batch, seqlen) int64 padded with label_pad_id for per-token labels;
    start_positions, end_positions, example_index: (batch,) int64 when present.
    Other keys (offsets, context_mask, word_ids) stay with the features.
    """
    if len(features) == 0:
        raise ValueError("collate needs at least one feature")
    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(features)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    token_type_ids = torch.zeros((batch, width), dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (f, n) in enumerate(zip(features, lengths)):
        input_ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        if "token_type_ids" in f:
            token_type_ids[i, :n] = torch.tensor(f["token_type_ids"], dtype=torch.long)
        attention_mask[i, :n] = torch.tensor(f["attention_mask"], dtype=torch.long) if "attention_mask" in f else 1
    out = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}

    if "labels" in features[0]:
        missing = [i for i, f in enumerate(features) if "labels" not in f]
        if missing:
            raise ValueError(f"feature {missing[0]} has no labels, but feature 0 has: a batch is labelled or not")
        labels = [f["labels"] for f in features]
        if _per_token(labels[0]):
            padded = torch.full((batch, width), label_pad_id, dtype=torch.long)
            for i, (lab, n) in enumerate(zip(labels, lengths)):
                if not _per_token(lab) or len(lab) != n:
                    got = f"{len(lab)} labels" if _per_token(lab) else "one label"
                    raise ValueError(f"feature {i} has {got} for {n} tokens")
                lab = torch.as_tensor(lab)
                if lab.is_floating_point():
                    raise TypeError(f"feature {i}: per-token labels must be integer class ids, got {lab.dtype}")
                padded[i, :n] = lab
            out["labels"] = padded
        else:
            # numpy scalars and 0-dim arrays/tensors as Python numbers: a numpy float32 score is not a
            # `float`, and torch.tensor(..., dtype=long) refused it with "cannot be interpreted as an integer"
            labels = [x.item() if hasattr(x, "item") else x for x in labels]
            if any(isinstance(x, float) for x in labels):
                out["labels"] = torch.tensor(labels, dtype=torch.float32)
            else:
                out["labels"] = torch.tensor(labels, dtype=torch.long)
    for key in _SCALAR_KEYS:
        if key in features[0]:
            out[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
    return out


def _per_token(labels) -> bool:
    """A list (or 1-D array/tensor) of labels, one per token; a scalar is one label per feature.
    A 1-D array went to torch.tensor whole and kept its own length: unpadded, never checked."""
    return isinstance(labels, (list, tuple)) or getattr(labels, "ndim", 0) >= 1


class LengthBucketSampler:
    """Batch sampler (torch DataLoader `batch_sampler=`) yielding lists of feature indices.

    shuffle: shuffle the rows (seeded by seed + epoch; see set_epoch), else keep file order.
    bucket: within each chunk of chunk_batches * batch_size rows, sort by length
        (longest first) before cutting batches, so a batch pads little; with shuffle
        the order of all batches is then shuffled too, so lengths do not come in waves.
    drop_last: drop the one short batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, bucket: bool = True,
                 chunk_batches: int = 50, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if chunk_batches < 1:
            raise ValueError(f"chunk_batches must be >= 1, got {chunk_batches}")
        self.lengths = list(lengths)
        self.batch_size, self.shuffle, self.bucket = batch_size, shuffle, bucket
        self.chunk_batches, self.seed, self.drop_last = chunk_batches, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.bucket:
            chunk = self.batch_size * self.chunk_batches
            order = [i for start in range(0, len(order), chunk)
                     for i in sorted(order[start:start + chunk], key=lambda j: -self.lengths[j])]
        out = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        if self.shuffle and self.bucket:
            rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def make_loader(features: Sequence[dict], batch_size: int, shuffle: bool = False, bucket: bool = False,
                seed: int = 0, pad_token_id: int = 0, chunk_batches: int = 50, drop_last: bool = False,
                pad_to_multiple_of: int | None = None, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over features with a LengthBucketSampler and collate().

    With shuffle=False and bucket=False the batches keep feature order (use that for
    prediction, so logits rows line up with features).
    """
    sampler = LengthBucketSampler([len(f["input_ids"]) for f in features], batch_size, shuffle=shuffle,
                                  bucket=bucket, chunk_batches=chunk_batches, seed=seed, drop_last=drop_last)
    return torch.utils.data.DataLoader(
        list(features), batch_sampler=sampler, num_workers=num_workers,
        collate_fn=functools.partial(collate, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of))
