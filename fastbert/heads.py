"""Task heads: the small dense layers that turn the encoder into each application.

    BertForSequenceClassification  [CLS] (pooled) -> dropout -> dense; cross-entropy,
                                   or mean squared error when num_labels == 1 (STS-B)
    BertForTokenClassification     every token -> dropout -> the same dense; labels -100 ignored
    BertForQuestionAnswering       every token -> dense to (start, end); loss = mean of the two
                                   cross-entropies; spans predicted by fastbert.ops.span_score

Each forward returns a TaskOutput dataclass (.loss, .logits; QA logits are (B, S, 2), start
then end, and .start_logits/.end_logits views), read as a transformers ModelOutput is: out[0],
out["logits"], to_tuple() (fastbert.model.ModelOutput; iterating yields values). A key padding mask row
with no real token gives that row zero attention context, never NaN (transformers' sdpa path
agrees; its eager path attends evenly instead).

Checkpoints move both ways: the files save_pretrained writes (and from_pretrained reads) use the
names of transformers' classes of the same names (bert.*, classifier.*, qa_outputs.*, through
fastbert.checkpoint's key map). In memory the encoder keeps its own shorter names
(model.state_dict() has bert.layers.0.attention.query.weight): go through the files, not
load_state_dict, to move weights into a transformers model.

Losses equal transformers' on the same weights and targets (tests/test_heads_fuzz.py):
-100 labels ignored, (B, 1) labels and positions taken for (B,), answer positions
clamped to [0, S] and S ignored; where every target is ignored the loss is NaN in
both (a mean over nothing; Trainer skips such a batch). On purpose unlike transformers:
labels are checked before the encoder runs (a class outside [0, num_labels) is a
ValueError, not an IndexError or a device-side assert; float labels for classes and
integer labels for regression are TypeErrors: a regression head would train on class ids
silently), and any integer dtype is taken (cross_entropy alone refuses int32).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint
from .config import BertConfig
from .model import BertModel, ModelOutput
from .ops._backend import host_sync_allowed

IGNORE_INDEX = -100


@dataclasses.dataclass
class TaskOutput(ModelOutput):
    loss: torch.Tensor | None
    logits: torch.Tensor                     # (B, num_labels) | (B, S, num_labels) | (B, S, 2)


@dataclasses.dataclass
class QuestionAnsweringOutput(TaskOutput):
    """logits (B, S, 2) and, as transformers' QuestionAnsweringModelOutput, start_logits and end_logits
    (B, S): views of them. By position: loss (when given), start_logits, end_logits."""

    @property
    def start_logits(self) -> torch.Tensor:
        return self.logits[..., 0]

    @property
    def end_logits(self) -> torch.Tensor:
        return self.logits[..., 1]

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.loss, self.start_logits, self.end_logits) if v is not None)

    def __getitem__(self, key):
        if key in ("start_logits", "end_logits"):
            return getattr(self, key)
        return super().__getitem__(key)


class _TaskModel(nn.Module):
    """Shared plumbing: an encoder named `bert`, a head, HF-compatible save/load."""

    head_name = "classifier"
    uses_pooler = True
    architecture = ""
    problem_type = None  # transformers' name for the loss, where its class reads one

    def __init__(self, config: BertConfig, num_outputs: int, backend: str | None = None):
        super().__init__()
        self.config = config
        self.head_loaded = False  # from_pretrained: True when the checkpoint's head weights were loaded
        self.bert = BertModel(config, backend=backend, add_pooling_layer=self.uses_pooler)
        classifier_dropout = config.extra.get("classifier_dropout")  # 0.0 is a setting, as in transformers
        self.dropout_p = config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        setattr(self, self.head_name, nn.Linear(config.hidden_size, num_outputs))
        nn.init.normal_(self.head.weight, std=config.initializer_range)
        nn.init.zeros_(self.head.bias)

    @property
    def head(self) -> nn.Linear:
        return getattr(self, self.head_name)

    @classmethod
    def from_pretrained(cls, name_or_path="default", num_labels: int | None = None, backend: str | None = None,
                        labels: list[str] | None = None, **config_overrides):
        """Load a BertModel or task checkpoint; the head is loaded when the checkpoint has
        one of the right shape, and initialised as BERT does otherwise. `config_overrides`
        replace config.json's values (hidden_dropout_prob=0.2, classifier_dropout=0.0, ...) and
        are checked as config.json's are. Returned in eval mode, as transformers returns it."""
        folder = checkpoint.resolve_model_path(name_or_path)
        config = BertConfig.from_json(folder / "config.json")
        if config_overrides:  # through from_dict: checked, and keys it has no field for go to `extra`
            config = BertConfig.from_dict({**config.to_dict(), **config_overrides})
        saved_names = _label_names(config.extra.get("id2label"))  # before _build records the new ones
        model = cls._build(config, num_labels, labels, backend)
        state = checkpoint.read_state_dict(folder)
        head_keys = checkpoint.load_encoder(model.bert, state, source=folder)
        head_state = {k.split(".", 1)[1]: state[k] for k in head_keys if k.startswith(model.head_name + ".")}
        own = model.head.state_dict()
        model.head_loaded = bool(head_state) and all(k in head_state and head_state[k].shape == v.shape
                                                     for k, v in own.items())
        if model.head_loaded:
            for key in own:
                checkpoint.check_weight(f"{model.head_name}.{key}", head_state[key], folder)
            model.head.load_state_dict({k: head_state[k] for k in own})
            if labels is not None and saved_names is not None:
                _follow_label_order(model, saved_names, list(labels), folder)
        elif not head_keys:
            # as transformers says it: an encoder checkpoint is the usual start of a fine-tuning, and a
            # model used for predictions before it is trained is random where its head is
            warnings.warn(f"checkpoint {folder} has no head weights: {model.head_name} is newly initialised "
                          f"(normal, std={config.initializer_range}; zero bias). Fine-tune it before use.",
                          NewHeadWarning, stacklevel=2)
        else:
            # A fine-tuned head dropped without a word (num_labels other than the checkpoint's, another
            # task's head) would leave a random one in its place: said, as transformers says it.
            shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in sorted(head_keys))
            wanted = ", ".join(f"{model.head_name}.{k} {tuple(v.shape)}" for k, v in own.items())
            warnings.warn(f"checkpoint {folder}: its head weights ({shapes}) do not fit this model's head ({wanted}); "
                          f"the head is newly initialised (normal, std={config.initializer_range}; zero bias). "
                          "Fine-tune it before use.", NewHeadWarning, stacklevel=2)
        return model.eval()  # as transformers returns it (BertModel.from_pretrained says why)

    @classmethod
    def _build(cls, config, num_labels, labels, backend):
        return cls(config, backend=backend)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.extra["architectures"] = [self.architecture]
        # transformers sizes the head from id2label and picks the loss by problem_type: a count
        # other than this head's (a QA head from a 3-label classifier's checkpoint, a head built
        # from a bare config) or a stale problem_type would not load there, or load another loss.
        _resolve_labels(self.config, self.head.out_features, None)
        if self.problem_type is not None:
            self.config.extra["problem_type"] = self.problem_type
        checkpoint.record_dtype(self.config, self)
        state = checkpoint.encoder_to_hf(self.bert, prefix="bert.")
        state.update({f"{self.head_name}.{k}": v for k, v in self.head.state_dict().items()})
        checkpoint.save_model_files(folder, self.config, state)

    def _dropout(self, x):
        return F.dropout(x, self.dropout_p, self.training)


