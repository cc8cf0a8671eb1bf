"""The `fastbert` command.

    fastbert encode [--model default|PATH] TEXT [TEXT ...]   sentence embeddings and their cosine similarities
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _mean_pool(hidden, mask):
    # all-MiniLM-L6-v2 is trained with mean pooling over real tokens.
    mask = mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def cmd_encode(args) -> int:
    import fastbert

    device = torch.device(args.device)
    model = fastbert.BertModel.from_pretrained(args.model, backend=args.backend).to(device).eval()
    tokenizer = fastbert.Tokenizer.from_pretrained(args.model)
    print(fastbert.ops.describe_default(device) if args.backend is None else f"fastbert: backend {args.backend!r}")
    batch = tokenizer(args.texts, max_length=args.max_seq_len)
    batch = {k: v.to(device) for k, v in batch.items()}
    start = time.perf_counter()
    with torch.no_grad():
        out = model(**batch)
    embeddings = torch.nn.functional.normalize(_mean_pool(out.last_hidden_state, batch["attention_mask"]), dim=-1)
    elapsed = time.perf_counter() - start
    similarity = embeddings @ embeddings.T
    print(f"encoded {len(args.texts)} texts ({int(batch['attention_mask'].sum())} tokens) in {elapsed * 1e3:.1f} ms")
    width = max(len(t) for t in args.texts)
    for i, text in enumerate(args.texts):
        print(f"{text[:60]:<{min(width, 60)}}  " + "  ".join(f"{similarity[i, j]:+.3f}" for j in range(len(args.texts))))
    return 0


DEMO_TEXTS = [
    "A man is playing a guitar.",
    "Someone is strumming a musical instrument.",
    "The stock market fell sharply today.",
    "Shares dropped steeply in afternoon trading.",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastbert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    encode = sub.add_parser("encode", help="embed texts with the encoder and print their cosine similarities")
    encode.add_argument("texts", nargs="*", default=DEMO_TEXTS)
    encode.add_argument("--model", default="default", help="'default' (embedded all-MiniLM-L6-v2) or an HF-layout folder")
    encode.add_argument("--backend", choices=["torch", "triton", "cuda"], default=None)
    encode.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    encode.add_argument("--max-seq-len", type=int, default=128)
    encode.set_defaults(run=cmd_encode)
    args = parser.parse_args(argv)
    if getattr(args, "texts", None) == []:
        args.texts = DEMO_TEXTS
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"fastbert {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
