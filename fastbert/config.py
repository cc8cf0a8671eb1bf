"""BertConfig: the hyper-parameters of a BERT encoder, read from and written to
Hugging Face's config.json so checkpoints move between fastbert and transformers."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path


@dataclasses.dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    # Keys of config.json that fastbert does not use (architectures, id2label, ...):
    # kept so that save_pretrained writes back what it read.
    extra: dict = dataclasses.field(default_factory=dict, repr=False)

    SUPPORTED_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh")

    def __post_init__(self):
        # Types and ranges first: config.json is user input, and a bad value must become a
        # ValueError naming it, not a ZeroDivisionError below or a NaN at the first forward.
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig: {name} must be a positive integer, got {value!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig: {name} must be a probability in [0, 1), got {value!r}")
        # transformers' head dropout (None: hidden_dropout_prob), as checked as the encoder's: True ran as
        # p=1 (a head fed zeros) and 1.5 failed at the first forward in torch's words
        classifier_dropout = self.extra.get("classifier_dropout")
        if classifier_dropout is not None and (isinstance(classifier_dropout, bool)
                                               or not isinstance(classifier_dropout, (int, float))
                                               or not 0.0 <= classifier_dropout < 1.0):
            raise ValueError(f"BertConfig: classifier_dropout must be a probability in [0, 1) or null, "
                             f"got {classifier_dropout!r}")
        # layer_norm_eps below float32's smallest normal number rounds to 0 in the kernels, and a
        # row of equal values then normalises to NaN; initializer_range is the std of newly
        # initialised weights (BERT: 0.02): above 1 a model built from the config overflows.
        for name, low, high in (("layer_norm_eps", 1e-38, float("inf")), ("initializer_range", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low < value <= high:
                bounds = f"> {low:g}" if high == float("inf") else f"in ({low:g}, {high:g}]"
                raise ValueError(f"BertConfig: {name} must be a finite number {bounds}, got {value!r}")
        if self.pad_token_id is not None and (isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int)
                                              or not 0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"BertConfig: pad_token_id must be an integer in [0, vocab_size={self.vocab_size}) "
                             f"or null, got {self.pad_token_id!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in self.SUPPORTED_ACTS:
            raise ValueError(f"BertConfig: hidden_act must be one of {self.SUPPORTED_ACTS}, got {self.hidden_act!r}")
        position_type = self.extra.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"BertConfig: position_embedding_type must be 'absolute' (the only kind supported), got {position_type!r}")
        for key in ("is_decoder", "add_cross_attention"):
            # transformers runs such a BERT with causal (or cross-) attention; the encoder here is bidirectional
            # only and would compute something else without a word
            if self.extra.get(key):
                raise ValueError(f"BertConfig: {key} is true: that BERT is a decoder (causal attention"
                                 f"{', cross-attention' if key == 'add_cross_attention' else ''}); fastbert's "
                                 "encoder is bidirectional self-attention only")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        return "none" if self.hidden_act == "gelu" else "tanh"

    @classmethod
    def from_dict(cls, values: dict) -> "BertConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in values.items() if k in known},
                   extra={k: v for k, v in values.items() if k not in known})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BertConfig":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"BertConfig: no config.json at {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"BertConfig: {path} is not valid JSON: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"BertConfig: {path} must hold a JSON object, got {type(values).__name__}")
        model_type = values.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"BertConfig: {path} describes model_type {model_type!r}, expected 'bert'")
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        values = dict(self.extra)
        values.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        values["model_type"] = "bert"
        values.setdefault("architectures", ["BertModel"])
        return values

    def to_json_text(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json(self, path: str | os.PathLike) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(Path(path), self.to_json_text())
