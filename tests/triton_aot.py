"""Compile every Triton kernel of fastbert for a real GPU target, without a GPU.

The interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) accepts
code the compiler rejects: a plain global read inside a kernel, a dtype mix the
MLIR verifier refuses, a bf16 path the interpreter cannot even run. This script
runs each launcher with the compiler's JIT entry point replaced by a recorder,
so the launcher computes its real GPU configuration (block sizes, warps, stages,
constexpr flags) and the recorder keeps (kernel, arguments, options) instead of
launching. Each distinct signature is then compiled ahead of time for sm_80 and
sm_90 with `triton.compile`, down to cubin (ptxas included).

    python tests/triton_aot.py [--arch 90 80] [--quick] [--resources FILE.md] [--jobs N]

--resources writes, per compiled kernel and architecture, what ptxas gave it (registers,
stack and local memory per thread: spills land there; Triton's dynamic shared memory),
read from the cubin with the cuobjdump that Triton's NVIDIA backend ships. --jobs N compiles in N
processes (default: the CPUs this process may use); each compile is one thread of Python and LLVM,
so on 2 cores one process left the other idle.

Must run without TRITON_INTERPRET (the kernels are then JITFunctions). Exits 1
naming every kernel and signature that failed. tests/test_triton_compile.py runs it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import re
import subprocess
import tempfile
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tests/triton_aot.py: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")

# What a GPU launch gets by default (and silences Triton 3.9's warning about it).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.jit import JITFunction

import fastbert.kernels.attention as KA
import fastbert.kernels.gelu as KG
import fastbert.kernels.layernorm as KL
import fastbert.kernels.span as KS

POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.uint8: "*u8",
                 torch.int8: "*i8", torch.bool: "*i1", torch.int32: "*i32", torch.int64: "*i64"}
OPTIONS = ("num_warps", "num_stages", "num_ctas")
# Shared memory a program may opt in to, in bytes, per target (CUDA's sharedMemPerBlockOptin): sm_86, sm_89
# and sm_120 (RTX 30/40/50, A10, L4, L40S) give 99 KB where sm_80 gives 163 KB and sm_90 227 KB.
# Each target's launches are recorded with its limit (the attention tiles depend on it) and a
# kernel past it fails here, as Triton would refuse it at launch.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


class Recorder:
    """Stands in for JITFunction.run: records each launch instead of running it."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel, *args, grid=None, warmup=False, **kwargs):
        options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
        bound = dict(zip(kernel.arg_names, args))
        bound.update(kwargs)
        missing = [name for name in kernel.arg_names if name not in bound]
        if missing:
            raise TypeError(f"{kernel.__name__}: launch leaves {missing} unbound")
        self.launches.append((kernel, bound, options))


def _scalar_type(name, value):
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: cannot type {type(value).__name__} for compilation")


def signature_of(kernel, bound):
    """(signature, constexprs, attrs) in the form triton.compile's ASTSource takes, specialised as
    the JIT specialises a launch: an int equal to 1 becomes a constant, an int divisible by 16 and a
    16-byte aligned pointer carry tt.divisibility=16 (every tensor is taken as aligned: torch's
    allocations are, and so are our views). Without these hints ptxas sees 2-byte accesses: no
    vector loads, no cp.async pipelining, and resources unlike the real launch's."""
    constexpr_names = {kernel.arg_names[i] for i in kernel.constexprs}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = bound[name]
        param = kernel.params[index]
        specialise = not getattr(param, "do_not_specialize", False)
        aligned = specialise and not getattr(param, "do_not_specialize_on_alignment", False)
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            if aligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif value is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        elif specialise and isinstance(value, int) and not isinstance(value, bool) and value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = _scalar_type(name, value)
            if aligned and isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _t(shape, dtype):
    return torch.zeros(shape, dtype=dtype, device="cuda")


