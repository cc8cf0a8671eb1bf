"""Drop-in use of fastbert's kernels inside a transformers BERT (or RoBERTa, XLM-R, CamemBERT,
ELECTRA, ERNIE: the family whose encoder layers are BERT's; and DistilBERT, whose block is
patched as a whole).

    import fastbert
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path)
    fastbert.patch_transformers(model)                     # in place; returns the model
    # ... the user's own training loop, Trainer, accelerate: unchanged

What changes, module by module (weights, parameter names and state dicts stay transformers'):
- self-attention: `config._attn_implementation = "fastbert"`, registered with transformers'
  AttentionInterface; q/k/v go to `fastbert.ops.attention` with the key padding mask and the
  attention dropout, as the flash kernels take them. The mask comes from our entry in
  AttentionMaskInterface: without one transformers hands a custom attention function no
  padding mask at all, and padding would silently attend.
- <Family>SelfOutput / <Family>Output: dense -> `fastbert.ops.add_layernorm` (dropout, residual add and
  LayerNorm in one pass, mean/rstd saved for the backward).
- <Family>Intermediate: dense without its bias -> `fastbert.ops.bias_gelu` (bias + erf GELU; the
  tanh forms "gelu_new"/"gelu_pytorch_tanh" use the tanh option), when hidden_act is one of those
  and dense is a plain nn.Linear at call time (a LoRA-wrapped or hooked one runs its own forward).

`backend` ("torch", "triton", "cuda"; None: whatever fastbert.ops is set to, "auto" by default)
applies to the patched modules only. Encoder self-attention only: a decoder (causal) or
cross-attention call raises instead of computing something else.
"""
from __future__ import annotations

import contextlib
import functools
import types
import warnings

import torch
import torch.nn.functional as F

from . import ops
from .ops._backend import check_backend_name, host_sync_allowed

ATTN_IMPLEMENTATION = "fastbert"
_GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


MIN_TRANSFORMERS = (5, 4)


def transformers_supported() -> bool:
    """Whether the installed transformers is one patch_transformers works with (>= 5.4)."""
    import transformers

    from .ops._backend import release

    return release(transformers.__version__) >= MIN_TRANSFORMERS


def _transformers_interfaces():
    import transformers

    # Tested with transformers 5.17 (the GPU image) and 5.24: there the BERT family reaches its
    # attention through AttentionInterface and builds its masks through AttentionMaskInterface.
    # Earlier releases route BERT differently, and a hook that is not consulted would leave the
    # model on its own attention (or, worse, without its padding mask) while looking patched;
    # 5.0 to 5.3 call the mask hook with another signature (a TypeError deep inside transformers).
    if not transformers_supported():
        raise ImportError(f"fastbert.patch_transformers needs transformers >= 5.4 (found {transformers.__version__}): "
                          "there the BERT family's attention and masks go through AttentionInterface and "
                          "AttentionMaskInterface, which the patch hooks")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return AttentionInterface, AttentionMaskInterface


def _backend_scope(module):
    backend = getattr(module, "fastbert_backend", None)
    return ops.use_backend(backend) if backend else contextlib.nullcontext()