class NewHeadWarning(UserWarning):
    """from_pretrained initialised the head (none, or none that fits, in the checkpoint)."""


class BertForSequenceClassification(_TaskModel):
    architecture = "BertForSequenceClassification"

    def __init__(self, config: BertConfig, num_labels: int = 2, backend: str | None = None):
        _check_num_labels(num_labels)
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 means regression), got {num_labels}")
        self.num_labels = num_labels
        super().__init__(config, num_labels, backend)

    @property
    def problem_type(self) -> str:
        return "regression" if self.num_labels == 1 else "single_label_classification"

    @classmethod
    def _build(cls, config, num_labels, labels, backend):
        num_labels = _resolve_labels(config, num_labels, labels)
        model = cls(config, num_labels=num_labels, backend=backend)
        saved = config.extra.get("problem_type")
        if saved is not None and saved != model.problem_type:  # e.g. multi_label_classification
            warnings.warn(f"config.json's problem_type {saved!r} is not this head's loss: fastbert's "
                          f"BertForSequenceClassification(num_labels={num_labels}) computes "
                          f"{'mean squared error' if num_labels == 1 else 'single-label cross-entropy'}, "
                          f"and save_pretrained records problem_type {model.problem_type!r}", stacklevel=3)
        return model

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> TaskOutput:
        if labels is not None:
            if self.num_labels == 1:
                _check_labels(labels, _ids_shape(input_ids)[:1], None, regression=True)
            else:
                _check_labels(labels, _ids_shape(input_ids)[:1], self.num_labels, column_ok=True)
        pooled = self.bert(input_ids, attention_mask, token_type_ids).pooler_output      # (B, hidden)
        logits = self.classifier(self._dropout(pooled))                                 # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                # labels may be (B,) or (B, 1); (B, 1) against (B,) would broadcast to a (B, B) loss
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.reshape(-1).float())
            else:
                # (B,) or (B, 1), as transformers takes them; any integer dtype (cross_entropy takes int64 only)
                loss = F.cross_entropy(logits.float(), labels.reshape(-1).long())
        return TaskOutput(loss, logits)


