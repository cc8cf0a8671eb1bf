"""The `fastbert` command.

    fastbert finetune --task {sst2,cola,mrpc,rte,stsb,pos,squad} --train FILE --dev FILE --out DIR [...]
    fastbert evaluate --model DIR --dev FILE
    fastbert predict  --model DIR (TEXT [TEXT_B] | --question Q --context C | --file FILE)
    fastbert encode   [--model default|PATH] TEXT [TEXT ...]
    fastbert bench    [--suite kernels|e2e|all] [--quick] [--out DIR]
    fastbert demo     fine-tune the embedded MiniLM on the shipped SST-2 sample, evaluate, predict
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _device(name):
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# -- finetune / evaluate / predict ----------------------------------------------------


def cmd_finetune(args) -> int:
    import fastbert
    from fastbert import data, tasks, train

    if args.task is None and args.task_type is None:
        raise ValueError("give --task (a preset) or --task-type")
    if args.compile and args.unpad:
        raise ValueError("--unpad and --compile do not go together: the packed encoder's shapes change with "
                         "every batch, so a compiled model runs padded; pick one")
    overrides = dict(max_seq_len=args.max_seq_len, doc_stride=args.doc_stride, max_answer_len=args.max_answer_len,
                     text_cols=args.text_cols, label_col=args.label_col)
    spec = tasks.TaskSpec.preset(args.task, **overrides) if args.task else \
        tasks.TaskSpec(name=args.task_type, kind=args.task_type,
                       **{k: v for k, v in overrides.items() if v is not None})
    torch.manual_seed(args.seed)
    device = _device(args.device)
    tokenizer = fastbert.Tokenizer.from_pretrained(args.model)
    started = time.perf_counter()
    train_data = tasks.read(spec, args.train, tokenizer, args.max_train_examples)
    dev_data = tasks.read(spec, args.dev, tokenizer, args.max_dev_examples) if args.dev else None
    model = tasks.build_model(spec, args.model, args.backend).to(device)
    model.bert.unpad = args.unpad
    model.bert.gradient_checkpointing = args.gradient_checkpointing
    print(fastbert.ops.describe_default(device) if args.backend is None else f"fastbert: backend {args.backend!r}")
    print(f"task {spec.name} ({spec.kind}): {len(train_data.features)} training features"
          + (f", {len(dev_data.features)} dev features" if dev_data else ""))
    cfg = train.TrainConfig(out=Path(args.out), epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                            lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                            grad_accum=args.grad_accum, seed=args.seed, precision=args.precision,
                            bucket_by_length=not args.no_bucket, save_every=args.save_every,
                            progress=not args.no_progress, compile=args.compile)
    evaluate = (lambda m: tasks.evaluate(m, spec, dev_data, args.eval_batch_size)) if dev_data else None
    trainer = train.Trainer(model, train_data.features, data.collate, cfg, evaluate, train_data.lengths)
    if args.resume and trainer.resume():
        print(f"resumed from step {trainer.step}")
    summary = trainer.train()
    final = Path(args.out) / "model"
    model.save_pretrained(final)
    tokenizer.save(final)
    summary.update(task=spec.name, kind=spec.kind, model=str(args.model), device=str(device),
                   backend=args.backend or "auto", unpad=args.unpad,
                   gradient_checkpointing=args.gradient_checkpointing, compile=args.compile, train_features=len(train_data.features),
                   total_wall_time_s=time.perf_counter() - started, saved_to=str(final),
                   final_metrics=summary["epochs"][-1] if summary["epochs"] else {})
    metrics_file = Path(args.metrics_json or Path(args.out) / "metrics.json")
    from fastbert.checkpoint import atomic_write_text

    atomic_write_text(metrics_file, json.dumps(summary, indent=2) + "\n")
    print(f"final: {json.dumps(summary['final_metrics'])}\nmodel saved to {final}; metrics in {metrics_file}")
    return 0


def cmd_evaluate(args) -> int:
    import fastbert
    from fastbert import tasks

    model, spec = tasks.load_finetuned(args.model, args.backend)
    model.to(_device(args.device))
    dev = tasks.read(spec, args.dev, fastbert.Tokenizer.from_pretrained(args.model), args.max_dev_examples)
    scores = tasks.evaluate(model, spec, dev, args.eval_batch_size)
    print(json.dumps(scores, indent=2))
    return 0


def predict_texts(model, spec, tokenizer, texts, pairs=None, question=None, context=None):
    """Human-readable predictions for raw inputs (used by `predict` and the demo)."""
    from fastbert import data, tasks

    if spec.kind == "qa":
        example = data.SquadExample(id="q", title="", question=question, context=context, answers=[], answer_starts=[])
        features = data.build_squad_features([example], tokenizer, spec.max_seq_len, spec.doc_stride)
        logits = tasks.predict_logits(model, features)
        return [tasks.answers_from_logits(model, spec, [example], features, logits)["q"]]
    if spec.kind == "tagging":
        words = [t.split() for t in texts]
        features = data.encode_words(tokenizer, words, spec.max_seq_len)
        out = []
        for feat, logits, ws in zip(features, tasks.predict_logits(model, features), words):
            tags, seen = [], set()
            for pos, w in enumerate(feat["word_ids"]):
                if w is not None and w not in seen:
                    seen.add(w)
                    tags.append(f"{ws[w]}/{spec.labels[int(logits[pos].argmax())]}")
            out.append(" ".join(tags))
        return out
    enc = tokenizer(texts, pairs, max_length=spec.max_seq_len, padding=False, return_tensors=False)
    features = [{"input_ids": i, "token_type_ids": t} for i, t in zip(enc["input_ids"], enc["token_type_ids"])]
    logits = tasks.predict_logits(model, features)
    if spec.kind == "regression":
        return [f"{l.item():.3f}" for l in logits]
    out = []
    for l in logits:
        p = torch.softmax(l, -1)
        out.append(f"{spec.labels[int(p.argmax())]} ({p.max().item():.3f})")
    return out


def cmd_predict(args) -> int:
    import fastbert
    from fastbert import tasks

    model, spec = tasks.load_finetuned(args.model, args.backend)
    model.to(_device(args.device))
    tokenizer = fastbert.Tokenizer.from_pretrained(args.model)
    if spec.kind == "qa":
        if not (args.question and args.context):
            raise ValueError("a question-answering model needs --question and --context")
        print(predict_texts(model, spec, tokenizer, None, question=args.question, context=args.context)[0])
        return 0
    if args.file:
        lines = [l.rstrip("\n").split("\t") for l in Path(args.file).read_text().splitlines() if l.strip()]
    elif args.texts:
        lines = [args.texts]
    else:
        raise ValueError("give TEXT [TEXT_B] or --file FILE (one input per line, a pair separated by a tab)")
    texts = [l[0] for l in lines]
    pairs = [l[1] for l in lines] if spec.kind in ("pair", "regression") and all(len(l) > 1 for l in lines) else None
    for text, pred in zip(texts, predict_texts(model, spec, tokenizer, texts, pairs)):
        print(f"{pred}\t{text}")
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
                "--lr", "8e-5", "--max-seq-len", "128", "--out", str(out)]
    if args.max_train_examples:
        finetune += ["--max-train-examples", str(args.max_train_examples)]
    code = main(finetune)
    if code:
        return code
    import fastbert

    model, spec = tasks.load_finetuned(out / "model")
    tokenizer = fastbert.Tokenizer.from_pretrained(out / "model")
    print("\npredictions of the fine-tuned model (label 1 = positive):")
    for text, pred in zip(DEMO_REVIEWS, predict_texts(model, spec, tokenizer, DEMO_REVIEWS)):
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


def cmd_encode(args) -> int:
    import fastbert

    device = _device(args.device)
    model = fastbert.BertModel.from_pretrained(args.model, backend=args.backend).to(device).eval()
    tokenizer = fastbert.Tokenizer.from_pretrained(args.model)
    print(fastbert.ops.describe_default(device) if args.backend is None else f"fastbert: backend {args.backend!r}")
    texts = args.texts or DEMO_TEXTS
    batch = {k: v.to(device) for k, v in tokenizer(texts, max_length=args.max_seq_len).items()}
    with torch.no_grad():
        out = model(**batch)
    embeddings = torch.nn.functional.normalize(_mean_pool(out.last_hidden_state, batch["attention_mask"]), dim=-1)
    similarity = embeddings @ embeddings.T
    width = min(max(len(t) for t in texts), 60)
    for i, text in enumerate(texts):
        print(f"{text[:60]:<{width}}  " + "  ".join(f"{similarity[i, j]:+.3f}" for j in range(len(texts))))
    return 0


# -- parser -------------------------------------------------------------------------------


def _common(p):
    p.add_argument("--backend", choices=["torch", "triton", "cuda"], default=None,
                   help="kernel backend (default: the fastest available on the device)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-dev-examples", type=int, default=None)


def build_parser():
    parser = argparse.ArgumentParser(prog="fastbert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("finetune", help="fine-tune a pretrained BERT on a task")
    ft.add_argument("--task", choices=sorted(__import__("fastbert.tasks", fromlist=["PRESETS"]).PRESETS))
    ft.add_argument("--task-type", choices=["single", "pair", "regression", "tagging", "qa"])
    ft.add_argument("--text-cols", nargs="+", default=None, help="column names or indices of the text(s)")
    ft.add_argument("--label-col", default=None)
    ft.add_argument("--train", required=True)
    ft.add_argument("--dev", default=None)
    ft.add_argument("--model", default="default", help="'default' (embedded all-MiniLM-L6-v2) or an HF-layout folder")
    ft.add_argument("--out", required=True)
    ft.add_argument("--metrics-json", default=None)
    ft.add_argument("--epochs", type=int, default=3)
    ft.add_argument("--max-steps", type=int, default=None)
    ft.add_argument("--unpad", action="store_true",
                    help="run the encoder on the real tokens only (packed; no work on padding)")
    ft.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="train through torch.compile (default backend inductor; the kernels stay "
                         "in the graph as registered ops). Not with --unpad, whose shapes vary")
    ft.add_argument("--gradient-checkpointing", action="store_true",
                    help="keep only each layer's input and recompute the layer in the backward "
                         "(much less activation memory, about a third more compute)")
    ft.add_argument("--max-train-examples", type=int, default=None)
    ft.add_argument("--batch-size", type=int, default=32)
    ft.add_argument("--grad-accum", type=int, default=1)
    ft.add_argument("--lr", type=float, default=5e-5)
    ft.add_argument("--weight-decay", type=float, default=0.01)
    ft.add_argument("--warmup-ratio", type=float, default=0.1)
    ft.add_argument("--max-seq-len", type=int, default=None)
    ft.add_argument("--doc-stride", type=int, default=None)
    ft.add_argument("--max-answer-len", type=int, default=None)
    ft.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ft.add_argument("--seed", type=int, default=42)
    ft.add_argument("--save-every", type=int, default=None, help="optimizer steps between checkpoints (default: each epoch)")
    ft.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    ft.add_argument("--no-bucket", action="store_true", help="do not batch examples of similar length together")
    ft.add_argument("--no-progress", action="store_true")
    _common(ft)
    ft.set_defaults(run=cmd_finetune)

    ev = sub.add_parser("evaluate", help="score a fine-tuned model on a dev file")
    ev.add_argument("--model", required=True)
    ev.add_argument("--dev", required=True)
    _common(ev)
    ev.set_defaults(run=cmd_evaluate)

    pr = sub.add_parser("predict", help="predict with a fine-tuned model")
    pr.add_argument("--model", required=True)
    pr.add_argument("texts", nargs="*", help="a text, or a pair of texts")
    pr.add_argument("--question")
    pr.add_argument("--context")
    pr.add_argument("--file", help="one input per line; a pair separated by a tab")
    _common(pr)
    pr.set_defaults(run=cmd_predict)

    en = sub.add_parser("encode", help="embed texts with the encoder and print their cosine similarities")
    en.add_argument("texts", nargs="*")
    en.add_argument("--model", default="default")
    en.add_argument("--max-seq-len", type=int, default=128)
    en.add_argument("--backend", choices=["torch", "triton", "cuda"], default=None)
    en.add_argument("--device", default=None)
    en.set_defaults(run=cmd_encode)

    de = sub.add_parser("demo", help="fine-tune the embedded MiniLM on the shipped SST-2 sample, evaluate, predict")
    de.add_argument("--out", default="runs/demo")
    de.add_argument("--max-train-examples", type=int, default=None)
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
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"fastbert {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
