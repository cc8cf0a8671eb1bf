"""The `fastbert` command.

    fastbert finetune --task {sst2,cola,mrpc,rte,stsb,pos,ner,squad,squad_v2} --train FILE --dev FILE --out DIR [...]
    fastbert evaluate --model DIR --dev FILE
    fastbert predict  --model DIR (TEXT [TEXT_B] | --question Q --context C | --file FILE) [--json]
    fastbert encode   [--model default|PATH] [TEXT ...]   (no TEXT: four example sentences)
    fastbert bench    [--suite kernels|e2e|all] [--quick] [--out DIR]
    fastbert demo     fine-tune the embedded MiniLM on the shipped SST-2 sample, evaluate, predict
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import torch

from fastbert.metrics import to_json as metrics_json  # null where a metric is undefined (JSON has no NaN)


def _device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda (or cuda:N), got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build or machine has no usable CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (or cuda:N), got {name!r}")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        # Kernels a graph runs itself (a --compile backend other than inductor) launch on the current
        # device: make it the one asked for, for the whole command
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def _callers_cuda_device_kept():
    """`--device cuda:N` makes N current for the command (_device); a program that calls main()
    gets its own current device back (the CUDA default, 0, where CUDA was not started before)."""
    before = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    try:
        yield
    finally:
        if torch.cuda.is_initialized() and torch.cuda.current_device() != before:
            torch.cuda.set_device(before)


# -- argument checks: a user's mistake is an error naming the argument, before any work ----------


def _check_counts(args, positive=(), optional_positive=(), optional_non_negative=()):
    for name in positive + optional_positive + optional_non_negative:
        value = getattr(args, name, None)
        if value is None and name not in positive:
            continue
        low = 0 if name in optional_non_negative else 1
        if value is None or value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _check_file(flag, path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {str(path)!r}: no such file")
    if not path.is_file():
        raise ValueError(f"{flag} {str(path)!r} is not a file")


def _model_folder(flag, name):
    """The model folder, with a hint where the user named a `finetune --out` folder or a checkpoint."""
    from fastbert.checkpoint import resolve_model_path

    folder = resolve_model_path(name)
    if not (folder / "config.json").exists() and (folder / "model" / "config.json").exists():
        raise ValueError(f"{flag} {str(folder)!r} is a `fastbert finetune --out` folder: "
                         f"the fine-tuned model is {str(folder / 'model')!r}")
    return folder


def _no_examples(flag, path):
    return ValueError(f"{flag} {str(path)!r} holds no examples (an empty file, or a header only?)")


def _keep_best_metric(asked: str, spec) -> str:
    """--keep-best's metric: the task's main one, or one it reports."""
    from fastbert import tasks

    names = tasks.metric_names(spec)
    if asked == "main":
        return names[0]
    scores = [n for n in names if not n.endswith("_threshold")]  # a threshold is no score to maximise
    if asked not in scores:
        raise ValueError(f"--keep-best {asked}: task {spec.name} is scored by {', '.join(scores)}")
    return asked


def _check_dev(path, spec, dev):
    """What scoring needs of dev data, checked before any training or prediction."""
    if not dev.features:
        raise _no_examples("--dev", path)
    if spec.kind == "regression" and len(dev.features) < 2:
        raise ValueError(f"--dev {str(path)!r}: a correlation needs at least 2 examples, got {len(dev.features)}")


def _check_headerless_columns(args):
    """--no-header: a file without a header has no column names, so every column is an index."""
    from fastbert import data
    from fastbert.data.glue import is_column_index

    preset = data.TASKS.get(args.task) if args.task else None
    for flag, given, preset_cols in [("--text-cols", args.text_cols, preset.text_cols if preset else ()),
                                     ("--label-col", None if args.label_col is None else [args.label_col],
                                      (preset.label_col,) if preset and preset.label_col is not None else ())]:
        for col in given or ():
            if not is_column_index(col):
                raise ValueError(f"--no-header: {flag} {col!r} is a column name, but a file without a header has "
                                 "none; give 0-based column indices (0 is the first column)")
        named = [c for c in preset_cols if not is_column_index(c)]
        if not given and named:
            raise ValueError(f"--no-header: the {args.task} preset finds its columns by header name "
                             f"({', '.join(map(repr, named))}), but a file without a header has none; give "
                             f"{flag} as 0-based column indices")


# -- metrics as JSON: null where a metric is undefined ---------------------------------


# Why a metric can be undefined, and what to do about it: the line for people says which.
_WHY_UNDEFINED = {
    "constant input": "a correlation needs predictions and gold scores that vary",
    "no such entity": "no entity of that type in the gold tags or the predictions",
    "no such question": "the dev data holds no question of that kind (with an answer, or without)",
    "NaN logits": "the model's outputs are not numbers (a diverged run: lower --lr, or use fp32)",
}


def _why_undefined(name: str, scores: dict) -> str:
    if name in ("pearson", "spearman"):
        return "constant input"
    if name.startswith(("entity_f1_", "entity_precision_", "entity_recall_")):
        return "no such entity"
    if name.startswith(("has_answer_", "no_answer_")) and not _is_nan(scores.get("f1")):
        return "no such question"
    return "NaN logits"


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _undefined(scores: dict) -> list[str]:
    return [k for k, v in scores.items() if _is_nan(v)]


def _describe_scores(scores: dict) -> str:
    """One line for people: `pearson undefined (constant input)` where JSON says null; a threshold
    in full (`--null-score-diff-threshold` takes it back), a score to 4 places."""
    def text(k, v):
        if isinstance(v, float):
            if math.isnan(v):
                return f"undefined ({_why_undefined(k, scores)})"
            return repr(v) if k.endswith("_threshold") else f"{v:.4f}"
        return str(v)
    return ", ".join(f"{k} {text(k, v)}" for k, v in scores.items()) or "(none)"


def _undefined_note(scores: dict) -> str | None:
    by_reason: dict[str, list[str]] = {}
    for name in _undefined(scores):
        by_reason.setdefault(_why_undefined(name, scores), []).append(name)
    if not by_reason:
        return None
    return "; ".join(f"{', '.join(names)} undefined ({why}): {_WHY_UNDEFINED[why]}"
                     for why, names in by_reason.items()) + "; null in the JSON"


# -- finetune / evaluate / predict ----------------------------------------------------


def cmd_finetune(args) -> int:
    from fastbert import distributed

    if not distributed.launched_by_torchrun():
        return _finetune(args, _device(args.device))
    # torchrun: one process per GPU (or a few on the CPU, over gloo); rank 0 reports and writes.
    joined = not torch.distributed.is_initialized()
    device = distributed.init_from_env(args.device)
    try:
        return _finetune(args, device)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _finetune(args, device) -> int:
    import fastbert
    from fastbert import data, distributed, tasks, train
    from fastbert.config import BertConfig

    rank, world = distributed.rank_and_world()
    say = print if rank == 0 else (lambda *_, **__: None)
    if args.task is None and args.task_type is None:
        raise ValueError("give --task (a preset) or --task-type")
    if args.compile and args.unpad:
        raise ValueError("--unpad and --compile do not go together: the packed encoder's shapes change with "
                         "every batch, so a compiled model runs padded; pick one")
    _check_counts(args, positive=("epochs", "batch_size", "grad_accum", "eval_batch_size"),
                  optional_positive=("max_steps", "save_every", "eval_every", "early_stop", "log_every", "max_train_examples",
                                     "max_dev_examples", "max_answer_len", "max_question_len"),
                  optional_non_negative=("doc_stride", "warmup_steps"))
    if args.max_seq_len is not None and args.max_seq_len < 8:
        raise ValueError(f"--max-seq-len must be >= 8 (room for the special tokens and some text), got {args.max_seq_len}")
    if not 0 < args.lr < math.inf:
        raise ValueError(f"--lr must be finite and > 0, got {args.lr}")
    if not 0 <= args.weight_decay < math.inf:
        raise ValueError(f"--weight-decay must be finite and >= 0, got {args.weight_decay}")
    if not 0 <= args.warmup_ratio <= 1:
        raise ValueError(f"--warmup-ratio must be in [0, 1], got {args.warmup_ratio}")
    if not all(0 <= b < 1 for b in args.adam_betas):
        raise ValueError(f"--adam-betas must be two numbers in [0, 1), got {' '.join(map(str, args.adam_betas))}")
    if not 0 < args.adam_eps < math.inf:
        raise ValueError(f"--adam-eps must be finite and > 0, got {args.adam_eps}")
    if not 0 < args.layer_lr_decay <= 1:
        raise ValueError(f"--layer-lr-decay must be in (0, 1], got {args.layer_lr_decay}")
    if not 0 < args.max_grad_norm < math.inf:
        raise ValueError(f"--max-grad-norm must be finite and > 0, got {args.max_grad_norm}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    kind = args.task_type or tasks.PRESETS.get(args.task)
    if args.task is None and kind in ("single", "pair", "regression"):
        wanted = {"single": "one", "pair": "two", "regression": "one or two"}[kind]
        if not args.text_cols or args.label_col is None:
            raise ValueError(f"--task-type {kind} needs --text-cols ({wanted} column names or 0-based indices) "
                             "and --label-col")
        if len(args.text_cols) not in {"single": (1,), "pair": (2,), "regression": (1, 2)}[kind]:
            raise ValueError(f"--task-type {kind} takes {wanted} --text-cols, got {len(args.text_cols)}: "
                             f"{args.text_cols}")
    if kind in ("tagging", "qa") and (args.text_cols or args.label_col is not None or args.no_header):
        raise ValueError(f"--text-cols/--label-col/--no-header are for TSV data (single, pair, regression); a {kind} "
                         "task reads " + ("UPOS from CoNLL-U, the last column from CoNLL-2003-style files"
                                          if kind == "tagging" else "SQuAD v1.1/v2.0 JSON"))
    if args.no_header:
        _check_headerless_columns(args)
    if args.keep_best and not args.dev:
        raise ValueError("--keep-best needs --dev: the dev scores pick the best")
    if args.eval_every and not args.dev:
        raise ValueError("--eval-every needs --dev, the data it evaluates on")
    if args.early_stop and not args.keep_best:
        raise ValueError("--early-stop needs --keep-best: the metric it watches, and the weights the run ends with")
    _check_file("--train", args.train)
    if args.dev:
        _check_file("--dev", args.dev)
    from fastbert.checkpoint import check_writable

    check_writable("--out", args.out, folder=True)
    if args.metrics_json:
        check_writable("--metrics-json", args.metrics_json, folder=False)
    if args.null_score_diff_threshold is not None and (kind != "qa" or args.task == "squad"):
        raise ValueError(f"--null-score-diff-threshold is for question answering where a question may have no "
                         f"answer (--task squad_v2, or --task-type qa on such data), not "
                         + (f"--task {args.task}" if args.task else f"--task-type {kind}"))
    overrides = dict(max_seq_len=args.max_seq_len, doc_stride=args.doc_stride, max_answer_len=args.max_answer_len,
                     max_question_len=args.max_question_len, null_score_diff_threshold=args.null_score_diff_threshold,
                     text_cols=args.text_cols, label_col=args.label_col, header=False if args.no_header else None)
    spec = tasks.TaskSpec.preset(args.task, **overrides) if args.task else \
        tasks.TaskSpec(name=args.task_type, kind=args.task_type,
                       **{k: v for k, v in overrides.items() if v is not None})
    folder = _model_folder("--model", args.model)
    limit = BertConfig.from_json(folder / "config.json").max_position_embeddings
    if spec.max_seq_len > limit:
        raise ValueError(f"--max-seq-len {spec.max_seq_len} is more than the model's {limit} positions "
                         f"(max_position_embeddings of {folder})")
    cfg = train.TrainConfig(out=Path(args.out), epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                            lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                            max_grad_norm=args.max_grad_norm, warmup_steps=args.warmup_steps, schedule=args.lr_schedule,
                            adam_betas=tuple(args.adam_betas), adam_eps=args.adam_eps,
                            layer_lr_decay=args.layer_lr_decay,
                            grad_accum=args.grad_accum, seed=args.seed, precision=args.precision,
                            bucket_by_length=not args.no_bucket, save_every=args.save_every,
                            progress=not args.no_progress, compile=args.compile, keep_best=args.keep_best,
                            eval_every=args.eval_every, early_stop=args.early_stop, log_every=args.log_every)
    train._autocast_dtype(cfg.precision, device)  # fp16 without a GPU: say so before reading anything
    torch.manual_seed(args.seed)
    tokenizer = fastbert.Tokenizer.from_pretrained(args.model)
    started = time.perf_counter()
    train_data = tasks.read(spec, args.train, tokenizer, args.max_train_examples)
    if not train_data.features:
        raise _no_examples("--train", args.train)
    if args.null_score_diff_threshold is not None and not spec.no_answer:
        raise ValueError(f"--null-score-diff-threshold: every question of --train {str(args.train)!r} has an "
                         "answer, so the model is trained to always answer (SQuAD v1.1) and has no null score to "
                         "weigh")
    dev_data = tasks.read(spec, args.dev, tokenizer, args.max_dev_examples) if args.dev else None
    if dev_data is not None:
        _check_dev(args.dev, spec, dev_data)
    if args.keep_best:  # named once the data is read: a classification's metrics follow its labels
        cfg.keep_best = _keep_best_metric(args.keep_best, spec)
    model = tasks.build_model(spec, args.model, args.backend).to(device)
    model.bert.unpad = args.unpad
    model.bert.gradient_checkpointing = args.gradient_checkpointing
    say(fastbert.ops.describe_default(device) if args.backend is None else f"fastbert: backend {args.backend!r}")
    say(f"task {spec.name} ({spec.kind}): {len(train_data.features)} training features"
        + (f", {len(dev_data.features)} dev features" if dev_data else "")
        + (f"; {world} processes, {args.batch_size} examples a batch each" if world > 1 else ""))
    def evaluate(model):  # under torchrun every process predicts its share of the dev set
        return tasks.evaluate(model, spec, dev_data, args.eval_batch_size, shard=True)

    evaluate.collective = True
    def save_model(model, folder):  # checkpoints with the tokenizer: each is a --model folder too
        model.save_pretrained(folder)
        tokenizer.save(folder)

    final = Path(args.out) / "model"
    # The block holds --out through the final model's save, which a second run could interleave with.
    with train.Trainer(model, train_data.features, data.collate, cfg, evaluate if dev_data else None, train_data.lengths,
                       save_model) as trainer:
        if args.resume:
            if trainer.resume():
                say(f"resumed from step {trainer.step}")
            else:
                say(f"--resume: no checkpoint in {args.out} yet; starting from the beginning")
        summary = trainer.train()
        if rank != 0:
            return 0
        best = trainer.best_checkpoint()
        if best is not None and not best.is_dir():  # a resumed run that did not keep it before
            say(f"--keep-best: the best evaluation's checkpoint {best} is gone; the last weights are saved")
            summary.pop("best")
            best = None
        if best is not None:
            # the weights of the best evaluation, from the checkpoint the run kept of it
            model.load_state_dict(type(model).from_pretrained(best).state_dict())
        elif cfg.keep_best:
            say(f"--keep-best {cfg.keep_best}: no evaluation had a defined score; the last weights are saved")
        model.save_pretrained(final)
        tokenizer.save(final)
    summary.update(task=spec.name, kind=spec.kind, model=str(args.model), device=str(device),
                   backend=args.backend or "auto", unpad=args.unpad, processes=world,
                   precision={None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[trainer.autocast],
                   gradient_checkpointing=args.gradient_checkpointing, compile=args.compile, train_features=len(train_data.features),
                   total_wall_time_s=time.perf_counter() - started, saved_to=str(final),
                   final_metrics=summary.get("best") or (summary["epochs"][-1] if summary["epochs"] else {}))
    metrics_file = Path(args.metrics_json or Path(args.out) / "metrics.json")
    from fastbert.checkpoint import atomic_write_text

    metrics_file.parent.mkdir(parents=True, exist_ok=True)  # as --out is
    atomic_write_text(metrics_file, metrics_json(summary, indent=2) + "\n")
    if (stopped := summary.get("stopped_early_at_step")) is not None:
        print(f"stopped early at step {stopped} of {trainer.total_steps}: {cfg.early_stop} evaluations in a row "
              f"without a better {cfg.keep_best}")
    kept = f" (step {best_record['step']}, epoch {best_record['epoch']}, the best by {cfg.keep_best})" \
        if (best_record := summary.get("best")) else ""
    print(f"final: {_describe_scores(summary['final_metrics'])}\nmodel{kept} saved to {final}; metrics in {metrics_file}")
    return 0


def _load_finetuned(args):
    import fastbert
    from fastbert import tasks

    folder = _model_folder("--model", args.model)
    device = _device(args.device)
    if not ((folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists()) \
            and (folder / "trainer_state.pt").exists():
        raise ValueError(f"--model {str(folder)!r} is a training checkpoint, which keeps no tokenizer: use the "
                         f"finished run's model folder, or copy its tokenizer.json here")
    model, spec = tasks.load_finetuned(folder, args.backend)
    if args.null_score_diff_threshold is not None:
        if not (spec.kind == "qa" and spec.no_answer):
            what = "a question-answering model that always answers" if spec.kind == "qa" else f"a {spec.kind} model"
            raise ValueError(f"--null-score-diff-threshold: {args.model} is {what} ({spec.name}); the threshold is "
                             "for SQuAD v2.0 models (--task squad_v2)")
        spec.null_score_diff_threshold = args.null_score_diff_threshold
    return model.to(device), spec, fastbert.Tokenizer.from_pretrained(folder)


def _inference_autocast(args, model):
    """The autocast finetune trains under for --precision (auto: bf16 on a GPU, fp32 on the CPU),
    so evaluate reproduces the scores finetune printed and the half-precision-only "cuda"
    backend runs."""
    from fastbert import train

    device = next(model.parameters()).device
    return train.autocast(device, train._autocast_dtype(args.precision, device))


def cmd_evaluate(args) -> int:
    from fastbert import tasks

    _check_counts(args, positive=("eval_batch_size",), optional_positive=("max_dev_examples",))
    _check_file("--dev", args.dev)
    from fastbert.checkpoint import check_writable

    for flag in ("predictions", "null_odds"):
        if getattr(args, flag):
            check_writable(f"--{flag.replace('_', '-')}", getattr(args, flag), folder=False)
    model, spec, tokenizer = _load_finetuned(args)
    if args.null_odds and not spec.no_answer:
        raise ValueError(f"--null-odds is for SQuAD v2.0 models (questions may have no answer), not task "
                         f"{spec.name!r}")
    dev = tasks.read(spec, args.dev, tokenizer, args.max_dev_examples)
    _check_dev(args.dev, spec, dev)
    with _inference_autocast(args, model):
        scores, predictions, *odds = tasks.evaluate_and_predict(model, spec, dev, args.eval_batch_size,
                                                                return_null_odds=bool(args.null_odds))
    if args.predictions:
        _write_predictions(Path(args.predictions), spec, dev, predictions)
    print(metrics_json(scores, indent=2))          # stdout stays JSON (null where undefined)
    if (note := _undefined_note(scores)):
        print(f"fastbert evaluate: note: {note}", file=sys.stderr)
    if args.null_odds:
        _write_null_odds(Path(args.null_odds), odds[0])
    return 0


def _write_null_odds(path: Path, odds: dict[str, float]) -> None:
    """--null-odds: {question id: null score - best span score}, the official evaluate-v2.0.py's
    --na-prob-file (it reads any number as odds: a question is unanswered above --na-prob-thresh)."""
    import json

    from fastbert.checkpoint import atomic_write_text

    bad = [qid for qid, value in odds.items() if math.isnan(value) or value == -math.inf]
    if bad:
        # after the metrics (all null): the file would need NaN, which JSON has not
        raise ValueError(f"--null-odds: no odds for {len(bad)} question(s), e.g. {bad[0]!r}: the model's logits hold "
                         "NaN or -inf (a diverged model, or an overflow under --precision fp16)")
    # a question without a span in any window (odds inf) is the least answerable: the largest number
    text = json.dumps({qid: min(value, sys.float_info.max) for qid, value in odds.items()}, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _write_predictions(path: Path, spec, dev, predictions) -> None:
    """--predictions: SQuAD's official prediction file (question id -> answer text) for qa; GLUE's
    submission layout (index<TAB>prediction, a row's 0-based index in the file) for sentence tasks;
    for tagging one word<TAB>gold<TAB>predicted line per word, a blank line after each sentence."""
    import json

    from fastbert.checkpoint import atomic_write_text

    if spec.kind == "qa":
        text = json.dumps(predictions, ensure_ascii=False, indent=1) + "\n"
    elif spec.kind == "tagging":
        # A word that tokenizes to nothing has no piece to tag: "_" (CoNLL's empty field), not scored by
        # token accuracy; O for named entities, as their scores count it (conlleval would read "_" as
        # an entity of type "")
        from fastbert import metrics

        untagged = "O" if metrics.is_chunk_scheme(spec.labels or ()) else "_"
        text = "".join("".join(f"{w}\t{g}\t{p or untagged}\n" for w, g, p in zip(s.words, s.tags, tags)) + "\n"
                       for s, tags in zip(dev.examples, predictions))
    else:
        text = "index\tprediction\n" + "".join(
            f"{i}\t{p:.6g}\n" if spec.kind == "regression" else f"{i}\t{p}\n" for i, p in enumerate(predictions))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def predict_texts(model, spec, tokenizer, texts, pairs=None, batch_size=64, questions=None, contexts=None,
                  precision="auto"):
    """Human-readable predictions for raw inputs (used by `predict` and the demo), from
    fastbert.Predictor's: the label and its probability, a score, word/TAG pairs, an answer.

    qa: lists questions + contexts (one answer each)."""
    return [_readable(spec, r) for r in _predictions(model, spec, tokenizer, texts, pairs, batch_size, questions,
                                                      contexts, precision)]


def _predictions(model, spec, tokenizer, texts, pairs, batch_size, questions, contexts, precision) -> list[dict]:
    from fastbert.predictor import Predictor

    predictor = Predictor(model, spec, tokenizer, batch_size=batch_size, precision=precision)
    if spec.kind == "qa":
        return predictor(question=list(questions), context=list(contexts))
    if spec.kind == "tagging":
        # a sentence longer than max_seq_len is tagged in consecutive pieces, every word kept
        return predictor(words=[t.split() for t in texts])
    return predictor(list(texts), list(pairs) if pairs is not None else None)


def _readable(spec, result: dict) -> str:
    if spec.kind == "qa":
        return result["answer"]
    if spec.kind == "tagging":
        return " ".join(f"{w}/{t if t is not None else '?'}" for w, t in zip(result["words"], result["tags"]))
    if spec.kind == "regression":
        return f"{result['score']:.3f}"
    return f"{result['label']} ({result['score']:.3f})"


def _read_inputs(path, fields: int, what: str) -> list[list[str]]:
    """The non-blank lines of a predict --file, each split at tabs into `fields` fields."""
    try:
        text = (sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()).decode("utf-8-sig")
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # as read_text's universal newlines
    except UnicodeDecodeError:
        raise ValueError(f"--file {str(path)!r} is not UTF-8 text") from None
    rows = []
    # split("\n"), not splitlines(): read_text has made \r\n and \r into \n, and splitlines() would also
    # cut a text at U+2028, U+0085, form feeds and the like, which are characters of its line
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        row = line.split("\t")
        if len(row) != fields:
            raise ValueError(f"{path}:{number}: {what} per line, got {len(row)} tab-separated field"
                             f"{'s' if len(row) != 1 else ''}")
        rows.append(row)
    if not rows:
        raise ValueError(f"--file {str(path)!r} holds no inputs (no non-blank line)")
    return rows


def cmd_predict(args) -> int:
    _check_counts(args, positive=("eval_batch_size",))
    if args.file:
        if args.file != "-":  # a pipe (<(...), /dev/stdin) is no regular file but reads as one
            if not Path(args.file).exists():
                raise FileNotFoundError(f"--file {args.file!r}: no such file")
            if Path(args.file).is_dir():
                raise ValueError(f"--file {args.file!r} is a folder, not a file")
        if args.texts:
            raise ValueError("give TEXT arguments or --file FILE, not both")
    model, spec, tokenizer = _load_finetuned(args)
    with _inference_autocast(args, model):
        return _predict(args, model, spec, tokenizer)


def _predict(args, model, spec, tokenizer) -> int:
    described = f"{args.model} is a {spec.kind} model ({spec.name})"
    if spec.kind == "qa":
        if args.texts:
            raise ValueError(f"{described}: give --question Q --context C (or --file with question<TAB>context "
                             "lines), not TEXT arguments")
        if args.file:
            rows = _read_inputs(args.file, 2, "a question-answering model takes question<TAB>context")
        elif args.question and args.context:
            rows = [[args.question, args.context]]
        else:
            raise ValueError(f"{described}: it needs --question and --context (both non-empty), or --file")
        answers = _predictions(model, spec, tokenizer, None, None, args.eval_batch_size, [r[0] for r in rows],
                               [r[1] for r in rows], args.precision)
        for (question, _), answer in zip(rows, answers):
            if args.json:
                print(metrics_json({"question": question, **answer}, ensure_ascii=False))
            else:
                print(answer["answer"] if not args.file else f"{answer['answer']}\t{question}")
        return 0
    if args.question or args.context:
        raise ValueError(f"{described}: --question/--context are for a question-answering model; give TEXT")
    from fastbert.predictor import takes_pair

    pair = takes_pair(spec)
    if args.file:
        what = "a text-pair model takes text<TAB>text_b" if pair else "a tagging model takes one sentence" \
            if spec.kind == "tagging" else "a single-text model takes one text"
        rows = _read_inputs(args.file, 2 if pair else 1, what)
    elif args.texts:
        if pair and len(args.texts) != 2:
            raise ValueError(f"{described}: it takes a pair, TEXT TEXT_B; got {len(args.texts)} text"
                             f"{'s' if len(args.texts) != 1 else ''}")
        rows = [args.texts] if pair else [[t] for t in args.texts]
    else:
        raise ValueError("give TEXT [TEXT_B] or --file FILE (one input per line, a pair separated by a tab)")
    texts = [r[0] for r in rows]
    pairs = [r[1] for r in rows] if pair else None
    found = _predictions(model, spec, tokenizer, texts, pairs, args.eval_batch_size, None, None, args.precision)
    for row, result in zip(rows, found):
        if args.json:
            given = {"text": row[0], **({"text_pair": row[1]} if pair else {})}
            print(metrics_json({**given, **result}, ensure_ascii=False))
        else:
            print("\t".join([_readable(spec, result), *row]))
    return 0


# -- demo -------------------------------------------------------------------------------


DEMO_REVIEWS = ["a gripping , beautifully acted film", "a tedious , joyless mess that overstays its welcome",
                "one of the most charming movies of the year", "the plot is thin and the jokes fall flat"]


def cmd_demo(args) -> int:
    """The README's main job: fine-tune the embedded MiniLM on the shipped SST-2 sample."""
    from fastbert import data, tasks

    out = Path(args.out)
    finetune = ["finetune", "--task", "sst2", "--train", str(data.sample_path("sst2_sample.tsv")),
                "--dev", str(data.sample_path("sst2_sample_dev.tsv")), "--epochs", "1", "--batch-size", "32",
                "--lr", "8e-5", "--max-seq-len", "128", "--out", str(out), "--precision", args.precision]
    if args.max_train_examples is not None:  # 0 went unsaid and trained on all 4,000; finetune refuses it
        finetune += ["--max-train-examples", str(args.max_train_examples)]
    code = main(finetune)
    if code:
        return code
    import fastbert

    model, spec = tasks.load_finetuned(out / "model")
    tokenizer = fastbert.Tokenizer.from_pretrained(out / "model")
    print("\npredictions of the fine-tuned model (label 1 = positive):")
    for text, pred in zip(DEMO_REVIEWS, predict_texts(model, spec, tokenizer, DEMO_REVIEWS, precision=args.precision)):
        print(f"  {pred:<12}  {text}")
    return 0


# -- encode -----------------------------------------------------------------------------


def _mean_pool(hidden, mask):
    # all-MiniLM-L6-v2 is trained with mean pooling over real tokens.
    mask = mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


DEMO_TEXTS = [
    "A man is playing a guitar.",
    "Someone is strumming a musical instrument.",
    "The stock market fell sharply today.",
    "Shares dropped steeply in afternoon trading.",
]


def _read_json(path):
    import json

    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _sentence_transformers_max_len(folder, limit, tokenizer_max_len):
    """The truncation sentence-transformers applies to this folder: sentence_bert_config.json's
    max_seq_length (256 for all-MiniLM-L6-v2), else the smaller of the positions and the
    tokenizer's limit. Refuses a folder whose modules.json asks for more than the encoder, mean
    pooling and normalisation (which cosine similarities do not see): its embeddings would differ."""
    if (path := folder / "modules.json").exists():
        modules = _read_json(path)
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise ValueError(f"{path} must hold a JSON list of module objects, as sentence-transformers writes it")
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Pooling":
                pooling = _read_json(folder / str(module.get("path", "")) / "config.json")
                if not isinstance(pooling, dict):
                    raise ValueError(f"{folder / str(module.get('path', ''))}/config.json must hold a JSON object")
                modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True)
                if modes != ["pooling_mode_mean_tokens"]:
                    raise ValueError(f"{folder}: the model pools by {modes}; fastbert encode pools by the mean of "
                                     "the real tokens only")
            elif kind not in ("Transformer", "Normalize"):
                raise ValueError(f"{path} lists a {kind} module; fastbert encode runs the encoder, mean pooling "
                                 "and normalisation only")
    if (path := folder / "sentence_bert_config.json").exists() and (length := _read_json(path).get("max_seq_length")):
        return min(int(length), limit)
    return min(limit, tokenizer_max_len)


