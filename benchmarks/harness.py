"""The one timing harness every kernel benchmark runs on.

What one measurement is (METHOD.md, "Time properly"):
  - input sets: `make_inputs(k)` builds set k from a seeded generator, so every
    implementation of a case sees the same values (and the same padding mask).
    On a GPU, sets are cycled until about 3x the L2 size is touched between two
    uses of one set, so an op reads its inputs from HBM, not L2; where `max_sets`
    sets cannot reach that (small inputs), the L2 is also flushed (a write over
    twice its size) before each call, outside the timed region.
  - modes: "fwd" is the training forward (inputs require grad, activations are
    saved); "bwd" is only the backward, of a forward run untimed just before
    it and followed by an L2 flush; "fwd+bwd" is both, timed as one.
    Gradients are set to None before every call, outside the timed region, so
    no call pays for accumulating into .grad.
  - timing (GPU): a first call (JIT, autotuning, torch.compile: its wall time
    is kept as `first_call_s`), a short estimate, warm-up for `warmup_ms`, then
    one pair of CUDA events around each of N calls, N from `rep_ms`. Before
    each call the GPU is kept busy by `torch.cuda._sleep` for longer than the
    host needs to issue the call, so the events time the GPU work and not
    Python dispatch (the host's issue time per call is kept as `host_us`;
    triton.testing.do_bench gets the same effect from its L2-flush memset).
    Reported: median, p20 and p80 of the N per-call times.
  - timing (loop): for whole training steps (bench_e2e), the same CUDA events
    around each of N back-to-back calls, without the spin: a call's time is then
    what a training loop sees, max(GPU work, the host's dispatch), host syncs
    inside the step included. The spin would hide up to 5 ms of host time, but
    only for calls that never wait for the GPU (compiled, CUDA graphs), not for
    eager steps that read a value back: their ratios would not compare like with
    like. No `host_us` (the issue time there includes the waits).
  - timing (host): for CPU runs and host-bound implementations (the Python
    n-best loop), synchronize, perf_counter, call, synchronize.
  - quick (smoke test, CPU too): the first call and one timed call, nothing more.
  - peak memory: one extra call after timing; `peak_mib` is the peak allocated
    during it above what was allocated before it (inputs and, in "bwd" mode,
    the forward's saved activations are excluded).

Work counts (one formula per op, in the bench files): bytes are the fewest an
implementation must move (each input read once, each output written once);
FLOPs count the matrix products. `metric` = work / median time, in GB/s or
TFLOP/s, and `pct_of_ceiling` compares it with the ceilings measured in the same
run: a large device-to-device copy (bytes read + written) for GB/s rows, an
8192^3 bf16 matmul for TFLOP/s rows.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]  # the checkout; site-packages/fastbert when installed as fastbert.benchmarks
IN_CHECKOUT = (REPO / "kernels").is_dir() and (REPO / "setup.py").is_file()
MODES = ("fwd", "bwd", "fwd+bwd")
GBPS, TFLOPS = "GB/s", "TFLOP/s"
QUANTILES = (0.5, 0.2, 0.8)


# ----------------------------------------------------------------------------- settings

@dataclasses.dataclass
class Settings:
    """How long and how carefully to time each case."""

    device: torch.device
    warmup_ms: float = 25.0       # warm-up after the first call
    rep_ms: float = 100.0         # timed calls per case, in total
    min_reps: int = 10
    max_reps: int = 2000
    rotate_bytes: int = 0         # cycle input sets until this many bytes lie between two uses of a set
    max_sets: int = 8
    quick: bool = False           # smoke test: the first call and one timed call
    compile_backend: str = "inductor"

    @classmethod
    def make(cls, device: torch.device, quick: bool = False, budget: bool = False) -> "Settings":
        if quick:
            # aot_eager traces forward and backward graphs as inductor would, without its minutes of codegen.
            return cls(device, warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1, quick=True,
                       compile_backend="aot_eager")
        l2 = l2_bytes(device)
        if budget:  # gpu_check.sh: the whole suite in a few minutes
            return cls(device, warmup_ms=10.0, rep_ms=40.0, min_reps=10, max_reps=300, rotate_bytes=3 * l2)
        return cls(device, rotate_bytes=3 * l2)


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 size (50 MB on an H100), 0 on a CPU."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20)


# ----------------------------------------------------------------------------- environment

def _run(cmd: Sequence[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """HEAD of the checkout ("+dirty" with uncommitted changes), else $FASTBERT_COMMIT, else the
    installed release ("fastbert 0.1.0": an installed wheel's folder may sit in someone else's git tree)."""
    head = _run(["git", "rev-parse", "HEAD"]) if IN_CHECKOUT else None
    if head:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        return head + ("+dirty" if dirty else "")
    if os.environ.get("FASTBERT_COMMIT"):
        return os.environ["FASTBERT_COMMIT"]
    if IN_CHECKOUT:
        return "unknown"
    import fastbert

    return f"fastbert {fastbert.__version__}"


def environment(device: torch.device) -> dict:
    """What every result row records about the machine and the code."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "gpu": "cpu",
        "driver": None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "host": platform.node(),
        "commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"])
        env.update(gpu=props.name, driver=smi or "unknown", sm_count=props.multi_processor_count,
                   l2_bytes=props.L2_cache_size, memory_bytes=props.total_memory,
                   capability=f"{props.major}.{props.minor}")
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


