"""A lean BERT encoder whose fusable steps all go through fastbert.ops.

Read top to bottom: embeddings -> self-attention -> feed-forward -> layer ->
encoder (BertModel) with its pooler. Post-LN, exactly the arithmetic of
transformers' BertModel, so its checkpoints load here and ours load there
(the key map lives in checkpoint.py). Which kernels run is decided in
fastbert.ops, never here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

from . import checkpoint, ops
from .ops._backend import check_backend_name, host_sync_allowed
from .config import BertConfig


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, input_ids, token_type_ids, position_ids=None):
        """input_ids, token_type_ids (B, S) -> (B, S, hidden); or packed tokens: (T,) each with
        their positions in their sequences, position_ids (T,) -> (T, hidden)."""
        tokens = self.word(input_ids) + self.token_type(token_type_ids)
        if position_ids is None:
            positions = self.position.weight[:input_ids.shape[1]].expand_as(tokens)  # broadcast over B
        else:
            positions = self.position(position_ids)
        hidden = ops.add_layernorm(positions, tokens, self.norm.weight, self.norm.bias, self.norm.eps)
        return F.dropout(hidden, self.dropout_p, self.training)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention plus its output projection; the residual and
    LayerNorm that follow belong to the layer."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden, mask, packed=None):
        """hidden (B, S, hidden) with mask (B, S) bool or None; or packed tokens (T, hidden) with
        packed = (cu_seqlens, max_seqlen) (BertModel.unpad). Returns hidden's shape."""
        lead = hidden.shape[:-1]                                     # (B, S) or (T,)
        # One GEMM for q, k and v (their weights stacked, (3 * hidden, hidden)): under autocast
        # `hidden` is cast once instead of three times, and the backward computes dhidden in
        # one GEMM instead of three plus two additions. q, k, v are strided views of its
        # output, which the attention kernels read as they are.
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(hidden, weight, bias).view(*lead, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(-3)                                     # each (*lead, heads, head_dim)
        dropout_p = self.dropout_p if self.training else 0.0
        if packed is None:
            context = ops.attention(q, k, v, mask, dropout_p=dropout_p)
        else:
            context = ops.attention_varlen(q, k, v, *packed, dropout_p=dropout_p)
        # The width named, not -1: with no tokens at all (unpad, every row padded) -1 is ambiguous.
        return self.out(context.reshape(*lead, self.heads * self.head_dim))  # hidden's shape


class BertFeedForward(nn.Module):
    """dense -> GELU -> dense. The first dense runs without its bias, which
    bias_gelu adds in the same pass as the activation."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.inner = nn.Linear(config.hidden_size, config.intermediate_size)
        self.outer = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = config.gelu_approximate

    def forward(self, hidden):                                       # (B, S, hidden)
        inner = ops.bias_gelu(F.linear(hidden, self.inner.weight), self.inner.bias, self.approximate)
        return self.outer(inner)                                     # (B, S, hidden)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = BertFeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, hidden, hidden_in, mask, packed=None):
        """hidden: the residual stream; hidden_in: the same values as the sublayers' GEMMs read
        them (under autocast, in its dtype). Returns both for the next layer. Packed tokens
        (T, hidden) come with packed = (cu_seqlens, max_seqlen) instead of a mask."""
        p = self.dropout_p if self.training else 0.0
        # Post-LN: hidden = LayerNorm(dropout(sublayer(hidden)) + hidden), twice. Under autocast
        # the stream stays float32 and each add_layernorm also writes the copy the next GEMM
        # reads, in the sublayer's dtype, so autocast has nothing left to cast.
        norm = self.attention_norm
        hidden, hidden_in = ops.add_layernorm(self.attention(hidden_in, mask, packed), hidden, norm.weight, norm.bias,
                                              norm.eps, p, copy_in_x_dtype=True)
        hidden, hidden_in = ops.add_layernorm(self.ffn(hidden_in), hidden, self.ffn_norm.weight,
                                              self.ffn_norm.bias, self.ffn_norm.eps, p, copy_in_x_dtype=True)
        return hidden, hidden_in


class ModelOutput:
    """What code written for transformers' outputs reads: fields by name (out.logits, out["logits"])
    or by position over the fields that are not None (out[0], out[:2], to_tuple(), and so
    `loss, logits = out`), as a ModelOutput or return_dict=False's tuple gives them. Iterating
    yields the values (a ModelOutput, an OrderedDict, yields the names)."""

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            value = getattr(self, key, None) if key in {f.name for f in dataclasses.fields(self)} else None
            if value is None:
                raise KeyError(f"{type(self).__name__} has no {key!r}" + (" (it is None)" if hasattr(self, key) else ""))
            return value
        return self.to_tuple()[key]


@dataclasses.dataclass
class BertOutput(ModelOutput):
    last_hidden_state: torch.Tensor                                  # (B, S, hidden)
    pooler_output: torch.Tensor | None                               # (B, hidden); None without a pooler


class BertModel(nn.Module):
    """The BERT encoder: embeddings, `num_hidden_layers` post-LN layers and the
    pooler (dense + tanh on the [CLS] vector).

    unpad=True runs the layers on the real tokens only (packed, attention_varlen), as
    FlashAttention's BERT does: the outputs at real positions are the padded model's, padded
    positions of last_hidden_state are zeros, and no GEMM or kernel spends time on padding.
    It costs one host sync per forward (the token count) and is skipped under torch.compile,
    whose graphs need static shapes, and in a CUDA graph capture, which cannot take the sync.
    The pooler reads position 0 in both: for rows padded on the right, as BERT's tokenizers and
    fastbert.data.collate pad, that is [CLS] either way; a row that starts with padding pools a
    padding token's vector in the padded model and zeros here (neither means anything).

    A CUDA graph (torch.cuda.make_graphed_callables, torch.cuda.graph) can capture the model's
    training step: under capture the input-id range check (a host sync) is left to the warm-up
    runs, and attention draws its dropout seed on the device, so every replay draws new masks.
    torch.compile leaves out the same value checks (ids inside the vocabulary and type vocabulary,
    an integer mask of 0/1 only; they would break the graph): the shapes, dtypes and devices are
    still checked, and one eager call on a batch checks its values.

    gradient_checkpointing=True keeps only each layer's input during training and recomputes the
    layer in the backward: activation memory of one layer instead of all, for about a third
    more compute."""

    def __init__(self, config: BertConfig, backend: str | None = None, add_pooling_layer: bool = True,
                 unpad: bool = False, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config
        if backend is not None:
            check_backend_name(backend)  # a typo fails here, not at the first forward
        self.backend = backend  # None: whatever fastbert.ops is set to (default "auto")
        self.unpad = unpad
        self.gradient_checkpointing = gradient_checkpointing
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        # Tagging and QA heads read every token, not [CLS]: like transformers they drop the pooler.
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # BERT's initialisation, so a model built from a config trains like one from transformers.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> BertOutput:
        """input_ids, attention_mask (1/True = real token), token_type_ids: (batch, seqlen)."""
        input_ids, mask, token_type_ids = self._checked_inputs(input_ids, attention_mask, token_type_ids)
        scope = ops.use_backend(self.backend) if self.backend else contextlib.nullcontext()
        with scope:
            if self.unpad and mask is not None and host_sync_allowed(input_ids, torch.compiler.is_compiling()):
                hidden = self._encode_packed(input_ids, token_type_ids, mask)
            else:
                hidden = self.embeddings(input_ids, token_type_ids)
                hidden_in = hidden
                for layer in self.layers:
                    hidden, hidden_in = self._run_layer(layer, hidden, hidden_in, mask)
            pooled = torch.tanh(self.pooler(hidden[:, 0])) if self.pooler is not None else None
        return BertOutput(last_hidden_state=hidden, pooler_output=pooled)

    def _encode_packed(self, input_ids, token_type_ids, mask):
        """Embeddings and layers over the real tokens only: (B, S) ids -> packed (T, hidden) ->
        (B, S, hidden) with zeros at padding. Each row's real tokens stay in order and together,
        which is all attention needs; each keeps its position in its row for the embeddings."""
        batch, seqlen = input_ids.shape
        real = mask.reshape(-1).nonzero().squeeze(1)                   # (T,): one host sync
        cu_seqlens = F.pad(torch.cumsum(mask.sum(1, dtype=torch.int32), 0, dtype=torch.int32), (1, 0))
        packed = (cu_seqlens, seqlen)                                   # seqlen bounds every length: no sync
        tokens = self.embeddings(input_ids.reshape(-1).index_select(0, real),
                                 token_type_ids.reshape(-1).index_select(0, real), real % seqlen)
        tokens_in = tokens
        for layer in self.layers:
            tokens, tokens_in = self._run_layer(layer, tokens, tokens_in, None, packed)
        width = tokens.shape[-1]
        return tokens.new_zeros(batch * seqlen, width).index_copy(0, real, tokens).view(batch, seqlen, width)

    def _run_layer(self, layer, hidden, hidden_in, *rest):
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return layer(hidden, hidden_in, *rest)
        # Keep only each layer's inputs; the backward runs the layer again. The dropout seeds are
        # drawn from torch's generators, whose states checkpoint restores before the rerun, so
        # the kernels regenerate the same masks: gradients equal the run without checkpointing.
        # Of the two inputs only the float32 stream is kept: under autocast hidden_in is
        # hidden.to(its dtype) bit for bit (add_layernorm's copy), so the rerun casts it again
        # instead of keeping half as many bytes more per layer. The first run takes the copy given.
        given, in_dtype, same = [hidden_in], hidden_in.dtype, hidden_in is hidden

        def inputs(hidden):
            return given.pop() if given else (hidden if same else hidden.to(in_dtype))

        if torch.compiler.is_compiling():
            # A compiled backward reruns the traced graph, not this Python, so the scope need not be
            # reopened; and opening it inside the checkpointed region (a list push) is a side effect
            # Dynamo refuses there: fullgraph=True failed, and without it every layer ran uncompiled.
            return torch.utils.checkpoint.checkpoint(layer, hidden, hidden_in, *rest, use_reentrant=False)
        # The rerun happens inside backward(), outside any use_backend scope of this forward:
        # it reopens the scope in force now, or it could run other kernels with other masks.
        backend = ops.get_backend()

        def rerunnable(hidden, *layer_args):
            with ops.use_backend(backend):
                return layer(hidden, inputs(hidden), *layer_args)
        return torch.utils.checkpoint.checkpoint(rerunnable, hidden, *rest, use_reentrant=False)

    def _checked_inputs(self, input_ids, attention_mask, token_type_ids):
        device = self.embeddings.word.weight.device
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
        batch, seqlen = input_ids.shape
        if seqlen < 1 or batch < 1:
            raise ValueError(f"input_ids must hold at least one row (batch >= 1) of at least one token "
                             f"(seqlen >= 1), got shape {tuple(input_ids.shape)}")
        if seqlen > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {seqlen} tokens per row, more than the model's "
                             f"max_position_embeddings = {self.config.max_position_embeddings}")
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise ValueError(f"attention_mask must be (batch, seqlen) = {tuple(input_ids.shape)}, got {got}")
            if attention_mask.device != device:
                raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
            if attention_mask.is_floating_point() or attention_mask.is_complex():
                raise TypeError(f"attention_mask must be bool or integer 0/1 (1 = real token), got {attention_mask.dtype} "
                                "(an additive float mask such as transformers' extended mask is not accepted)")
            mask = attention_mask.bool()
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif not isinstance(token_type_ids, torch.Tensor) or token_type_ids.shape != input_ids.shape:
            got = tuple(token_type_ids.shape) if isinstance(token_type_ids, torch.Tensor) else type(token_type_ids).__name__
            raise ValueError(f"token_type_ids must be (batch, seqlen) = {tuple(input_ids.shape)}, got {got}")
        elif token_type_ids.device != device:
            raise ValueError(f"token_type_ids is on {token_type_ids.device} but the model is on {device}")
        elif token_type_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token_type_ids must be int64 or int32 segment ids, got {token_type_ids.dtype}")
        if host_sync_allowed(input_ids, torch.compiler.is_compiling()):
            # Out-of-range ids would index past the embedding tables: a device-side assert
            # on the GPU, garbage elsewhere. The check costs small reductions and one copy to
            # the host (one sync on a GPU, not four), which a CUDA graph capture cannot take:
            # make_graphed_callables checks its sample inputs in its warm-up runs.
            extrema = [input_ids.min(), input_ids.max(), token_type_ids.min(), token_type_ids.max()]
            int_mask = attention_mask is not None and attention_mask.dtype != torch.bool
            if int_mask:  # 0/1 only: bool() would read -10000 (an additive mask) as "real token"
                extrema += [attention_mask.min(), attention_mask.max()]
            low, high, tt_low, tt_high, *mask_range = torch.stack(
                [t.to(torch.int64) for t in extrema]).tolist()
            if int_mask and (mask_range[0] < 0 or mask_range[1] > 1):
                raise ValueError(f"attention_mask must hold 0/1 (1 = real token), got values in "
                                 f"[{mask_range[0]}, {mask_range[1]}]")
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in [{low}, {high}]")
            if tt_low < 0 or tt_high >= self.config.type_vocab_size:
                raise ValueError(f"token_type_ids must lie in [0, type_vocab_size={self.config.type_vocab_size}), "
                                 f"got values in [{tt_low}, {tt_high}]")
        return input_ids, mask, token_type_ids

    # -- checkpoints ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "default", backend: str | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "BertModel":
        """Load an HF-layout folder (config.json + model.safetensors or pytorch_model.bin, or shards of either);
        "default" is the embedded all-MiniLM-L6-v2. Returned in eval mode, as transformers returns it:
        call .train() before a training loop of your own (fastbert's Trainer does)."""
        folder = checkpoint.resolve_model_path(name_or_path)
        model = cls(BertConfig.from_json(folder / "config.json"), backend=backend)
        checkpoint.load_encoder(model, checkpoint.read_state_dict(folder), source=folder)
        # In eval mode, as transformers returns it: a loaded model is used before it is trained, and
        # dropout left on gave other outputs on every call. Trainer.train() switches it to training.
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors with transformers' key names, together atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint.record_dtype(self.config, self)
        checkpoint.save_model_files(folder, self.encoder_config(), checkpoint.encoder_to_hf(self))

    # What a task model's config adds: a task model's encoder shares its config, and an encoder saved
    # with them was taken for the task model (by transformers' Auto classes and by `fastbert predict`).
    TASK_CONFIG_KEYS = ("fastbert_task", "id2label", "label2id", "problem_type", "num_labels")

    def encoder_config(self) -> BertConfig:
        """A copy of the config for this encoder alone: architectures BertModel, no task keys."""
        extra = {k: v for k, v in self.config.extra.items() if k not in self.TASK_CONFIG_KEYS}
        return dataclasses.replace(self.config, extra={**extra, "architectures": ["BertModel"]})
