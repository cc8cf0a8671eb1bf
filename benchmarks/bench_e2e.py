"""End-to-end benchmark: one fine-tuning step and one inference pass of a whole BERT
with a task head, fastbert against transformers, on the GPU of the run.

    fastbert bench --suite e2e [--quick | --budget] [--compile none|key|all] [--time-limit S] [--filter REGEX]
    python -m benchmarks.bench_e2e --write-lengths [--data ../shared/data]   # regenerate benchmarks/data/

Cases (op = "<model>-<head>", shape label, mode):
  models   base (12 layers, hidden 768, 12 heads, FFN 3072) and large (24, 1024, 16, 4096), vocab 30522,
           512 positions, randomly initialised (seeded) with the real shapes: no weights needed
  heads    cls: BertForSequenceClassification (2 labels, pooler -> classifier, cross-entropy);
           qa: BertForQuestionAnswering (qa_outputs on every token, mean of start/end cross-entropies)
  shapes   fixed: B32 S128 and B8 S512, every row full (attention_mask all ones, as a tokenizer gives it);
           real lengths: "sst2" (cls head, 8 batches of 32 sentences drawn from benchmarks/data/sst2_lengths.txt,
           SST-2 train sentences tokenized by fastbert.Tokenizer) and "squad" (qa head, 4 batches of 16
           windows from benchmarks/data/squad_lengths.txt: SQuAD v1.1 windows at max length 384, stride 128);
           each batch padded to its own longest row (as fastbert.data.collate does), not bucketed:
           this is where padding costs time
  modes    train: forward + loss, backward, AdamW step (fused on CUDA), zero_grad(set_to_none)
           infer: forward under torch.no_grad(), model.eval()
           both under bf16 autocast on the GPU, master weights float32 (mixed-precision fine-tuning)
  impls    fb_torch, fb_triton, fb_cuda (fastbert.heads with that backend; cuda only where fastbert._C is
           built), each also under torch.compile (<impl>_compile); on real lengths also fb_triton_unpad,
           fb_cuda_unpad (BertModel.unpad: the layers on packed real tokens, eager only); on a GPU at the
           fixed shapes also fb_triton_graph, fb_cuda_graph (the eager model captured in CUDA graphs: the
           forward and backward through torch.cuda.make_graphed_callables with AdamW outside, inference
           through torch.cuda.graph; no host work per layer, new dropout masks per replay);
           hf_eager, hf_sdpa (transformers'
           BertFor* with attn_implementation "eager" / "sdpa"), hf_sdpa_compile (torch.compile of hf_sdpa);
           hf_fastbert (the same transformers model after fastbert.patch_transformers, backend "auto":
           the drop-in a transformers user gets from one call, eager).
           Every implementation of a case gets the same weights (one seeded fastbert model, copied through
           the checkpoint key map) and the same batches. torch.compile is the default (inductor, dynamic=None:
           a second shape recompiles once with a dynamic sequence length); its first call, compile included,
           is kept as first_call_s. A failing implementation is a row with status "error", never a crash.
  order    tier 1: base-cls B8 S512 (issue 6's target: a BERT-base fine-tuning step at seqlen 512), train
           then infer; 2: the other base cases with the cls head and the real-length cases; 3: large with
           the cls head and on squad lengths; 4: the QA head on fixed shapes. --time-limit drops whole
           cases from tier 4 up; inside a case the eager implementations run before the compiled ones and
           the CUDA-graph captures, and neither of those is started past the limit (row "skipped"). Rows are
           saved every 10 s.
           --compile key (default) compiles tier 1 only, all compiles every case, none none.

Each row (JSON, one per case; the harness's row format plus these keys):
  ms, ms_p20, ms_p80   median and quantiles of per-call CUDA-event times of back-to-back calls (harness.time_calls,
                       timer "loop": what a training loop sees, host dispatch and host syncs included, alike
                       for eager, compiled and graphed steps): one call is one step on the fixed shapes, and
                       all the batches of the case on real lengths
  tokens, padded_tokens, tokens_per_s   real (non-padding) tokens per call, positions computed, real tokens/s
  metric               TFLOP/s of model FLOPs (flops() below) per median call
  pct_of_ceiling, mfu_pct   MFU: metric / the bf16 8192^3 matmul rate measured in the same run (harness)
  speedup_vs_eager     hf_eager ms / ms, hf_eager measured in the same run on the same case
  speedup_vs_hf_compile   hf_sdpa_compile ms / ms, likewise
  max_abs_diff         (infer) max |logits - hf_eager's logits| on the first batch (QA: at real positions):
                       the weights really match
Writes DIR/e2e.json, DIR/e2e.md (every row, and the summary) and DIR/e2e.png (speed-up over transformers
eager and MFU per case).

--quick (CPU too, a smoke test for CI): a tiny model (2 layers, hidden 64, 2 heads, vocab 1024), float32
without autocast, fixed B2 S32 plus short real-length batches (lengths capped at 32), the first call and one
timed call each, one intra-op thread; compile (aot_eager) on the key case only. Under TRITON_INTERPRET=1
fb_triton runs through the Triton interpreter, on the key case only (it is slow), and fb_triton_compile is
skipped (the interpreter cannot run under torch.compile).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import random
import re
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import harness
from .report import bar_panel, save_figure

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
LENGTH_FILES = {"sst2": DATA / "sst2_lengths.txt", "squad": DATA / "squad_lengths.txt"}

# name -> (layers, hidden, heads, intermediate, vocab)
MODELS = {
    "base": (12, 768, 12, 3072, 30522),
    "large": (24, 1024, 16, 4096, 30522),
    "tiny": (2, 64, 2, 256, 1024),
}
NUM_LABELS = 2
CLS_ID, SEP_ID = 101, 102
MODES = ("train", "infer")
BASELINE, COMPILE_BASELINE = "hf_eager", "hf_sdpa_compile"
IMPL_ORDER = ["hf_eager", "hf_sdpa", "hf_sdpa_compile", "hf_fastbert", "fb_torch", "fb_torch_compile", "fb_triton",
              "fb_triton_compile", "fb_triton_unpad", "fb_triton_graph", "fb_cuda", "fb_cuda_compile", "fb_cuda_unpad",
              "fb_cuda_graph"]  # tables, plots
# Run order inside a case: the eager implementations first (hf_eager, the baseline, before all), then the
# compiled ones (each compile costs tens of seconds: a run cut short still has every eager number), then
# the CUDA-graph captures (a way out of host overhead, after the peers the targets name).
RUN_ORDER = ["hf_eager", "hf_sdpa", "hf_fastbert", "fb_torch", "fb_triton", "fb_cuda", "fb_triton_unpad", "fb_cuda_unpad",
             "hf_sdpa_compile", "fb_triton_compile", "fb_cuda_compile", "fb_torch_compile", "fb_triton_graph",
             "fb_cuda_graph"]
# Real-length sets: head, batch size, batches per call, cap on a length (quick mode only)
REAL = {"sst2": ("cls", 32, 8), "squad": ("qa", 16, 4)}
REAL_QUICK = {"sst2": ("cls", 4, 2, 32), "squad": ("qa", 2, 2, 32)}
FIXED = [(32, 128), (8, 512)]
FIXED_QUICK = [(2, 32)]
KEY_FIXED = (8, 512)     # issue 6's target: one BERT-base fine-tuning step at seqlen 512


# ----------------------------------------------------------------------------- work

def flops(model: str, head: str, lengths: Sequence[int], mode: str) -> float:
    """Model FLOPs of one call on sequences of the given real lengths (padding is not work).

        forward = 2 * P_tok * T  +  2 * P_seq * N  +  4 * L * h * sum_i s_i^2
          T = sum_i s_i real tokens, N sequences, L layers, h hidden size, i FFN size
          P_tok = L * (4 h^2 + 2 h i)      weights of the matrix products every token goes through
                                           (q, k, v, out; FFN in and out), + 2 h for the QA head
          P_seq = h^2 + h * num_labels     pooler and classifier, on [CLS] only (cls head)
          4 L h s^2                        attention's QK^T and PV over a sequence of s tokens
        train = 3 * forward                backward = 2x forward (gradients of inputs and of weights):
                                           6 * params * tokens + 12 * L * h * sum s^2, the usual MFU count
        infer = forward

    2 FLOPs per multiply-add. Not counted: embedding lookups (no matmul: embeddings are not in P),
    biases, LayerNorm, GELU, softmax, dropout, the loss, AdamW, recomputation, and padded positions, so
    on real-length batches TFLOP/s and MFU measure useful work and a kernel that skips padding gets credit.
    """
    layers, h, _heads, inner, _vocab = MODELS[model]
    p_tok = layers * (4 * h * h + 2 * h * inner) + (2 * h if head == "qa" else 0)
    p_seq = h * h + h * NUM_LABELS if head == "cls" else 0
    tokens = sum(lengths)
    fwd = 2.0 * p_tok * tokens + 2.0 * p_seq * len(lengths) + 4.0 * layers * h * sum(s * s for s in lengths)
    return {"train": 3.0 * fwd, "infer": fwd}[mode]


# ----------------------------------------------------------------------------- lengths

@functools.lru_cache(maxsize=None)
def read_lengths(name: str) -> tuple[int, ...]:
    path = LENGTH_FILES[name]
    try:
        values = tuple(int(line) for line in path.read_text().split())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: run `python -m benchmarks.bench_e2e --write-lengths` "
                                "in a checkout beside ../shared/data") from None
    if not values or min(values) < 2:
        raise ValueError(f"{path}: expected one token count >= 2 per line")
    return values


def write_lengths(data_dir: Path, n_sst2: int = 2000, seed: int = 0) -> None:
    """Tokenize n_sst2 SST-2 train sentences (a seeded sample) and every SQuAD window of
    train-from-dev-v1.1.json (max length 384, stride 128) with the embedded model's tokenizer."""
    import fastbert
    from fastbert import data

    tok = fastbert.Tokenizer.from_pretrained("default")
    rows = data.read_glue(data_dir / "sst2" / "train.tsv", "sst2")
    picked = sorted(random.Random(seed).sample(range(len(rows.texts)), n_sst2))
    enc = tok([rows.texts[i] for i in picked], max_length=128, truncation="longest_first", padding=False,
              return_tensors=False)
    sst2 = [len(ids) for ids in enc["input_ids"]]
    examples = data.read_squad(data_dir / "squad" / "train-from-dev-v1.1.json")
    squad = [len(f["input_ids"]) for f in data.build_squad_features(examples, tok, 384, 128)]
    DATA.mkdir(parents=True, exist_ok=True)
    for name, values in (("sst2", sst2), ("squad", squad)):
        LENGTH_FILES[name].write_text("".join(f"{v}\n" for v in values))
        print(f"{LENGTH_FILES[name]}: {len(values)} lengths, mean {sum(values) / len(values):.1f}, "
              f"max {max(values)}")