ROW_ENV_KEYS = ("gpu", "driver", "torch", "triton", "cuda", "commit")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_us(device_index: int) -> float:
    """Calibrate torch.cuda._sleep (a spin of N clock cycles) against CUDA events."""
    if not hasattr(torch.cuda, "_sleep"):
        return 0.0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)  # load the kernel
    cycles = 2_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / max(start.elapsed_time(end) * 1e3, 1e-3)


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(x) for x in q)


@dataclasses.dataclass
class Timing:
    ms: float
    p20: float
    p80: float
    reps: int
    host_us: Optional[float]
    first_call_s: float
    peak_mib: Optional[float] = None


def time_calls(call: Callable[[int], object], before: Callable[[int], None], n_sets: int, cfg: Settings,
               timer: str = "device", max_reps: Optional[int] = None) -> Timing:
    """Time call(k % n_sets) as the module docstring says; before(k) runs untimed ahead of each call."""
    device = cfg.device
    max_reps = min(cfg.max_reps, max_reps or cfg.max_reps)
    t0 = time.perf_counter()
    before(0)
    call(0)
    _sync(device)
    first_call_s = time.perf_counter() - t0
    if cfg.quick:
        n_warm, n_rep, host_us = 0, 1, None
    elif first_call_s > 0.5 and max_reps <= 3:
        # A slow host-bound implementation (the Python n-best loop): no estimate, no warm-up.
        n_warm, n_rep, host_us = 0, max_reps, None
    else:
        # Estimate one call (issue and run) from a few calls after the first.
        n_est = 1 if first_call_s > 0.5 else 5
        _sync(device)
        t0 = time.perf_counter()
        issue = 0.0
        for k in range(n_est):
            before(k % n_sets)
            t1 = time.perf_counter()
            call(k % n_sets)
            issue += time.perf_counter() - t1
        _sync(device)
        est_ms = (time.perf_counter() - t0) * 1e3 / n_est
        host_us = issue * 1e6 / n_est
        n_warm = int(cfg.warmup_ms / max(est_ms, 1e-3))
        n_rep = min(max_reps, max(cfg.min_reps, int(cfg.rep_ms / max(est_ms, 1e-3))))
    for k in range(n_warm):
        before(k % n_sets)
        call(k % n_sets)
    _sync(device)

    times, issues = [], []
    if timer in ("device", "loop") and device.type == "cuda":
        spin = 0
        if timer == "device":
            # Keep the GPU busy while the host issues the call (capped at 5 ms of spinning).
            spin = int(_sleep_cycles_per_us(device.index or 0) * min(max(1.5 * (host_us or 50.0), 20.0), 5000.0))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_rep)]
        for k, (start, end) in enumerate(events):
            before(k % n_sets)
            if spin:
                torch.cuda._sleep(spin)
            t1 = time.perf_counter()
            start.record()
            call(k % n_sets)
            end.record()
            issues.append(time.perf_counter() - t1)
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for k in range(n_rep):
            before(k % n_sets)
            _sync(device)
            t1 = time.perf_counter()
            call(k % n_sets)
            _sync(device)
            times.append((time.perf_counter() - t1) * 1e3)
    ms, p20, p80 = _quantiles(times)
    if issues:
        host_us = sorted(issues)[len(issues) // 2] * 1e6
    if timer == "loop":
        host_us = None
    return Timing(ms, p20, p80, len(times), host_us, first_call_s)


def peak_mib(call: Callable[[int], object], before: Callable[[int], None], device: torch.device) -> Optional[float]:
    """Peak memory allocated during one call above what was allocated before it."""
    if device.type != "cuda":
        return None
    before(0)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call(0)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ----------------------------------------------------------------------------- cases

@dataclasses.dataclass
class Case:
    """One implementation of one op on one shape, dtype and mode.

    fn(*inputs) -> Tensor or tuple of Tensors; make_inputs(k) -> tuple, the k-th seeded input set;
    grad_idx: which inputs require grad (and get gradients in bwd modes).
    work: bytes (unit GB/s) or FLOPs (unit TFLOP/s) for this mode.
    status: "ok" to run, or "unsupported"/"skipped" with `note` (recorded, not run).
    """

    op: str
    impl: str
    label: str
    shape: dict
    dtype: torch.dtype
    mode: str
    fn: Optional[Callable]
    make_inputs: Callable[[int], tuple]
    work: float
    unit: str
    grad_idx: tuple = ()
    tier: int = 1
    status: str = "ok"
    note: str = ""
    timer: str = "device"
    max_reps: Optional[int] = None
    rotate: bool = True           # cycle input sets past L2 (memory-bound ops)

    @property
    def group(self) -> tuple:
        return (self.op, self.label, str(self.dtype), self.mode)


def _nbytes(objs) -> int:
    return sum(t.numel() * t.element_size() for t in objs if isinstance(t, torch.Tensor))


def _prepare(case: Case, cfg: Settings):
    """Build the input sets and the per-mode call(k) / before(k) closures."""
    first = case.make_inputs(0)
    set_bytes = max(_nbytes(first), 1)
    if case.mode != "fwd":
        set_bytes *= 2  # the output gradient and the input gradients move too
    n_sets = 1
    if case.rotate and cfg.rotate_bytes:
        n_sets = max(1, min(cfg.max_sets, math.ceil(cfg.rotate_bytes / set_bytes)))
    sets = [first] + [case.make_inputs(k) for k in range(1, n_sets)]
    leaves = []
    for s in sets:
        for j in case.grad_idx:
            s[j].requires_grad_(True)
        leaves.append([s[j] for j in case.grad_idx])
    # Small inputs: max_sets sets do not reach rotate_bytes (a 32-window span batch is 0.1 MB, 8 sets
    # stay in L2), so flush the L2 before each call instead, untimed, as triton.testing.do_bench does.
    flush_each = case.rotate and cfg.rotate_bytes and n_sets * set_bytes < cfg.rotate_bytes
    flush_l2 = _l2_flusher(cfg.device) if flush_each else None

    def before(k):
        for t in leaves[k]:
            t.grad = None
        if flush_l2 is not None:
            flush_l2()

    fn = case.fn
    if case.mode == "fwd":
        def call(k):
            return fn(*sets[k])
        return call, before, n_sets
    if not case.grad_idx:
        raise ValueError(f"{case.op}: mode {case.mode!r} needs inputs that require grad")
    gen = torch.Generator(device=cfg.device).manual_seed(1234)
    dys = []  # one upstream gradient per output (fn may return a tuple of tensors)
    for s in sets:
        shape_of = fn(*s)
        outs_of = shape_of if isinstance(shape_of, tuple) else (shape_of,)
        dys.append(tuple(torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=gen) for o in outs_of))
    del shape_of, outs_of

    def backward(out, dy, k):
        # autograd.grad, not .backward(): accumulating into leaves' .grad copies a gradient that two
        # leaves share (add_layernorm's dx = dresidual without dropout) or whose layout differs from
        # its leaf's; in a model these inputs are not leaves and nothing is copied.
        torch.autograd.grad(out if isinstance(out, tuple) else (out,), leaves[k], dy, allow_unused=True)

    if case.mode == "fwd+bwd":
        def call(k):
            backward(fn(*sets[k]), dys[k], k)
        return call, before, n_sets

    # "bwd": the forward runs untimed in before(k); then the L2 is flushed, so the backward reads
    # the saved activations from memory as it would in a model (its forward ran long before).
    flush = flush_l2 or _l2_flusher(cfg.device)
    outs = [None] * n_sets

    def before_bwd(k):
        for t in leaves[k]:
            t.grad = None
        outs[k] = fn(*sets[k])
        flush()

    def call(k):
        out, outs[k] = outs[k], None
        backward(out, dys[k], k)
    return call, before_bwd, n_sets


