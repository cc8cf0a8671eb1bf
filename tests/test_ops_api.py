"""The public Python API under the mistakes users make: every bad input gets a clear Python
exception naming the argument (the same one on the torch and the triton backend), never a
crash deep inside a kernel, a NaN or a silent wrong answer. All inputs tiny: seconds in all."""
import copy

import pytest
import torch

import fastbert
from fastbert import ops

BACKENDS = ["torch", "triton"]  # triton runs through the interpreter on the CPU (conftest)


def _qkv(batch=2, seqlen=5, heads=2, head_dim=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, seqlen, heads, head_dim, generator=g, dtype=dtype) for _ in range(3)]


def _packed():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(7, 2, 16, generator=g) for _ in range(3))
    return q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32)


# -- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale, error, match", [
    (float("nan"), ValueError, "softmax_scale must be a finite float > 0"),
    (float("inf"), ValueError, "softmax_scale must be a finite float > 0"),
    (0.0, ValueError, "softmax_scale must be a finite float > 0"),
    (-0.25, ValueError, "softmax_scale must be a finite float > 0"),
    ("0.25", TypeError, "softmax_scale must be None or a float"),
    (True, TypeError, "softmax_scale must be None or a float > 0, got bool"),  # a bool is not a number here
])
def test_attention_rejects_bad_softmax_scale(backend, scale, error, match):
    q, k, v = _qkv()
    with ops.use_backend(backend), pytest.raises(error, match=f"attention: {match}"):
        ops.attention(q, k, v, softmax_scale=scale)
    qp, kp, vp, cu = _packed()
    with ops.use_backend(backend), pytest.raises(error, match=f"attention_varlen: {match}"):
        ops.attention_varlen(qp, kp, vp, cu, 4, softmax_scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_valid_softmax_scale_still_works(backend):
    q, k, v = _qkv()
    with ops.use_backend(backend):
        out = ops.attention(q, k, v, softmax_scale=2)  # an int is a number too
    ref = ops.attention(q.double(), k.double(), v.double(), softmax_scale=2.0)
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [None, "0.1", False])
def test_attention_rejects_non_number_dropout(backend, dropout_p):
    q, k, v = _qkv()
    with ops.use_backend(backend), pytest.raises(TypeError, match="attention: dropout_p must be a float"):
        ops.attention(q, k, v, dropout_p=dropout_p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_rejects_integer_inputs(backend):
    q, k, v = (t.to(torch.int32) for t in _qkv())
    with ops.use_backend(backend), pytest.raises(TypeError, match="attention: q, k, v must be floating-point"):
        ops.attention(q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_rejects_zero_head_dim(backend):
    q, k, v = _qkv(head_dim=0)
    with ops.use_backend(backend), pytest.raises(ValueError, match=r"attention: head_dim .* must be >= 1"):
        ops.attention(q, k, v)


# -- layernorm / gelu ---------------------------------------------------------------------------


def _rows():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(3, 8, generator=g) for _ in range(2)] + [torch.randn(8, generator=g) for _ in range(2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps, error, match", [
    (-1.0, ValueError, "eps must be a finite float >= 0"),
    (float("nan"), ValueError, "eps must be a finite float >= 0"),
    (float("inf"), ValueError, "eps must be a finite float >= 0"),
    (None, TypeError, "eps must be a float"),
    ("1e-5", TypeError, "eps must be a float"),
    (True, TypeError, "eps must be a float >= 0, got bool"),
])
def test_layernorm_rejects_bad_eps(backend, eps, error, match):
    x, residual, weight, bias = _rows()
    with ops.use_backend(backend):
        with pytest.raises(error, match=f"add_layernorm: {match}"):
            ops.add_layernorm(x, residual, weight, bias, eps)
        with pytest.raises(error, match=f"layernorm_gelu: {match}"):
            ops.layernorm_gelu(x, weight, bias, eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_layernorm_rejects_non_number_dropout_and_scalar_x(backend):
    x, residual, weight, bias = _rows()
    with ops.use_backend(backend):
        with pytest.raises(TypeError, match="add_layernorm: dropout_p must be a float"):
            ops.add_layernorm(x, residual, weight, bias, 1e-5, None)
        one = torch.ones(())
        with pytest.raises(ValueError, match="add_layernorm: x must have at least one dimension"):
            ops.add_layernorm(one, one, one, one, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gelu_zero_features(backend):
    x = torch.randn(3, 0, requires_grad=True)
    bias = torch.randn(0, requires_grad=True)
    with ops.use_backend(backend):
        y = ops.bias_gelu(x, bias)
    assert y.shape == (3, 0)
    y.sum().backward()
    assert x.grad.shape == (3, 0) and bias.grad.shape == (0,)


# -- BertModel ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    config = fastbert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=8)
    torch.manual_seed(0)
    return fastbert.BertModel(config).eval()


@pytest.mark.parametrize("mask, match", [
    (torch.tensor([[0, 0, 0, 0], [0, 0, -10000, -10000]]), r"attention_mask must hold 0/1 .* \[-10000, 0\]"),
    (torch.tensor([[1, 1, 1, 1], [1, 2, 0, 0]]), r"attention_mask must hold 0/1 .* \[0, 2\]"),
])
def test_model_rejects_integer_mask_beyond_0_1(tiny, mask, match):
    with pytest.raises(ValueError, match=match):
        tiny(torch.ones(2, 4, dtype=torch.long), attention_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_model_rejects_non_integer_token_type_ids(tiny, dtype):
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="token_type_ids must be int64 or int32"):
        tiny(ids, token_type_ids=torch.zeros(2, 4, dtype=dtype))


def test_model_rejects_unknown_backend_at_construction(tiny):
    with pytest.raises(ValueError, match="backend must be one of"):
        fastbert.BertModel(tiny.config, backend="cdua")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpadded_model_with_every_row_padded(tiny, backend):
    model = copy.deepcopy(tiny)
    model.unpad = True
    model.backend = backend
    with torch.no_grad():
        out = model(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.zeros(2, 4, dtype=torch.long))
    # unpad: padded positions hold zeros; the pooler reads them as they are
    assert out.last_hidden_state.shape == (2, 4, 32)
    assert torch.equal(out.last_hidden_state, torch.zeros(2, 4, 32))
    assert torch.isfinite(out.pooler_output).all()


@pytest.mark.parametrize("name, error, match", [
    (None, TypeError, "name_or_path must be a model folder"),
    (3, TypeError, "name_or_path must be a model folder"),
    ("", ValueError, "name_or_path is empty"),
])
def test_from_pretrained_rejects_non_paths(name, error, match):
    with pytest.raises(error, match=match):
        fastbert.BertModel.from_pretrained(name)


# -- Tokenizer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return fastbert.Tokenizer.from_pretrained("default")


def test_tokenizer_bad_calls(tokenizer):
    with pytest.raises(ValueError, match="texts must hold at least one text"):
        tokenizer([])
    with pytest.raises(TypeError, match="max_length must be an int or None, got float"):
        tokenizer(["hello"], max_length=5.5)
    with pytest.raises(ValueError, match="only_second.*pass pairs"):
        tokenizer(["a b c d e f"], max_length=4, truncation="only_second")


def test_tokenizer_decode_checks_ids(tokenizer):
    assert tokenizer.decode(torch.tensor([101, 7592, 102])) == tokenizer.decode([101, 7592, 102])
    with pytest.raises(ValueError, match="decode: ids must be one sequence"):
        tokenizer.decode(torch.tensor([[101, 7592, 102]]))
    with pytest.raises(ValueError, match=r"decode: ids\[0\] = -1 is outside the vocabulary"):
        tokenizer.decode([-1])
    with pytest.raises(ValueError, match=r"decode: ids\[1\] = 1000000 is outside the vocabulary"):
        tokenizer.decode([101, 10**6])


# -- patch_transformers -------------------------------------------------------------------------


def test_patched_model_refuses_non_additive_4d_float_mask():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    ref = transformers.BertModel(config).eval()
    model = fastbert.patch_transformers(copy.deepcopy(ref), backend="torch")
    ids = torch.randint(1, 50, (2, 6))
    keep = torch.ones(2, 6)
    keep[1, 4:] = 0
    # a 0/1 float 4D mask: transformers adds it to the scores; masking the 1s would be wrong
    with pytest.raises(ValueError, match="additive and must hold 0 .* got values in \\[0, 1\\]"):
        model(ids, attention_mask=keep[:, None, None, :])
    # the additive form transformers builds works as before
    additive = ((1 - keep) * torch.finfo(torch.float32).min)[:, None, None, :]
    with torch.no_grad():
        got = model(ids, attention_mask=additive).last_hidden_state
        want = ref(ids, attention_mask=additive).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)


def test_argument_checks_trace_under_compile_with_dynamic_floats():
    """The number checks (softmax_scale, dropout_p, eps) must not break a fullgraph trace where
    Dynamo passes those floats symbolically (math.isfinite would)."""
    q, k, v = _qkv()
    x, residual, weight, bias = _rows()

    def f(q, k, v, scale, eps):
        return (ops.attention(q, k, v, softmax_scale=scale).sum()
                + ops.add_layernorm(x, residual, weight, bias, eps).sum())

    compiled = torch.compile(f, fullgraph=True, backend="eager", dynamic=True)
    with ops.use_backend("torch"):
        for scale in (0.25, 0.5):
            assert torch.allclose(compiled(q, k, v, scale, 1e-5), f(q, k, v, scale, 1e-5))


def test_a_second_dropout_value_traces_under_compile():
    """A second dropout_p makes it a SymFloat in the trace; dropout_p's float32 check (struct.pack)
    sent Dynamo into a RecursionError there (a dropout sweep in one process with --compile)."""
    q, k, v = _qkv()
    x, residual, weight, bias = _rows()

    def f(p):
        return ops.attention(q, k, v, dropout_p=p).sum() + ops.add_layernorm(x, residual, weight, bias, 1e-5, p).sum()

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    with ops.use_backend("torch"):
        for p in (0.1, 0.2, 0.3):
            torch.manual_seed(0)
            expected = f(p)
            torch.manual_seed(0)
            assert torch.allclose(compiled(p), expected), p


# -- dropout_p range, backend dispatch ----------------------------------------------------------


def test_dropout_rounding_check_holds_where_dynamo_runs_the_op_eagerly():
    """Dynamo runs a frame eagerly when it gives up on it (a graph break it cannot resume, the
    recompile limit) and still compiles the frames that one calls: check_dropout, compiled on its
    own, read is_compiling() as True and skipped the float32 rounding check of an eager call."""
    q, k, v = _qkv()
    attention = torch._dynamo.disable(ops.attention, recursive=False)
    torch._dynamo.reset()
    try:
        run = torch.compile(lambda p: attention(q, k, v, dropout_p=p) + 0, backend="eager")
        with ops.use_backend("torch"), pytest.raises(ValueError, match="rounds to 0.0 in float32"):
            run(1e-46)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_dropout_is_refused_by_every_op(backend):
    """dropout_p must be in [0, 1): a negative p is refused like p = 1 (the kernels would treat it
    as "no dropout" without a word, the torch backend would raise deep inside F.dropout)."""
    q, k, v = _qkv()
    qp, kp, vp, cu = _packed()
    x, residual, weight, bias = _rows()
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"attention: dropout_p must be in \[0, 1\), got -0.1"):
            ops.attention(q, k, v, dropout_p=-0.1)
        with pytest.raises(ValueError, match=r"attention_varlen: dropout_p must be in \[0, 1\), got -0.1"):
            ops.attention_varlen(qp, kp, vp, cu, 4, dropout_p=-0.1)
        with pytest.raises(ValueError, match=r"add_layernorm: dropout_p must be in \[0, 1\), got -0.1"):
            ops.add_layernorm(x, residual, weight, bias, 1e-5, -0.1)
        # p that float32 rounds to 0 or 1: the CUDA add_layernorm backward returned uninitialised dx for 1e-46
        for p, p32 in ((1e-46, "0.0"), (1 - 1e-9, "1.0")):
            with pytest.raises(ValueError, match=f"attention: dropout_p = {p!r} rounds to {p32} in float32"):
                ops.attention(q, k, v, dropout_p=p)
            with pytest.raises(ValueError, match=f"attention_varlen: dropout_p = {p!r} rounds to {p32} in float32"):
                ops.attention_varlen(qp, kp, vp, cu, 4, dropout_p=p)
            with pytest.raises(ValueError, match=f"add_layernorm: dropout_p = {p!r} rounds to {p32} in float32"):
                ops.add_layernorm(x, residual, weight, bias, 1e-5, p)
        assert ops.add_layernorm(x, residual, weight, bias, 1e-5, 1e-40).shape == x.shape  # a float32 subnormal


def test_backend_choice_default_scopes_and_nesting():
    """"auto" runs CPU tensors on "torch" (the interpreter is for tests, never a default);
    set_backend sets the process default, use_backend overrides it for its block, and leaving a
    nested block restores the enclosing choice, not the default. Each choice is checked where the
    op dispatches: a head_dim the Triton kernels do not take is refused by the "triton" backend
    only."""
    from fastbert.ops._backend import resolve
    cpu = torch.device("cpu")
    q, k, v = _qkv(head_dim=40)

    def runs_on():
        try:
            ops.attention(q, k, v)
        except ValueError as err:
            assert "not supported by the Triton backend" in str(err)
            return "triton"
        return "torch"

    assert ops.get_backend() == "auto" and resolve(cpu) == "torch" and runs_on() == "torch"
    assert ops.describe_default("cpu").startswith("fastbert: ops on cpu run on backend 'torch' (usable: torch")
    try:
        ops.set_backend("triton")
        assert resolve(cpu) == "triton" and runs_on() == "triton"
        with ops.use_backend("torch"):
            assert resolve(cpu) == "torch" and runs_on() == "torch"
            with ops.use_backend("triton"):
                assert resolve(cpu) == "triton" and runs_on() == "triton"
            assert ops.get_backend() == "torch" and runs_on() == "torch", "the inner block did not restore the outer"
        assert ops.get_backend() == "triton" and runs_on() == "triton", "the block did not restore set_backend's"
    finally:
        ops.set_backend("auto")
    assert resolve(cpu) == "torch"


# -- fake (meta) functions of the cuda custom ops ------------------------------------------------


def test_cuda_custom_ops_fake_functions_match_the_ops(cuda_device, monkeypatch):
    """torch.compile builds the graph from each registered cuda op's fake function; an output
    shape or dtype that differs from what the op returns (lse's (B, H, S), y float32 beside a
    half x under autocast, dbias in bias's dtype, span scores float32) miscompiles downstream.
    Every op is run on real inputs (the CPU emulation without a GPU) and on fake ones: the outputs
    must agree in shape, dtype and strides (torch.library.opcheck's fake-tensor test)."""
    from test_model_backends import _cuda_attention_on
    if cuda_device.type == "cuda" and "cuda" not in ops.available_backends(cuda_device):
        pytest.skip("fastbert._C is not built here")
    _cuda_attention_on(cuda_device, monkeypatch)
    g = torch.Generator().manual_seed(5)

    def rand(*shape, dtype=torch.float16):
        return torch.randn(*shape, generator=g).to(device=cuda_device, dtype=dtype)

    F = torch.ops.fastbert
    q, k, v = rand(2, 8, 3, 32), rand(2, 8, 3, 32), rand(2, 8, 3, 32)
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3], device=cuda_device)
    out, lse, res = F.attention_fwd_cuda(q, k, v, mask, None, 8, 0.0, 0.2, None, True)
    qp, kp, vp = rand(11, 3, 32), rand(11, 3, 32), rand(11, 3, 32)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32, device=cuda_device)
    outp, lsep, _ = F.attention_fwd_cuda(qp, kp, vp, None, cu, 7, 0.0, 0.2, None, False)
    x16, r32, w32, b32 = rand(3, 4, 16), rand(3, 4, 16, dtype=torch.float32), rand(16, dtype=torch.float32), rand(16, dtype=torch.float32)
    _, _, mean, rstd = F.add_layernorm_fwd_cuda(x16, r32, w32, b32, 1e-5, 0.0, None, True)
    _, mean1, rstd1 = F.layernorm_gelu_fwd_cuda(x16, w32, b32, 1e-5)
    s, e = rand(2, 9), rand(2, 9)
    calls = [
        (F.attention_fwd_cuda, (q, k, v, mask, None, 8, 0.0, 0.2, None, True)),
        (F.attention_fwd_cuda, (qp, kp, vp, None, cu, 7, 0.0, 0.2, None, False)),
        (F.attention_bwd_cuda, (rand(2, 8, 3, 32), q, k, v, out, lse, mask, None, 8, 0.0, 0.2, None, res)),
        (F.attention_bwd_cuda, (rand(11, 3, 32), qp, kp, vp, outp, lsep, None, cu, 7, 0.0, 0.2, None, None)),
        (F.add_layernorm_fwd_cuda, (x16, r32, w32, b32, 1e-5, 0.0, None, True)),
        (F.add_layernorm_fwd_cuda, (x16, x16, w32, b32, 1e-5, 0.0, None, False)),
        (F.add_layernorm_bwd_cuda, (r32, x16, r32, w32, mean, rstd, 0.0, None, rand(3, 4, 16))),
        (F.add_layernorm_bwd_cuda, (x16, x16, x16, w32, mean, rstd, 0.0, None, None)),
        (F.layernorm_gelu_fwd_cuda, (x16, w32, b32, 1e-5)),
        (F.layernorm_gelu_bwd_cuda, (rand(3, 4, 16), x16, w32, b32, mean1, rstd1)),
        (F.bias_gelu_fwd_cuda, (x16, b32, "none")),
        (F.bias_gelu_bwd_cuda, (rand(3, 4, 16), x16, b32, "tanh")),
        (F.span_score_cuda, (s, e, None, 4, 3)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils="test_faketensor")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_on_another_device_are_named(backend):
    """Every tensor argument's device is checked (meta stands in for a second device), v and
    bias included, not only the first ones."""
    q, k, v = _qkv()
    x, residual, weight, bias = _rows()
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="attention: q, k, v must be on one device, got cpu, cpu, meta"):
            ops.attention(q, k, v.to("meta"))
        with pytest.raises(ValueError, match="add_layernorm: bias is on meta but x is on cpu"):
            ops.add_layernorm(x, residual, weight, bias.to("meta"), 1e-5)
        with pytest.raises(TypeError, match="layernorm_gelu: bias must be a torch.Tensor, got float"):
            ops.layernorm_gelu(x, weight, 0.0, 1e-5)