def _sentence_transformers_lower_cases(folder) -> bool:
    """sentence_bert_config.json's do_lower_case: sentence-transformers lower-cases each text
    before its tokenizer sees it (a cased tokenizer then gets lower-cased text)."""
    path = folder / "sentence_bert_config.json"
    return path.exists() and _read_json(path).get("do_lower_case") is True


def cmd_encode(args) -> int:
    import fastbert
    from fastbert import train

    device = _device(args.device)
    dtype = train._autocast_dtype(args.precision, device)
    if args.backend == "cuda" and dtype is None:
        raise ValueError("--backend cuda has float16 and bfloat16 kernels only: add --precision bf16 (or fp16, or "
                         "auto on a GPU), or choose another backend")
    folder = _model_folder("--model", args.model)
    model = fastbert.BertModel.from_pretrained(folder, backend=args.backend).to(device).eval()
    limit = model.config.max_position_embeddings
    tokenizer = fastbert.Tokenizer.from_pretrained(folder)
    max_seq_len = _sentence_transformers_max_len(folder, limit, tokenizer.model_max_length)
    if args.max_seq_len is not None:
        if not 3 <= args.max_seq_len <= limit:
            raise ValueError(f"--max-seq-len must be in [3, {limit}] (the model's positions), got {args.max_seq_len}")
        max_seq_len = args.max_seq_len
    print(fastbert.ops.describe_default(device) if args.backend is None else f"fastbert: backend {args.backend!r}")
    texts = args.texts or DEMO_TEXTS
    lower = _sentence_transformers_lower_cases(folder)
    batch = {k: v.to(device) for k, v in tokenizer([t.lower() for t in texts] if lower else texts,
                                                  max_length=max_seq_len).items()}
    with torch.no_grad(), train.autocast(device, dtype):
        out = model(**batch)
    pooled = _mean_pool(out.last_hidden_state.float(), batch["attention_mask"])
    embeddings = torch.nn.functional.normalize(pooled, dim=-1)
    similarity = embeddings @ embeddings.T
    width = min(max(len(t) for t in texts), 60)
    for i, text in enumerate(texts):
        print(f"{text[:60]:<{width}}  " + "  ".join(f"{similarity[i, j]:+.3f}" for j in range(len(texts))))
    return 0