class BertForTokenClassification(_TaskModel):
    architecture = "BertForTokenClassification"
    uses_pooler = False

    def __init__(self, config: BertConfig, num_labels: int = 2, backend: str | None = None):
        _check_num_labels(num_labels)
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2 for tagging, got {num_labels}")
        self.num_labels = num_labels
        super().__init__(config, num_labels, backend)

    @classmethod
    def _build(cls, config, num_labels, labels, backend):
        return cls(config, num_labels=_resolve_labels(config, num_labels, labels), backend=backend)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> TaskOutput:
        if labels is not None:
            _check_labels(labels, _ids_shape(input_ids), self.num_labels)
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, S, hidden)
        logits = self.classifier(self._dropout(hidden))                                 # (B, S, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().long(), ignore_index=IGNORE_INDEX)
        return TaskOutput(loss, logits)


class BertForQuestionAnswering(_TaskModel):
    architecture = "BertForQuestionAnswering"
    head_name = "qa_outputs"
    uses_pooler = False

    def __init__(self, config: BertConfig, backend: str | None = None):
        super().__init__(config, 2, backend)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None,
                start_positions=None, end_positions=None) -> QuestionAnsweringOutput:
        if start_positions is not None and end_positions is not None:
            start_positions = _check_positions(start_positions, _ids_shape(input_ids)[0], "start_positions")
            end_positions = _check_positions(end_positions, _ids_shape(input_ids)[0], "end_positions")
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, S, hidden)
        logits = self.qa_outputs(hidden)                                                # (B, S, 2)
        loss = None
        if start_positions is not None and end_positions is not None:
            start_logits, end_logits = logits.float().unbind(-1)                        # (B, S) each
            # Positions outside the window (shouldn't happen; the data layer points them at [CLS]) are ignored.
            ignored = start_logits.shape[1]
            loss = (F.cross_entropy(start_logits, start_positions.clamp(0, ignored), ignore_index=ignored)
                    + F.cross_entropy(end_logits, end_positions.clamp(0, ignored), ignore_index=ignored)) / 2
        return QuestionAnsweringOutput(loss, logits)


def _check_num_labels(num_labels) -> None:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int):
        raise TypeError(f"num_labels must be an int, got {num_labels!r}")


def _ids_shape(input_ids) -> torch.Size:
    """input_ids' (batch, seqlen), read to check labels before the encoder checks the ids: the encoder's
    own messages, so a list or a 1-D tensor is not an AttributeError or a label-shape error."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
    return input_ids.shape


def _check_positions(positions, batch: int, name: str) -> torch.Tensor:
    """Answer positions as (B,) int64, or a clear error naming them (cross_entropy's name neither the
    argument nor the head). (B, 1) is taken, as transformers takes it; any integer dtype. Their values
    are not checked: out-of-window positions are clamped and ignored, as transformers does."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(positions).__name__}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"{name} must be integer token indices, got {positions.dtype}")
    if tuple(positions.shape) not in ((batch,), (batch, 1)):
        raise ValueError(f"{name} must be shaped ({batch},) or ({batch}, 1), got {tuple(positions.shape)}")
    return positions.reshape(-1).long()


