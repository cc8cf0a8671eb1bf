"""WordPiece tokenization through the `tokenizers` library.

Wraps a checkpoint's tokenizer.json (or vocab.txt) and adds what fine-tuning
needs: pairs packed `[CLS] a [SEP] b [SEP]` with token_type_ids, truncation
(longest-first or only-second), padding, offsets back into the text, and
overflowing windows with a stride for long SQuAD passages.
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import processors

TRUNCATION = {"longest_first": "longest_first", "only_second": "only_second", "only_first": "only_first"}


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, model_max_length: int = 512):
        # The checkpoint's own truncation/padding defaults (MiniLM pads every text
        # to 128) would override the per-call choices: start from none.
        backend.no_truncation()
        backend.no_padding()
        self._tok = backend  # never changed after this: threads share it
        self._lock = threading.Lock()
        self._truncators: OrderedDict[tuple, _HFTokenizer] = OrderedDict()
        self.model_max_length = model_max_length
        self.pad_token_id = self.token_id("[PAD]")
        self.cls_token_id = self.token_id("[CLS]")
        self.sep_token_id = self.token_id("[SEP]")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "default") -> "Tokenizer":
        from .checkpoint import resolve_model_path

        folder = resolve_model_path(name_or_path)
        config = {}
        if (path := folder / "tokenizer_config.json").exists():
            try:
                config = json.loads(path.read_text())
            except ValueError as err:
                raise ValueError(f"tokenizer: {path} is not valid JSON: {err}") from None
            if not isinstance(config, dict):
                raise ValueError(f"tokenizer: {path} must hold a JSON object, got {type(config).__name__}")
        max_length = config.get("model_max_length", 512)
        if isinstance(max_length, bool) or not isinstance(max_length, (int, float)) or not max_length >= 1:
            raise ValueError(f"tokenizer: model_max_length in {folder / 'tokenizer_config.json'} must be a "
                             f"positive number, got {max_length!r}")
        max_length = 512 if max_length > 100_000 else int(max_length)  # above: transformers' "no limit" sentinel
        if (path := folder / "tokenizer.json").exists():
            try:
                backend = _HFTokenizer.from_file(str(path))
            except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
                raise ValueError(f"tokenizer: {path} is not a readable tokenizers file: {err}") from None
        elif (path := folder / "vocab.txt").exists():
            from tokenizers.implementations import BertWordPieceTokenizer

            tokens = {line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()}
            if (missing := [t for t in ("[CLS]", "[SEP]") if t not in tokens]):
                raise ValueError(f"tokenizer: {path} has no {' or '.join(missing)} token; a BERT WordPiece "
                                 "vocabulary holds both")
            # transformers' BertTokenizer settings; strip_accents None follows do_lower_case
            settings = {key: config.get(key, default) for key, default in
                        (("do_lower_case", True), ("strip_accents", None), ("tokenize_chinese_chars", True))}
            for key, value in settings.items():
                if not isinstance(value, bool) and not (value is None and key == "strip_accents"):
                    raise ValueError(f"tokenizer: {key} in {folder / 'tokenizer_config.json'} must be true or false"
                                     f"{' or null' if key == 'strip_accents' else ''}, got {value!r}")
            backend = BertWordPieceTokenizer(str(path), lowercase=settings["do_lower_case"],
                                             strip_accents=settings["strip_accents"],
                                             handle_chinese_chars=settings["tokenize_chinese_chars"])._tokenizer
            cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
            backend.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
        else:
            raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {folder}")
        return cls(backend, max_length)

    # tokenizers keeps truncation as state of the Tokenizer object, and encode_batch releases the
    # GIL: setting it per call on one shared object let a thread's call run with another's
    # max_length, or with none (an inference server's threads, a DataLoader's). Each setting gets
    # a copy of its own, set once and never changed. A copy holds the whole vocabulary (about 6 MB
    # for BERT's 30k WordPieces), and a program uses one or two settings: a few are kept.
    _MAX_TRUNCATORS = 4

    def truncating(self, max_length: int, stride: int = 0, strategy: str = "longest_first") -> _HFTokenizer:
        """The tokenizers.Tokenizer that truncates to max_length (windows sharing `stride` tokens)."""
        key = (max_length, stride, strategy)
        with self._lock:
            backend = self._truncators.get(key)
            if backend is not None:
                self._truncators.move_to_end(key)
                return backend
        backend = _HFTokenizer.from_str(self._tok.to_str())
        backend.enable_truncation(max_length, stride=stride, strategy=strategy)
        with self._lock:
            self._truncators[key] = backend
            while len(self._truncators) > self._MAX_TRUNCATORS:
                self._truncators.popitem(last=False)
        return backend

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"], state["_truncators"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._truncators = OrderedDict()

    def token_id(self, token: str) -> int:
        found = self._tok.token_to_id(token)
        if found is None:
            raise ValueError(f"the vocabulary has no {token!r} token")
        return found

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def save(self, folder: str | os.PathLike) -> None:
        from .checkpoint import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self._tok.to_str())
        config = {"tokenizer_class": "BertTokenizer", "model_max_length": self.model_max_length,
                  **self._normalizer_settings()}
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config) + "\n")

    def _normalizer_settings(self) -> dict:
        """BertTokenizer's settings as the normaliser in use has them. transformers 5 rebuilds a
        BertTokenizer's normaliser from tokenizer_config.json, defaulting to lower case: a cased
        model's tokenizer saved without them tokenised lower-cased and accent-stripped there."""
        normalizer = json.loads(self._tok.to_str()).get("normalizer") or {}
        if normalizer.get("type") != "BertNormalizer":
            return {}
        return {"do_lower_case": bool(normalizer.get("lowercase", True)),
                "strip_accents": normalizer.get("strip_accents"),
                "tokenize_chinese_chars": bool(normalizer.get("handle_chinese_chars", True))}

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids) -> str:
        """Text of one sequence of token ids (a list of ints or a 1-D integer tensor)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(f"decode: ids must be one sequence (a 1-D integer tensor or a list of ints), "
                                 f"got a {ids.dim()}-D {ids.dtype} tensor; decode each row of a batch in turn")
            ids = ids.tolist()
        ids = list(ids)
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"decode: ids[{i}] must be an int token id, got {type(t).__name__}")
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"decode: ids[{i}] = {t} is outside the vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids)

    def __call__(self, texts, pairs=None, *, max_length: int | None = None, truncation: str | bool = "longest_first",
                 padding: str | bool = "longest", stride: int = 0, return_overflowing: bool = False,
                 return_offsets: bool = False, return_tensors: bool = True):
        """Encode a batch of texts (or text pairs).

        Returns a dict with input_ids, token_type_ids, attention_mask: (batch, seqlen)
        int64 tensors (lists if return_tensors=False or padding=False); with return_offsets,
        `offsets` (batch, seqlen, 2) character spans and `sequence_ids` (None for
        special tokens and padding); with return_overflowing, every window of every
        input and `sample_index` naming the input each window came from.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if pairs is not None:
            pairs = [pairs] if isinstance(pairs, str) else list(pairs)
            if len(pairs) != len(texts):
                raise ValueError(f"pairs must have one entry per text: {len(texts)} texts, {len(pairs)} pairs")
        if not texts:
            raise ValueError("texts must hold at least one text, got an empty batch")
        for name, batch in (("texts", texts), ("pairs", pairs or [])):
            for i, t in enumerate(batch):
                if not isinstance(t, str):
                    raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
            raise TypeError(f"max_length must be an int or None, got {type(max_length).__name__}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            # -1 came back as an OverflowError from tokenizers, 1.5 as a TypeError naming neither
            raise ValueError(f"stride must be an int >= 0 (tokens shared by consecutive windows), got {stride!r}")
        max_length = self.model_max_length if max_length is None else max_length
        if max_length < 3 + (pairs is not None):
            raise ValueError(f"max_length must leave room for the special tokens, got {max_length}")
        if truncation:
            strategy = "longest_first" if truncation is True else truncation
            if strategy not in TRUNCATION:
                raise ValueError(f"truncation must be one of {sorted(TRUNCATION)} or False, got {truncation!r}")
            if strategy == "only_second" and pairs is None:
                raise ValueError("truncation='only_second' truncates the second text of each pair: pass pairs")
        if padding not in (False, "longest", "max_length", True):
            raise ValueError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")
        backend = self.truncating(max_length, stride, TRUNCATION[strategy]) if truncation else self._tok
        try:
            inputs = list(zip(texts, pairs)) if pairs is not None else texts
            encodings = backend.encode_batch(inputs)
        except BaseException as err:
            # Inputs that cannot be cut to max_length: tokenizers raises a bare Exception (the kept text alone
            # is too long) or panics (a sequence cut to no more than `stride` tokens). Its PanicException is a
            # BaseException, which escapes `except Exception` and the CLI's error report: say it as a ValueError.
            if not truncation or not (isinstance(err, Exception) or type(err).__name__ == "PanicException"):
                raise
            raise ValueError(f"cannot cut the inputs to max_length={max_length} with truncation={truncation!r} and "
                             f"stride={stride} ({err}): raise max_length, lower stride, or truncate the other "
                             "text") from None
        windows, sample_index = [], []
        for i, enc in enumerate(encodings):
            for window in [enc] + (list(enc.overflowing) if return_overflowing else []):
                windows.append(window)
                sample_index.append(i)
        if not truncation and max(len(w.ids) for w in windows) > max_length:
            raise ValueError(f"an input has {max(len(w.ids) for w in windows)} tokens, more than max_length={max_length}; "
                             "enable truncation")
        width = max(len(w.ids) for w in windows)
        if padding == "max_length":
            width = max_length
        out = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        if return_offsets:
            out["offsets"], out["sequence_ids"] = [], []
        for w in windows:
            pad = (width - len(w.ids)) if padding else 0
            out["input_ids"].append(list(w.ids) + [self.pad_token_id] * pad)
            out["token_type_ids"].append(list(w.type_ids) + [0] * pad)
            out["attention_mask"].append([1] * len(w.ids) + [0] * pad)
            if return_offsets:
                out["offsets"].append([tuple(o) for o in w.offsets] + [(0, 0)] * pad)
                out["sequence_ids"].append(list(w.sequence_ids) + [None] * pad)
        if return_overflowing:
            out["sample_index"] = sample_index
        if return_tensors and padding:
            for key in ("input_ids", "token_type_ids", "attention_mask"):
                out[key] = torch.tensor(out[key], dtype=torch.long)
            if return_offsets:
                out["offsets"] = torch.tensor(out["offsets"], dtype=torch.long)
        return out