# The interpreter computes the tile's padded rows too: with eps = 0 they divide 0 by 0 (never stored).
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_layernorm_takes_eps_zero(backend):
    """eps is a finite number >= 0: 0 is allowed (rows with spread need none)."""
    x, residual, weight, bias = _rows()
    with ops.use_backend(backend):
        y = ops.add_layernorm(x, residual, weight, bias, 0.0)
        z = ops.layernorm_gelu(x, weight, bias, 0)
    def layer_norm_eps0(h):  # torch's own, in float64: independent of the torch backend's reference
        return torch.nn.functional.layer_norm(h.double(), h.shape[-1:], weight.double(), bias.double(), eps=0.0)
    assert torch.allclose(y.double(), layer_norm_eps0(x + residual), atol=1e-5)
    assert torch.allclose(z.double(), torch.nn.functional.gelu(layer_norm_eps0(x)), atol=1e-5)


# -- double backward -----------------------------------------------------------------------------


def _op_cases():
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    q, k, v = _qkv()
    return {
        "attention": ([q.requires_grad_(), k.requires_grad_(), v.requires_grad_()], ops.attention),
        "add_layernorm": ([rand(4, 16), rand(4, 16), rand(16), rand(16)],
                          lambda x, r, w, b: ops.add_layernorm(x, r, w, b, 1e-5)),
        "layernorm_gelu": ([rand(4, 16), rand(16), rand(16)], lambda x, w, b: ops.layernorm_gelu(x, w, b, 1e-5)),
        "bias_gelu": ([rand(4, 16), rand(16)], ops.bias_gelu),
    }