def key_padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: the (batch, kv_length) key padding mask as bool, or None.

    transformers has already turned the user's 2D mask into bool (True = real token) by now;
    it is passed on as it is, without the `mask.all()` check (a host sync) that would drop
    an all-real mask. Anything else that a mask factory would add (causal, sliding windows,
    offsets from a cache) is not bidirectional self-attention and is refused."""
    if q_offset or kv_offset or q_length != kv_length:
        raise ValueError(f"fastbert attention is encoder self-attention: got q_length {q_length}, kv_length "
                         f"{kv_length}, offsets {q_offset}/{kv_offset} (a cache or cross-attention)")
    if attention_mask is None:
        return None
    return _key_padding_bool(attention_mask, batch_size, kv_length)


# An additive mask value at or below this masks its key (transformers uses finfo(dtype).min, older
# code -10000): exp(-1e4 + score) is 0 in every float dtype.
_ADDITIVE_MASKED = -1e4


def _key_padding_bool(mask, batch, kv_length):
    """(batch, kv_length) bool, True = real, from a 2D mask (bool or 0/1) or a 4D
    (batch, 1, 1, kv_length) mask (bool, or additive float where 0 keeps a key); a batch
    dimension of 1 is broadcast over the batch, as transformers' attention does."""
    given = tuple(mask.shape)
    if mask.dim() == 4 and mask.shape[1:3] == (1, 1):
        mask = mask[:, 0, 0, :]
        if mask.dtype != torch.bool:
            # additive: 0 keeps, a large negative number masks. Anything else (a 0/1 float mask,
            # where transformers would add 1 to the kept scores; a soft bias) has no key padding
            # form: refuse it rather than mask the 1s. One host sync, for 4D float masks only
            # (transformers 5 hands this module bool masks from key_padding_mask below); none under a
            # CUDA graph capture, which refuses syncs (the eager warm-up runs check).
            keep = mask == 0
            additive = (keep | (mask <= _ADDITIVE_MASKED)).all()
            refused = ("fastbert attention: a non-bool (batch, 1, 1, kv_length) attention_mask is additive and must "
                       f"hold 0 (keep) or values <= {_ADDITIVE_MASKED:g} (masked)")
            compiling = torch.compiler.is_compiling()  # read once, here: host_sync_allowed says why
            if host_sync_allowed(mask, compiling):
                if not bool(additive):
                    raise ValueError(f"{refused}, got values in [{mask.min().item():g}, {mask.max().item():g}]; "
                                     "pass a 2D 0/1 or bool mask (True/1 = real token) instead")
            elif compiling:
                # no host read in a graph (a 0/1 mask read as additive masked the real tokens and
                # kept the padding, silently): the graph checks it where the mask is. On the CPU that
                # is a RuntimeError with this message; on a GPU a device-side assert, which ends the
                # process (as PyTorch's own index checks do).
                torch._assert_async(additive, refused)
            mask = keep
    if mask.dim() == 2 and mask.shape[0] == 1 and batch > 1:
        mask = mask.expand(batch, -1)
    if mask.dim() != 2 or tuple(mask.shape) != (batch, kv_length):
        raise ValueError(f"fastbert attention: attention_mask must be a key padding mask (batch, kv_length) = "
                         f"{(batch, kv_length)} or (batch, 1, 1, kv_length), got {given}: per-query masks "
                         "(causal, custom 4D) are not supported")
    return mask if mask.dtype == torch.bool else mask != 0


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry: query/key/value (batch, heads, seqlen, head_dim) as transformers
    passes them; returns ((batch, seqlen, heads, head_dim), None): no attention weights exist
    to return, the kernel never forms them."""
    if getattr(module, "is_causal", False) or getattr(module, "is_cross_attention", False) \
            or key.shape[2] != query.shape[2]:
        raise ValueError(f"fastbert attention is bidirectional encoder self-attention; {type(module).__name__} "
                         f"asked for causal or cross-attention (q length {query.shape[2]}, k length {key.shape[2]})")
    # transformers collects the weights when the call or, without it, the config asks for them
    # (config.output_attentions=True set while the model was on eager); returning none would
    # leave `outputs.attentions` an empty tuple.
    if kwargs.get("output_attentions", getattr(getattr(module, "config", None), "output_attentions", False)):
        raise ValueError("fastbert attention never forms the attention probabilities: output_attentions=True "
                         "(in the call or the model's config) needs attn_implementation='eager'")
    mask = None
    if attention_mask is not None:
        mask = _key_padding_bool(attention_mask, query.shape[0], key.shape[2])
    # (B, H, S, D) -> (B, S, H, D): for BERT this undoes transformers' transpose, giving back
    # the linear layers' own (contiguous) outputs; the kernels read the strides either way.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    with _backend_scope(module):
        out = ops.attention(q, k, v, mask, dropout_p=dropout, softmax_scale=scaling)
    return out, None


def register() -> None:
    """Make attn_implementation="fastbert" known to transformers (idempotent), so that
    `from_pretrained(..., attn_implementation="fastbert")` also works: that swaps the attention
    only; patch_transformers also fuses the LayerNorm and GELU steps."""
    attention_interface, mask_interface = _transformers_interfaces()
    attention_interface.register(ATTN_IMPLEMENTATION, attention_forward)
    mask_interface.register(ATTN_IMPLEMENTATION, key_padding_mask)


def _add_layernorm_forward(self, hidden_states, input_tensor):
    # transformers: LayerNorm(dropout(dense(hidden_states)) + input_tensor)
    if not (_plain(self.LayerNorm, torch.nn.LayerNorm) and _plain(self.dropout, torch.nn.Dropout)):
        return type(self).forward(self, hidden_states, input_tensor)
    dropout_p = self.dropout.p if self.training else 0.0
    with _backend_scope(self):
        return ops.add_layernorm(self.dense(hidden_states), input_tensor, self.LayerNorm.weight,
                                 self.LayerNorm.bias, self.LayerNorm.eps, dropout_p)


def _plain(module, cls) -> bool:
    # Fusing reads a module's weights and skips its forward: only right for a `cls` as it is. A LoRA
    # wrapper (peft: weight is the base layer's, its forward adds the adapter), a quantised subclass,
    # a hook (pruning's recomputes the weight; probes and steering change the output) or a forward
    # replaced by another library would be silently dropped: such a module runs unfused.
    if not isinstance(module, torch.nn.Module):  # an activation given as a plain function: no hooks to skip
        return type(module) is cls
    return (type(module) is cls and not module._forward_pre_hooks and not module._forward_hooks
            and "forward" not in vars(module))


def _fusable(module, cls) -> bool:
    """A module whose forward the patch replaces: `cls` itself (a subclass's forward, as adapter
    libraries add, would be skipped) without a forward of its own set on it by another library
    (one of ours, from patching before, is replaced again). Hooks still run around the patched forward."""
    own = vars(module).get("forward")
    return type(module) is cls and (own is None or isinstance(own, _PatchedForward))


def _warn_unfused(model, unfused) -> None:
    if unfused:
        names = [name or type(model).__name__ for name, m in model.named_modules() if any(m is u for u in unfused)]
        warnings.warn(f"patch_transformers: {len(names)} module(s) left unfused, running their own forward (a "
                      f"subclass or a forward set by another library, which fusing would skip): "
                      f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}", stacklevel=4)


def _plain_linear(linear):
    return _plain(linear, torch.nn.Linear)


def _bias_gelu_forward(self, hidden_states):
    # transformers: act(dense(hidden_states)); the bias joins the activation's pass.
    if not (_plain_linear(self.dense) and _plain(self.intermediate_act_fn, self.fastbert_act_type)):
        return self.intermediate_act_fn(self.dense(hidden_states))
    with _backend_scope(self):
        return ops.bias_gelu(F.linear(hidden_states, self.dense.weight), self.dense.bias,
                             self.fastbert_gelu_approximate)


class _PatchedForward(functools.partial):
    """A patched module's forward: forward(module, ...). A partial, not types.MethodType: a bound
    method pickles as a lookup of its name on the module, which fails on load (torch.save(model) /
    torch.load); a partial pickles the function by reference and the module by identity, and
    deepcopy rebinds it to the copy. Loading one registers attn_implementation "fastbert" too:
    in a fresh process the loaded model's config names it, and transformers would not know it."""

    def __reduce__(self):
        return _restore_forward, (self.func, *self.args)


