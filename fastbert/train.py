"""Fine-tuning: AdamW (no decay on biases and LayerNorm), linear warm-up and
decay, gradient clipping and accumulation, autocast on the GPU (float32 on the
CPU unless precision="bf16" asks for CPU autocast), evaluation each epoch, atomic checkpoints and an exact resume.

Exact resume: the batch order of epoch e is a permutation drawn from
seed + e, and a checkpoint stores weights, optimizer, scheduler, step, the
position inside the epoch and the RNG states (torch's, which dropout draws from, and Python's
and numpy's, which a collate that augments may draw from), so an
interrupted CPU run that resumes ends with the same weights as one that never
stopped (tests/test_train.py).

Under torchrun the processes split each optimizer step's batches and sum their gradients
(fastbert/distributed.py): N processes with batch b update as one with batch b and grad_accum N.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import distributed
from .checkpoint import atomic_write_bytes, atomic_write_text
from .heads import IGNORE_INDEX
from .metrics import to_json


@dataclasses.dataclass
class TrainConfig:
    out: Path
    epochs: int = 3
    max_steps: int | None = None         # optimizer steps; overrides epochs when set
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)   # torch's and transformers' defaults; RoBERTa's recipe: (0.9, 0.98)
    adam_eps: float = 1e-8                           # BERT's own recipe used 1e-6
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None      # optimizer steps of warm-up; overrides warmup_ratio when set
    schedule: str = "linear"             # after the warm-up: linear | cosine decay to 0, or constant
    max_grad_norm: float = 1.0
    layer_lr_decay: float = 1.0          # < 1: encoder layer i of L trains at lr * decay**(L - i) (parameter_groups)
    grad_accum: int = 1
    seed: int = 42
    precision: str = "auto"              # auto | fp32 | bf16 | fp16
    bucket_by_length: bool = False
    save_every: int | None = None        # optimizer steps between checkpoints (None: each epoch)
    progress: bool = True
    compile: str | None = None           # torch.compile backend for the training forward ("inductor"); None: eager
    keep_best: str | None = None         # a dev metric (higher is better): its best evaluation's checkpoint is kept
    eval_every: int | None = None        # optimizer steps between evaluations inside an epoch (None: at its end only)
    early_stop: int | None = None        # stop after this many evaluations in a row without a better keep_best score
    log_every: int | None = None         # optimizer steps between lines of out/train_log.jsonl (None: no log)

    def __post_init__(self):
        self.out = Path(self.out)
        for name in ("epochs", "batch_size", "grad_accum", "max_steps", "save_every", "eval_every", "early_stop",
                     "warmup_steps", "log_every"):
            value = getattr(self, name)
            if value is None and name in ("max_steps", "save_every", "eval_every", "early_stop", "warmup_steps",
                                          "log_every"):
                continue
            # 2.5 failed later as a slice index, naming nothing; True passed as 1
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            low = 0 if name == "warmup_steps" else 1  # 0: no warm-up
            if value < low:
                raise ValueError(f"{name} must be >= {low}" + (" (or None: each epoch)" if name == "save_every" else "")
                                 + f", got {value}")
        for name in ("lr", "weight_decay", "warmup_ratio", "max_grad_norm", "layer_lr_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        # inf passed the range checks and trained to NaN weights, saved without a word
        if not 0.0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ValueError(f"layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")
        if not self.max_grad_norm > 0.0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out {str(self.out)!r} is a file; checkpoints need a folder")
        betas = tuple(self.adam_betas) if isinstance(self.adam_betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0
                                      for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        if isinstance(self.adam_eps, bool) or not isinstance(self.adam_eps, (int, float)) or not 0.0 < self.adam_eps < math.inf:
            raise ValueError(f"adam_eps must be finite and > 0, got {self.adam_eps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be finite and > 0, got {self.lr}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            # numpy's range, as transformers' set_seed; the batch-order generator's seed (seed * 1000003 +
            # epoch) left torch's 64 bits above about 1.8e13, after the data was read
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        if self.keep_best is not None and (not isinstance(self.keep_best, str) or not self.keep_best):
            raise TypeError(f"keep_best must be a metric name or None, got {self.keep_best!r}")
        if self.early_stop is not None and self.keep_best is None:
            raise ValueError("early_stop needs keep_best: the metric whose best it waits for, and the checkpoint "
                             "the run ends with")
        if self.compile is not None and self.compile not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(f"compile must be a torch.compile backend {torch.compiler.list_backends()} or None, "
                             f"got {self.compile!r}")


# The folders a save writes and `latest` may name (the staging copy only while a save of the same
# step moves it into place).
_CHECKPOINT_NAME = re.compile(r"(\.staging-)?checkpoint-\d+")

_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase) + \
    ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())


# An encoder layer's parameters: ours (bert.layers.3.), transformers' (bert.encoder.layer.3.,
# distilbert.transformer.layer.3.)
_LAYER_INDEX = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


_EMBEDDINGS = re.compile(r"(?:^|\.)embeddings(?:_project)?\.")   # ELECTRA-small's projection belongs there too


def layer_depths(model: torch.nn.Module) -> dict[str, int]:
    """Each trainable parameter's depth for layer-wise learning-rate decay: 0 for the embeddings,
    i + 1 for encoder layer i, L + 1 for the rest (pooler, task head). L counts every layer, frozen
    ones too, so freezing the top layers does not move the others."""
    every = [name for name, _ in model.named_parameters()]
    indices = {name: int(m.group(1)) for name in every if (m := _LAYER_INDEX.search(name))}
    if not indices:
        raise ValueError("layer_lr_decay needs a model whose parameter names number its layers (layers.N. or "
                         f"layer.N.); found none in {every[:3]}")
    top = max(indices.values()) + 1
    return {name: indices[name] + 1 if name in indices else 0 if _EMBEDDINGS.search(name) else top + 1
            for name, param in model.named_parameters() if param.requires_grad}


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                     layer_lr_decay: float = 1.0):
    """Weight decay on matrices only: biases and LayerNorm parameters are exempt, as in BERT.

    Norms are found by module type as well as by name (as transformers' Trainer does): a norm
    need not be called one (GPT-2's ln_1, ln_f), and a class like T5LayerNorm is no nn.LayerNorm.

    layer_lr_decay < 1 (layer-wise learning-rate decay): the head and pooler train at lr, the top
    layer at lr * decay, each layer below at one more factor of decay and the embeddings at
    lr * decay**(L + 1); one decay and one exempt group per depth. (ELECTRA's code, which fine-tunes
    with decay 0.8 for base models, counts one factor more below the head: its top layer trains at
    lr * decay**2; the same curve as ours at a peak lr one factor of decay lower.)"""
    norms = {id(p) for module in model.modules()
             if isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")
             for p in module.parameters(recurse=False)}
    depths = layer_depths(model) if layer_lr_decay != 1.0 else {}
    top = max(depths.values(), default=0)
    groups: dict[tuple[int, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = name.endswith("bias") or "norm" in name.lower() or id(param) in norms
        groups.setdefault((depths.get(name, 0), exempt), []).append(param)
    if not depths:
        return [{"params": groups.get((0, False), []), "weight_decay": weight_decay},
                {"params": groups.get((0, True), []), "weight_decay": 0.0}]
    if lr is None:
        raise ValueError("layer_lr_decay needs lr, the head's learning rate")
    return [{"params": params, "weight_decay": 0.0 if exempt else weight_decay,
             "lr": lr * layer_lr_decay ** (top - depth)}
            for (depth, exempt), params in sorted(groups.items())]


SCHEDULES = ("linear", "cosine", "constant")


def linear_warmup_decay(optimizer, warmup_steps: int, total_steps: int, schedule: str = "linear"):
    """Linear warm-up to the peak lr, then linear (or cosine) decay to 0 at total_steps, or the peak
    lr kept (constant).

    Unlike transformers' get_linear_schedule_with_warmup (factor step / warmup_steps), the
    warm-up factor is (step + 1) / (warmup_steps + 1): the first update is not spent at lr 0.
    The Trainer takes warmup_steps = int(warmup_ratio * total_steps), or TrainConfig.warmup_steps;
    transformers rounds the ratio up: one step less of warm-up at most. Both sides of
    scripts/compare_quality.py use this schedule."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        left = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))  # 1 -> 0 after the warm-up
        if schedule == "cosine":  # transformers' get_cosine_schedule_with_warmup, half a period
            return 0.5 * (1.0 - math.cos(math.pi * left))
        return 1.0 if schedule == "constant" else left
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Example indices of each batch of one epoch, a pure function of (seed, epoch).

    With lengths, batches are formed from examples of similar length (sorted inside
    chunks of 50 batches) so padding is small, and the batch order is shuffled.
    """
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    if lengths is not None:
        chunk = batch_size * 50
        order = [i for start in range(0, len(order), chunk)
                 for i in sorted(order[start:start + chunk], key=lambda j: lengths[j])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def loss_items(batch: dict) -> int:
    """How many terms the model's mean loss averages over: labels other than -100 for class
    labels (every labelled token for tagging), examples for regression, and for span positions
    the examples whose answer start lies in the window (the QA head ignores the others; a batch
    where none does has no loss term and is skipped: its mean would be 0/0)."""
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point():
        return int((labels != IGNORE_INDEX).sum())
    starts = batch.get("start_positions")
    if isinstance(starts, torch.Tensor):
        window = batch["input_ids"].shape[-1]
        return int(((starts >= 0) & (starts < window)).sum())
    return len(batch["input_ids"])


def _length(feature) -> int:
    """An unpadded example's token count, for bucketing by length."""
    try:
        return len(feature["input_ids"])
    except (TypeError, KeyError):
        raise ValueError("bucket_by_length needs lengths=... or examples with an 'input_ids' sequence") from None


def _token_ids_digest(features) -> str:
    """sha256 of every example's input_ids, in order (\"\" for examples without them)."""
    digest = hashlib.sha256()
    for feature in features:
        try:
            ids = feature["input_ids"]
        except (TypeError, KeyError, IndexError):
            return ""
        ids = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        digest.update(ids.astype(np.int64).tobytes() + b"|")
    return digest.hexdigest()[:16]


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable: fsyncing the files is not enough."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; nothing more to do there
        pass
    finally:
        os.close(fd)


def _autocast_dtype(precision: str, device: torch.device):
    """auto: bf16 (else fp16) autocast on a GPU, float32 on the CPU. bf16 asked for by name
    runs on the CPU too (CPU autocast; how the CPU tests exercise mixed precision); fp16 needs
    a GPU, where a gradient scaler keeps small gradients from underflowing."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device (a gradient scaler), got {device}; "
                         "use bf16 or fp32 on the CPU")
    # the training device's capability (is_bf16_supported asks the current device's)
    if precision == "fp16" or torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype):
    """torch.autocast at `dtype` (from _autocast_dtype) on `device`; None: off (float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def on_device(device: torch.device):
    """`device` made the current CUDA device for a block (nothing for the CPU or an unindexed "cuda")."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class Trainer:
    """Trains `model` on `features` (a list of examples) batched by `collate`.

    evaluate(model) -> dict of metrics, called after each epoch under the training autocast
    (precision bf16/fp16 evaluates in it too, as transformers' Trainer does). Under torchrun rank 0
    calls it alone, unless it has `collective = True` (every process calls it, and it shares the work:
    tasks.evaluate(..., shard=True)); every process keeps rank 0's scores. `save_model(model, folder)`
    writes the model in HF layout (default: model.save_pretrained).
    """

    def __init__(self, model, features: Sequence, collate: Callable, config: TrainConfig,
                 evaluate: Callable | None = None, lengths: Sequence[int] | None = None,
                 save_model: Callable | None = None):
        if len(features) == 0:
            raise ValueError("no training examples")
        for name in ("keep_best", "eval_every"):
            if getattr(config, name) and evaluate is None:
                raise ValueError(f"{name}={getattr(config, name)!r} needs an evaluate function (dev data)")
        self.model, self.features, self.collate, self.cfg = model, features, collate, config
        self.save_model = save_model or (lambda model, folder: model.save_pretrained(folder))
        if config.bucket_by_length and lengths is None:
            # bucketing asked for without lengths would silently not bucket: measure them instead
            lengths = [_length(f) for f in features]
        if lengths is not None and len(lengths) != len(features):
            raise ValueError(f"lengths must hold one length per feature: {len(features)} features, "
                             f"{len(lengths)} lengths")
        self.evaluate_fn, self.lengths = evaluate, (lengths if config.bucket_by_length else None)
        self._out_lock = None  # the open lock file while this Trainer holds cfg.out (_hold_out)
        self._held_by_with = False  # inside `with trainer:`, which holds cfg.out to its end
        self.device = next(model.parameters()).device
        # Under torchrun: each optimizer step takes grad_accum batches per process (fastbert/distributed.py).
        self.rank, self.world = distributed.rank_and_world()
        if self.world > 1:
            distributed.check_device(self.device)
            with on_device(self.device):  # NCCL's object collectives run on the current device
                distributed.broadcast_model(model)
                self._items_per_example = distributed.from_first(self._measure_items_per_example())
            # summed bucket by bucket during each step's last backward (fastbert/distributed.py)
            self._gradient_sum = distributed.GradientSum(list(model.parameters()))
        self.batches_per_epoch = math.ceil(len(features) / config.batch_size)
        steps_per_epoch = math.ceil(self.batches_per_epoch / (config.grad_accum * self.world))
        self.total_steps = config.max_steps or steps_per_epoch * config.epochs
        self.epochs = math.ceil(self.total_steps / steps_per_epoch)
        # The fused AdamW: on a GPU one kernel for every parameter's update instead of a few per tensor;
        # on the CPU one vectorised pass per tensor (MiniLM on 2 cores: 8.5 ms a step, the default
        # for-loop 58 ms; the demo's fine-tuning went from 1,690 to 1,970 tokens/s).
        self.optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay, config.lr,
                                                            config.layer_lr_decay), lr=config.lr,
                                           betas=config.adam_betas, eps=config.adam_eps,
                                           fused=self.device.type in ("cuda", "cpu") or None)
        warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * self.total_steps)
        self.scheduler = linear_warmup_decay(self.optimizer, warmup, self.total_steps, config.schedule)
        self.autocast = _autocast_dtype(config.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast == torch.float16 else None
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: list[dict] = []
        self._token_ids_digest: str | None = None  # _run_identity's, computed at the first checkpoint
        # log_every: (sum, count) of the losses since the last log line, (training time, tokens) at it,
        # the last step's norm
        self._log_losses, self._log_mark, self._grad_norm, self._log_failed = (0.0, 0), None, None, False
        self._kept_best: Path | None = None  # the best evaluation's checkpoint a save has kept (keep_best)
        if self.world > 1:
            # With what decides when the processes meet (saves, evaluations): one that differs would hang.
            meetings = {"save_every": config.save_every, "eval_every": config.eval_every, "keep_best": config.keep_best,
                        "early_stop": config.early_stop, "evaluates": evaluate is not None,
                        "evaluates_together": getattr(evaluate, "collective", False),
                        # the gradient buckets are laid out from these, alike on every process or the sums mix
                        "frozen_parameters": [n for n, p in model.named_parameters() if not p.requires_grad]}
            with on_device(self.device):
                distributed.check_same_run({**self._run_identity(), **meetings}, self.device)
        self._running: list[float] = []  # this epoch's batch losses so far (checkpointed: a resumed epoch's mean is whole)
        # The training forward (and so its backward) through torch.compile; the model itself stays
        # eager for evaluation and checkpoints (the compiled module shares its parameters). The
        # padded batches vary in length: the second length recompiles once with a dynamic one.
        self._train_forward = torch.compile(model, backend=config.compile) if config.compile else model
        # collate() may carry bookkeeping (example_index) that the model does not take.
        self._model_inputs = set(inspect.signature(model.forward).parameters)

    # -- checkpoints -----------------------------------------------------------

    def _check_weights_finite(self) -> None:
        """The loss is checked before each update, but the update itself can still overflow (the last
        one is never followed by a loss): a checkpoint of NaN weights would be written as if it were
        good, and refused only when loaded. One device sync per checkpoint."""
        params = [(name, p) for name, p in self.model.named_parameters() if p.is_floating_point()]
        finite = torch.stack([torch.isfinite(p).all() for _, p in params]).cpu() if params else torch.ones(0)
        bad = [name for (name, _), ok in zip(params, finite.tolist()) if not ok]
        if bad:
            raise FloatingPointError(f"weights became non-finite at step {self.step} ({', '.join(bad[:3])}"
                                     f"{', ...' if len(bad) > 3 else ''}): not saved; lower --lr or use fp32")

    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step>/ (model in HF layout + trainer_state.pt), then point
        `latest` at it atomically; a crash mid-write leaves the previous one intact."""
        self._check_weights_finite()
        folder = self.cfg.out / f"checkpoint-{self.step}"
        rng = self._rng_states()
        if self.world > 1:
            # Each process's generators (dropout differs between them); rank 0 writes them all.
            ranks = distributed.gather_to_first(rng)
            if self.rank != 0:
                distributed.barrier()
                return folder
        self.cfg.out.mkdir(parents=True, exist_ok=True)
        self._finish_interrupted_save()
        staging = self.cfg.out / f".staging-checkpoint-{self.step}"
        shutil.rmtree(staging, ignore_errors=True)
        self.save_model(self.model, staging)
        state = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "history": json.dumps(self.history),
            "running": json.dumps(self._running), "run": json.dumps(self._run_identity()),
            # log_every: (sum, count) of the losses since the last log line, which the next line averages
            "log_losses": json.dumps({"sum": self._log_losses[0], "count": self._log_losses[1]}),
            "scaler": self.scaler.state_dict() if self.scaler else {}, **rng,
            # the best checkpoint this save keeps (keep_best): a resume without keep_best still deletes it later
            "kept_best": best.name if (best := self.best_checkpoint()) is not None else "",
        }
        if self.world > 1:
            state["ranks"] = ranks
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(staging / "trainer_state.pt", buffer.getvalue())
        # Each rename is durable (its folder fsynced) before the next step relies on it, so a power
        # cut cannot leave `latest` naming a folder whose rename was lost, with the previous one deleted.
        _fsync_dir(staging)
        previous = self._latest()
        if previous == folder:
            # The step `latest` names is saved again (a resumed run that reaches a save at the step it
            # resumed from): point `latest` at the complete staging copy while the old folder goes, so
            # that it never names a missing one.
            atomic_write_text(self.cfg.out / "latest", staging.name + "\n")
            _fsync_dir(self.cfg.out)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        _fsync_dir(self.cfg.out)
        atomic_write_text(self.cfg.out / "latest", folder.name + "\n")
        _fsync_dir(self.cfg.out)
        # Deleted only once `latest` names a checkpoint whose history says which evaluation is the best, so
        # a crash never leaves a resumed run naming a best checkpoint that is gone.
        best = self.best_checkpoint()
        for old in {previous, self._kept_best} - {None, folder, best}:
            # Renamed first (atomic), so that a delete cut short leaves a staging folder, which the
            # loop below clears at the next save, not half a checkpoint kept for good.
            trash = self.cfg.out / f".staging-{old.name}-old"
            shutil.rmtree(trash, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.replace(old, trash)
        self._kept_best = best
        for stale in self.cfg.out.glob(".staging-checkpoint-*"):  # left by a run killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        if self.world > 1:
            distributed.barrier()
        return folder

    def best_record(self) -> dict | None:
        """The history's record (an epoch's end, or an evaluation inside one) with the highest
        keep_best metric, the earliest of equal ones; None without keep_best or a defined score yet."""
        metric = self.cfg.keep_best
        scored = [r for r in self.history if metric and isinstance(r.get(metric), (int, float))
                  and math.isfinite(r[metric])]
        return max(scored, key=lambda r: r[metric]) if scored else None

    def stopped_early(self) -> bool:
        """early_stop: that many evaluations in a row since the best one brought no better score. Read
        from the history, so a resumed run stops where the uninterrupted one did."""
        best = self.best_record()
        if not self.cfg.early_stop or best is None:
            return False
        since = next(len(self.history) - 1 - i for i, record in enumerate(self.history) if record is best)
        return since >= self.cfg.early_stop

    def best_checkpoint(self) -> Path | None:
        """The checkpoint of the best evaluation (keep_best), which saves keep until a better one comes."""
        record = self.best_record()
        return None if record is None else self.cfg.out / f"checkpoint-{record['step']}"

    def _rng_states(self) -> dict:
        return {
            "cpu_rng": torch.get_rng_state(),
            # The training device's generator (cuda:1's dropout seeds), not the current device's.
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
            # as JSON text, which torch.load(weights_only=True) reads back (a numpy array it refuses)
            "py_rng": json.dumps(random.getstate()), "np_rng": json.dumps(_numpy_rng_state()),
        }

    def _hold_out(self) -> None:
        """Hold cfg.out for this Trainer (from resume() or train() to the end of train(), or for a
        `with` block; close() lets it go): two runs
        writing one folder shared the staging names, and could leave a checkpoint of one run's
        weights beside the other's optimizer state, which a resume accepted. flock is released by
        the kernel when the process dies, so a killed run never leaves the folder locked."""
        if self._out_lock is not None or self.rank != 0:  # under torchrun only rank 0 writes
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        self.cfg.out.mkdir(parents=True, exist_ok=True)
        lock = open(self.cfg.out / ".lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RuntimeError(f"out {str(self.cfg.out)!r} is in use by another fastbert run (it holds "
                               f"{self.cfg.out / '.lock'}); wait for it to end or train into another folder") from None
        except OSError as err:  # a filesystem without flock (NFS without lockd, Lustre without -o flock)
            lock.close()
            warnings.warn(f"cannot lock {self.cfg.out / '.lock'} ({err.strerror or err}): this run is not "
                          "protected against a second one writing the same folder", stacklevel=3)
            return
        self._out_lock = lock

    def _release_out(self) -> None:
        if self._out_lock is not None and not self._held_by_with:
            self._out_lock.close()  # closing the file releases the flock
            self._out_lock = None

    def close(self) -> None:
        """Let cfg.out go now: a Trainer that resumed and will not train kept it until it was
        garbage-collected, and another run on the folder was refused meanwhile."""
        self._held_by_with = False
        self._release_out()

    def __enter__(self) -> "Trainer":
        """`with Trainer(...) as trainer:` holds cfg.out for the whole block, not only to the end of
        train(): what the caller writes there afterwards (the final model) is covered too."""
        self._hold_out()
        self._held_by_with = True
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run_identity(self) -> dict:
        """What fixes the batch order and the updates: a resume with other values would not continue the
        same run. total_steps (epochs or max_steps) sets the schedule's length: the scheduler state
        restores only its step, so a changed total would bend the rest of the learning-rate curve.
        The token ids' digest tells other data of the same size apart, and the same data cut to
        another --max-seq-len or read by another tokenizer. precision is the autocast dtype in use
        (fp32 without one): a run resumed in another matches neither."""
        if self._token_ids_digest is None:
            self._token_ids_digest = _token_ids_digest(self.features)
        return {"examples": len(self.features), "token_ids": self._token_ids_digest,
                "batch_size": self.cfg.batch_size, "grad_accum": self.cfg.grad_accum, "seed": self.cfg.seed,
                "bucket_by_length": self.cfg.bucket_by_length,
                "total_steps": self.total_steps, "lr": self.cfg.lr, "warmup_ratio": self.cfg.warmup_ratio,
                "warmup_steps": self.cfg.warmup_steps, "schedule": self.cfg.schedule,
                "adam_betas": list(self.cfg.adam_betas), "adam_eps": self.cfg.adam_eps,
                "layer_lr_decay": self.cfg.layer_lr_decay,
                "weight_decay": self.cfg.weight_decay, "max_grad_norm": self.cfg.max_grad_norm,
                "precision": str(self.autocast or torch.float32).removeprefix("torch."),
                # each process keeps its own generators: a checkpoint holds as many as wrote it
                "world_size": self.world}

    def _pointer(self) -> str | None:
        """What `latest` holds, or None when there is none."""
        pointer = self.cfg.out / "latest"
        return pointer.read_text().strip() if pointer.is_file() else None

    def _latest(self) -> Path | None:
        """The checkpoint folder `latest` names, or None: no pointer, or one that names no checkpoint
        of ours (another tool's `latest`, DeepSpeed's "global_step100", "..", an absolute path). Only
        a folder named here is ever deleted by a save."""
        name = self._pointer()
        if name is None or not _CHECKPOINT_NAME.fullmatch(name) or not (self.cfg.out / name).is_dir():
            return None
        return self.cfg.out / name

    def _finish_interrupted_save(self) -> None:
        """A save of the step `latest` names points `latest` at its staging copy while it replaces the
        folder. Interrupted there, `latest` names the staging folder (complete) or, after the rename,
        a staging folder that is gone beside the complete checkpoint: finish the move either way."""
        name = self._pointer()
        if name is None or not (match := _CHECKPOINT_NAME.fullmatch(name)) or not match.group(1):
            return
        staging, folder = self.cfg.out / name, self.cfg.out / name.removeprefix(".staging-")
        if staging.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
            _fsync_dir(self.cfg.out)
        if (folder / "trainer_state.pt").is_file():
            atomic_write_text(self.cfg.out / "latest", folder.name + "\n")
            _fsync_dir(self.cfg.out)

    def resume(self) -> bool:
        """Load the latest checkpoint under cfg.out, if there is one. The Trainer holds cfg.out from
        here to the end of train(); a refused resume lets it go."""
        self._hold_out()
        try:
            return self._resume()
        except BaseException:
            self._release_out()
            raise

    def _resume(self) -> bool:
        if self.rank == 0:
            self._finish_interrupted_save()
        if self.world > 1:
            with on_device(self.device):  # NCCL's collectives run on the current device
                # The others read `latest` once rank 0 has settled it, and all must resume from the same
                # checkpoint (an out/ folder each machine keeps for itself would not be).
                distributed.barrier()
                distributed.check_same_run({"resume_from": self._pointer()}, self.device,
                                           advice="--out must be one folder every process sees (rank 0 writes it)")
        if self._pointer() is None:
            return False
        folder = self._latest()
        if folder is None or folder.name.startswith("."):
            pointer = self.cfg.out / "latest"
            raise FileNotFoundError(f"cannot resume: {pointer} must name a checkpoint folder in {self.cfg.out}, "
                                    f"holds {pointer.read_text().strip()!r}")
        if not (folder / "trainer_state.pt").exists():
            raise FileNotFoundError(f"checkpoint {folder} has no trainer_state.pt")
        path = folder / "trainer_state.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated zip, a pickle with code in it (weights_only refuses it), ...
            raise ValueError(f"cannot resume: {path} could not be loaded with weights_only=True: {err}") from None
        needed = ("optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "history", "cpu_rng", "cuda_rng", "scaler")
        if not isinstance(state, dict) or (lacking := [k for k in needed if k not in state]):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"cannot resume: {path} is not a fastbert trainer state (it lacks "
                             f"{lacking if isinstance(state, dict) else needed}; holds {got})")
        if "run" in state:
            # what a checkpoint written before a setting existed meant by leaving it out
            before = {"world_size": 1, "warmup_steps": None, "schedule": "linear", "adam_betas": [0.9, 0.999],
                      "adam_eps": 1e-8, "layer_lr_decay": 1.0}
            saved, now = {**before, **json.loads(state["run"])}, self._run_identity()
            changed = [f"{k}={saved[k]!r} there, {now[k]!r} now" for k in now if k in saved and saved[k] != now[k]]
            if changed:
                raise ValueError(f"cannot resume from {folder}: it was written by a run with other data or settings "
                                 f"({'; '.join(changed)}); resume with the same ones, or train into a fresh folder "
                                 "(from these weights: the checkpoint folder is a model folder, `fastbert "
                                 "finetune --model` takes it)")
        if self.cfg.keep_best:
            # Evaluations without the metric would silently not be candidates: a run keeping the best by
            # another metric, or one from before the task reported it (tagging's entity_f1, stop 30).
            evaluations = [r for r in json.loads(state["history"]) if set(r) - {"epoch", "step", "train_loss"}]
            if any(self.cfg.keep_best not in r for r in evaluations):
                held = sorted(set(evaluations[0]) - {"epoch", "step", "train_loss"})
                raise ValueError(f"cannot resume from {folder} keeping the best by {self.cfg.keep_best!r}: its "
                                 f"evaluations hold {', '.join(held)}; keep the best by one of those")
        if self.world > 1 and len(state.get("ranks", ())) != self.world:
            raise ValueError(f"cannot resume: {path} holds the generators of {len(state.get('ranks', ())) or 1} "
                             f"process(es), this run has {self.world}")
        # Everything is checked before anything is loaded: a refused resume leaves the model as it was
        # (a caller who catches the error and trains afresh would have started from these weights).
        loaded = type(self.model).from_pretrained(folder)
        ours, theirs = self.model.state_dict(), loaded.state_dict()
        differ = [f"{k} {tuple(theirs[k].shape)} there, {tuple(ours[k].shape)} here" for k in ours
                  if k in theirs and theirs[k].shape != ours[k].shape]
        if differ or ours.keys() != theirs.keys():
            raise ValueError(f"cannot resume from {folder}: its model is not this run's model ("
                             + "; ".join(differ or [f"tensors {sorted(ours.keys() ^ theirs.keys())[:4]}"])
                             + "): another --model, or another label set (a head of another size); resume with "
                             "the same ones, or train into a fresh folder")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.model.load_state_dict(loaded.state_dict())
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history = json.loads(state["history"])
        kept = state.get("kept_best", "")
        self._kept_best = self.cfg.out / kept if re.fullmatch(r"checkpoint-\d+", kept) else self.best_checkpoint()
        self._running = json.loads(state.get("running", "[]"))
        logged = json.loads(state.get("log_losses", "[]"))   # a list of the losses in checkpoints of early stop 30
        self._log_losses = (logged["sum"], logged["count"]) if isinstance(logged, dict) else (sum(logged, 0.0), len(logged))
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["ranks"][self.rank] if self.world > 1 else state
        torch.set_rng_state(rng["cpu_rng"])
        if self.device.type == "cuda" and rng["cuda_rng"].numel():
            torch.cuda.set_rng_state(rng["cuda_rng"], self.device)
        if "py_rng" in rng:  # checkpoints written before these were saved lack them
            version, internal, gauss = json.loads(rng["py_rng"])
            random.setstate((version, tuple(internal), gauss))
        if "np_rng" in rng:
            name, keys, pos, has_gauss, cached = json.loads(rng["np_rng"])
            np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        return True

    # -- the loop ----------------------------------------------------------------

    def _autocast(self):
        return autocast(self.device, self.autocast)

    def _evaluate(self) -> dict:
        # Under the training autocast, as transformers' Trainer evaluates: the scores are those of
        # the model as it trains, and a backend with half-precision kernels only ("cuda") runs.
        with self._autocast():
            return self.evaluate_fn(self.model)

    def _forward_backward(self, batch, scale: float) -> tuple[torch.Tensor, int]:
        # on the host still: no device sync. A collate of its own may leave the mask out (the model
        # takes None: every token real)
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in self._model_inputs}
        with self._autocast():
            loss = self._train_forward(**batch).loss
        (self.scaler.scale(loss * scale) if self.scaler else loss * scale).backward()
        return loss.detach(), tokens

    def _check_loss(self, value: float) -> float:
        # A bad loss stops the run before the optimizer step can spread it into the weights.
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {self.step}: lower --lr or use fp32")
        return value

    def _measure_items_per_example(self) -> float:
        """Loss terms per example (labelled tokens for tagging, about 1 otherwise) in up to 256
        features spread over the data: under torchrun the scale a batch's loss is weighed by before
        the group's true count is known. A collate that draws from the generators draws from seeded
        ones, which are then put back as they were: the guess, and so the run, follows from the seed."""
        sample = self.features[::max(1, len(self.features) // 256)][:256]
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(self.cfg.seed)
                random.seed(self.cfg.seed)
                np.random.seed(self.cfg.seed % 2**32)
                items = loss_items(self.collate(list(sample)))
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        return items / len(sample) if items else 1.0

    def _sum_over_processes(self, group_size: int, losses: dict, tokens: int, items: int,
                            items_guess: float) -> tuple[dict, int]:
        """Under torchrun: every process's losses, token and loss-term counts for this step, then the
        gradients summed (fastbert/distributed.py; sent while the last backward ran). Each process
        weighed its batches by their loss terms over items_guess, the same on every process, as it had
        only its own batches' counts: the summed gradients are scaled by items_guess / the group's
        count, so each batch weighs its share of the group's terms, as in one process. A bad loss on any
        process stops all of them here, before the gradients reach the parameters."""
        params = self._gradient_sum.params
        late = self._gradient_sum.finish()
        # Built in two pieces (the device's losses, one copy of what the host knows), not element by
        # element: a GPU would run a copy kernel per element.
        zero = torch.zeros((), device=self.device)
        device_part = torch.stack([losses[i].float() if i in losses else zero for i in range(group_size)])
        host_part = torch.tensor([tokens, items, float(late)] + [float(i in losses) for i in range(group_size)]
                                 + [float(p.grad is not None) for p in params], dtype=torch.float64)
        values = distributed.sum_step_record(torch.cat([device_part.double(), host_part.to(self.device)])).tolist()
        tokens, items, any_late = int(values[group_size]), values[group_size + 1], values[group_size + 2] > 0
        flags = values[group_size + 3:]
        try:
            losses = {i: self._check_loss(values[i]) for i in range(group_size) if flags[i]}
        except FloatingPointError:
            self._gradient_sum.disarm()   # the run stops: let the summed copies go
            raise
        used = [flag > 0 for flag in flags[group_size:]]
        self._gradient_sum.apply(used, scale=items_guess / items if items else 1.0, any_late=any_late)
        return losses, tokens

    def _record(self, epoch, running: list, aside, bar) -> bool:
        """Append to the history the record of an epoch's end (epoch = epochs done) or of an evaluation
        inside one (eval_every; epoch = the fraction done, as transformers logs it): the mean training
        loss of the epoch so far and the dev scores. Returns whether it is the best so far (keep_best)."""
        record = {"epoch": epoch, "step": self.step, "train_loss": sum(running) / max(1, len(running))}
        if self.evaluate_fn is not None:
            # under torchrun rank 0 evaluates (with every process, if evaluate is collective), and every
            # process keeps its scores
            collective = getattr(self.evaluate_fn, "collective", False)
            scores = aside(self._evaluate) if self.rank == 0 or collective else None
            record.update(distributed.from_first(scores) if self.world > 1 else scores)
            self.model.train()
            if self.cfg.keep_best and self.cfg.keep_best not in record:
                raise ValueError(f"keep_best {self.cfg.keep_best!r} is not one of the evaluation's metrics "
                                 f"{sorted(set(record) - {'epoch', 'step', 'train_loss'})}")
        self.history.append(record)
        if self.rank == 0:
            bar.write(to_json(record))  # null, not NaN, for an undefined metric: the line stays JSON
        return bool(self.cfg.keep_best) and self.best_record() is record

    LOG_NAME = "train_log.jsonl"

    def _start_log(self) -> None:
        """A fresh run starts without a log (an earlier run's in the same folder would read as its own,
        with or without log_every); a resumed run keeps the lines of the steps it has trained (its
        checkpoint's step and before: an interrupted run's lines past it are written again)."""
        path = self.cfg.out / self.LOG_NAME
        self._log_mark = None
        try:
            if self.step == 0:
                path.unlink(missing_ok=True)
            elif self.cfg.log_every and path.is_file():
                kept = []
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by the interruption
                        continue
                    if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= self.step:
                        kept.append(line + "\n")
                atomic_write_text(path, "".join(kept))
        except OSError as err:
            self._log_failed = True
            warnings.warn(f"cannot rewrite {path} ({err}); training goes on without the log", RuntimeWarning, stacklevel=2)

    def _log_step(self, epoch, training_s: float, tokens_seen: int) -> None:
        """One line of out/train_log.jsonl: the mean loss of the steps since the last line, the learning
        rate (the head's, the highest with layer_lr_decay), the gradient norm before clipping, tok/s
        over the training time since the last line, and the Unix time."""
        mark, self._log_mark = self._log_mark, (training_s, tokens_seen)
        since_s, since_tokens = (training_s - mark[0], tokens_seen - mark[1]) if mark else (training_s, tokens_seen)
        line = {"step": self.step, "epoch": epoch,
                "loss": self._log_losses[0] / self._log_losses[1] if self._log_losses[1] else None,
                "lr": max(group["lr"] for group in self.optimizer.param_groups),
                "grad_norm": float(self._grad_norm) if self._grad_norm is not None else None,
                "tokens_per_s": since_tokens / since_s if since_s > 0 else None, "time": round(time.time(), 3)}
        self._log_losses = (0.0, 0)
        if self.rank == 0 and not self._log_failed:
            try:
                with open(self.cfg.out / self.LOG_NAME, "a", encoding="utf-8") as f:
                    f.write(to_json(line) + "\n")
            except OSError as err:  # a log is no reason to stop training (and, under torchrun, hang the others)
                self._log_failed = True
                warnings.warn(f"log_every: cannot write {self.cfg.out / self.LOG_NAME} ({err}); training goes on "
                              "without the log", RuntimeWarning, stacklevel=2)

    def _optimizer_step(self):
        # A group without one labelled item ran no backward: no update, but the step and the schedule
        # still advance (the scaler would refuse a step that recorded no gradients).
        updated = True
        self._grad_norm = None
        if any(p.grad is not None for p in self.model.parameters()):
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            # the norm before clipping (inf where fp16 overflowed), read only when a log line wants it
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            if self.scaler:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                # A lowered scale: the gradients overflowed and the update was skipped. The schedule
                # waits for it, as in transformers, or the first steps' overflows eat the warm-up.
                updated = self.scaler.get_scale() >= scale
            else:
                self.optimizer.step()
        if updated:
            with warnings.catch_warnings():
                # a first step without a labelled item advances the schedule on purpose, with no update
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def train(self, stop_after_step: int | None = None) -> dict:
        """Run to the end (or to `stop_after_step`, to simulate an interruption); returns the summary."""
        # The training device current throughout: kernels that a compiled graph launches itself (any
        # torch.compile backend but inductor) run on the current device, whatever their tensors' device.
        self._hold_out()
        try:
            if self.world > 1:
                self._gradient_sum.attach()
            with on_device(self.device):
                return self._train(stop_after_step)
        finally:
            if self.world > 1:
                self._gradient_sum.remove()
            self._release_out()

    def _train(self, stop_after_step: int | None) -> dict:
        from tqdm.auto import tqdm

        if stop_after_step is not None and self.step >= stop_after_step:  # already there: not one step more
            return {"stopped_at_step": self.step}
        self.model.train()
        # Gradients left by an interrupted group (Ctrl-C mid-accumulation, then resume on the same model)
        # would join the first step.
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            # GradScaler sets up its scale at its first scale() (after a resume too); under torchrun a
            # process whose first step runs no backward would otherwise unscale the summed gradients
            # without one, and fail.
            self.scaler.scale(torch.zeros((), device=self.device))
        if self.step == 0 and self.epoch == 0 and self.batch_in_epoch == 0:
            # Dropout draws from torch; a collate may draw from Python's or numpy's generator (as
            # transformers' set_seed covers). A resumed run restores the saved states instead.
            # Under torchrun dropout differs between processes, and so do a collate's draws (each
            # collates its own batches: alike generators would give batches r and r+1 the same
            # draws); a checkpoint keeps every process's generators.
            seed = self.cfg.seed + 1_000_003 * self.rank
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        # tok/s: real tokens (the attention mask's ones, no padding) over training time, which
        # excludes evaluation and checkpoint writes.
        started, tokens_seen, not_training = time.perf_counter(), 0, 0.0

        def aside(work, *args):
            nonlocal not_training
            begun = time.perf_counter()
            try:
                return work(*args)
            finally:
                not_training += time.perf_counter() - begun

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.cfg.progress or self.rank != 0,
                   unit="step", dynamic_ncols=True)
        if self.rank == 0:
            self._start_log()
        # An epoch left open by a checkpoint at the last step (save_every) is still closed: its record and evaluation.
        while self.epoch < self.epochs and (self.step < self.total_steps or self.batch_in_epoch > 0) \
                and not self.stopped_early():
            batches = epoch_batches(len(self.features), self.cfg.batch_size, self.cfg.seed, self.epoch, self.lengths)
            if self.batch_in_epoch == 0:
                self._running = []
            running = self._running

            def epochs_done():  # max_steps or eval_every may stop inside an epoch: the fraction done
                if self.batch_in_epoch >= len(batches):
                    return self.epoch + 1
                return round(self.epoch + self.batch_in_epoch / len(batches), 4)

            while self.batch_in_epoch < len(batches) and self.step < self.total_steps and not self.stopped_early():
                group_end = self.batch_in_epoch + self.cfg.grad_accum * self.world
                group = batches[self.batch_in_epoch:group_end]
                # Under torchrun this process trains on every world-th batch of the group, and collates
                # only those.
                own = {i: self.collate([self.features[j] for j in group[i]])
                       for i in range(self.rank, len(group), self.world)}
                # The group's gradient is that of one batch holding all of it: each batch's mean loss
                # weighs its share of the group's loss terms, not 1/len(group) (a short last batch,
                # tagging batches with unequal labelled-token counts). A batch with no labelled term
                # adds nothing (its mean would be 0/0). Under torchrun the group's count is known only
                # after the step: a common guess stands in, corrected when the gradients are summed.
                items = {i: loss_items(batch) for i, batch in own.items()}
                group_items = sum(items.values()) if self.world == 1 else \
                    self._items_per_example * sum(len(indices) for indices in group)
                losses, tokens = {}, 0
                last = max((i for i in own if items[i]), default=None)
                for i, batch in own.items():
                    if items[i]:
                        if self.world > 1 and i == last:
                            self._gradient_sum.arm()
                        losses[i], batch_tokens = self._forward_backward(batch, items[i] / group_items)
                        tokens += batch_tokens
                        if self.world == 1:  # one host sync a batch, after its backward is queued
                            losses[i] = self._check_loss(losses[i].item())
                if self.world > 1:
                    losses, tokens = self._sum_over_processes(len(group), losses, tokens, sum(items.values()),
                                                              group_items)
                step_losses = [losses[i] for i in sorted(losses)]
                running.extend(step_losses)
                tokens_seen += tokens
                self._optimizer_step()
                self.batch_in_epoch += len(group)
                elapsed = time.perf_counter() - started - not_training
                bar.update(1)
                if self.cfg.log_every:
                    total, count = self._log_losses
                    for loss in step_losses:   # summed in this order: the mean of sum() over a list, bitwise
                        total += loss
                    self._log_losses = (total, count + len(step_losses))
                    if self.step % self.cfg.log_every == 0:
                        self._log_step(epochs_done(), elapsed, tokens_seen)
                if running:
                    bar.set_postfix(loss=f"{sum(running[-20:]) / len(running[-20:]):.4f}",
                                    tok_s=f"{tokens_seen / elapsed:,.0f}")
                # eval_every: evaluated inside the epoch (its last step has the epoch's evaluation), before
                # a checkpoint of the same step, which then holds the record: a resume does not redo it.
                improved = False
                if (self.cfg.eval_every and self.step % self.cfg.eval_every == 0
                        and self.batch_in_epoch < len(batches) and self.step < self.total_steps):
                    improved = self._record(epochs_done(), running, aside, bar)
                if (self.cfg.save_every and self.step % self.cfg.save_every == 0) or improved:
                    aside(self.save_checkpoint)
                if stop_after_step is not None and self.step >= stop_after_step:
                    bar.close()
                    return {"stopped_at_step": self.step}
            if self.stopped_early():  # by an evaluation inside the epoch, which needs no second one
                break
            improved = self._record(epochs_done(), running, aside, bar)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            # keep_best: a better evaluation is saved whatever save_every says, and that save keeps it
            if self.cfg.save_every is None or improved:
                aside(self.save_checkpoint)
        bar.close()
        elapsed = time.perf_counter() - started
        training = elapsed - not_training
        summary = {"steps": self.step, "epochs": self.history, "wall_time_s": elapsed, "train_time_s": training,
                   "tokens_per_s": tokens_seen / training if training > 0 else 0.0}
        if self.cfg.keep_best:
            summary["best"] = self.best_record()
        if self.stopped_early() and self.step < self.total_steps:  # not a run that ended on schedule anyway
            summary["stopped_early_at_step"] = self.step
        return summary
