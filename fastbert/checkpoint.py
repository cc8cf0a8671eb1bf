"""Checkpoints in Hugging Face's layout, both directions through one key map.

fastbert names its modules for reading (layers.3.ffn.inner); transformers names
them encoder.layer.3.intermediate.dense. KEY_MAP pairs the two once; loading
and saving both go through it, so a checkpoint moves either way unchanged.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
import warnings
from pathlib import Path

import torch

# (fastbert name, transformers name); {i} stands for a layer index.
KEY_MAP = [
    ("embeddings.word", "embeddings.word_embeddings"),
    ("embeddings.position", "embeddings.position_embeddings"),
    ("embeddings.token_type", "embeddings.token_type_embeddings"),
    ("embeddings.norm", "embeddings.LayerNorm"),
    ("layers.{i}.attention.query", "encoder.layer.{i}.attention.self.query"),
    ("layers.{i}.attention.key", "encoder.layer.{i}.attention.self.key"),
    ("layers.{i}.attention.value", "encoder.layer.{i}.attention.self.value"),
    ("layers.{i}.attention.out", "encoder.layer.{i}.attention.output.dense"),
    ("layers.{i}.attention_norm", "encoder.layer.{i}.attention.output.LayerNorm"),
    ("layers.{i}.ffn.inner", "encoder.layer.{i}.intermediate.dense"),
    ("layers.{i}.ffn.outer", "encoder.layer.{i}.output.dense"),
    ("layers.{i}.ffn_norm", "encoder.layer.{i}.output.LayerNorm"),
    ("pooler", "pooler.dense"),
]

# Tensors real checkpoints carry that the encoder does not use: buffers and
# pre-training heads (bert-base-uncased ships cls.predictions.*).
IGNORED = re.compile(r"(^|\.)position_ids$|(^|\.)token_type_ids$|^cls\.")
# Task heads of transformers' BertFor* classes, loaded by fastbert.heads.
HEAD_PREFIXES = ("classifier.", "qa_outputs.")
# TensorFlow-era names of the LayerNorm parameters, still in original checkpoints such as
# bert-base-uncased's; transformers renames them on load ("legacy" conversion), so do we.
LEGACY_LAYERNORM = re.compile(r"(LayerNorm)\.(gamma|beta)$")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"\.(?P<leaf>weight|bias)$")


_TO_HF = [(_pattern(ours), hf) for ours, hf in KEY_MAP]
_FROM_HF = [(_pattern(hf), ours) for ours, hf in KEY_MAP]


def _translate(key: str, table) -> str | None:
    for pattern, template in table:
        found = pattern.match(key)
        if found:
            return template.replace("{i}", found.groupdict().get("i") or "") + "." + found["leaf"]
    return None


def to_hf_key(key: str) -> str:
    hf = _translate(key, _TO_HF)
    if hf is None:
        raise KeyError(f"no transformers name for fastbert parameter {key!r}")
    return hf


def from_hf_key(key: str) -> str | None:
    """fastbert name for a transformers encoder key (without 'bert.'), or None if it is not one."""
    return _translate(key, _FROM_HF)


# -- files -------------------------------------------------------------------------


def resolve_model_path(name_or_path) -> Path:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a model folder (str or os.PathLike) or 'default', "
                        f"got {type(name_or_path).__name__}")
    if str(name_or_path) == "":
        raise ValueError("name_or_path is empty: name a model folder or 'default'")
    if str(name_or_path) == "default":
        from .defaults import default_model_path

        return default_model_path()
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model path {str(folder)!r} is not a folder (expected config.json + model.safetensors, "
                                "or 'default' for the embedded all-MiniLM-L6-v2)")
    return folder


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, or of pytorch_model.bin loaded with weights_only=True, or of
    their shards listed in model.safetensors.index.json / pytorch_model.bin.index.json (transformers
    shards large models); looked for in that order, transformers' order."""
    safetensors_file, torch_file = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors_file.exists():
        return _read_file(safetensors_file)
    if (index := folder / "model.safetensors.index.json").exists():
        return _read_shards(index)
    if torch_file.exists():
        return _read_file(torch_file)
    if (index := folder / "pytorch_model.bin.index.json").exists():
        return _read_shards(index)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or a sharded index of either) in {folder}")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for truncated or garbled files
            raise ValueError(f"checkpoint {path} is not a readable safetensors file: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} could not be loaded with weights_only=True: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} must hold a dict of tensors")
    return state


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    """The tensors named by a sharded checkpoint's index ({"weight_map": {tensor: shard file}}),
    each from the shard the index names: a tensor missing from its shard is an error, not a
    silently smaller state dict."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"checkpoint index {index} must be JSON with a \"weight_map\" object: {err!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"checkpoint index {index}: \"weight_map\" must map tensor names to shard file names")
    state = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index.parent / shard_name
        if Path(shard_name).name != shard_name or not shard.is_file():
            raise ValueError(f"checkpoint index {index} names shard {shard_name!r}, which is not a file in {index.parent}")
        tensors = _read_file(shard)
        wanted = [k for k, v in weight_map.items() if v == shard_name]
        if lacking := [k for k in wanted if k not in tensors]:
            raise ValueError(f"checkpoint shard {shard} lacks tensors its index {index.name} places there: "
                             + ", ".join(sorted(lacking)))
        state.update((k, tensors[k]) for k in wanted)
    return state


def check_writable(flag: str, path, folder: bool) -> None:
    """Refuse, before any work, an output path that cannot be made: a file where the folder `path`
    should be (or a folder where the file should be), or a file where a folder above it should be.
    The ValueError names the command-line flag."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{flag} {str(path)!r} is a {'file' if folder else 'folder'}; "
                         + ("it must be a folder (made if missing)" if folder else "give a file name"))
    above = next(p for p in path.absolute().parents if p.exists())
    if not above.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(above)!r} is a file, not a folder")
    # A read-only or foreign folder showed only when the first file was written: after an epoch
    # of training for --out, after the whole run for --metrics-json (its numbers lost).
    folder_made = path if folder else path.parent
    try:
        folder_made.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder_made):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {str(path)!r}: cannot write into {str(folder_made)!r} "
                         f"({err.strerror or err})") from None