def _restore_forward(forward, module):
    register()
    return _PatchedForward(forward, module)


# model_type -> (transformers module, class prefix): the BERT family whose encoder modules are
# BERT's line for line in transformers 5.x (SelfOutput, Output, Intermediate, SelfAttention;
# tests/test_transformers_integration.py checks each against its unpatched self).
FAMILY = {
    "bert": ("bert", "Bert"),
    "roberta": ("roberta", "Roberta"),
    "xlm-roberta": ("xlm_roberta", "XLMRoberta"),
    "camembert": ("camembert", "Camembert"),
    "electra": ("electra", "Electra"),
    "ernie": ("ernie", "Ernie"),
}


def _family_classes(model_type):
    import importlib

    module_name, prefix = FAMILY[model_type]
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    return types.SimpleNamespace(**{suffix: getattr(modeling, prefix + suffix) for suffix in
                                    ("Layer", "SelfAttention", "SelfOutput", "Output", "Intermediate")})


def _distilbert_block_forward(self, hidden_states, attention_mask=None, **kwargs):
    # transformers' TransformerBlock: a = LN(attention(h) + h); LN(dropout(lin2(act(lin1(a)))) + a)
    sa_norm, out_norm, ffn = self.sa_layer_norm, self.output_layer_norm, self.ffn
    if not (_plain(sa_norm, torch.nn.LayerNorm) and _plain(out_norm, torch.nn.LayerNorm)):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, **kwargs)
    attention_output, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    with _backend_scope(self):
        attended = ops.add_layernorm(attention_output, hidden_states, sa_norm.weight, sa_norm.bias, sa_norm.eps)
        if self.fastbert_gelu_approximate is None or not (
                _plain(ffn, self.fastbert_ffn_type) and _plain_linear(ffn.lin1) and _plain_linear(ffn.lin2)
                and _plain(ffn.dropout, torch.nn.Dropout) and _plain(ffn.activation, self.fastbert_act_type)):
            # another activation, or a wrapped or hooked FFN: the FFN as it is, its dropout inside
            return ops.add_layernorm(ffn(attended), attended, out_norm.weight, out_norm.bias, out_norm.eps)
        inner = ops.bias_gelu(F.linear(attended, ffn.lin1.weight), ffn.lin1.bias, self.fastbert_gelu_approximate)
        dropout_p = ffn.dropout.p if self.training else 0.0
        return ops.add_layernorm(F.linear(inner, ffn.lin2.weight, ffn.lin2.bias), attended, out_norm.weight,
                                 out_norm.bias, out_norm.eps, dropout_p)