# ----------------------------------------------------------------------------- models

def fastbert_config(model: str):
    from fastbert import BertConfig

    layers, h, heads, inner, vocab = MODELS[model]
    return BertConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=inner, max_position_embeddings=512)


def hf_config(model: str):
    import transformers

    c = fastbert_config(model)
    return transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        hidden_act=c.hidden_act, hidden_dropout_prob=c.hidden_dropout_prob,
        attention_probs_dropout_prob=c.attention_probs_dropout_prob,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps, num_labels=NUM_LABELS,
        # Set on the first call otherwise, which makes torch.compile compile twice.
        problem_type="single_label_classification")


def _fastbert_class(head: str):
    from fastbert import heads

    return heads.BertForSequenceClassification if head == "cls" else heads.BertForQuestionAnswering


def _build_fastbert(model: str, head: str, backend: str, device: torch.device):
    cls = _fastbert_class(head)
    config = fastbert_config(model)
    with torch.device(device):
        return cls(config, num_labels=NUM_LABELS, backend=backend) if head == "cls" else cls(config, backend=backend)


@functools.lru_cache(maxsize=2)
def reference_state(model: str, head: str, device_type: str) -> dict:
    """The weights every implementation of (model, head) gets: a seeded fastbert model's state
    dict (fastbert names), kept on the CPU."""
    torch.manual_seed(zlib.crc32(f"{model}-{head}".encode()))
    ref = _build_fastbert(model, head, "torch", torch.device(device_type))
    return {k: v.detach().to("cpu", copy=True) for k, v in ref.state_dict().items()}