def launch_all(dtypes, quick=False, head_dims=None):
    """Call every launcher over the cases that select distinct kernel specialisations."""
    head_dims = head_dims or ((32, 64) if quick else (16, 32, 48, 64, 96, 128))
    KA.attention_dropout_mask(2, 2, 129, 0.1, 7, "cuda")  # the tests' mask regenerator
    for dtype in dtypes:
        for D in head_dims:
            for S, masked, dropout, varlen in ((128, True, 0.0, False), (129, False, 0.1, False),
                                               (77, False, 0.0, True), (1, True, 0.1, False)):
                B, H = 2, 2
                if varlen:
                    q, k, v = (_t((2 * S, H, D), dtype) for _ in range(3))
                    cu, mask, max_s = _t((3,), torch.int32), None, S
                else:
                    q, k, v = (_t((B, S, H, D), dtype) for _ in range(3))
                    cu, mask, max_s = None, (_t((B, S), torch.bool) if masked else None), None
                seed = _t((1,), torch.int64) if dropout and S == 1 else 7  # compiled graphs pass a tensor
                out, lse = KA.attention_fwd(q, k, v, mask, cu, max_s, dropout, None, seed)
                if lse is None or out is None:
                    raise RuntimeError("attention_fwd returned no outputs")
                # 16-bit training keeps out's rounding residual (AttentionFunction); inference, a
                # gradient of v alone and direct launcher calls do not
                lse = torch.zeros((H, 2 * S) if varlen else (B, H, S), dtype=torch.float32)
                for residual in ((None, torch.zeros_like(out)) if dtype != torch.float32 else (None,)):
                    if residual is not None:
                        KA.attention_fwd(q, k, v, mask, cu, max_s, dropout, None, seed, out_residual=residual)
                    KA.attention_bwd(torch.zeros_like(out), q, k, v, out, lse, mask, cu, max_s, dropout, None, seed,
                                     out_residual=residual)
        for N in ((384, 768) if quick else (384, 768, 1000, 4096)):
            x, r = _t((64, N), dtype), _t((64, N), dtype)
            w, b = _t((N,), torch.float32), _t((N,), torch.float32)
            mean, rstd, seed = _t((64,), torch.float32), _t((64,), torch.float32), _t((1,), torch.int64)
            for p in (0.0, 0.1):
                KL.add_layernorm_fwd(x, r, w, b, 1e-12, p, seed if p else None)
                KL.add_layernorm_bwd(x, x, r, w, mean, rstd, p, seed if p else None)
                if dtype != torch.float32:  # autocast's mix: half x, the fp32 residual stream
                    r32 = _t((64, N), torch.float32)
                    for copy in ((False, True) if p == 0.0 else (True,)):  # BertLayer always asks for the copy
                        KL.add_layernorm_fwd(x, r32, w, b, 1e-12, p, seed if p else None, copy)
                        KL.add_layernorm_bwd(r32, x, r32, w, mean, rstd, p, seed if p else None, x if copy else None)
            KL.layernorm_gelu_fwd(x, w.to(dtype), b.to(dtype), 1e-12)
            KL.layernorm_gelu_bwd(x, x, w.to(dtype), b.to(dtype), mean, rstd)
            KL.add_layernorm_keep_mask((64, N), 0.1, seed)
            for approximate in ("none", "tanh"):
                KG.bias_gelu_fwd(x, b.to(dtype), approximate)
                KG.bias_gelu_bwd(x, x, b.to(dtype), approximate)
        for L, max_len, topk in ((384, 30, 20), (17, 4, 1), (512, 64, 32)):
            s, e = _t((4, L), dtype), _t((4, L), dtype)
            KS.span_score_fwd(s, e, _t((4, L), torch.bool), max_len, topk)
            KS.span_score_fwd(s, e, None, max_len, topk)


def record(dtypes, quick=False, arch=90, head_dims=None):
    recorder = Recorder()
    original, sm_count, max_shared = JITFunction.run, KG._sm_count, KA._max_shared
    JITFunction.run = lambda self, *a, **kw: recorder(self, *a, **kw)
    KG._sm_count = lambda index: 132  # an H100 SXM's; it only sizes the backward's grid
    KA._max_shared = lambda device: SHARED_LIMIT[arch]
    try:
        # Fake CUDA tensors: the launchers pick their GPU tiles and nothing is allocated.
        with FakeTensorMode():
            launch_all(dtypes, quick, head_dims)
    finally:
        JITFunction.run, KG._sm_count, KA._max_shared = original, sm_count, max_shared
    return recorder.launches


def distinct(launches):
    seen, unique = set(), []
    for kernel, bound, options in launches:
        signature, constexprs, attrs = signature_of(kernel, bound)
        key = (kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items(), key=str)),
               tuple(sorted(attrs)), tuple(sorted(options.items())))
        if key not in seen:
            seen.add(key)
            unique.append((kernel, signature, constexprs, attrs, options))
    return unique


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resources needs the cuobjdump Triton's NVIDIA backend ships: {path} is missing")
    return path


def resource_usage(cubin: bytes) -> dict:
    """{"REG": .., "STACK": .., "LOCAL": .., "SHARED": ..} of the one function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"Function [^:]+:\s*\n\s*(.*)", text)
    if found is None:
        raise ValueError(f"no function in cuobjdump's report:\n{text}")
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", found.group(1))}


def _specialisation(signature, constexprs) -> str:
    """What tells two launches of one kernel apart: the first pointer's dtype and the constexpr flags."""
    dtype = next((t[1:] for t in signature.values() if t.startswith("*")), "?")
    flags = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items()
             if v is not None and k.isupper()]
    return f"{dtype} " + " ".join(flags)