def _l2_flusher(device: torch.device) -> Callable[[], None]:
    """A write over twice the L2 size (what triton.testing.do_bench runs between calls)."""
    if device.type != "cuda":
        return lambda: None
    buf = torch.empty(2 * l2_bytes(device), dtype=torch.int8, device=device)
    return buf.zero_


def backend_unusable(backend: str, device: torch.device) -> Optional[str]:
    """Why fastbert's `backend` ("triton" or "cuda") cannot run the kernel suites on `device`, or
    None. The rows that call a kernel Function directly (attention's *_fa2d) pass no backend check
    of the ops, so this is theirs too: a triton that fails to import, or an interpreter that cannot
    run with this numpy, is a skip with its reason, not an error from deep inside a launch."""
    from fastbert.ops import _backend

    if problem := _backend.capability_problem(device):    # a T4, a V100, an AMD GPU
        return f"{backend} backend not usable here: {problem}"
    if backend == "cuda":
        if "cuda" in _backend.available_backends(device):
            return None
        return f"fastbert cuda backend not usable here: {_backend.cuda_runtime_problem() or 'fastbert._C not built'}"
    if problem := _backend.triton_problem():
        return f"triton backend not usable here: {problem}"
    if device.type != "cuda":
        if not _backend.interpreter_on():
            return "triton backend not usable here (needs CUDA or TRITON_INTERPRET=1)"
        if problem := _backend.interpreter_problem():
            return f"triton backend not usable here: {problem}"
    return None