def hf_state(state: dict) -> dict:
    """fastbert names -> transformers names through the one key map (fastbert.checkpoint)."""
    from fastbert import checkpoint

    return {("bert." + checkpoint.to_hf_key(k[5:]) if k.startswith("bert.") else k): v for k, v in state.items()}


def build_impl(impl: str, model: str, head: str, device: torch.device) -> torch.nn.Module:
    """The uncompiled module of `impl`, on `device`, holding the reference weights."""
    state = reference_state(model, head, device.type)
    if impl.startswith("fb_"):
        backend = impl.split("_")[1]
        module = _build_fastbert(model, head, backend, device)
        module.load_state_dict(state)
        module.bert.unpad = impl.endswith("_unpad")
        return module
    import transformers

    cls = transformers.BertForSequenceClassification if head == "cls" else transformers.BertForQuestionAnswering
    attn = "eager" if impl == "hf_eager" else "sdpa"
    with torch.device(device):
        module = cls._from_config(hf_config(model), attn_implementation=attn)
    missing, unexpected = module.load_state_dict(hf_state(state), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"transformers {cls.__name__} does not take the fastbert weights: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if impl == "hf_fastbert":
        from fastbert import patch_transformers

        patch_transformers(module)
    return module.to(device)


def logits_of(out) -> torch.Tensor:
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits], -1)
    return out.logits


# ----------------------------------------------------------------------------- batches

