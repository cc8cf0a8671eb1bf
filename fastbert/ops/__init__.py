"""fastbert.ops: every fusable step of BERT, each with three backends.

    attention(q, k, v, mask=None, dropout_p=0.0, softmax_scale=None, *, seed=None)
    attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, *, seed=None)
    bias_gelu(x, bias, approximate="none")              # "tanh": the tanh approximation
    add_layernorm(x, residual, weight, bias, eps, dropout_p=0.0, *, copy_in_x_dtype=False)
    layernorm_gelu(x, weight, bias, eps)
    span_score(start_logits, end_logits, mask=None, max_answer_len=30, topk=1)

Inputs are validated once here, before dispatch; the backend ("torch",
"triton", "cuda") comes from `use_backend`/`set_backend` or, by default, the
fastest one that runs on the inputs' device.
"""
from ._backend import available_backends, describe_default, get_backend, set_backend, use_backend
from .attention import attention, attention_varlen
from .gelu import bias_gelu
from .layernorm import add_layernorm, layernorm_gelu
from .span import span_score

__all__ = [
    "attention", "attention_varlen", "bias_gelu", "add_layernorm", "layernorm_gelu", "span_score",
    "use_backend", "set_backend", "get_backend", "available_backends", "describe_default",
]