@pytest.mark.parametrize("op", ["attention", "add_layernorm", "layernorm_gelu", "bias_gelu"])
def test_kernel_gradients_refuse_to_be_differentiated_again(op):
    """A kernel's gradient carries no graph: a gradient penalty through one (create_graph=True, then
    a loss on the gradient) took every second-order term through the op as zero, silently (off by
    up to 8 against the torch backend on add_layernorm). Now it is a clear error; an ordinary
    gradient, and the torch backend's double backward, are untouched."""
    inputs, fn = _op_cases()[op]
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match=f"{op}: the gradient of this fused kernel is not differentiable "
                                               r"again .*use_backend\('torch'\)"):
            torch.autograd.grad(fn(*inputs).square().sum(), inputs[0], create_graph=True)
        assert torch.autograd.grad(fn(*inputs).square().sum(), inputs[0])[0].isfinite().all()
    if op != "attention":  # PyTorch's CPU attention has no double backward of its own
        with ops.use_backend("torch"):
            grad = torch.autograd.grad(fn(*inputs).square().sum(), inputs[0], create_graph=True)[0]
            assert torch.autograd.grad(grad.square().sum(), inputs[0])[0].abs().sum() > 0


@pytest.mark.parametrize("op", ["attention", "add_layernorm", "layernorm_gelu", "bias_gelu"])
def test_batched_gradients_are_named_not_a_storage_error(op, cuda_device, monkeypatch):
    """jacobian(vectorize=True) and autograd.grad(is_grads_batched=True) vmap the backward: a kernel
    cannot read a batched gradient, and the error was "Cannot access storage of BatchedTensorImpl"
    (triton) or "...doesn't have storage" (cuda). The torch backend computes it."""
    from test_model_backends import _cuda_attention_on

    _cuda_attention_on(cuda_device, monkeypatch)
    inputs, fn = _op_cases()[op]
    if op == "attention":  # a head_dim the cuda kernels take
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randn(1, 5, 2, 32, generator=gen).requires_grad_() for _ in range(3)]
    dtype = torch.float16 if cuda_device.type == "cpu" else torch.bfloat16
    first = inputs[0].detach()
    for backend, x in (("triton", first), ("cuda", first.to(cuda_device, dtype))):
        rest = [t.detach().to(x.device, x.dtype) for t in inputs[1:]]
        if backend == "triton" and cuda_device.type == "cuda":
            rest, x = [t.to(cuda_device) for t in rest], first.to(cuda_device)
        with ops.use_backend(backend), pytest.raises(RuntimeError, match=f"{op}: a batched gradient .*'torch'"):
            torch.autograd.functional.jacobian(lambda t: fn(t, *rest), x, vectorize=True)
    with ops.use_backend("torch"):
        jac = torch.autograd.functional.jacobian(lambda t: fn(t, *inputs[1:]), first, vectorize=True)
    assert jac.isfinite().all() and jac.abs().sum() > 0