def _create_beside(folder: Path, name: str) -> tuple[int, str]:
    """A new file for writing, named after `name`, hidden, in `folder`. Created with mode 0666 so
    that the kernel applies the umask as open() does: another user (a serving container, a shared
    group folder) can read the model as any file written here. (mkstemp makes 0600, and reading
    the umask means setting it, process-wide: a thread writing a file meanwhile got the wrong mode,
    and two such reads at once could leave the process with 0022 for good.)"""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {folder}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    atomic_write_files(path.parent, {path.name: data})


def atomic_write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write every file to a temporary beside it first, then rename them all, in the order given: a
    failed write (a full disk, an interrupt) leaves every old file in place, not a new config.json
    beside the old weights. Only a crash between two renames can mix them."""
    folder = Path(folder)
    written: list[tuple[str, Path]] = []
    try:
        for name, data in files.items():
            fd, tmp = _create_beside(folder, name)
            written.append((tmp, folder / name))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        while written:
            tmp, path = written[0]
            os.replace(tmp, path)
            written.pop(0)
    except BaseException:
        for tmp, _ in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return save(tensors, metadata={"format": "pt"})


def save_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write_bytes(Path(path), safetensors_bytes(state))


def save_model_files(folder: Path, config, state: dict[str, torch.Tensor]) -> None:
    """config.json and model.safetensors of one model, written together (atomic_write_files): the
    weights renamed in first, then the config that describes them."""
    atomic_write_files(Path(folder), {"model.safetensors": safetensors_bytes(state),
                                      "config.json": config.to_json_text().encode()})


def record_dtype(config, model) -> None:
    """Name the saved weights' dtype in config.json. transformers loads a checkpoint in the dtype its
    config names: one kept from the checkpoint read (float16) would cast weights fastbert trained and
    saved in float32 down to float16 there."""
    config.extra.pop("torch_dtype", None)  # the older name; transformers prefers "dtype" when both are set
    config.extra["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")


# -- the encoder -------------------------------------------------------------------


def encoder_to_hf(model, prefix: str = "") -> dict[str, torch.Tensor]:
    """The encoder's parameters under transformers' names (prefix 'bert.' for task models)."""
    return {prefix + to_hf_key(name): tensor for name, tensor in model.state_dict().items()}


def load_encoder(model, hf_state: dict[str, torch.Tensor], source="checkpoint") -> list[str]:
    """Copy an HF state dict (keys with or without 'bert.') into a fastbert BertModel.

    Raises ValueError listing every missing, unexpected and mis-shaped key;
    returns the keys it did not use because they belong to a task head.

    One exception, as in transformers: a checkpoint without a pooler (token classification and
    question answering models have none) loads into a model that has one (sequence
    classification) with the pooler newly initialised as BERT does (normal, std
    initializer_range, zero bias) and a warning naming its weights. Any other missing weight
    is an error.
    """
    own = model.state_dict()
    found, unexpected, not_encoder, twice = {}, [], [], []
    for key, tensor in hf_state.items():
        bare = key[len("bert."):] if key.startswith("bert.") else key
        bare = LEGACY_LAYERNORM.sub(lambda m: f"{m[1]}.{'weight' if m[2] == 'gamma' else 'bias'}", bare)
        ours = from_hf_key(bare)
        if ours is not None and ours in own:
            if ours in found:  # with and without "bert.", or a legacy gamma beside its weight: which one?
                twice.append(f"{found[ours][0]} and {key}")
            found[ours] = (key, tensor)
        elif IGNORED.search(bare) or (bare.startswith("pooler.") and model.pooler is None):
            continue
        elif key.startswith(HEAD_PREFIXES):
            not_encoder.append(key)  # a task head's weights: the caller's business
        else:
            unexpected.append(key)
    missing = sorted(set(own) - set(found))
    fresh = [k for k in missing if k.startswith("pooler.")]        # a new pooler: initialised, not an error
    misshaped = [f"{key}: checkpoint {tuple(t.shape)}, model {tuple(own[ours].shape)}"
                 for ours, (key, t) in sorted(found.items()) if t.shape != own[ours].shape]
    if len(missing) > len(fresh) or unexpected or misshaped or twice:
        lines = [f"checkpoint {source} does not match the model's config:"]
        if missing:
            lines.append("  missing: " + ", ".join(to_hf_key(k) for k in missing))
        if unexpected:
            lines.append("  unexpected: " + ", ".join(sorted(unexpected)))
        if misshaped:
            lines.append("  mis-shaped: " + "; ".join(misshaped))
        if twice:
            lines.append("  one weight given twice: " + "; ".join(twice))
        raise ValueError("\n".join(lines))
    for key, tensor in found.values():  # every weight checked before any is copied: no half-loaded model
        check_weight(key, tensor, source)
    with torch.no_grad():
        for ours, (key, tensor) in found.items():
            own[ours].copy_(tensor)
    if fresh:
        _init_pooler(model, fresh, source)
    return not_encoder


def check_weight(key: str, tensor: torch.Tensor, source) -> None:
    """A checkpoint's weight must be floating point and finite: loaded as is, an integer tensor
    would be cast silently and one NaN would turn every output NaN."""
    if not tensor.is_floating_point():
        raise ValueError(f"checkpoint {source}: tensor {key} has dtype {tensor.dtype}, expected floating point")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"checkpoint {source}: tensor {key} holds NaN or infinite values")


def _init_pooler(model, keys: list[str], source) -> None:
    """BERT's initialisation of the pooler weights `keys` (fastbert names), which the checkpoint
    lacks, with a warning naming them (transformers' "newly initialized" warning)."""
    std = model.config.initializer_range
    with torch.no_grad():
        for key in keys:
            tensor = model.get_parameter(key)
            if key.endswith(".bias"):
                tensor.zero_()
            else:
                tensor.normal_(mean=0.0, std=std)
    names = ", ".join(to_hf_key(k) for k in sorted(keys, key=lambda k: not k.endswith(".weight")))
    warnings.warn(f"checkpoint {source} has no pooler weights {names} (models for token classification or "
                  f"question answering are saved without a pooler): newly initialised (normal, std={std}; "
                  "zero bias). Fine-tune before using the pooled output.", stacklevel=3)