# -- parser -------------------------------------------------------------------------------


def _common(p, dev=True, inference=True):
    p.add_argument("--backend", choices=["torch", "triton", "cuda"], default=None,
                   help="kernel backend (default: the fastest available on the device)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--eval-batch-size", type=int, default=64, metavar="N",
                   help="examples per forward when evaluating or predicting (default 64)")
    if inference:
        p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="autocast as finetune's --precision (auto: bf16 on a GPU, fp16 before sm_80, fp32 on "
                            "the CPU)")
    if dev:
        p.add_argument("--max-dev-examples", type=int, default=None, metavar="N",
                       help="read only the first N dev examples (questions, sentences)")


def _null_threshold_flag(p, where: str) -> None:
    p.add_argument("--null-score-diff-threshold", type=_finite_float, default=None, metavar="X",
                   help="SQuAD v2.0 models: answer nothing when the null score ([CLS]) beats the best span's by "
                        f"more than X ({where}default 0.0; evaluate reports best_f1_threshold, the best X on its data)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="fastbert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from fastbert import __version__

    parser.add_argument("--version", action="version", version=f"fastbert-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("finetune", help="fine-tune a pretrained BERT on a task",
                        description="Fine-tune a pretrained BERT: a task preset (--task) or your own data "
                                    "(--task-type with --text-cols/--label-col). The model, tokenizer and the "
                                    "task's settings go to OUT/model; the newest checkpoint to OUT/checkpoint-STEP. "
                                    "On several GPUs: torchrun --nproc-per-node N -m fastbert finetune ... (each "
                                    "process takes --batch-size examples a batch; their gradients are summed).")
    ft.add_argument("--task", choices=sorted(__import__("fastbert.tasks", fromlist=["PRESETS"]).PRESETS),
                    help="a preset: reader, head and metric (GLUE TSV for sst2/cola/mrpc/rte/stsb, CoNLL-U "
                         "UPOS for pos, CoNLL-2003 named entities (PER, ORG, LOC, MISC; IOB1 or IOB2) scored by "
                         "entity F1 for ner, SQuAD v1.1 JSON for squad, SQuAD v2.0 JSON (questions may have no "
                         "answer) for squad_v2)")
    ft.add_argument("--task-type", choices=["single", "pair", "regression", "tagging", "qa"],
                    help="any other data: a TSV, with a header unless --no-header (single, pair, regression: "
                         "give --text-cols and --label-col; labels are found in the training file), a CoNLL-U "
                         "or CoNLL-2003-style file (tagging: UPOS, or the last column; the format is told from "
                         "the content; IOB-style tags such as B-PER are scored by entity F1 too), or SQuAD "
                         "JSON (qa: v2.0's rules if a training question has no answer)")
    ft.add_argument("--text-cols", nargs="+", default=None, metavar="COL",
                    help="the text column(s), by header name or 0-based index: one, or two for a pair")
    ft.add_argument("--label-col", default=None, metavar="COL", help="the label column, by header name or 0-based index")
    ft.add_argument("--no-header", action="store_true",
                    help="TSV data: the first line is an example, not a header (columns by 0-based index); "
                         "evaluate reads dev files the same way")
    ft.add_argument("--train", required=True, metavar="FILE", help="training data")
    ft.add_argument("--dev", default=None, metavar="FILE", help="evaluation data, scored after each epoch")
    ft.add_argument("--model", default="default", help="'default' (embedded all-MiniLM-L6-v2) or an HF-layout folder")
    ft.add_argument("--out", required=True, metavar="DIR", help="output folder (made if missing)")
    ft.add_argument("--metrics-json", default=None, metavar="FILE", help="where the metrics go (default OUT/metrics.json)")
    ft.add_argument("--epochs", type=int, default=3, metavar="N", help="passes over the training data (default 3)")
    ft.add_argument("--max-steps", type=int, default=None, metavar="N",
                    help="stop after N optimizer steps (overrides --epochs)")
    ft.add_argument("--unpad", action="store_true",
                    help="run the encoder on the real tokens only (packed; no work on padding). Padded "
                         "positions come out as zeros: a qa loss, whose span softmax runs over every "
                         "position, differs a little from the padded run's")
    ft.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="train through torch.compile (default backend inductor; the kernels stay "
                         "in the graph as registered ops). Not with --unpad, whose shapes vary")
    ft.add_argument("--gradient-checkpointing", action="store_true",
                    help="keep only each layer's input and recompute the layer in the backward "
                         "(much less activation memory, about a third more compute)")
    ft.add_argument("--max-train-examples", type=int, default=None, metavar="N",
                    help="read only the first N training examples")
    ft.add_argument("--batch-size", type=int, default=32, metavar="N", help="examples per batch (default 32)")
    ft.add_argument("--grad-accum", type=int, default=1, metavar="N",
                    help="batches per optimizer step (gradient accumulation; default 1)")
    ft.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of AdamW (default 5e-5)")
    ft.add_argument("--weight-decay", type=float, default=0.01,
                    help="AdamW weight decay, not on biases and LayerNorm (default 0.01)")
    ft.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
                    help="AdamW's betas (default 0.9 0.999; RoBERTa's recipe: 0.9 0.98)")
    ft.add_argument("--adam-eps", type=float, default=1e-8, metavar="EPS",
                    help="AdamW's epsilon (default 1e-8; BERT's own recipe: 1e-6)")
    ft.add_argument("--layer-lr-decay", type=float, default=1.0, metavar="D",
                    help="layer-wise learning-rate decay in (0, 1]: the head trains at --lr, the top encoder layer "
                         "at lr * D, each layer below at one more factor D, the embeddings at lr * D**(layers + 1) "
                         "(default 1: one lr for all; 0.8-0.95 are usual)")
    ft.add_argument("--warmup-ratio", type=float, default=0.1,
                    help="fraction of the steps with a linear warm-up, in [0, 1] (default 0.1)")
    ft.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                    help="optimizer steps of linear warm-up (overrides --warmup-ratio)")
    ft.add_argument("--lr-schedule", choices=("linear", "cosine", "constant"), default="linear",
                    help="after the warm-up: linear or cosine decay to 0 at the last step, or constant (default linear)")
    ft.add_argument("--max-grad-norm", type=float, default=1.0, metavar="X",
                    help="clip the gradients' global L2 norm to X before each update (default 1.0)")
    ft.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                    help="tokens per example, longer ones truncated (default 128, qa 384; at most the model's positions)")
    ft.add_argument("--doc-stride", type=int, default=None, metavar="N",
                    help="qa: passage tokens that consecutive windows of a long passage share (default 128)")
    ft.add_argument("--max-answer-len", type=int, default=None, metavar="N",
                    help="qa: longest answer in tokens (default 30)")
    ft.add_argument("--max-question-len", type=int, default=None, metavar="N",
                    help="qa: question tokens kept; longer questions are cut, with a warning (default 64)")
    _null_threshold_flag(ft, "saved with the model; ")
    ft.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto: bf16 autocast on a GPU (fp16 before sm_80), fp32 on the CPU; fp16 needs a GPU. "
                         "bf16 on a CPU with bf16 instructions (AVX512-BF16, AMX) trains about 1.7x as fast as "
                         "fp32 (the demo on 2 cores; RESULTS.md compares its quality)")
    ft.add_argument("--seed", type=int, default=42, help="seed of the batch order, dropout and new head weights")
    ft.add_argument("--save-every", type=int, default=None, metavar="N",
                    help="optimizer steps between checkpoints (default: each epoch); each replaces the "
                         "previous one: only the newest is kept, for --resume (and the best evaluation's with --keep-best)")
    ft.add_argument("--eval-every", type=int, default=None, metavar="N",
                    help="also evaluate on --dev every N optimizer steps inside an epoch (default: at each "
                         "epoch's end only); --keep-best then picks among these evaluations too")
    ft.add_argument("--keep-best", nargs="?", const="main", default=None, metavar="METRIC",
                    help="keep the checkpoint of the evaluation with the best dev METRIC (default: the task's main "
                         "one: accuracy, matthews for cola, f1 for mrpc, squad and squad_v2, pearson, token_accuracy, entity_f1 "
                         "for IOB-tagged named entities) and "
                         "save its weights as OUT/model instead of the last; needs --dev")
    ft.add_argument("--early-stop", type=int, default=None, metavar="N",
                    help="with --keep-best: end the run after N evaluations in a row without a better score")
    ft.add_argument("--log-every", type=int, default=50, metavar="N",
                    help="every N optimizer steps a line of OUT/train_log.jsonl: mean loss since the last line, "
                         "learning rate, gradient norm before clipping, tokens/s (default 50)")
    ft.add_argument("--resume", action="store_true",
                    help="continue from the latest checkpoint in --out (same data and settings)")
    ft.add_argument("--no-bucket", action="store_true", help="do not batch examples of similar length together")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(ft, inference=False)
    ft.set_defaults(run=cmd_finetune)

    ev = sub.add_parser("evaluate", help="score a fine-tuned model on a dev file")
    ev.add_argument("--model", required=True, metavar="DIR", help="a model saved by finetune (OUT/model)")
    ev.add_argument("--dev", required=True, metavar="FILE", help="labelled data in the model's task format")
    ev.add_argument("--predictions", metavar="FILE",
                    help="also write what the model predicted: SQuAD's prediction JSON (id -> answer) for qa, "
                         "GLUE's index<TAB>prediction TSV for sentence tasks, word<TAB>gold<TAB>predicted lines "
                         "(a blank line between sentences) for tagging")
    _null_threshold_flag(ev, "instead of the one saved with the model; ")
    ev.add_argument("--null-odds", metavar="FILE",
                    help="SQuAD v2.0 models: also write each question's null score minus its best span's, the "
                         "official evaluate-v2.0.py's --na-prob-file. Given it and this run's --predictions, with "
                         "--na-prob-thresh the threshold the run used, the official script prints this run's "
                         "scores; best_f1 too if that threshold was 1e30 (the predictions then hold every "
                         "question's best span: the official search cannot answer a question they leave empty)")
    _common(ev)
    ev.set_defaults(run=cmd_evaluate)

    pr = sub.add_parser("predict", help="predict with a fine-tuned model",
                        description="Predict with a model saved by finetune. Sentence models: TEXT (several "
                                    "TEXTs: one prediction each) or, for a pair model, TEXT TEXT_B; tagging: "
                                    "TEXT of space-separated words; question answering: --question and "
                                    "--context. --file: one input per line, a pair or question<TAB>context "
                                    "separated by a tab.")
    pr.add_argument("--model", required=True, metavar="DIR", help="a model saved by finetune (OUT/model)")
    pr.add_argument("texts", nargs="*", metavar="TEXT", help="the input text(s)")
    pr.add_argument("--question", help="question-answering models: the question")
    pr.add_argument("--context", help="question-answering models: the passage to find the answer in")
    pr.add_argument("--file", metavar="FILE", help="one input per line; a pair separated by a tab ('-': stdin)")
    pr.add_argument("--json", action="store_true",
                    help="one JSON object per input instead of text: the input and fastbert.Predictor's result "
                         "(label, score and every label's probability; score; words, tags and entities; answer, "
                         "its character start/end in the context and score; SQuAD v2.0 models: an empty answer (start/end "
                         "-1) for no answer, and null_score_diff, the null score's margin over the best span)")
    _null_threshold_flag(pr, "instead of the one saved with the model; ")
    _common(pr, dev=False)
    pr.set_defaults(run=cmd_predict)

    en = sub.add_parser("encode", help="embed texts with the encoder and print their cosine similarities")
    en.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (none: four example sentences)")
    en.add_argument("--model", default="default",
                    help="'default' (embedded all-MiniLM-L6-v2) or an HF-layout folder")
    en.add_argument("--max-seq-len", type=int, default=None,
                    help="tokens per text, longer ones truncated (default: as sentence-transformers does for the "
                    "model, 256 for the embedded all-MiniLM-L6-v2)")
    en.add_argument("--backend", choices=["torch", "triton", "cuda"], default=None,
                    help="kernel backend (default: the fastest available on the device)")
    en.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    en.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                    help="autocast for the forward (default fp32: sentence-transformers' embeddings; the cuda "
                         "backend needs bf16 or fp16)")
    en.set_defaults(run=cmd_encode)

    de = sub.add_parser("demo", help="fine-tune the embedded MiniLM on the shipped SST-2 sample, evaluate, predict")
    de.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    de.add_argument("--max-train-examples", type=int, default=None, metavar="N",
                    help="train on the first N of the sample's 4,000 sentences (default: all)")
    de.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="as finetune's (auto: fp32 on the CPU); bf16 on a CPU with bf16 instructions "
                         "(AVX512-BF16, AMX) runs the demo about 1.7x as fast")
    de.set_defaults(run=cmd_demo)

    sub.add_parser("bench", help="kernel benchmarks against eager PyTorch, torch.compile and SDPA "
                   "(`fastbert bench --help`)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark suite has its own parser
        from fastbert.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        from fastbert.distributed import launched_by_torchrun

        if args.command != "finetune" and launched_by_torchrun():
            # each process would do the whole job and print it again
            raise ValueError("only finetune runs over several processes (WORLD_SIZE > 1); run "
                             f"{args.command} as one process")
        with _callers_cuda_device_kept():
            return args.run(args)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as err:
        # A user's mistake (argument, file, data, model folder) or a stopped run: the message, no traceback.
        message = f"{err.strerror}: {err.filename!r}" if isinstance(err, OSError) and err.filename and err.strerror \
            else str(err)
        print(f"fastbert {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