def kernel_rows(device: torch.device, make: Callable[[str], Callable]) -> dict:
    """The "triton" and "cuda" rows of a kernel suite: impl -> (fn or None, status, note), with
    make(backend) the timed function. No cuda row on a CPU (it never could run there)."""
    rows = {}
    for backend in ("triton", "cuda"):
        why = backend_unusable(backend, device)
        if why is None:
            rows[backend] = (make(backend), "ok", "")
        elif backend == "triton" or device.type == "cuda":
            rows[backend] = (None, "skipped", why)
    return rows


def _short(err: BaseException, limit: int = 300) -> str:
    msg = " ".join(f"{type(err).__name__}: {err}".split())
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def run_case(case: Case, cfg: Settings) -> dict:
    """Measure one case; never raises: failures become status "error" with the message."""
    row = {
        "op": case.op, "impl": case.impl, "shape": case.label, "dims": case.shape,
        "dtype": str(case.dtype).replace("torch.", ""), "mode": case.mode,
        "status": case.status, "note": case.note, "unit": case.unit, "work": case.work, "tier": case.tier,
        "timer": case.timer, "ms": None, "ms_p20": None, "ms_p80": None, "reps": None, "host_us": None, "first_call_s": None,
        "metric": None, "pct_of_ceiling": None, "speedup_vs_eager": None, "peak_mib": None,
        "utc": utc_now(),
    }
    if case.status != "ok":
        return row
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # each distinct warning once: "always" would cost time per call
            call, before, n_sets = _prepare(case, cfg)
            timing = time_calls(call, before, n_sets, cfg, case.timer, case.max_reps)
            if case.timer == "device":  # a host-bound implementation is not worth one more slow call
                timing.peak_mib = peak_mib(call, before, cfg.device)
            del call, before
    except Exception as err:  # noqa: BLE001 - a failing baseline is a result, not a crash
        # A backend without this op or an SDPA backend refusing the case is "unsupported", not broken.
        refused = isinstance(err, NotImplementedError) or "No available kernel" in str(err)
        row["status"] = "unsupported" if refused else "error"
        reasons = "; ".join(dict.fromkeys(str(w.message).split("\n")[0][:160] for w in caught))
        row["note"] = _short(err) + (f" [warnings: {reasons[:300]}]" if reasons else "")
        if os.environ.get("FASTBERT_BENCH_TRACE"):
            traceback.print_exc()
    if row["status"] != "ok":
        # Out here the exception and its frames (holding the inputs) are gone: memory can be returned.
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    row.update(ms=timing.ms, ms_p20=timing.p20, ms_p80=timing.p80, reps=timing.reps, host_us=timing.host_us,
               first_call_s=timing.first_call_s, peak_mib=timing.peak_mib, n_sets=n_sets)
    if timing.ms > 0 and case.work:
        row["metric"] = case.work / (timing.ms * 1e6) if case.unit == GBPS else case.work / (timing.ms * 1e9)
    if case.timer == "device" and timing.host_us and timing.host_us > 1e3 * timing.ms:
        # ms is the GPU's time; a loop of such calls runs at the host's pace instead
        row["note"] = "; ".join(filter(None, [row["note"], f"host-bound: {timing.host_us / 1e3:.3g} ms to issue a "
                                                           "call, more than the GPU's time"]))
    return row


