"""Issue 4's GPU runs: fine-tune the embedded MiniLM on all of SST-2 train and on the SQuAD
articles we have, with fastbert's "triton" backend, fastbert's "torch" backend and transformers
(the default --impls), recording wall time, tokens per second and dev metrics in one JSON file.

    python scripts/gpu_finetune.py --carry .gpu/carry --out finetune.json [--budget SECONDS] [...]

Data and model come from the carry folder written by scripts/prepare_gpu_carry.py (the GPU
machine has no ../shared and no embedded-model package):
    sst2   data/sst2/train.tsv; dev = its last --dev-split rows (2,000), train = the rest (65,349);
           single-sentence classification, max length 128, --sst2-epochs (3)
    squad  data/squad/train-from-dev-v1.1.json split by article as scripts/compare_quality.py does
           (titles sorted, every sixth held out for dev); windows of --squad-max-len 384, stride 128;
           --squad-epochs (2); dev scored by SQuAD EM/F1 (n-best over windows, fastbert.ops.span_score)
Every run goes through fastbert.train.Trainer (AdamW, linear warm-up/decay, clipping, bf16 autocast on
the GPU, length bucketing) and fastbert.tasks.evaluate; only the model differs: fastbert's heads on the
backend the impl names (--impls triton / torch / cuda / auto), or transformers' BertFor* classes
behind scripts/compare_quality.py's HFAdapter
(attn_implementation: transformers' default, sdpa), loaded from the same checkpoint, float32 master weights;
"transformers+fastbert" is that model after fastbert.patch_transformers, and "<impl>+compile" trains
through torch.compile (--compile-backend, inductor).
Checkpoints are not written (their disk time is not what we measure).

Recorded per run: wall_time_s (training, evaluations included), eval_time_s, train_time_s (without
them), tokens (real tokens trained on), tokens_per_s (tokens / train_time_s), steady_tokens_per_s
(after the first --warmup-steps steps: Triton's JIT and cuBLAS warm-up excluded), first_steps_s,
peak GPU memory, the metrics after each epoch and the final ones.

--budget SECONDS caps the whole script (data preparation included): SST-2 is cut to one epoch, and
each run gets a share of the time left; a run that reaches the end of its share stops after its
current optimizer step and is evaluated there (learning-rate schedule unchanged), and the later runs
of that task stop at the same step, so their metrics compare. The JSON says what was trimmed
("trimmed", and each run's "trimmed_by_time").
--max-steps / --max-train-examples / --max-dev-examples make a tiny CPU test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import fastbert  # noqa: E402
from fastbert import data, tasks, train  # noqa: E402
from fastbert.metrics import to_json  # noqa: E402  (null, never NaN, in the results JSON)

# fastbert backends; transformers as it comes; transformers after fastbert.patch_transformers. Any of
# them with "+compile": the Trainer's training forward through torch.compile (inductor).
BASE_IMPLS = ("triton", "torch", "transformers", "cuda", "auto", "transformers+fastbert")
IMPLS = BASE_IMPLS + tuple(f"{impl}+compile" for impl in BASE_IMPLS)
HYPER = {
    "sst2": dict(lr=8e-5, batch_size=32, max_seq_len=128),
    "squad": dict(lr=8e-5, batch_size=32, doc_stride=128),
}


# ----------------------------------------------------------------------------- data

def load_task(task: str, carry: Path, tokenizer, args) -> tuple[tasks.TaskSpec, tasks.TaskData, tasks.TaskData, dict]:
    if task == "sst2":
        spec = tasks.TaskSpec.preset("sst2", max_seq_len=HYPER["sst2"]["max_seq_len"])
        whole = tasks.read(spec, carry / "data" / "sst2" / "train.tsv", tokenizer)
        n = len(whole.features)
        if not 0 < args.dev_split < n:
            raise ValueError(f"--dev-split must be in (0, {n}), got {args.dev_split}")
        train_feats, dev_feats = whole.features[:n - args.dev_split], whole.features[n - args.dev_split:]
        info = {"file_rows": n, "split": f"train = rows [0, {n - args.dev_split}), dev = the last {args.dev_split} rows"}
        train_data, dev_data = tasks.TaskData(train_feats), tasks.TaskData(dev_feats)
    else:
        spec = tasks.TaskSpec.preset("squad", max_seq_len=args.squad_max_len, doc_stride=HYPER["squad"]["doc_stride"])
        examples = data.read_squad(carry / "data" / "squad" / "train-from-dev-v1.1.json")
        titles = sorted({e.title for e in examples})
        held_out = set(titles[::6])
        train_ex = [e for e in examples if e.title not in held_out]
        dev_ex = [e for e in examples if e.title in held_out]
        train_data, dev_data = squad_data(train_ex, tokenizer, spec), squad_data(dev_ex, tokenizer, spec)
        info = {"articles": len(titles), "dev_articles": sorted(held_out), "train_questions": len(train_ex),
                "dev_questions": len(dev_ex), "split": "by article: titles sorted, every sixth held out"}
    if args.max_train_examples:
        train_data = tasks.TaskData(train_data.features[:args.max_train_examples], train_data.examples)
    if args.max_dev_examples:
        if task == "squad":  # keep whole questions: the first N examples and all their windows
            dev_data = squad_data(dev_data.examples[:args.max_dev_examples], tokenizer, spec)
        else:
            dev_data = tasks.TaskData(dev_data.features[:args.max_dev_examples])
    info.update(train_features=len(train_data.features), dev_features=len(dev_data.features),
                train_tokens_per_epoch=sum(train_data.lengths),
                mean_train_length=sum(train_data.lengths) / len(train_data.lengths))
    return spec, train_data, dev_data, info


def squad_data(examples, tokenizer, spec) -> tasks.TaskData:
    return tasks.TaskData(data.build_squad_features(examples, tokenizer, spec.max_seq_len, spec.doc_stride), examples)


# ----------------------------------------------------------------------------- models

def build_model(impl: str, spec: tasks.TaskSpec, model_dir: Path, device: torch.device):
    impl = impl.removesuffix("+compile")
    if not impl.startswith("transformers"):
        return tasks.build_model(spec, model_dir, backend=impl).to(device), {"backend": impl}
    import transformers
    from compare_quality import HFAdapter  # the same adapter the CPU quality comparison uses

    if spec.kind == "qa":
        model = transformers.BertForQuestionAnswering.from_pretrained(str(model_dir), dtype=torch.float32)
    else:
        model = transformers.BertForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=len(spec.labels), dtype=torch.float32)
    if impl == "transformers+fastbert":
        fastbert.patch_transformers(model)
    return HFAdapter(model).to(device), {"transformers": transformers.__version__,
                                         "attn_implementation": model.config._attn_implementation}


class TimedTrainer(train.Trainer):
    """fastbert's Trainer plus a time limit (stop after the optimizer step that passes `deadline`,
    then evaluate as at an epoch's end) and a log of (time, tokens) at every optimizer step."""

    def __init__(self, *args, deadline: float | None = None, stop_at_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline, self.stop_at_step, self.trimmed_at, self.tokens = deadline, stop_at_step, None, 0
        self.step_log: list[tuple[float, int]] = []
        self.started = None

    def _forward_backward(self, batch, scale):
        if self.started is None:
            self.started = time.perf_counter()
        loss, tokens = super()._forward_backward(batch, scale)
        self.tokens += tokens
        return loss, tokens

    def _optimizer_step(self):
        super()._optimizer_step()
        now = time.perf_counter()  # no sync: the next loss.item() syncs, so the log lags by one step at most
        self.step_log.append((now, self.tokens))
        why = None
        if self.deadline is not None and now > self.deadline:
            why = "time share"
        elif self.stop_at_step and self.step >= self.stop_at_step:
            why = "the step where an earlier run of this task stopped"
        if why and self.step < self.total_steps:
            # The schedule stays the planned one; the loops end here and this epoch is evaluated as usual.
            self.trimmed_at = {"step": self.step, "planned_steps": self.total_steps, "epoch": self.epoch + 1, "why": why}
            self.total_steps = self.step


def run_one(task, impl, spec, train_data, dev_data, args, device, deadline, epochs, stop_at_step=None) -> dict:
    hyper = HYPER[task]
    record = {"task": task, "impl": impl, "epochs_planned": epochs, "seed": args.seed, "lr": hyper["lr"],
              "batch_size": hyper["batch_size"], "max_seq_len": spec.max_seq_len, "precision": args.precision,
              "bucket_by_length": True, "device": str(device),
              "compile": args.compile_backend if impl.endswith("+compile") else None}
    backend = impl.removesuffix("+compile")
    if not backend.startswith("transformers") and backend != "auto" \
            and backend not in fastbert.ops.available_backends(device):
        record.update(status="skipped", note=f"backend {impl!r} not usable on {device} "
                      f"(usable: {fastbert.ops.available_backends(device)})")
        return record
    torch.manual_seed(args.seed)  # the new head's initialisation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, about = build_model(impl, spec, args.carry / "model", device)
    record.update(about)
    cfg = train.TrainConfig(out=Path(args.work) / f"{task}-{impl}", epochs=epochs, max_steps=args.max_steps,
                            batch_size=hyper["batch_size"], lr=hyper["lr"], seed=args.seed, precision=args.precision,
                            bucket_by_length=True, progress=False, save_every=10**12,  # no checkpoints
                            compile=args.compile_backend if impl.endswith("+compile") else None)
    eval_spans = []

    def evaluate(m):
        t0 = time.perf_counter()
        scores = tasks.evaluate(m, spec, dev_data, args.eval_batch_size)
        eval_spans.append((t0, time.perf_counter()))
        print(f"  {task} {impl} eval: {json.dumps(scores)} ({eval_spans[-1][1] - t0:.1f} s)", flush=True)
        return scores

    trainer = TimedTrainer(model, train_data.features, data.collate, cfg, evaluate, train_data.lengths,
                           deadline=deadline, stop_at_step=stop_at_step)
    started = time.perf_counter()
    summary = trainer.train()
    wall = time.perf_counter() - started
    eval_s = sum(b - a for a, b in eval_spans)
    train_s = wall - eval_s
    log = trainer.step_log
    steady = None
    w = min(args.warmup_steps, len(log) - 2)
    if w >= 1:
        t0, tok0 = log[w - 1]
        t1, tok1 = log[-1]
        inside = sum(min(b, t1) - max(a, t0) for a, b in eval_spans if b > t0 and a < t1)
        if t1 - t0 - inside > 0:
            steady = (tok1 - tok0) / (t1 - t0 - inside)
    record.update(
        status="ok", steps=trainer.step, planned_steps=trainer.total_steps if not trainer.trimmed_at else
        trainer.trimmed_at["planned_steps"], epochs_run=len(summary["epochs"]),
        trimmed_by_time=trainer.trimmed_at, wall_time_s=wall, eval_time_s=eval_s, train_time_s=train_s,
        tokens=trainer.tokens, tokens_per_s=trainer.tokens / train_s if train_s > 0 else None,
        steady_tokens_per_s=steady, warmup_steps=w if steady is not None else 0,
        first_steps_s=(log[min(len(log), args.warmup_steps) - 1][0] - trainer.started) if log else None,
        peak_mem_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        history=summary["epochs"], metrics={k: v for k, v in summary["epochs"][-1].items()} if summary["epochs"] else {},
    )
    del model, trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


# ----------------------------------------------------------------------------- main

def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": version("triton"), "transformers": version("transformers"), "tokenizers": version("tokenizers"),
           "commit": os.environ.get("FASTBERT_COMMIT", "unknown"), "device": str(device), "gpu": "cpu",
           "fastbert_backends": fastbert.ops.available_backends(device), "host": platform.node()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carry", type=Path, default=REPO / ".gpu" / "carry",
                        help="folder written by scripts/prepare_gpu_carry.py (model/ and data/)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write (rewritten after every run)")
    parser.add_argument("--work", default="/tmp/fastbert_gpu_finetune", help="scratch folder for the trainers")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "squad"], choices=["sst2", "squad"])
    parser.add_argument("--impls", nargs="+", default=["triton", "torch", "transformers"], choices=IMPLS,
                        help="fastbert backends, transformers, transformers+fastbert (patched); each also "
                             "with +compile (default: triton torch transformers)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="the torch.compile backend of the +compile impls (aot_eager: a quick CPU test)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole script; see above")
    parser.add_argument("--sst2-epochs", type=int, default=3)
    parser.add_argument("--squad-epochs", type=int, default=2)
    parser.add_argument("--squad-max-len", type=int, default=384)
    parser.add_argument("--dev-split", type=int, default=2000, help="SST-2: the last N rows are the dev set")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--max-dev-examples", type=int, default=None)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=30, help="steps left out of steady_tokens_per_s")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    end = started + args.budget if args.budget else None
    device = torch.device(args.device)
    if not (args.carry / "model" / "model.safetensors").exists():
        print(f"error: {args.carry}/model/model.safetensors not found: run scripts/prepare_gpu_carry.py and carry "
              ".gpu/carry", file=sys.stderr)
        return 2

    epochs = {"sst2": args.sst2_epochs, "squad": args.squad_epochs}
    trimmed = []
    if args.budget and epochs["sst2"] > 1:
        trimmed.append(f"sst2: {epochs['sst2']} -> 1 epoch (--budget {args.budget:g})")
        epochs["sst2"] = 1
    for flag in ("max_steps", "max_train_examples", "max_dev_examples"):
        if getattr(args, flag):
            trimmed.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}")
    result = {"env": environment(device), "args": {k: str(v) for k, v in vars(args).items()},
              "epochs": epochs, "trimmed": trimmed, "data": {}, "runs": [], "started_utc": _utc()}

    def save():
        result["wall_s"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(to_json(result, indent=1, default=str))
        tmp.replace(args.out)

    tokenizer = fastbert.Tokenizer.from_pretrained(args.carry / "model")
    runs_left = len(args.tasks) * len(args.impls)
    for task in args.tasks:
        t0 = time.perf_counter()
        spec, train_data, dev_data, info = load_task(task, args.carry, tokenizer, args)
        info["prepare_s"] = round(time.perf_counter() - t0, 1)
        result["data"][task] = info
        print(f"{task}: {info}", flush=True)
        save()
        stop_at_step = None  # once a run of this task is cut short, the next ones stop at the same step
        for impl in args.impls:
            deadline = None
            if end is not None:
                left = end - time.perf_counter()
                share = (left - 10.0 * runs_left) / runs_left  # keep ~10 s per run for its evaluation
                if share < 5.0:
                    result["runs"].append({"task": task, "impl": impl, "status": "skipped",
                                           "note": f"--budget: {left:.0f} s left for {runs_left} runs"})
                    trimmed.append(f"{task} {impl}: not run (budget spent)")
                    runs_left -= 1
                    save()
                    continue
                deadline = time.perf_counter() + share
            print(f"== {task} {impl} ({epochs[task]} epochs"
                  + (f", {deadline - time.perf_counter():.0f} s at most" if deadline else "") + ")", flush=True)
            try:
                record = run_one(task, impl, spec, train_data, dev_data, args, device, deadline, epochs[task],
                                 stop_at_step)
            except Exception as err:  # noqa: BLE001 - one failing run must not lose the others
                import traceback

                traceback.print_exc()
                record = {"task": task, "impl": impl, "status": "error", "note": f"{type(err).__name__}: {err}"[:500]}
            cut = record.get("trimmed_by_time")
            if cut:
                trimmed.append(f"{task} {impl}: stopped at step {cut['step']} of {cut['planned_steps']} ({cut['why']})")
                stop_at_step = min(stop_at_step or cut["step"], cut["step"])
            result["runs"].append(record)
            runs_left -= 1
            save()
            brief = {k: record.get(k) for k in ("status", "steps", "wall_time_s", "tokens_per_s", "steady_tokens_per_s",
                                                "metrics", "note") if record.get(k) is not None}
            print(f"   {task} {impl}: {json.dumps(brief, default=str)}", flush=True)
    result["finished_utc"] = _utc()
    save()
    print(table(result))
    return 0 if all(r["status"] in ("ok", "skipped") for r in result["runs"]) else 1


def table(result: dict) -> str:
    lines = ["| task | impl | status | epochs | steps | wall s | train tok/s | steady tok/s | metrics |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        m = {k: round(v, 4) for k, v in r.get("metrics", {}).items() if k not in ("epoch", "step")}
        f = lambda key, fmt: format(r[key], fmt) if r.get(key) is not None else ""
        lines.append(f"| {r['task']} | {r['impl']} | {r['status']} | {r.get('epochs_run', '')} | {r.get('steps', '')} | "
                     f"{f('wall_time_s', '.1f')} | {f('tokens_per_s', ',.0f')} | "
                     f"{f('steady_tokens_per_s', ',.0f')} | {m} |")
    if result["trimmed"]:
        lines.append("trimmed: " + "; ".join(result["trimmed"]))
    return "\n".join(lines)


def _utc() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


if __name__ == "__main__":
    sys.exit(main())