def _patch_distilbert(model, config, backend):
    from transformers.models.distilbert import modeling_distilbert as distilbert

    if config.chunk_size_feed_forward:
        raise ValueError("patch_transformers: DistilBERT with chunk_size_feed_forward "
                         f"{config.chunk_size_feed_forward} (chunked FFN) is not supported; set it to 0")
    blocks = [m for m in model.modules() if isinstance(m, distilbert.TransformerBlock)]
    if not blocks:
        raise ValueError(f"patch_transformers: {type(model).__name__} holds no TransformerBlock")
    approximate = _GELU_APPROXIMATE.get(config.activation) if isinstance(config.activation, str) else None
    _warn_unfused(model, [b for b in blocks if not _fusable(b, distilbert.TransformerBlock)])
    for block in blocks:
        block.attention.fastbert_backend = backend
        if not _fusable(block, distilbert.TransformerBlock):
            continue
        block.fastbert_gelu_approximate = approximate
        block.fastbert_ffn_type = distilbert.FFN
        block.fastbert_act_type = type(block.ffn.activation)  # the GELU the config names, as patched
        block.forward = _PatchedForward(_distilbert_block_forward, block)
        block.fastbert_backend = backend
    return [block.attention for block in blocks]


def _patch_family(model, config, backend):
    family = _family_classes(config.model_type)
    if not any(isinstance(m, family.Layer) for m in model.modules()):
        raise ValueError(f"patch_transformers: {type(model).__name__} holds no {family.Layer.__name__}")
    approximate = _GELU_APPROXIMATE.get(config.hidden_act) if isinstance(config.hidden_act, str) else None
    unfused = [m for m in model.modules() if isinstance(m, (family.SelfOutput, family.Output, family.Intermediate))
               and not any(_fusable(m, cls) for cls in (family.SelfOutput, family.Output, family.Intermediate))]
    _warn_unfused(model, unfused)
    for module in model.modules():
        if any(module is m for m in unfused):
            continue
        if isinstance(module, (family.SelfOutput, family.Output)):
            module.forward = _PatchedForward(_add_layernorm_forward, module)
        elif isinstance(module, family.Intermediate) and approximate is not None:
            module.fastbert_gelu_approximate = approximate
            module.fastbert_act_type = type(module.intermediate_act_fn)  # the GELU the config names, as patched
            module.forward = _PatchedForward(_bias_gelu_forward, module)
        elif not isinstance(module, family.SelfAttention):
            continue
        module.fastbert_backend = backend
    return [m for m in model.modules() if isinstance(m, family.SelfAttention)]