# ----------------------------------------------------------------------------- ceilings

def measure_ceilings(cfg: Settings) -> dict:
    """The physical ceilings of this run: copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s)."""
    device = cfg.device
    on_gpu = device.type == "cuda"
    copy_elems = (1 << 29) if on_gpu and not cfg.quick else (1 << 22)   # 1 GiB of bf16 on a GPU
    n = 8192 if on_gpu and not cfg.quick else 256
    mm_dtype = torch.bfloat16 if on_gpu else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}

    src = torch.randn(copy_elems, dtype=torch.bfloat16 if on_gpu else torch.float32, device=device, generator=gen)
    dst = torch.empty_like(src)
    t = time_calls(lambda k: dst.copy_(src), lambda k: None, 1, cfg)
    out["copy_GBps"] = 2 * _nbytes([src]) / (t.ms * 1e6)
    out["copy_bytes"] = 2 * _nbytes([src])
    del src, dst

    a = torch.randn(n, n, dtype=mm_dtype, device=device, generator=gen)
    b = torch.randn(n, n, dtype=mm_dtype, device=device, generator=gen)
    c = torch.empty(n, n, dtype=mm_dtype, device=device)
    t = time_calls(lambda k: torch.matmul(a, b, out=c), lambda k: None, 1, cfg)
    out["matmul_TFLOPs"] = 2 * n**3 / (t.ms * 1e9)
    out["matmul_shape"] = f"{n}x{n}x{n} {str(mm_dtype).replace('torch.', '')}"
    del a, b, c
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def add_derived(rows: list[dict], ceilings: dict) -> None:
    """Fill pct_of_ceiling, speedup_vs_eager (eager measured in the same run, same group) and
    speedup_vs: {other impl: its ms / this ms} for every other implementation of the group that ran,
    plus "sdpa_best" (the fastest SDPA backend), the baselines issue 6's targets name (best SDPA
    backend for attention; the outer sum and the Python n-best loop for the span score)."""
    ms_of: dict = {}
    for r in rows:
        if r["status"] == "ok" and r.get("ms"):
            ms_of.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), {})[r["impl"]] = r["ms"]
    for group in ms_of.values():
        sdpa = [ms for impl, ms in group.items() if impl.startswith("sdpa_")]
        if sdpa:
            group["sdpa_best"] = min(sdpa)
    for r in rows:
        if r["status"] != "ok" or r["metric"] is None:
            continue
        ceiling = ceilings.get("copy_GBps") if r["unit"] == GBPS else ceilings.get("matmul_TFLOPs")
        if ceiling:
            r["pct_of_ceiling"] = 100.0 * r["metric"] / ceiling
        group = ms_of.get((r["op"], r["shape"], r["dtype"], r["mode"]), {})
        if r["ms"]:
            base = group.get("eager")
            if base:  # (e2e rows have no "eager": bench_e2e.add_derived sets theirs)
                r["speedup_vs_eager"] = base / r["ms"]
            r["speedup_vs"] = {impl: ms / r["ms"] for impl, ms in group.items() if impl != r["impl"]}


# ----------------------------------------------------------------------------- torch.compile baselines