# -- "auto" on a GPU: inputs no kernel takes ---------------------------------------------------


def test_auto_runs_inputs_no_kernel_takes_on_the_torch_backend(monkeypatch):
    """On a GPU "auto" picks cuda, then triton for what cuda cannot take; inputs neither takes
    (float64, head_dim 8 as in transformers' tiny test BERTs, head_dim 256, rows past 4096) raised
    the triton or cuda error there, where "auto" should run them on torch. Simulated without a GPU:
    resolve() answers under "auto" what it answers for a CUDA tensor with fastbert._C built, so
    every case here must fall through to the torch backend (no kernel can run on these tensors)."""
    import sys

    from fastbert.ops import _backend
    import fastbert.ops.gelu as gelu_module
    import fastbert.ops.layernorm as layernorm_module
    attention_module = sys.modules["fastbert.ops.attention"]
    for module in (attention_module, layernorm_module, gelu_module):
        monkeypatch.setattr(module, "resolve", lambda device, real=module.resolve:
                            "cuda" if _backend.get_backend() == "auto" else real(device))
    monkeypatch.setattr(attention_module, "available_backends", lambda device: ["torch", "triton", "cuda"])
    g = torch.Generator().manual_seed(4)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype)

    w64, b64 = rand(8, dtype=torch.float64), rand(8, dtype=torch.float64)
    wide = rand(2, 5000)
    cases = {
        "attention head_dim 8": lambda: ops.attention(*[rand(1, 4, 2, 8) for _ in range(3)]),
        "attention head_dim 256": lambda: ops.attention(*[rand(1, 4, 1, 256) for _ in range(3)]),
        "attention float64": lambda: ops.attention(*[rand(1, 4, 2, 64, dtype=torch.float64) for _ in range(3)]),
        "add_layernorm float64": lambda: ops.add_layernorm(rand(2, 8, dtype=torch.float64),
                                                          rand(2, 8, dtype=torch.float64), w64, b64, 1e-5),
        "add_layernorm hidden 5000": lambda: ops.add_layernorm(wide, wide, torch.ones(5000), torch.zeros(5000), 1e-5),
        "layernorm_gelu float64": lambda: ops.layernorm_gelu(rand(2, 8, dtype=torch.float64), w64, b64, 1e-5),
        "bias_gelu float64": lambda: ops.bias_gelu(rand(2, 8, dtype=torch.float64), b64),
    }
    for name, call in cases.items():
        state = g.get_state()
        got = call()
        g.set_state(state)
        with ops.use_backend("torch"):
            expected = call()
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
    with ops.use_backend("triton"), pytest.raises(ValueError, match="head_dim = 8 is not supported by the Triton"):
        ops.attention(*[rand(1, 4, 2, 8) for _ in range(3)])       # asked for by name: its own error


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_seeds_are_named(backend):
    """seed: None, an int in [0, 2**31) or a one-element int64 tensor. "abc" failed in int(), 1.5 was
    truncated, 2**64 overflowed in the launcher, and 2**31 gave the mask of 2**63 - 1 on triton."""
    q, k, v = _qkv()
    qp, kp, vp, cu = _packed()
    with ops.use_backend(backend):
        for seed, error, message in (("abc", TypeError, "seed must be None or an int in"),
                                     (1.5, TypeError, "seed must be None or an int in"),
                                     (True, TypeError, "seed must be None or an int in"),
                                     (-1, ValueError, r"seed must be in \[0, 2\*\*31\), got -1"),
                                     (2**31, ValueError, r"seed must be in \[0, 2\*\*31\), got 2147483648"),
                                     (torch.tensor([1.0]), ValueError, "a tensor seed must hold one int64"),
                                     (torch.tensor([1, 2]), ValueError, "a tensor seed must hold one int64")):
            with pytest.raises(error, match=f"attention: {message}"):
                ops.attention(q, k, v, dropout_p=0.1, seed=seed)
            with pytest.raises(error, match=f"attention_varlen: {message}"):
                ops.attention_varlen(qp, kp, vp, cu, 4, dropout_p=0.1, seed=seed)
        assert ops.attention(q, k, v, dropout_p=0.1, seed=2**31 - 1).shape == q.shape
        if backend != "torch":  # whose dropout draws from torch's generator (the seed is the kernels')
            assert torch.equal(ops.attention(q, k, v, dropout_p=0.5, seed=torch.tensor([7])),
                               ops.attention(q, k, v, dropout_p=0.5, seed=7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("varlen", [False, True])
def test_attention_under_autocast_returns_q_dtype_on_every_backend(backend, varlen):
    """autocast ran the torch backend's SDPA in float16 for float32 q, k, v (float16 out, 2e-3 off),
    while the kernel backends return q's dtype."""
    q, k, v = _qkv()
    qp, kp, vp, cu = _packed()
    call = (lambda: ops.attention_varlen(qp, kp, vp, cu, 4)) if varlen else (lambda: ops.attention(q, k, v))
    with ops.use_backend(backend):
        plain = call()
        with torch.autocast("cpu", dtype=torch.float16):
            autocast = call()
    assert autocast.dtype == plain.dtype == torch.float32
    assert torch.equal(autocast, plain)


def test_a_compiled_call_follows_a_later_backend_choice():
    """The backend asked for outside a compiled region was read once while tracing, unguarded:
    set_backend or use_backend around a compiled model changed nothing, silently (a check against
    the "torch" reference ran the kernels). It is guarded now: another choice re-traces. Here the
    choice "cuda" on CPU tensors must raise as in eager mode, and "auto" run again."""
    x, residual, weight, bias = _rows()
    q, k, v = _qkv()

    def f(x):
        return ops.add_layernorm(x, residual, weight, bias, 1e-5).sum() + ops.attention(q, k, v).sum()

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    expected = f(x)
    assert torch.allclose(compiled(x), expected)
    try:
        ops.set_backend("cuda")
        with pytest.raises(Exception, match="fastbert backend 'cuda' cannot run on a cpu tensor"):
            compiled(x)
    finally:
        ops.set_backend("auto")
    assert torch.allclose(compiled(x), expected)
    with ops.use_backend("cuda"), pytest.raises(Exception, match="fastbert backend 'cuda' cannot run on a cpu tensor"):
        compiled(x)
    assert torch.allclose(compiled(x), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes a second GPU; a real one would be used instead")
def test_triton_launchers_run_on_their_tensors_device(monkeypatch):
    """Triton launches on the current device and its stream: tensors on cuda:1 while cuda:0 is current
    ran their kernels on cuda:0. Each public launcher makes the tensors' device current first (here
    with fake cuda tensors and the device switch recorded: nothing runs)."""
    pytest.importorskip("triton")
    import fastbert.kernels.attention as KA
    import fastbert.kernels.gelu as KG
    import fastbert.kernels.layernorm as KL
    import fastbert.kernels.span as KS
    from torch._subclasses.fake_tensor import FakeTensorMode

    launchers = [KA.attention_fwd, KA.attention_bwd, KG.bias_gelu_fwd, KG.bias_gelu_bwd, KL.add_layernorm_fwd,
                 KL.add_layernorm_bwd, KL.layernorm_gelu_fwd, KL.layernorm_gelu_bwd, KL.add_layernorm_keep_mask,
                 KS.span_score_fwd, KA._fill_dropout_mask]
    assert all(getattr(f, "__wrapped__", None) is not None for f in launchers)   # each goes through on_input_device
    switched = []

    class Recorder:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            switched.append(self.index)

        def __exit__(self, *exc):
            return False

    ran = KG.on_input_device(lambda *args, **kwargs: "ran")
    with FakeTensorMode():
        on_1, on_0 = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:0")
        # after making them: a CUDA build of torch would initialise CUDA for a fake tensor if told it had one
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(KG, "_cuda_present", lambda: True)
        monkeypatch.setattr(torch.cuda, "device", Recorder)
        assert ran(3, on_1, wrap=None) == "ran" and switched == [1]
        assert ran(on_0) == "ran" and switched == [1]
    assert ran(torch.empty(2)) == "ran" and ran() == "ran" and switched == [1]


def test_registered_triton_ops_trace_on_the_cpu_and_refuse_a_graph_capture():
    """Interpreted Triton kernels cannot run on Dynamo's fake tensors: the LayerNorm, GELU and span
    ops failed with "Attempted to set the storage of a tensor on device meta" (attention already
    skipped the launch there). Now they trace with fullgraph=True and backend="eager" runs them; a
    graph capture (aot_eager), which would lose the kernel, is a named error."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(0)
    x, r = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    w, b = 1 + 0.1 * torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    s, e = torch.randn(2, 12, generator=gen), torch.randn(2, 12, generator=gen)
    calls = {
        "add_layernorm": lambda: torch.ops.fastbert.add_layernorm_fwd(x, r, w, b, 1e-5, 0.0, None, False)[0],
        "layernorm_gelu": lambda: torch.ops.fastbert.layernorm_gelu_fwd(x, w, b, 1e-5)[0],
        "bias_gelu": lambda: torch.ops.fastbert.bias_gelu_fwd(x, b, "none"),
        "span_score": lambda: torch.ops.fastbert.span_score_triton(s, e, None, 4, 3)[2],
    }
    for op, call in calls.items():
        eager = call()
        torch._dynamo.reset()
        try:
            torch.testing.assert_close(torch.compile(call, fullgraph=True, backend="eager")(), eager, msg=op)
            torch._dynamo.reset()
            with pytest.raises(Exception, match=f"{op}: interpreted Triton kernels .* cannot be captured"):
                torch.compile(call, fullgraph=True, backend="aot_eager")()
        finally:
            torch._dynamo.reset()


def test_interpreter_asked_for_after_import_is_named():
    """triton.jit reads TRITON_INTERPRET when it builds a kernel, at `import fastbert`. A notebook
    that set it in a later cell was told the triton backend was usable on the CPU, then got
    Triton's "0 active drivers" from the first launch. The kernels' own build decides now, and the
    error says to set the variable first. (A fresh interpreter: this one imported fastbert already.)"""
    import os
    import subprocess
    import sys

    script = """
import os
import torch
import fastbert
from fastbert.ops import _backend, bias_gelu, use_backend
os.environ["TRITON_INTERPRET"] = "1"
print(_backend.available_backends("cpu"), _backend.interpreter_on())
try:
    with use_backend("triton"):
        bias_gelu(torch.randn(2, 8), torch.randn(8))
except RuntimeError as err:
    print("RuntimeError:", err)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "['torch'] False", run.stdout
    assert lines[1].startswith("RuntimeError:") and "set before fastbert is imported" in lines[1], run.stdout


def test_a_triton_that_fails_to_import_turns_the_backend_off_with_its_reason(tmp_path):
    """An installed triton whose import fails (its compiled part missing): the backend was listed
    usable (find_spec found the package), and use_backend("triton") then died with "'NoneType'
    object has no attribute 'bias_gelu_fwd'". (Other failures stop torch._dynamo's own import.)"""
    init, error = 'raise ImportError("libtriton.so: cannot open shared object file")\n', "ImportError: libtriton.so"
    import os
    import subprocess
    import sys

    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text(init)
    script = """
import warnings
warnings.simplefilter("always")
import torch
import fastbert
from fastbert.ops import _backend, bias_gelu, use_backend
print(_backend.available_backends("cpu"), _backend.available_backends("cuda"))
try:
    with use_backend("triton"):
        bias_gelu(torch.randn(2, 8), torch.randn(8))
except RuntimeError as err:
    print("RuntimeError:", err)
with use_backend("torch"):
    print(tuple(bias_gelu(torch.randn(2, 8), torch.randn(8)).shape))
"""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "['torch'] ['torch']", run.stdout
    assert lines[1].startswith("RuntimeError: fastbert backend 'triton' cannot run on a cpu tensor: it needs "
                               "fastbert's Triton kernels, and triton is installed but fastbert's Triton kernels "
                               "fail to import"), run.stdout
    assert error in lines[1], run.stdout
    assert lines[2] == "(2, 8)", run.stdout
    assert "the 'triton' backend is off" in run.stderr, run.stderr[-2000:]


def test_interpreter_check_reads_versions_without_package_metadata(monkeypatch):
    """pytorch-triton wheels install the import name triton under another distribution name:
    importlib.metadata.version("triton") raised PackageNotFoundError there, so every interpreted
    call died on the check meant to explain a version clash."""
    import importlib.metadata

    import numpy

    from fastbert.ops import _backend

    triton = pytest.importorskip("triton")

    def no_metadata(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    assert _backend._installed_versions() == (triton.__version__, numpy.__version__)


class _WorkingExtension:
    """Stands in for a fastbert._C whose CUDA runtime works with the driver."""
    CUDART_VERSION = 13000

    @staticmethod
    def device_count():
        return 2


def _simulate_gpu(monkeypatch, capability, name, extension=_WorkingExtension, current=0):
    """torch.cuda answers as a machine with this GPU would; triton imports and fastbert._C is `extension`."""
    from fastbert.ops import _backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(_backend, "_device_capability", lambda index: (*capability, name))
    monkeypatch.setattr(_backend, "triton_importable", lambda: True)
    monkeypatch.setattr(_backend, "triton_problem", lambda: None)
    monkeypatch.setattr(_backend, "cuda_extension", lambda: extension)


@pytest.mark.parametrize("capability, name, kernels", [((7, 5), "Tesla T4", False), ((7, 0), "Tesla V100-SXM2-16GB", False),
                                                       ((8, 0), "NVIDIA A100-SXM4-80GB", True),
                                                       ((9, 0), "NVIDIA H200", True), ((12, 0), "NVIDIA RTX 5090", True)])
def test_a_gpu_older_than_ampere_runs_on_the_torch_backend(monkeypatch, capability, name, kernels):
    """csrc/ is built for sm_80/sm_90 (+ compute_90 PTX, which a pre-Ampere device cannot load) and
    Triton supports 8.0+: on a T4 or V100, "auto" picked cuda and the first launch failed ("no kernel
    image"). Simulated without a GPU: the device's capability, an importable triton and a built _C."""
    from fastbert.ops import _backend

    _simulate_gpu(monkeypatch, capability, name, current=1)
    for device in (torch.device("cuda"), torch.device("cuda:1")):
        if kernels:
            assert _backend.available_backends(device) == ["torch", "triton", "cuda"]
            assert _backend._resolve("auto", device) == "cuda" and _backend._resolve("triton", device) == "triton"
            assert _backend.describe_default(device).endswith("(usable: torch, triton, cuda)")
            continue
        assert _backend.available_backends(device) == ["torch"]
        assert _backend._resolve("auto", device) == "torch"
        for requested in ("cuda", "triton"):
            with pytest.raises(RuntimeError, match=rf"'{requested}' cannot run .* cuda:1 \({name}\) has compute "
                                                   rf"capability {capability[0]}\.{capability[1]}.* 8\.0 or newer"):
                _backend._resolve(requested, device)
        assert "backend 'torch'" in _backend.describe_default(device) and f"{capability[0]}.{capability[1]}" in _backend.describe_default(device)
    assert _backend.available_backends("cpu") == ["torch"] + (["triton"] if _backend.interpreter_on() else [])


def test_an_amd_gpu_runs_on_the_torch_backend(monkeypatch):
    """A ROCm build of torch calls its GPUs "cuda" and gives an MI300 capability 9.4: "auto" took
    fastbert's kernels there, built and tested for NVIDIA GPUs only."""
    from fastbert.ops import _backend

    _simulate_gpu(monkeypatch, (9, 4), "AMD Instinct MI300X")
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert _backend.available_backends("cuda") == ["torch"] and _backend._resolve("auto", torch.device("cuda")) == "torch"
    with pytest.raises(RuntimeError, match=r"'triton' cannot run .*MI300X\) is an AMD GPU"):
        _backend._resolve("triton", torch.device("cuda"))


def test_a_driver_older_than_the_extensions_cuda_turns_the_cuda_backend_off(monkeypatch):
    """fastbert._C carries its CUDA runtime (CUDA 13 in our wheels); on a driver for CUDA 12, where
    torch's cu126/cu128 wheels run, "auto" took the cuda backend and its first launch failed. Now the
    backend is off there, with the driver's own message, and the Triton kernels serve."""
    from fastbert.ops import _backend

    class OldDriver(_WorkingExtension):
        @staticmethod
        def device_count():
            raise RuntimeError("CUDA error: CUDA driver version is insufficient for CUDA runtime version "
                               "(cudaGetDeviceCount)")

    _simulate_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3", OldDriver)
    with pytest.warns(UserWarning, match="the 'cuda' backend is off"):
        assert _backend.available_backends("cuda") == ["torch", "triton"]
    assert _backend._resolve("auto", torch.device("cuda")) == "triton"
    with pytest.raises(RuntimeError, match=r"newer NVIDIA driver: fastbert._C, built with CUDA 13.0, cannot use .*"
                                           r"driver version is insufficient"):
        _backend._resolve("cuda", torch.device("cuda"))
    monkeypatch.setattr(_backend, "cuda_extension", lambda: _WorkingExtension)
    assert _backend.available_backends("cuda") == ["torch", "triton", "cuda"]