def patch_transformers(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """Run a transformers BERT-family encoder (BertModel, RobertaModel, ElectraModel,
    DistilBertModel, ... or any of their head models) on fastbert's kernels, in place.
    Returns the model.

    Raises ValueError for a model outside FAMILY and DistilBERT or without encoder layers (or not
    a PreTrainedModel: a submodule), a decoder (causal) or cross-attention configuration, or an
    unknown backend name; ImportError for a transformers without the attention hooks. Patching
    twice is harmless. A module of a subclass (adapters) or with a forward set on it keeps that
    forward, unfused, and a warning names it."""
    if backend is not None:
        check_backend_name(backend)
    import transformers

    if not isinstance(model, transformers.PreTrainedModel) and not callable(getattr(model, "set_attn_implementation",
                                                                                  None)):
        # a submodule (model.bert.encoder) has a config too, but no set_attn_implementation: it was
        # half patched (its FFNs fused, its attention not) before an AttributeError
        raise ValueError(f"patch_transformers expects a transformers model of the BERT family (a PreTrainedModel such "
                         f"as BertModel or one of its head models), got {type(model).__name__}; patch the model "
                         "that holds it")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILY and model_type != "distilbert":
        raise ValueError(f"patch_transformers expects a transformers model of the BERT family (config.model_type "
                         f"in {sorted(FAMILY) + ['distilbert']}), got {type(model).__name__}"
                         + (f" with model_type {model_type!r}" if config is not None else ""))
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("patch_transformers: fastbert attention is bidirectional encoder self-attention; "
                         "this model is configured as a decoder (is_decoder / add_cross_attention)")
    if getattr(config, "position_embedding_type", None) not in (None, "absolute"):
        # relative_key(_query) adds position scores inside the attention (transformers < 5.17 still has
        # them): the attention function here would leave them out without a word
        raise ValueError(f"patch_transformers: position_embedding_type {config.position_embedding_type!r} is not "
                         "supported; fastbert attention takes absolute position embeddings only")
    register()
    attentions = (_patch_distilbert if model_type == "distilbert" else _patch_family)(model, config, backend)
    _checkpoint_reruns_keep_the_backend(model)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    # The mask is built from the model's config and each attention module dispatches on its own:
    # an EncoderDecoderModel's encoder gets a config of its own while its layers keep the one they
    # were built with, so the layers stayed on SDPA and read fastbert's (batch, seqlen) key mask as
    # (1, 1, batch, seqlen). Every attention module's config names the implementation the mask is for.
    for module in attentions:
        module_config = getattr(module, "config", None)
        if module_config is not None and module_config._attn_implementation != ATTN_IMPLEMENTATION:
            module_config._attn_implementation_internal = ATTN_IMPLEMENTATION
    return model


# -- gradient checkpointing ----------------------------------------------------------------------
# transformers' gradient checkpointing reruns each layer inside backward(), where a use_backend
# scope around the forward alone has closed: the rerun would pick the backend again ("auto" gives
# other kernels, with other dropout masks) and the gradients came out wrong (use_reentrant=True)
# or checkpoint refused the recomputed values (False). Each checkpoint call now reopens the scope
# its forward ran in, as BertModel._run_layer does; patched modules with a backend of their own
# reopen theirs anyway.

class _CheckpointKeepingTheBackend:
    """A layer's checkpoint function (transformers': a partial of torch.utils.checkpoint) whose
    reruns run in the backend scope of the forward. A class, not a closure: patched models pickle."""

    def __init__(self, checkpoint_func):
        self.checkpoint_func = checkpoint_func

    def __call__(self, function, *args, **kwargs):
        if torch.compiler.is_compiling():
            # a compiled backward reruns the traced graph, not this Python (and a scope opened in
            # the checkpointed region is a side effect Dynamo refuses)
            return self.checkpoint_func(function, *args, **kwargs)
        backend = ops.get_backend()

        def rerunnable(*fn_args, **fn_kwargs):
            with ops.use_backend(backend):
                return function(*fn_args, **fn_kwargs)
        return self.checkpoint_func(rerunnable, *args, **kwargs)


def _wrap_checkpoint_funcs(model: torch.nn.Module) -> None:
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not isinstance(func, _CheckpointKeepingTheBackend):
            module._gradient_checkpointing_func = _CheckpointKeepingTheBackend(func)


class _SetCheckpointingKeepingTheBackend:
    """The instance's _set_gradient_checkpointing: the class's, then the wrap. Holds its module
    (pickle and deepcopy carry the reference over to the copy)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        type(self.module)._set_gradient_checkpointing(self.module, *args, **kwargs)
        _wrap_checkpoint_funcs(self.module)


def _checkpoint_reruns_keep_the_backend(model: torch.nn.Module) -> None:
    """Checkpointing enabled before the patch is wrapped now; enabled later (gradient_ or
    activation_checkpointing_enable, on the model or a submodel: both reach
    _set_gradient_checkpointing), as it is set."""
    _wrap_checkpoint_funcs(model)
    for module in model.modules():
        if callable(getattr(type(module), "_set_gradient_checkpointing", None)):
            module._set_gradient_checkpointing = _SetCheckpointingKeepingTheBackend(module)