def make_batches(lengths: Sequence[Sequence[int]], head: str, vocab: int, device: torch.device,
                 seed: int) -> list[dict]:
    """One dict of tensors per batch, each padded to its longest row: random token ids between
    [CLS] and [SEP], pad id 0, attention_mask 1/0, token_type_ids 1 on the second segment (QA),
    labels (cls) or start/end positions (qa) inside each row."""
    g = torch.Generator().manual_seed(seed)
    low = 1000 if vocab > 2000 else 5
    out = []
    for rows in lengths:
        B, S = len(rows), max(rows)
        n = torch.tensor(rows)[:, None]
        pos = torch.arange(S)[None, :]
        ids = torch.randint(low, vocab, (B, S), generator=g)
        ids[:, 0] = CLS_ID
        ids[pos == n - 1] = SEP_ID
        ids[pos >= n] = 0
        mask = (pos < n).long()
        types = ((pos >= n // 3) & (pos < n)).long() if head == "qa" else torch.zeros(B, S, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if head == "cls":
            batch["labels"] = torch.randint(0, NUM_LABELS, (B,), generator=g)
        else:
            start = (torch.rand(B, generator=g) * (n[:, 0] - 1)).long() + 1
            batch["start_positions"] = start
            batch["end_positions"] = torch.minimum(start + 3, n[:, 0] - 1)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# ----------------------------------------------------------------------------- cases

@dataclasses.dataclass
class E2ECase:
    model: str
    head: str
    label: str                      # "B8 S512" | "sst2 B32x8"
    lengths: list                   # real lengths, one list per batch of a call
    mode: str
    impl: str
    dtype: torch.dtype              # autocast dtype (float32: no autocast)
    tier: int
    status: str = "ok"
    note: str = ""

    @property
    def op(self) -> str:
        return f"{self.model}-{self.head}"

    @property
    def compiled(self) -> bool:
        """Seconds of setup before the first timed call (a torch.compile, a CUDA graph capture): not
        started past --time-limit, and run after the eager implementations of a case."""
        return self.impl.endswith(("_compile", "_graph"))

    @property
    def group(self) -> tuple:
        return (self.op, self.label, str(self.dtype), self.mode)

    @property
    def tokens(self) -> int:
        return sum(sum(b) for b in self.lengths)

    @property
    def padded_tokens(self) -> int:
        return sum(len(b) * max(b) for b in self.lengths)

    @property
    def work(self) -> float:
        return flops(self.model, self.head, [s for b in self.lengths for s in b], self.mode)

    @property
    def dims(self) -> dict:
        layers, h, heads, inner, vocab = MODELS[self.model]
        return {"B": len(self.lengths[0]), "S": max(max(b) for b in self.lengths), "batches": len(self.lengths),
                "layers": layers, "hidden": h, "heads": heads, "intermediate": inner, "vocab": vocab,
                "head": self.head, "autocast": self.dtype != torch.float32}


def _tier(model: str, head: str, label: str, key_fixed: str) -> int:
    """Run order (and what a time limit drops first: the highest tier)."""
    small = model in ("base", "tiny")
    if small and head == "cls" and label == key_fixed:
        return 1
    if small and ((head == "cls" and label.startswith("B")) or not label.startswith("B")):
        return 2
    if model == "large" and (head == "cls" or not label.startswith("B")):
        return 3
    return 4


def _impls(device: torch.device, compile_here: bool, key: bool, real_lengths: bool = False) -> dict:
    """impl -> (status, note) for one case (key: a tier-1 case; real_lengths: padded batches, where
    the unpadded encoder runs too)."""
    from fastbert.ops import available_backends
    from fastbert.ops._backend import capability_problem, cuda_runtime_problem, interpreter_on, resolve

    usable = available_backends(device)
    out = {name: ("ok", "") for name in ("hf_eager", "hf_sdpa")}
    from fastbert.transformers_integration import transformers_supported

    out["hf_fastbert"] = ("ok", f"fastbert backend auto: {resolve(device)}") if transformers_supported() else \
        ("skipped", "patch_transformers needs transformers >= 5.4")
    if compile_here:
        out["hf_sdpa_compile"] = ("ok", "")
    for backend in ("torch", "triton", "cuda"):
        name = f"fb_{backend}"
        if backend not in usable:
            if backend == "cuda" and device.type != "cuda":
                continue
            why = capability_problem(device) or (cuda_runtime_problem() if backend == "cuda" else None)
            out[name] = ("skipped", f"fastbert backend {backend!r} not usable here (usable: {', '.join(usable)})"
                         + (f": {why}" if why else ""))
            continue
        interpreted = backend == "triton" and device.type != "cuda"
        out[name] = ("ok", "") if key or not interpreted else \
            ("skipped", "the Triton interpreter is slow: on the CPU fb_triton runs the key case only")
        if compile_here:
            if interpreted and interpreter_on():
                out[name + "_compile"] = ("skipped", "torch.compile cannot run Triton kernels through the interpreter")
            else:
                out[name + "_compile"] = ("ok", "")
        if real_lengths and backend != "torch":  # the torch backend's varlen loops over sequences
            out[name + "_unpad"] = ("ok", "")  # also under the interpreter: the quick run's only packed path
        if not real_lengths and backend != "torch" and device.type == "cuda":  # a graph holds one shape
            out[name + "_graph"] = ("ok", "peak_mib leaves out the graph's memory pool, allocated at capture")
    return dict(sorted(out.items(), key=lambda kv: RUN_ORDER.index(kv[0])))


def cases(profile: str, cfg: harness.Settings, compile_scope: str = "key") -> list[E2ECase]:
    """profile: "quick" (tiny model, CPU too), "budget" or "full" (base and large)."""
    device = cfg.device
    quick = profile == "quick"
    dtype = torch.bfloat16 if device.type == "cuda" and not quick else torch.float32
    models = ["tiny"] if quick else ["base", "large"]
    fixed = FIXED_QUICK if quick else FIXED
    key_fixed = f"B{fixed[-1][0]} S{fixed[-1][1]}" if quick else f"B{KEY_FIXED[0]} S{KEY_FIXED[1]}"
    rng_seed = 1234
    out = []
    for model in models:
        shapes = []  # (head, label, lengths)
        for head in ("cls", "qa"):
            if quick and head == "qa":
                continue  # the QA head runs on the squad lengths below
            for B, S in fixed:
                shapes.append((head, f"B{B} S{S}", [[S] * B]))
        for name, spec in (REAL_QUICK if quick else REAL).items():
            head, B, n_batches = spec[:3]
            cap = spec[3] if quick else None
            pool = read_lengths(name)
            rng = random.Random(rng_seed + zlib.crc32(name.encode()))
            drawn = rng.sample(pool, B * n_batches) if len(pool) >= B * n_batches else rng.choices(pool, k=B * n_batches)
            if cap:
                drawn = [min(s, cap) for s in drawn]
            shapes.append((head, f"{name} B{B}x{n_batches}", [drawn[i * B:(i + 1) * B] for i in range(n_batches)]))
        for head, label, lengths in shapes:
            tier = _tier(model, head, label, key_fixed)
            compile_here = compile_scope == "all" or (compile_scope == "key" and tier == 1)
            for mode in MODES:
                for impl, (status, note) in _impls(device, compile_here, tier == 1,
                                                   not label.startswith("B")).items():
                    out.append(E2ECase(model, head, label, lengths, mode, impl, dtype, tier, status, note))
    return out


# ----------------------------------------------------------------------------- one case

def _prepare(case: E2ECase, cfg: harness.Settings, keep: list) -> tuple[Callable, Callable, dict]:
    """Build the implementation, its optimizer and the batches; returns call(k), before(k), extras.
    Everything the case allocates goes into `keep` so the caller can drop it."""
    device = cfg.device
    module = build_impl(case.impl.replace("_compile", "").replace("_graph", ""), case.model, case.head, device)
    keep.append(module)
    runner = module
    if case.impl.endswith("_compile"):
        harness._raise_recompile_limits()
        runner = torch.compile(module, backend=cfg.compile_backend)
        keep.append(runner)
    seed = zlib.crc32(repr(case.group).encode())
    batches = make_batches(case.lengths, case.head, MODELS[case.model][4], device, seed)
    keep.append(batches)
    amp = dict(device_type=device.type, dtype=case.dtype if case.dtype != torch.float32 else torch.bfloat16,
               enabled=case.dtype != torch.float32)
    if case.impl.endswith("_graph"):
        return _prepare_graphed(case, module, batches, amp, keep)

    if case.mode == "train":
        module.train()
        fused = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, weight_decay=0.01, **fused)
        keep.append(optimizer)

        def call(k):
            for batch in batches:
                with torch.autocast(**amp):
                    loss = runner(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    else:
        module.eval()
        inputs = [{k: b[k] for k in INPUT_KEYS} for b in batches]

        def call(k):
            with torch.no_grad(), torch.autocast(**amp):
                for batch in inputs:
                    out = runner(**batch)
            return out

    def first_logits():
        """The first batch's logits; per-token (QA) logits at real positions only (the unpadded
        encoder leaves padding at zeros, so its logits there are the head's bias alone)."""
        module.eval()
        with torch.no_grad(), torch.autocast(**amp):
            logits = logits_of(runner(**{k: batches[0][k] for k in INPUT_KEYS})).float().cpu()
        if logits.dim() == 3:
            logits = logits * batches[0]["attention_mask"].cpu()[..., None].to(logits.dtype)
        return logits

    return call, (lambda k: None), {"first_logits": first_logits}


def _prepare_graphed(case: E2ECase, module, batches: list, amp: dict, keep: list):
    """_prepare for the "_graph" impls: the step captured in CUDA graphs once, then replayed. Autocast
    runs with its cast cache off, as a capture needs (the cached casts would be the capture's)."""
    if len(batches) != 1:
        raise ValueError("a CUDA graph holds one batch shape: graphs run the fixed-shape cases only")
    amp = dict(amp, cache_enabled=False)
    batch = batches[0]
    if case.mode == "train":
        module.train()
        keys = tuple(batch)

        class Step(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = module

            def forward(self, *tensors):
                with torch.autocast(**amp):
                    return self.model(**dict(zip(keys, tensors))).loss

        args = tuple(batch[k] for k in keys)
        graphed = torch.cuda.make_graphed_callables(Step(), args)   # warm-up runs, then the captures
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, weight_decay=0.01, fused=True)
        keep += [graphed, optimizer]

        def call(k):
            graphed(*args).backward()
            optimizer.step()
            # set_to_none: each p.grad is the graph's own gradient buffer (autograd adopts it). Zeroed
            # in place, the next replay would write its gradient there and autograd add it again: 2x.
            optimizer.zero_grad(set_to_none=True)
        return call, (lambda k: None), {}

    module.eval()
    inputs = {k: batch[k] for k in INPUT_KEYS}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad(), torch.autocast(**amp):
        for _ in range(3):  # Triton's compiles, cuBLAS's handles and the id check, before the capture
            module(**inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), torch.autocast(**amp):
        static_logits = logits_of(module(**inputs))
    keep += [graph, static_logits]

    def first_logits():
        """The graph's own logits, from a replay (QA: at real positions only, as _prepare's)."""
        graph.replay()
        logits = static_logits.float().cpu()
        if logits.dim() == 3:
            logits = logits * batch["attention_mask"].cpu()[..., None].to(logits.dtype)
        return logits

    return (lambda k: graph.replay()), (lambda k: None), {"first_logits": first_logits}


def _row(case: E2ECase) -> dict:
    row = {
        "op": case.op, "impl": case.impl, "shape": case.label, "dims": case.dims,
        "dtype": str(case.dtype).replace("torch.", ""), "mode": case.mode,
        "status": case.status, "note": case.note, "unit": harness.TFLOPS, "work": case.work, "tier": case.tier,
        "ms": None, "ms_p20": None, "ms_p80": None, "reps": None, "host_us": None, "first_call_s": None,
        "metric": None, "pct_of_ceiling": None, "speedup_vs_eager": None, "peak_mib": None,
        "tokens": case.tokens, "padded_tokens": case.padded_tokens, "tokens_per_s": None, "mfu_pct": None,
        "speedup_vs_hf_compile": None, "max_abs_diff": None,
        "library": {"hf_fastbert": "transformers + fastbert.patch_transformers"}.get(
            case.impl, "transformers" if case.impl.startswith("hf_") else "fastbert"),
        "compiled": case.impl.endswith("_compile"), "utc": harness.utc_now(),
    }
    return row


def run_case(case: E2ECase, cfg: harness.Settings, reference_logits: dict) -> dict:
    """Measure one case; never raises: failures become status "error" with the message."""
    row = _row(case)
    if case.status != "ok":
        return row
    keep: list = []
    timing = call = before = extras = None
    try:
        call, before, extras = _prepare(case, cfg, keep)
        timing = harness.time_calls(call, before, 1, cfg, "loop")
        timing.peak_mib = harness.peak_mib(call, before, cfg.device)
        if case.mode == "infer":
            logits = extras["first_logits"]()
            if case.impl == BASELINE:
                reference_logits[case.group] = logits
            elif case.group in reference_logits and reference_logits[case.group].shape == logits.shape:
                row["max_abs_diff"] = float((logits - reference_logits[case.group]).abs().max())
    except Exception as err:  # noqa: BLE001 - a failing implementation is a result, not a crash
        refused = isinstance(err, NotImplementedError)
        row["status"] = "unsupported" if refused else "error"
        row["note"] = harness._short(err)
        if os.environ.get("FASTBERT_BENCH_TRACE"):
            traceback.print_exc()
    finally:
        call = before = extras = None  # the closures hold the model, optimizer and batches
        keep.clear()
        if case.impl.endswith("_compile"):
            torch._dynamo.reset()
        gc.collect()
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    if timing is None or row["status"] != "ok":
        return row
    row.update(ms=timing.ms, ms_p20=timing.p20, ms_p80=timing.p80, reps=timing.reps, host_us=timing.host_us,
               first_call_s=timing.first_call_s, peak_mib=timing.peak_mib)
    if timing.ms > 0:
        row["metric"] = case.work / (timing.ms * 1e9)
        row["tokens_per_s"] = case.tokens / (timing.ms * 1e-3)
    return row


# ----------------------------------------------------------------------------- results

def add_derived(rows: list[dict], ceilings: dict) -> None:
    """MFU against the measured matmul rate; speed-ups against transformers eager and transformers
    + torch.compile measured in the same run on the same case."""
    by = {}
    for r in rows:
        if r["status"] == "ok":
            by[(r["op"], r["shape"], r["dtype"], r["mode"], r["impl"])] = r["ms"]
    ceiling = ceilings.get("matmul_TFLOPs")
    for r in rows:
        if r["status"] != "ok" or not r["ms"]:
            continue
        if ceiling and r["metric"] is not None:
            r["pct_of_ceiling"] = r["mfu_pct"] = 100.0 * r["metric"] / ceiling
        key = (r["op"], r["shape"], r["dtype"], r["mode"])
        base, comp = by.get(key + (BASELINE,)), by.get(key + (COMPILE_BASELINE,))
        r["speedup_vs_eager"] = base / r["ms"] if base else None
        r["speedup_vs_hf_compile"] = comp / r["ms"] if comp else None


class E2EResults(harness.Results):
    def save(self) -> None:
        add_derived(self.rows, self.ceilings)
        super().save()  # harness.add_derived finds no impl named "eager" here and leaves these alone


def format_row(r: dict) -> str:
    head = f"{r['op']:<10} {r['impl']:<18} {r['shape']:<16} {r['mode']:<6}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['note'][:140]}"
    return (f"{head} {r['ms']:10.3f} ms [{r['ms_p20']:.3f}, {r['ms_p80']:.3f}] {r['tokens_per_s']:12,.0f} tok/s "
            f"{r['metric']:8.2f} TFLOP/s  first {r['first_call_s']:.1f} s")


def run_cases(todo: Sequence[E2ECase], cfg: harness.Settings, results: E2EResults, deadline: Optional[float],
              log: Callable[[str], None] = print) -> None:
    """As harness.run_cases: tier by tier, a whole group (every impl of one case) or none of it, except
    that a compiled implementation (tens of seconds of compiling) is not started past the deadline: its
    row says "skipped" (the eager ones, seconds each, finish the group). Saved every 10 s, inside a
    group too (one group of a model with its compiles can take minutes): a killed run keeps its rows."""
    current, skipping, saved = None, False, time.monotonic()
    reference_logits: dict = {}
    for case in sorted(todo, key=lambda c: c.tier):
        if case.group != current:
            current = case.group
            reference_logits.clear()
            skipping = deadline is not None and time.monotonic() > deadline
            if skipping:
                results.skipped_for_time.append(" ".join(current))
        if skipping:
            continue
        if case.compiled and case.status == "ok" and deadline is not None and time.monotonic() > deadline:
            case = dataclasses.replace(case, status="skipped",
                                       note="time limit: compiling (or a graph capture) was not started past --time-limit")
            results.skipped_for_time.append(f"{' '.join(current)} {case.impl}")
        row = run_case(case, cfg, reference_logits)
        results.add(row)
        log(format_row(row))
        if time.monotonic() - saved > 10.0:
            results.save()
            saved = time.monotonic()
    results.save()


# ----------------------------------------------------------------------------- report

def _rank(value, order):
    return order.index(value) if value in order else len(order)


def _sorted(rows):
    return sorted(rows, key=lambda r: (r["op"].split("-")[0] != "base", r["op"], _rank(r["mode"], list(MODES)),
                                       r["shape"][0] != "B", r["dims"].get("S", 0), r["shape"],
                                       _rank(r["impl"], IMPL_ORDER)))


def _num(x, fmt):
    return "" if x is None else format(x, fmt)


def markdown(data: dict) -> str:
    from . import report

    out = ["# End-to-end benchmarks", "", report.header(data), "",
           "One call: a fine-tuning step (forward + loss, backward, AdamW) or an inference forward; on real "
           "lengths (sst2, squad) all the batches of the case. ms: median [p20, p80] of CUDA-event times per "
           "call; tok/s: real tokens per second; TFLOP/s and MFU: model FLOPs of the real tokens "
           "(benchmarks/bench_e2e.py flops()) against the measured matmul ceiling; x hf: transformers eager ms / "
           "ms; x hf+c: transformers sdpa + torch.compile ms / ms, same run; first s: first call (compile "
           "included).", ""]
    rows = _sorted(data["rows"])
    for op in dict.fromkeys(r["op"] for r in rows):
        out += [f"## {op}", "",
                "| mode | shape | impl | ms | tok/s | TFLOP/s | MFU % | x hf | x hf+c | peak MiB | first s | note |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["op"] == op):
            ms = r["status"] if r["status"] != "ok" else f"{r['ms']:.4g} [{r['ms_p20']:.4g}, {r['ms_p80']:.4g}]"
            note = r["note"].replace("|", "/")[:140]
            if r.get("max_abs_diff") is not None:
                note = (note + "; " if note else "") + f"max diff vs hf_eager {r['max_abs_diff']:.2g}"
            out.append(f"| {r['mode']} | {r['shape']} | {r['impl']} | {ms} | {_num(r['tokens_per_s'], ',.0f')} | "
                       f"{_num(r['metric'], '.4g')} | {_num(r['mfu_pct'], '.1f')} | "
                       f"{_num(r['speedup_vs_eager'], '.2f')} | {_num(r['speedup_vs_hf_compile'], '.2f')} | "
                       f"{_num(r['peak_mib'], '.0f')} | {_num(r['first_call_s'], '.1f')} | {note} |")
        out.append("")
    out += ["## Summary", "", summary_markdown(data, with_header=False)]
    return "\n".join(out)


def summary_markdown(data: dict, with_header: bool = True) -> str:
    """One line per case (op, shape, mode), a column per implementation: "ms (x hf_eager)"; the last
    column is the best fastbert implementation's MFU."""
    from . import report

    rows = _sorted(data["rows"])
    impls = sorted({r["impl"] for r in rows}, key=lambda i: _rank(i, IMPL_ORDER))
    groups = report.group_by_case(rows)
    out = ([report.header(data), ""] if with_header else []) + [
        "| model | shape | mode | " + " | ".join(impls) + " | best fastbert MFU |",
        "|---|---|---|" + "---|" * len(impls) + "---|"]
    for (op, shape, _dtype, mode), by_impl in groups.items():
        cells = report.timing_cells(by_impl, impls, baseline=BASELINE, speedup_format=".2f")
        fb = [r for i, r in by_impl.items() if i.startswith("fb_") and r["status"] == "ok" and r["mfu_pct"] is not None]
        best = min(fb, key=lambda r: r["ms"]) if fb else None
        mfu = f"{best['mfu_pct']:.1f}% ({best['impl']})" if best else ""
        out.append(f"| {op} | {shape} | {mode} | " + " | ".join(cells) + f" | {mfu} |")
    return "\n".join(out)


def plot(data: dict, png: Path) -> Optional[Path]:
    """Speed-up over transformers eager (log scale, top) and MFU (bottom), a column per mode."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_e2e: matplotlib is not installed; no plot", file=sys.stderr)
        return None
    rows = [r for r in _sorted(data["rows"]) if r["status"] == "ok"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    if not modes:
        return None
    fig, axes = plt.subplots(2, len(modes), figsize=(max(7.0, 8.0 * len(modes)), 9), squeeze=False)
    for col, mode in enumerate(modes):
        mine = [r for r in rows if r["mode"] == mode]
        cases_ = list(dict.fromkeys(f"{r['op']} {r['shape']}" for r in mine))
        impls = sorted({r["impl"] for r in mine}, key=lambda i: _rank(i, IMPL_ORDER))
        for row, (key, ylabel) in enumerate((("speedup_vs_eager", "speed-up over transformers eager (x)"),
                                             ("mfu_pct", "MFU (% of measured bf16 matmul)"))):
            title = f"{mode} ({'fine-tuning step' if mode == 'train' else 'inference forward'})"
            bar_panel(axes[row][col], cases_, impls,
                      lambda impl: {f"{r['op']} {r['shape']}": r.get(key) for r in mine if r["impl"] == impl},
                      ylabel, title=title if row == 0 else None, rotation=50)
        axes[0][col].legend(fontsize=7)
    return save_figure(fig, plt, data["env"], "end to end", png)


def write_all(data: dict, out_dir: Path) -> tuple[Path, Optional[Path]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "e2e.md"
    md.write_text(markdown(data) + "\n")
    return md, plot(data, out_dir / "e2e.png")


# ----------------------------------------------------------------------------- entry (fastbert bench)

def settings(device: torch.device, quick: bool, budget: bool) -> harness.Settings:
    """The harness's settings, with repetitions sized for whole steps (tens of ms each)."""
    cfg = harness.Settings.make(device, quick=quick, budget=budget)
    if quick:
        return cfg
    if budget:
        return dataclasses.replace(cfg, warmup_ms=150.0, rep_ms=400.0, min_reps=5, max_reps=100, rotate_bytes=0)
    return dataclasses.replace(cfg, warmup_ms=500.0, rep_ms=2000.0, min_reps=10, max_reps=500, rotate_bytes=0)


def run(args, device: torch.device, out_dir: Path, started: float, argv: Sequence[str],
        log: Callable[[str], None] = print) -> int:
    """`fastbert bench --suite e2e`: returns 0, or 1 when a fastbert or transformers-eager row failed."""
    import fastbert

    profile = "quick" if args.quick else "budget" if args.budget else "full"
    cfg = settings(device, args.quick, args.budget)
    env = harness.environment(device)
    results = E2EResults(out_dir / "e2e.json", env, cfg, meta={
        "suite": "e2e", "profile": profile, "compile_scope": args.compile_scope, "time_limit_s": args.time_limit,
        "filter": getattr(args, "filter", None), "started_utc": harness.utc_now(), "argv": list(argv),
        "fastbert_backends": fastbert.ops.available_backends(device),
        "transformers": _version("transformers"), "baseline": BASELINE, "compile_baseline": COMPILE_BASELINE,
    })
    log(f"fastbert bench: {profile} e2e run on {env['gpu']} (torch {env['torch']}, transformers "
        f"{results.meta['transformers']}, commit {env['commit']}) -> {out_dir}")
    results.ceilings = harness.measure_ceilings(harness.Settings.make(device, quick=args.quick, budget=args.budget))
    results.save()
    c = results.ceilings
    log(f"ceilings: matmul {c['matmul_TFLOPs']:.2f} TFLOP/s ({c['matmul_shape']}), copy {c['copy_GBps']:.1f} GB/s")
    todo = cases(profile, cfg, args.compile_scope)
    pattern = getattr(args, "filter", None)
    if pattern:
        todo = [c for c in todo if re.search(pattern, f"{c.op} {c.label} {c.mode} {c.impl}")]
    deadline = started + args.time_limit if args.time_limit is not None else None
    threads = torch.get_num_threads()
    if device.type != "cuda":
        # Tiny matrices: one intra-op thread is faster, and far faster on busy shared cores (CI).
        torch.set_num_threads(1)
    try:
        run_cases(todo, cfg, results, deadline, log)
    finally:
        torch.set_num_threads(threads)
    results.meta["finished_utc"] = harness.utc_now()
    results.meta["wall_s"] = round(time.monotonic() - started, 1)
    results.save()
    data = harness_load(results.path)
    md, png = write_all(data, out_dir)
    log(f"\nwrote {results.path}, {md}" + (f", {png}" if png else "") + f" ({results.meta['wall_s']} s)")
    if results.skipped_for_time:
        log(f"time limit: {len(results.skipped_for_time)} e2e case groups or compiled implementations not run "
            "(listed in the JSON)")
    log(summary_markdown(data))
    must_run = ("fb_torch", "fb_triton", "fb_cuda", "fb_torch_compile", "fb_triton_compile", "fb_cuda_compile",
                "fb_triton_unpad", "fb_cuda_unpad", "fb_triton_graph", "fb_cuda_graph", "hf_fastbert", BASELINE)
    broken = [r for r in results.rows if r["status"] == "error" and r["impl"] in must_run]
    for r in broken:
        print(f"ERROR {r['op']} {r['impl']} {r['shape']} {r['mode']}: {r['note']}", file=sys.stderr)
    return 1 if broken else 0


def harness_load(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def _version(name: str) -> Optional[str]:
    try:
        import importlib.metadata as md

        return md.version(name)
    except Exception:  # noqa: BLE001
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-lengths", action="store_true",
                        help="regenerate benchmarks/data/{sst2,squad}_lengths.txt from --data")
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    args, rest = parser.parse_known_args(argv)
    if args.write_lengths:
        write_lengths(args.data)
        return 0
    from fastbert.bench import main as bench_main

    return bench_main(["--suite", "e2e"] + rest)


if __name__ == "__main__":
    sys.exit(main())