def resources_markdown(rows) -> str:
    out = [f"# Triton kernels: resources on the GPU targets (triton {triton.__version__}, tests/triton_aot.py)", "",
           "Generated by `python tests/triton_aot.py --arch 90 --resources FILE` at each launcher's real GPU "
           "configuration (fake CUDA tensors, no GPU). Registers per thread; stack and local bytes per thread "
           "(a spill lands there: 0 = none); shared = Triton's dynamic shared memory per program, in bytes.", "",
           "| sm | kernel | specialisation | warps | stages | registers | stack | local | shared |",
           "|---|---|---|---|---|---|---|---|---|"]
    for arch, kernel, spec, options, usage, shared in rows:
        out.append(f"| {arch} | {kernel} | {spec} | {options.get('num_warps', 4)} | {options.get('num_stages', 3)} "
                   f"| {usage['REG']} | {usage['STACK']} | {usage['LOCAL']} | {shared} |")
    spilling = [r for r in rows if r[4]["STACK"] or r[4]["LOCAL"]]
    out += ["", f"{len(rows)} compiled kernels, {len(spilling)} with stack or local memory."]
    return "\n".join(out) + "\n"


def to_compile(archs, dtypes, quick, head_dims=None, only=None) -> list:
    """(arch, kernel, signature, constexprs, attrs, options) for every compile, in a fixed order;
    only: the kernels whose name holds this text."""
    return [(arch, *launch) for arch in archs for launch in distinct(record(dtypes, quick, arch, head_dims))
            if only is None or only in launch[0].__name__]


_TO_COMPILE: list = []  # a worker's copy of to_compile(...): JITFunctions do not pickle, so each rebuilds it


def _start_worker(archs, dtype_names, quick, head_dims, only):
    global _TO_COMPILE
    _TO_COMPILE = to_compile(archs, [getattr(torch, name) for name in dtype_names], quick, head_dims, only)


def _compile_one(index: int, kernel_name: str, with_resources: bool):
    """Compile _TO_COMPILE[index]: its resources row (a tuple), None, or the failure's text."""
    arch, kernel, signature, constexprs, attrs, options = _TO_COMPILE[index]
    assert kernel.__name__ == kernel_name, "a worker recorded the launches in another order"
    try:
        binary = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32), options=dict(options))
        if binary.metadata.shared > SHARED_LIMIT[arch]:
            return (f"sm_{arch} {kernel.__name__} {constexprs} {options}: needs {binary.metadata.shared} bytes of "
                    f"shared memory, and sm_{arch} gives a program {SHARED_LIMIT[arch]}")
        if with_resources:
            return (arch, kernel.__name__, _specialisation(signature, constexprs), options,
                    resource_usage(binary.asm["cubin"]), binary.metadata.shared)
        return None
    except Exception as error:  # report all, then fail
        return (f"sm_{arch} {kernel.__name__} {constexprs} {options}:\n"
                + "".join(traceback.format_exception_only(error))[-2000:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", type=int, default=[90, 80], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--quick", action="store_true", help="fewer head dims and hidden sizes")
    parser.add_argument("--head-dims", nargs="+", type=int, help="the attention head dims (default: by --quick)")
    parser.add_argument("--only", help="compile only the kernels whose name holds this text")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    parser.add_argument("--resources", metavar="FILE.md", help="write registers/stack/local/shared per kernel")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="compile in this many processes (default: the CPUs this process may use)")
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name) for name in args.dtypes]
    started = time.perf_counter()
    global _TO_COMPILE
    _TO_COMPILE = to_compile(args.arch, dtypes, args.quick, args.head_dims, args.only)
    kernels = sorted({k.__name__ for _, k, *_ in _TO_COMPILE})
    print(f"triton {triton.__version__}: {len(_TO_COMPILE)} launches to compile (each target's distinct ones) of "
          f"{len(kernels)} kernels: {', '.join(kernels)}", flush=True)
    tasks = [(i, entry[1].__name__, args.resources is not None) for i, entry in enumerate(_TO_COMPILE)]
    jobs = max(1, min(args.jobs, len(tasks)))
    if jobs == 1:
        outcomes = [_compile_one(*task) for task in tasks]
    else:
        # spawn, not fork: this process holds torch's threads. A worker that dies (a compiler crash)
        # raises BrokenProcessPool here instead of hanging. map keeps the order of the rows.
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_start_worker,
                                                    initargs=(args.arch, args.dtypes, args.quick, args.head_dims,
                                                              args.only)) as pool:
            outcomes = list(pool.map(_compile_one, *zip(*tasks)))
    failures = [o for o in outcomes if isinstance(o, str)]
    resources = [o for o in outcomes if isinstance(o, tuple)]
    print(f"compiled {len(tasks) - len(failures)} of {len(tasks)} "
          f"for sm_{', sm_'.join(map(str, args.arch))} in {time.perf_counter() - started:.0f} s")
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    if args.resources:
        with open(args.resources, "w") as f:
            f.write(resources_markdown(resources))
        print(f"wrote {args.resources}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