def _raise_recompile_limits() -> None:
    """Every shape and mask is a new graph of one reference function: keep them all compiled
    (past the default limit of 8, dynamo would silently fall back to eager)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4096))


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, backend: str) -> Callable:
    """torch.compile of a reference (static shapes: one graph per case, as a fixed-shape model sees)."""
    _raise_recompile_limits()
    return torch.compile(fn, dynamic=False, backend=backend)


# ----------------------------------------------------------------------------- running a suite

class Results:
    """Rows, environment and ceilings of one run, saved to JSON after every group of cases."""

    def __init__(self, path: Path, env: dict, settings: Settings, meta: dict):
        self.path = Path(path)
        self.env, self.meta = env, meta
        self.settings = {k: (str(v) if isinstance(v, torch.device) else v)
                         for k, v in dataclasses.asdict(settings).items()}
        self.ceilings: dict = {}
        self.rows: list[dict] = []
        self.skipped_for_time: list[str] = []

    def add(self, row: dict) -> None:
        for key in ROW_ENV_KEYS:
            row[key] = self.env.get(key)
        self.rows.append(row)

    def save(self) -> None:
        add_derived(self.rows, self.ceilings)
        data = {"env": self.env, "ceilings": self.ceilings, "settings": self.settings, "meta": self.meta,
                "skipped_for_time": self.skipped_for_time, "rows": self.rows}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.path)


def run_cases(cases: Sequence[Case], cfg: Settings, results: Results, deadline: Optional[float] = None,
              log: Callable[[str], None] = print) -> None:
    """Run cases tier by tier (a stable sort keeps each shape's implementations together).

    A group (op, shape, dtype, mode) is started only before `deadline` (time.monotonic()),
    so a time limit drops whole groups, lowest priority first, and keeps eager beside the rest.
    """
    ordered = sorted(cases, key=lambda c: c.tier)
    current, skipping, saved = None, False, time.monotonic()
    for case in ordered:
        if case.group != current:
            current = case.group
            skipping = deadline is not None and time.monotonic() > deadline
            if skipping:
                results.skipped_for_time.append(" ".join(current))
        if skipping:
            continue
        row = run_case(case, cfg)
        results.add(row)
        log(format_row(row))
        if time.monotonic() - saved > 10.0:  # also inside a long group: a killed run loses <= 10 s
            results.save()
            saved = time.monotonic()
    results.save()


def pytest_benchmark(benchmark, case: Case, rounds: int = 30) -> None:
    """Time `case` with pytest-benchmark's `benchmark` fixture (pedantic, one synchronized call per
    round, input sets rotated as above): wall time of the call as the host sees it. Rows of
    `fastbert bench` are the GPU-event numbers; this entry point is for pytest-benchmark's tooling
    (--benchmark-json, --benchmark-compare)."""
    import pytest

    if case.status != "ok":
        pytest.skip(f"{case.impl}: {case.status}: {case.note}")
    cfg = Settings.make(torch.device("cuda" if torch.cuda.is_available() else "cpu"), budget=torch.cuda.is_available())
    try:
        call, before, n_sets = _prepare(case, cfg)
        before(0)
        call(0)
    except Exception as err:  # noqa: BLE001
        if case.impl.startswith("sdpa") or case.impl.endswith("compile"):  # a baseline that cannot run here
            pytest.skip(f"{case.impl} cannot run this case: {_short(err)}")
        raise
    state = {"k": 0}

    def setup():
        state["k"] = (state["k"] + 1) % n_sets
        before(state["k"])
        _sync(cfg.device)
        return (state["k"],), {}

    def target(k):
        call(k)
        _sync(cfg.device)

    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=min(3, rounds // 3), iterations=1)
    benchmark.extra_info.update(op=case.op, impl=case.impl, shape=case.label, dtype=str(case.dtype),
                                mode=case.mode, unit=case.unit, work=case.work)
    median_s = benchmark.stats.stats.median
    if median_s > 0:
        benchmark.extra_info["metric"] = case.work / median_s / (1e9 if case.unit == GBPS else 1e12)


def format_row(r: dict) -> str:
    head = f"{r['op']:<15} {r['impl']:<16} {r['shape']:<28} {r['dtype']:<9} {r['mode']:<8}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['note'][:120]}"
    metric = f"{r['metric']:9.2f} {r['unit']}" if r["metric"] is not None else ""
    return f"{head} {r['ms']:10.4f} ms [{r['ms_p20']:.4f}, {r['ms_p80']:.4f}] {metric}"