def _check_labels(labels, shape, num_labels, regression=False, column_ok=False):
    """labels fit the head, or a clear error naming them: cross-entropy's own errors name neither the
    argument nor the head, and on a GPU an out-of-range class is a device-side assert. Checked before
    the encoder runs, so the host sync of the value check lands where the model's id check syncs.
    regression or column_ok: (B, 1) is taken for (B,), as transformers takes it."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(shape) and not ((regression or column_ok) and tuple(labels.shape) == (*shape, 1)):
        column = f" or {(*shape, 1)}" if regression or column_ok else ""
        multi = (" (multi-hot labels: multi-label classification is not supported; one class id per example)"
                 if column_ok and labels.dim() == 2 and labels.shape[0] == shape[0] else "")
        raise ValueError(f"labels must be shaped {tuple(shape)}{column}, got {tuple(labels.shape)}{multi}")
    if regression:
        if not labels.is_floating_point():
            raise TypeError(f"labels of a regression head (num_labels=1) must be floating point, got {labels.dtype}")
        # A NaN or inf target made the loss NaN, which the Trainer blamed on the learning rate.
        if labels.numel() and host_sync_allowed(labels, torch.compiler.is_compiling()) and not bool(torch.isfinite(labels).all()):
            raise ValueError("labels of a regression head (num_labels=1) must be finite, got "
                             f"{labels[~torch.isfinite(labels)][0].item()}")
        return
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}")
    if labels.numel() == 0 or not host_sync_allowed(labels, torch.compiler.is_compiling()):
        return  # the range check needs a host sync: eager runs (a graph's warm-up runs included) make it
    wide = labels.long()  # uint8 would wrap IGNORE_INDEX to 156 and let a label 156 pass as "ignored"
    counted = torch.where(wide == IGNORE_INDEX, 0, wide)        # one host sync below, no boolean indexing
    low, high = torch.stack([counted.min(), counted.max()]).tolist()
    if low < 0 or high >= num_labels:
        raise ValueError(f"labels must lie in [0, num_labels={num_labels}) or be {IGNORE_INDEX} (ignored), "
                         f"got values in [{low}, {high}]")


def _label_names(id2label) -> list | None:
    """A checkpoint's label names by row, or None where its id2label does not name every row 0..n-1."""
    if not isinstance(id2label, dict):
        return None
    names = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    return names if None not in names else None


def _follow_label_order(model, saved_names: list, names: list, folder) -> None:
    """A loaded head's row i scores the checkpoint's label saved_names[i]. Labels given in another order
    (fastbert reads a dataset's labels sorted; an NLI checkpoint's are contradiction, neutral,
    entailment) relabelled the rows without moving them: the rows follow their names now, as
    transformers' run_glue maps them through the checkpoint's label2id."""
    if saved_names == names:
        return
    if sorted(map(str, saved_names)) != sorted(map(str, names)) or len(set(saved_names)) != len(saved_names):
        warnings.warn(f"checkpoint {folder}: its head's labels {saved_names} are not the labels given {names}; "
                      "its rows are kept in order and named by the labels given", stacklevel=3)
        return
    order = torch.tensor([saved_names.index(name) for name in names])
    with torch.no_grad():
        for param in model.head.parameters():
            param.copy_(param[order.to(param.device)])


def _resolve_labels(config: BertConfig, num_labels, labels):
    """num_labels from the argument, the label names, or the checkpoint's id2label (else its num_labels,
    as transformers reads a config that gives only that); recorded in the config as id2label."""
    if num_labels is not None:
        _check_num_labels(num_labels)
    if labels is not None:
        # A string gave one label per character; repeated names collapsed label2id.
        if not isinstance(labels, (list, tuple)) or len(set(labels)) != len(labels) or \
                not all(isinstance(name, str) for name in labels):
            raise ValueError(f"labels must be a list of distinct label names (str), got {labels!r}")
        if num_labels is not None and num_labels != len(labels):
            raise ValueError(f"num_labels={num_labels} but {len(labels)} label names were given")
        num_labels = len(labels)
    saved = config.extra.get("id2label")
    if saved is not None and not isinstance(saved, dict):
        raise ValueError(f"config.json's id2label must be an object of label names by id, got {saved!r}")
    saved_count = config.extra.pop("num_labels", None)  # id2label says it from here on
    if saved_count is not None and (isinstance(saved_count, bool) or not isinstance(saved_count, int)
                                    or saved_count < 1):
        raise ValueError(f"config.json's num_labels must be a positive int, got {saved_count!r}")
    if num_labels is None:
        num_labels = len(saved) if saved else saved_count or 2
    if labels is not None:
        config.extra["id2label"] = {str(i): name for i, name in enumerate(labels)}
        config.extra["label2id"] = {name: i for i, name in enumerate(labels)}
    elif not saved or len(saved) != num_labels:
        config.extra["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config.extra["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    return num_labels
