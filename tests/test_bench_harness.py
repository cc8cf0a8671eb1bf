"""The benchmark harness and report without running a suite (CPU, seconds): L2 handling of input sets,
saving inside a case group, derived ratios, the work formulas checked by hand, the newest run, the
targets table, and the timing loops (the GPU one on a simulated stream) on fake clocks. No real
timing is asserted."""
import contextlib
import dataclasses
import json
import time

import pytest
import torch

from benchmarks import bench_attention, bench_e2e, bench_layernorm, bench_span, harness, report

CPU = torch.device("cpu")


def _case(make_inputs, fn=lambda x: x * 2, mode="fwd", grad_idx=(), impl="eager", label="s", rotate=True):
    return harness.Case(op="op", impl=impl, label=label, shape={}, dtype=torch.float32, mode=mode, fn=fn,
                        make_inputs=make_inputs, work=1.0, unit=harness.GBPS, grad_idx=grad_idx, rotate=rotate)


@pytest.fixture
def flushes(monkeypatch):
    """Count L2 flushes (a CPU has none: harness._l2_flusher returns a no-op there)."""
    count = {"n": 0}

    def flusher(device):
        def flush():
            count["n"] += 1
        return flush
    monkeypatch.setattr(harness, "_l2_flusher", flusher)
    return count


def _cycle(prepared, calls):
    """Run a prepared case `calls` times over its input sets, as the timing loop does; its set count."""
    call, before, n_sets = prepared
    for k in range(calls):
        before(k % n_sets)
        call(k % n_sets)
    return n_sets


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd", "bwd"])
def test_small_input_sets_get_the_l2_flushed_before_each_call(flushes, mode):
    """max_sets sets of a small case cannot reach rotate_bytes: the L2 is flushed before every call
    (once: in "bwd" mode after the untimed forward), as triton.testing.do_bench does."""
    cfg = harness.Settings(CPU, rotate_bytes=10**7, max_sets=8)
    case = _case(lambda k: (torch.randn(64),), mode=mode, grad_idx=(0,) if mode != "fwd" else ())
    n_sets = _cycle(harness._prepare(case, cfg), 3)
    assert n_sets == 8
    assert flushes["n"] == 3


def test_large_input_sets_rotate_without_flushing(flushes):
    cfg = harness.Settings(CPU, rotate_bytes=3 * 4096 * 4, max_sets=8)
    case = _case(lambda k: (torch.randn(4096),))
    n_sets = _cycle(harness._prepare(case, cfg), 6)
    assert n_sets == 3
    assert flushes["n"] == 0
    call, before, n_sets = harness._prepare(_case(lambda k: (torch.randn(4096),), rotate=False), cfg)
    before(0)
    assert n_sets == 1 and flushes["n"] == 0


def test_attention_cases_rotate_their_inputs():
    cfg = harness.Settings.make(CPU, quick=True)
    assert all(c.rotate for c in bench_attention.cases("full", cfg, compile_scope="none"))


class _Clock:
    """time.monotonic that advances `step` seconds per reading; perf_counter stays real."""

    def __init__(self, step):
        self.t, self.step = 1000.0, step

    def monotonic(self):
        self.t += self.step
        return self.t

    perf_counter = staticmethod(time.perf_counter)


def test_kernel_run_saves_inside_a_group(tmp_path, monkeypatch):
    """A run killed in the middle of a group keeps the rows measured before (saved every 10 s)."""
    monkeypatch.setattr(harness, "time", _Clock(step=11.0))

    def killed(x):
        raise KeyboardInterrupt  # what the time limit of the device call does to the process

    inputs = lambda k: (torch.randn(8),)  # noqa: E731
    cases = [_case(inputs, impl="eager"), _case(inputs, impl="triton"), _case(inputs, fn=killed, impl="cuda")]
    results = harness.Results(tmp_path / "kernels.json", {"gpu": "cpu"}, harness.Settings.make(CPU, quick=True), {})
    with pytest.raises(KeyboardInterrupt):
        harness.run_cases(cases, harness.Settings.make(CPU, quick=True), results, log=lambda line: None)
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert [r["impl"] for r in saved["rows"]] == ["eager", "triton"]


def _e2e_cases(impls):
    return [bench_e2e.E2ECase("tiny", "cls", "B2 S32", [[32, 32]], "train", impl, torch.float32, 1)
            for impl in impls]


def test_e2e_run_skips_compiles_past_the_deadline_and_saves_inside_a_group(tmp_path, monkeypatch):
    clock = _Clock(step=4.0)
    monkeypatch.setattr(bench_e2e, "time", clock)
    ran = []

    def fake_run_case(case, cfg, reference_logits):
        if case.impl == "fb_triton":
            raise KeyboardInterrupt
        row = bench_e2e._row(case)
        if case.status == "ok":
            ran.append(case.impl)
            row.update(ms=1.0, ms_p20=1.0, ms_p80=1.0, tokens_per_s=1.0, metric=1.0, first_call_s=0.0)
        return row
    monkeypatch.setattr(bench_e2e, "run_case", fake_run_case)
    cfg = harness.Settings.make(CPU, quick=True)
    results = bench_e2e.E2EResults(tmp_path / "e2e.json", {"gpu": "cpu"}, cfg, {})
    todo = _e2e_cases(["hf_eager", "fb_torch", "hf_sdpa_compile", "fb_torch_compile", "fb_triton"])
    deadline = clock.t + 10.0  # passes after the first two implementations of the group
    with pytest.raises(KeyboardInterrupt):
        bench_e2e.run_cases(todo, cfg, results, deadline, log=lambda line: None)
    assert ran == ["hf_eager", "fb_torch"]
    saved = json.loads((tmp_path / "e2e.json").read_text())
    rows = {r["impl"]: r for r in saved["rows"]}
    assert list(rows) == ["hf_eager", "fb_torch", "hf_sdpa_compile", "fb_torch_compile"]
    assert rows["hf_sdpa_compile"]["status"] == rows["fb_torch_compile"]["status"] == "skipped"
    assert "time limit" in rows["fb_torch_compile"]["note"]


def test_derived_ratios_name_the_targets_baselines():
    def row(op, impl, ms, mode="fwd+bwd"):
        return dict(op=op, impl=impl, shape="s", dtype="bfloat16", mode=mode, status="ok", ms=ms, metric=1.0,
                    unit=harness.TFLOPS, speedup_vs_eager=None, pct_of_ceiling=None)
    rows = [row("attention", "eager", 4.0), row("attention", "triton", 1.0), row("attention", "sdpa_flash", 2.0),
            row("attention", "sdpa_cudnn", 1.5), dict(row("attention", "sdpa_efficient", None), status="error"),
            row("span_score", "triton", 0.1, "fwd"), row("span_score", "outer_sum", 3.0, "fwd"),
            row("span_score", "python_nbest", 500.0, "fwd"),
            dict(row("base-cls", "fb_triton", 2.0, "train"), speedup_vs_eager=1.7)]
    harness.add_derived(rows, {"matmul_TFLOPs": 10.0})
    triton = rows[1]
    assert triton["speedup_vs_eager"] == 4.0 and triton["pct_of_ceiling"] == pytest.approx(10.0)
    assert triton["speedup_vs"] == {"eager": 4.0, "sdpa_flash": 2.0, "sdpa_cudnn": 1.5, "sdpa_best": 1.5}
    assert rows[5]["speedup_vs"] == {"outer_sum": 30.0, "python_nbest": 5000.0}
    assert rows[5]["speedup_vs_eager"] is None
    assert rows[-1]["speedup_vs_eager"] == 1.7  # an e2e row: bench_e2e.add_derived owns it


def test_derived_ratios_never_cross_dtypes():
    """bf16 and fp16 runs of one shape are separate groups: keyed without the dtype, each triton row
    would be divided by whichever eager row came last (here fp16's 8 ms for bf16's 1 ms triton)."""
    def row(impl, dtype, ms):
        return dict(op="attention", impl=impl, shape="s", dtype=dtype, mode="fwd", status="ok", ms=ms, metric=1.0,
                    unit=harness.TFLOPS, speedup_vs_eager=None, pct_of_ceiling=None)
    rows = [row("eager", "bfloat16", 4.0), row("triton", "bfloat16", 1.0),
            row("eager", "float16", 8.0), row("triton", "float16", 2.0)]
    harness.add_derived(rows, {})
    assert rows[1]["speedup_vs_eager"] == 4.0 and rows[1]["speedup_vs"] == {"eager": 4.0}
    assert rows[3]["speedup_vs_eager"] == 4.0 and rows[3]["speedup_vs"] == {"eager": 4.0}


# ----------------------------------------------------------------------------- work formulas, by hand

def test_attention_flops_by_hand():
    # BERT-base, B16 S512 H12 D64: QK^T and PV, 2 * 512 * 512 * 64 FLOPs each per (batch, head)
    fwd = 16 * 12 * 2 * (2 * 512 * 512 * 64)
    assert fwd == 12_884_901_888
    assert bench_attention.flops(16, 512, 12, 64, "fwd") == fwd
    assert bench_attention.flops(16, 512, 12, 64, "fwd+bwd") == 3.5 * fwd
    # backward: QK^T recomputed, dV, dP, dQ, dK: 5 products of the forward's 2, as FlashAttention counts it
    assert bench_attention.flops(16, 512, 12, 64, "bwd") == 2.5 * fwd == 32_212_254_720
    # padded: only real queries x real keys count (rows of 3 and 5 real tokens)
    assert bench_attention.flops(2, 512, 12, 64, "fwd", [3, 5]) == 4 * 12 * 64 * (9 + 25)


def test_attention_padding_masks_use_real_lengths():
    sst2, squad = set(bench_e2e.read_lengths("sst2")), set(bench_e2e.read_lengths("squad"))
    assert bench_attention.length_source(128) == "sst2" and bench_attention.length_source(384) == "squad"
    assert bench_attention.length_source(512) == "unif"
    lengths = bench_attention.mask_lengths(64, 128, seed=5)
    assert set(lengths) <= sst2 and bench_attention.mask_lengths(64, 128, seed=5) == lengths
    assert set(bench_attention.mask_lengths(32, 384, seed=5)) <= squad
    make = bench_attention.make_inputs_fn(4, 128, 2, 32, lengths[:4], torch.float32, CPU, seed=5)
    (q0, _, _, m0), (q1, _, _, m1) = make(0), make(1)
    assert m0.sum(1).tolist() == lengths[:4] and torch.equal(m0, m1) and not torch.equal(q0, q1)
    cfg = harness.Settings.make(CPU, quick=True)
    padded = [c for c in bench_attention.cases("full", cfg, "none") if c.label == "base B64 S128 H12 D64 pad-sst2"]
    assert padded and padded[0].work == bench_attention.flops(64, 128, 12, 64, padded[0].mode,
                                                              bench_attention.mask_lengths(64, 128, 128_000 + 120 + 64))
    # the real fraction a plot legend reports is real tokens over all B x S positions
    real = bench_attention.mask_lengths(64, 128, 128_000 + 120 + 64)
    assert padded[0].shape["real_fraction"] == pytest.approx(sum(real) / (64 * 128))
    assert 0.0 < padded[0].shape["real_fraction"] < 1.0


def test_uniform_padding_lengths_span_a_quarter_to_all_of_s():
    """At S512 (no real length set) lengths are uniform in [S/4, S]: a narrower draw would make the
    padded cases look denser (and the FLOPs larger) than the documented mix."""
    lengths = bench_attention.mask_lengths(16, 512, seed=1)
    assert all(128 <= s <= 512 for s in lengths)
    assert min(lengths) < 256  # 16 draws from [128, 512]: some fall in the lower half


def test_memory_bound_bytes_by_hand():
    n, h = 16384, 768
    # add_layernorm bf16 forward: read x and residual, write y (2 bytes each), read weight and bias
    assert bench_layernorm.bytes_moved("add_layernorm", n, h, 2, "fwd") == 3 * n * h * 2 + 2 * h * 2 == 75_500_544
    # bias_gelu bf16 backward: read dy and x, write dx; read bias, write dbias
    assert bench_layernorm.bytes_moved("bias_gelu", n, 3072, 2, "bwd") == 3 * n * 3072 * 2 + 2 * 3072 * 2
    # span score, SQuAD dev fp32: both logits, the bool mask, 20 x (int64, int64, float32) per window
    assert bench_span.bytes_moved(10570, 384, 4, 20) == 2 * 10570 * 384 * 4 + 10570 * 384 + 10570 * 20 * 20 \
        == 40_757_920


@pytest.mark.parametrize("op, fwd, bwd", [
    # n = 10 rows, width w = 8, e = 2 bytes; parameters (w long) counted once per read or write
    # add_layernorm: fwd reads x, residual, writes y (3 n w e) + weight, bias (2 w e);
    #                bwd reads dy, z, writes dx (3 n w e) + weight read, dweight and dbias written (3 w e)
    ("add_layernorm", 3 * 10 * 8 * 2 + 2 * 8 * 2, 3 * 10 * 8 * 2 + 3 * 8 * 2),           # 512, 528
    # layernorm_gelu: fwd reads x, writes y; bwd reads dy, x, writes dx; 2 and 4 parameter vectors
    ("layernorm_gelu", 2 * 10 * 8 * 2 + 2 * 8 * 2, 3 * 10 * 8 * 2 + 4 * 8 * 2),          # 352, 544
    # bias_gelu: fwd reads x, writes y, reads bias; bwd reads dy, x, writes dx, reads bias, writes dbias
    ("bias_gelu", 2 * 10 * 8 * 2 + 8 * 2, 3 * 10 * 8 * 2 + 2 * 8 * 2),                   # 336, 512
    # add_layernorm_amp: x half (2), residual fp32 (4), y fp32 (4), y's half copy (2); bwd: dy (4), the
    # copy's gradient (2), z (4), dresidual (4), dx (2); 2 fp32 parameters read (8 w), + 1 written (12 w)
    ("add_layernorm_amp", (2 + 4 + 4 + 2) * 10 * 8 + 8 * 8, (4 + 2 + 4 + 4 + 2) * 10 * 8 + 12 * 8),
])
def test_every_layernorm_family_formula_by_hand(op, fwd, bwd):
    assert bench_layernorm.bytes_moved(op, 10, 8, 2, "fwd") == fwd
    assert bench_layernorm.bytes_moved(op, 10, 8, 2, "bwd") == bwd
    assert bench_layernorm.bytes_moved(op, 10, 8, 2, "fwd+bwd") == fwd + bwd  # both passes move their bytes


def test_memory_bound_cases_count_bytes_of_their_own_dtype():
    """A bf16 or fp16 case moves 2-byte elements: counted as 4 its GB/s (and % of copy) would double."""
    cfg = harness.Settings.make(CPU, quick=True)
    ln = {(c.op, str(c.dtype), c.mode): c.work for c in bench_layernorm.cases("budget", cfg, "none")
          if c.label == "N16384 H768" and c.impl == "eager"}
    assert ln["add_layernorm", "torch.bfloat16", "fwd"] == ln["add_layernorm", "torch.float16", "fwd"] == 75_500_544
    span = {(c.label, str(c.dtype)): c.work for c in bench_span.cases("budget", cfg, "none") if c.impl == "eager"}
    # SQuAD dev in bf16: 2 x 10570 x 384 x 2 logits + 10570 x 384 mask + 10570 x 20 x 20 top-k = 24,522,400
    assert span["squad-dev B10570 L384 k20", "torch.bfloat16"] == 24_522_400
    assert span["squad-dev B10570 L384 k20", "torch.float32"] == 40_757_920


def test_e2e_flops_by_hand():
    # BERT-base cls, B8 S512: per token 12 layers x (4 h^2 + 2 h i) weights, pooler + classifier per
    # sequence, attention 4 L h s^2 per sequence; 2 FLOPs per multiply-add; training 3x.
    per_token = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    fwd = 2 * per_token * 4096 + 2 * (768 * 768 + 768 * 2) * 8 + 4 * 12 * 768 * 8 * 512 * 512
    assert fwd == 773_103_575_040
    assert bench_e2e.flops("base", "cls", [512] * 8, "train") == 3 * fwd


# ----------------------------------------------------------------------------- report

def _write_run(root, name, started):
    folder = root / name
    folder.mkdir()
    (folder / "kernels.json").write_text(json.dumps({"meta": {"started_utc": started}, "rows": []}))
    return folder / "kernels.json"


def test_latest_results_is_the_newest_run_not_the_last_gpu_name(tmp_path):
    _write_run(tmp_path, "2026-12-01-nvidia-h200", "2026-12-01T09:00:00Z")
    newest = _write_run(tmp_path, "2026-12-01-nvidia-h100-80gb-hbm3", "2026-12-01T15:00:00Z")
    _write_run(tmp_path, "2026-11-30-nvidia-h200", "2026-11-30T23:00:00Z")
    assert report.latest_results(tmp_path) == newest


def test_targets_table():
    kernels = {"rows": [
        dict(op="attention", impl="triton", shape="base", dtype="bfloat16", mode="fwd+bwd", status="ok", tier=1,
             dims={"S": 512}, speedup_vs={"sdpa_best": 1.25}, pct_of_ceiling=40.0, speedup_vs_eager=5.0),
        dict(op="add_layernorm", impl="cuda", shape="N H768", dtype="bfloat16", mode="fwd", status="ok", tier=1,
             dims={}, speedup_vs={}, pct_of_ceiling=80.0, speedup_vs_eager=3.5),
        dict(op="span_score", impl="triton", shape="squad", dtype="float32", mode="fwd", status="ok", tier=1,
             dims={}, speedup_vs={"outer_sum": 25.0, "python_nbest": 90.0}, pct_of_ceiling=1.0,
             speedup_vs_eager=9.0),
        dict(op="span_score", impl="triton", shape="batch", dtype="float32", mode="fwd", status="ok", tier=2,
             dims={}, speedup_vs={"outer_sum": 1.0}, pct_of_ceiling=1.0, speedup_vs_eager=1.0)]}
    e2e = {"rows": [dict(op="base-cls", shape="B8 S512", mode="train", impl="fb_cuda", dtype="bfloat16",
                         status="ok", speedup_vs_eager=1.7, speedup_vs_hf_compile=1.1, mfu_pct=50.0),
                    dict(op="base-cls", shape="B8 S512", mode="train", impl="hf_eager", dtype="bfloat16",
                         status="ok", speedup_vs_eager=1.0, speedup_vs_hf_compile=0.5, mfu_pct=20.0)]}
    lines = report.targets_markdown(kernels, e2e).splitlines()[2:]
    got = [(line.split(" | ")[2], line.split(" | ")[3], line.split(" | ")[5].rstrip(" |")) for line in lines]
    assert got == [("triton", "1.25x", "yes"),                                 # attention vs SDPA best
                   ("cuda", "80%", "**no**"), ("cuda", "3.5x", "yes"),          # copy bandwidth, x eager
                   ("triton", "25x", "yes"), ("triton", "90x", "**no**"),       # outer sum, n-best
                   ("fb_cuda", "1.7x", "yes"), ("fb_cuda", "1.1x", "**no**"), ("fb_cuda", "50%", "**no**")]


def test_pytest_benchmark_entry_runs_a_case(benchmark):
    """The `pytest benchmarks/` path (GPU-only there) through harness.pytest_benchmark, on a tiny case."""
    cfg = harness.Settings.make(CPU, quick=True)
    case = next(c for c in bench_span.cases("quick", cfg, "none") if c.impl == "python_nbest")
    harness.pytest_benchmark(benchmark, case, rounds=3)
    assert benchmark.stats.stats.rounds == 3
    assert benchmark.extra_info["impl"] == "python_nbest" and benchmark.extra_info["metric"] > 0
    # a GB/s case: bytes / median seconds / 1e9 (not / 1e12, the TFLOP/s divisor)
    assert benchmark.extra_info["metric"] == pytest.approx(case.work / benchmark.stats.stats.median / 1e9)


# ----------------------------------------------------------------------------- measurement arithmetic (fake clock)

class _CallClock:
    """perf_counter that moves only when a timed call runs: each call advances it by the next of
    `durations` (seconds), so the per-call times are known exactly."""

    def __init__(self, durations):
        self.t, self.durations = 0.0, list(durations)

    def perf_counter(self):
        return self.t

    def monotonic(self):
        return self.t

    def call(self, k):
        self.t += self.durations.pop(0)


def test_time_calls_reports_the_median_and_quantiles_not_the_mean(monkeypatch):
    clock = _CallClock([1.0, 0.001, 0.001, 0.010])  # a slow first call, then 1, 1 and 10 ms
    monkeypatch.setattr(harness, "time", clock)
    cfg = harness.Settings(CPU, warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3)
    t = harness.time_calls(clock.call, lambda k: None, 1, cfg, timer="host")
    assert t.reps == 3 and t.first_call_s == pytest.approx(1.0)
    # median of (1, 1, 10) ms is 1 (the mean, 4, would let one slow call move the published number);
    # p80 interpolates 60% of the way from the 2nd to the 3rd sorted time: 1 + 0.6 * 9 = 6.4
    assert t.ms == pytest.approx(1.0) and t.p20 == pytest.approx(1.0) and t.p80 == pytest.approx(6.4)


class _FakeStream:
    """One CUDA stream and the host clock that feeds it, simulated: a kernel starts when the host
    has issued it and the kernel before it has ended; an event is stamped when the stream reaches
    it; synchronize makes the host wait for the stream. Patched in as harness's `time` and as
    torch.cuda's Event, _sleep and synchronize, it runs time_calls' GPU path on a CPU."""

    def __init__(self, cycles_per_us=1500.0):
        self.host = 0.0      # seconds
        self.tail = 0.0      # when the queued work ends, seconds
        self.cycles_per_us = cycles_per_us
        self.sleeps = []     # each _sleep's length, seconds

    def perf_counter(self):
        return self.host

    def monotonic(self):
        return self.host

    def issue(self, host_s, kernel_s):
        """The host spends host_s issuing a kernel that runs kernel_s on the GPU."""
        self.host += host_s
        self.tail = max(self.tail, self.host) + kernel_s

    def sleep(self, cycles):
        seconds = cycles / self.cycles_per_us * 1e-6
        self.sleeps.append(seconds)
        self.issue(0.0, seconds)

    def synchronize(self, device=None):
        self.host = max(self.host, self.tail)

    def Event(self, enable_timing=False):
        stream = self

        class Event:
            def record(self):
                self.at = stream.tail = max(stream.tail, stream.host)

            def elapsed_time(self, end):
                return (end.at - self.at) * 1e3
        return Event()


@pytest.fixture
def fake_gpu(monkeypatch):
    stream = _FakeStream()
    monkeypatch.setattr(harness, "time", stream)
    monkeypatch.setattr(torch.cuda, "Event", stream.Event)
    monkeypatch.setattr(torch.cuda, "_sleep", stream.sleep, raising=False)
    monkeypatch.setattr(torch.cuda, "synchronize", stream.synchronize)
    harness._sleep_cycles_per_us.cache_clear()  # calibrated against this stream, not a real one
    yield stream
    harness._sleep_cycles_per_us.cache_clear()


def _host_bound_op(stream, kernels=3, issue_us=100.0, kernel_us=20.0, log=None):
    """An op whose host issues `kernels` small kernels, each taking longer to issue than to run:
    timed by events around an idle GPU it would look issue-bound (about kernels * issue_us)."""
    def call(k):
        if log is not None:
            log.append(("call", k))
        for _ in range(kernels):
            stream.issue(issue_us * 1e-6, kernel_us * 1e-6)
    return call


def _flush_before(stream, flush_us=500.0, log=None):
    """before(k): an L2 flush, queued on the GPU ahead of the timed call."""
    def before(k):
        if log is not None:
            log.append(("before", k))
        stream.issue(5e-6, flush_us * 1e-6)
    return before


def test_device_timing_measures_gpu_work_not_issue_time_or_the_flush(fake_gpu):
    """The events around each call must time the GPU's 3 x 20 us, not the host's 3 x 100 us of
    issuing (the _sleep spin keeps the GPU busy until the whole call is queued), nor the 500 us
    flush queued before it; host_us keeps the issue time; the spin is calibrated against events
    and covers 1.5x the issue time; the input sets take turns."""
    cfg = harness.Settings(torch.device("cuda", 0), warmup_ms=2.0, rep_ms=20.0, min_reps=10, max_reps=2000)
    log = []
    t = harness.time_calls(_host_bound_op(fake_gpu, log=log), _flush_before(fake_gpu, log=log), 3, cfg)
    assert harness._sleep_cycles_per_us(0) == pytest.approx(fake_gpu.cycles_per_us)
    assert t.ms == pytest.approx(0.060) and t.p20 == pytest.approx(0.060) and t.p80 == pytest.approx(0.060)
    assert t.host_us == pytest.approx(300.0)
    # the estimate (issue, flush and run: about 0.8 ms a call) sets the count: 20 ms / 0.8 ms
    assert 15 <= t.reps <= 40
    timed_spins = fake_gpu.sleeps[-t.reps:]
    assert all(s == pytest.approx(1.5 * 300e-6) for s in timed_spins)
    # each timed call on input set k % 3, its flush queued just before it
    assert log[-2 * t.reps:] == [(step, k % 3) for k in range(t.reps) for step in ("before", "call")]


def test_device_timing_caps_the_spin_at_5_ms(fake_gpu):
    """A call that takes 12 ms to issue would need an 18 ms spin; the spin stops at 5 ms (the GPU
    idles for the rest, which the published median then includes: such calls are host-bound)."""
    cfg = harness.Settings(torch.device("cuda", 0), warmup_ms=0.0, rep_ms=0.0, min_reps=4, max_reps=4)
    t = harness.time_calls(_host_bound_op(fake_gpu, issue_us=4000.0), _flush_before(fake_gpu), 1, cfg)
    assert t.reps == 4 and t.host_us == pytest.approx(12000.0)
    assert all(s == pytest.approx(5e-3) for s in fake_gpu.sleeps[-4:])


def test_loop_timing_is_the_step_a_training_loop_sees_whether_or_not_it_waits(fake_gpu):
    """timer="loop" (bench_e2e's steps): no spin, so a host-bound step takes its host time (3 x 100
    us), and one that reads a value back mid-step (an eager model's id check: a synchronize) takes
    the same. Under the spin the first looked like 60 us of GPU work and the second like 300 us:
    compiled against eager ratios came out up to 5 ms a step in the compiled one's favour."""
    cfg = harness.Settings(torch.device("cuda", 0), warmup_ms=1.0, rep_ms=10.0, min_reps=10, max_reps=100)
    plain = _host_bound_op(fake_gpu)

    def waits(k):
        fake_gpu.issue(100e-6, 20e-6)
        fake_gpu.synchronize()                                  # a value read back on the host
        fake_gpu.issue(100e-6, 20e-6)
        fake_gpu.issue(100e-6, 20e-6)

    looped = [harness.time_calls(op, lambda k: None, 1, cfg, timer="loop") for op in (plain, waits)]
    assert not fake_gpu.sleeps
    for t in looped:
        assert t.ms == pytest.approx(0.300, abs=0.025) and t.host_us is None
    spun = [harness.time_calls(op, lambda k: None, 1, cfg) for op in (plain, waits)]
    assert spun[0].ms == pytest.approx(0.060) and spun[1].ms > 3 * spun[0].ms  # why e2e does not spin
    gpu_bound = harness.time_calls(_host_bound_op(fake_gpu, issue_us=5.0, kernel_us=200.0), lambda k: None, 1, cfg,
                                   timer="loop")
    assert gpu_bound.ms == pytest.approx(0.600, abs=0.02)


def test_host_timer_on_a_gpu_waits_for_the_flush_and_the_call(fake_gpu):
    """timer="host" (the Python n-best loop) on a GPU: synchronize after before(k), so the flush
    queued there is not timed, and after the call, so its last kernel is: 3 x 100 us of issuing
    plus the last kernel's 20 us."""
    cfg = harness.Settings(torch.device("cuda", 0), warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3)
    t = harness.time_calls(_host_bound_op(fake_gpu), _flush_before(fake_gpu), 1, cfg, timer="host")
    assert t.reps == 3 and t.ms == pytest.approx(0.320)
    assert not fake_gpu.sleeps, "no spin when the host times"


def test_peak_memory_counts_the_call_not_its_inputs(monkeypatch):
    """peak_mib: memory allocated by before(0) (inputs, a bwd mode's saved activations) is the base;
    the peak above it during the call is reported, in MiB."""
    allocated = {"now": 0, "peak": 0}

    def alloc(nbytes):
        allocated["now"] += nbytes
        allocated["peak"] = max(allocated["peak"], allocated["now"])

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])

    def call(k):  # a 3 MiB workspace, freed, then a 1 MiB output kept
        alloc(3 * 2**20)
        alloc(-3 * 2**20)
        alloc(2**20)
    assert harness.peak_mib(call, lambda k: alloc(64 * 2**20), torch.device("cuda", 0)) == pytest.approx(3.0)
    assert harness.peak_mib(call, lambda k: None, CPU) is None


def _timed(ms):
    return lambda *a, **k: harness.Timing(ms=ms, p20=ms, p80=ms, reps=1, host_us=None, first_call_s=0.0)


@pytest.mark.parametrize("unit, work, metric", [
    (harness.GBPS, 4e9, 2000.0),       # 4e9 bytes in 2 ms = 2e12 B/s = 2000 GB/s
    (harness.TFLOPS, 6e12, 3000.0),    # 6e12 FLOPs in 2 ms = 3e15 FLOP/s = 3000 TFLOP/s
])
def test_run_case_metric_is_work_over_median_time_in_its_unit(monkeypatch, unit, work, metric):
    monkeypatch.setattr(harness, "time_calls", _timed(2.0))
    case = dataclasses.replace(_case(lambda k: (torch.ones(4),)), work=work, unit=unit)
    row = harness.run_case(case, harness.Settings.make(CPU, quick=True))
    assert row["status"] == "ok" and row["ms"] == 2.0
    assert row["metric"] == pytest.approx(metric)


def test_a_kernel_row_that_takes_longer_to_issue_than_to_run_says_so(monkeypatch):
    """The kernel suite publishes GPU time (the spin hides dispatch); a call whose host issue time
    is longer (the eager attention() at short lengths) runs at the host's pace in a loop: noted."""
    timed = lambda host_us: (lambda *a, **k: harness.Timing(ms=0.1, p20=0.1, p80=0.1, reps=1, host_us=host_us,
                                                            first_call_s=0.0))
    case = dataclasses.replace(_case(lambda k: (torch.ones(4),)), note="")
    monkeypatch.setattr(harness, "time_calls", timed(450.0))
    assert harness.run_case(case, harness.Settings.make(CPU, quick=True))["note"] == \
        "host-bound: 0.45 ms to issue a call, more than the GPU's time"
    monkeypatch.setattr(harness, "time_calls", timed(50.0))
    assert not harness.run_case(case, harness.Settings.make(CPU, quick=True))["note"]


def test_ceilings_count_copy_bytes_read_and_written_and_matmul_2n3(monkeypatch):
    """% of ceiling divides by these: a copy counted once (or n^3 FLOPs) would halve the ceiling and
    double every published share of it."""
    monkeypatch.setattr(harness, "time_calls", _timed(1.0))
    c = harness.measure_ceilings(harness.Settings.make(CPU, quick=True))
    # quick/CPU: a 2^22-element float32 copy (16 MiB read + 16 MiB written) in 1 ms
    assert c["copy_bytes"] == 2 * 4 * 2**22
    assert c["copy_GBps"] == pytest.approx(2 * 4 * 2**22 / 1e6)          # 33.55 GB/s
    # a 256^3 matmul: 2 * 256^3 FLOPs in 1 ms
    assert c["matmul_TFLOPs"] == pytest.approx(2 * 256**3 / 1e9) and c["matmul_shape"].startswith("256x256x256")


def test_backward_modes_count_gradients_when_rotating_inputs(flushes):
    """In bwd modes the output and input gradients move too (twice the forward's bytes per set), so
    fewer sets reach rotate_bytes: 3 sets of 16 KiB in fwd, 2 in fwd+bwd."""
    cfg = harness.Settings(CPU, rotate_bytes=3 * 4096 * 4, max_sets=8)
    fwd = _case(lambda k: (torch.randn(4096),))
    both = _case(lambda k: (torch.randn(4096),), mode="fwd+bwd", grad_idx=(0,))
    assert harness._prepare(fwd, cfg)[2] == 3
    assert harness._prepare(both, cfg)[2] == 2
    assert flushes["n"] == 0


# ----------------------------------------------------------------------------- README tables

def _krow(op, impl, shape, unit, ms, tier=1, pct=None, speedup=None, mode="fwd"):
    return dict(op=op, impl=impl, shape=shape, dims={}, dtype="bfloat16", mode=mode, status="ok", note="",
                unit=unit, tier=tier, ms=ms, ms_p20=ms, ms_p80=ms, metric=1.0, pct_of_ceiling=pct,
                speedup_vs_eager=speedup, peak_mib=None)


def test_summary_table_shows_key_shapes_and_triton_share_of_the_right_ceiling():
    data = {"env": {}, "rows": [
        _krow("attention", "eager", "base", harness.TFLOPS, 4.0, pct=10.0, speedup=1.0),
        _krow("attention", "triton", "base", harness.TFLOPS, 1.0, pct=40.0, speedup=4.0),
        _krow("add_layernorm", "eager", "N H768", harness.GBPS, 3.0, pct=20.0, speedup=1.0),
        _krow("add_layernorm", "triton", "N H768", harness.GBPS, 1.0, pct=80.0, speedup=3.0),
        _krow("add_layernorm", "triton", "N H384", harness.GBPS, 1.0, tier=2, pct=70.0, speedup=2.0)]}
    lines = report.summary_markdown(data).splitlines()
    assert lines[-4] == "| op | shape | dtype | mode | triton | eager | triton % ceil |"
    # only the key shapes (tier 1); the last column is triton's row (not eager's) and names its ceiling
    assert lines[-2:] == ["| attention | base | bfloat16 | fwd | 1 ms (4x) | 4 ms | 40% of matmul |",
                          "| add_layernorm | N H768 | bfloat16 | fwd | 1 ms (3x) | 3 ms | 80% of copy |"]


def test_full_table_puts_each_number_in_its_column():
    data = {"env": {}, "rows": [_krow("add_layernorm", "triton", "N H768", harness.GBPS, 1.0, pct=42.0,
                                      speedup=3.0)]}
    line = next(ln for ln in report.markdown(data).splitlines() if ln.startswith("| triton |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    header = "impl | shape | dtype | mode | ms | metric | % ceil | x eager | peak MiB | note".split(" | ")
    got = dict(zip(header, cells))
    assert got["% ceil"] == "42.0" and got["x eager"] == "3.00" and got["ms"] == "1 [1, 1]"


def test_a_target_met_exactly_counts_as_met():
    """The targets say ">= target": a row exactly at the target meets it."""
    kernels = {"rows": [dict(op="add_layernorm", impl="triton", shape="N H768", dtype="bfloat16", mode="fwd",
                             status="ok", tier=1, dims={}, speedup_vs={}, pct_of_ceiling=85.0,
                             speedup_vs_eager=3.0)]}
    lines = report.targets_markdown(kernels, None).splitlines()[2:]
    assert [(ln.split(" | ")[3], ln.split(" | ")[5].rstrip(" |")) for ln in lines] == [("85%", "yes"), ("3x", "yes")]


# ----------------------------------------------------------------------------- e2e rows

def _e2e_row(impl, ms, metric=None):
    case = bench_e2e.E2ECase("base", "cls", "B8 S512", [[512] * 8], "train", impl, torch.bfloat16, 1)
    row = bench_e2e._row(case)
    row.update(ms=ms, ms_p20=ms, ms_p80=ms, metric=metric if metric is not None else case.work / (ms * 1e9))
    return row


def test_e2e_derived_ratios_and_mfu():
    rows = [_e2e_row("hf_eager", 150.0), _e2e_row("hf_sdpa", 120.0), _e2e_row("hf_sdpa_compile", 100.0),
            _e2e_row("fb_triton", 75.0, metric=350.0)]
    bench_e2e.add_derived(rows, {"matmul_TFLOPs": 700.0})
    fb = rows[-1]
    assert fb["speedup_vs_eager"] == pytest.approx(2.0)              # hf_eager 150 ms / 75 ms
    assert fb["speedup_vs_hf_compile"] == pytest.approx(100 / 75)    # hf_sdpa_compile, not hf_sdpa (120)
    assert fb["mfu_pct"] == fb["pct_of_ceiling"] == pytest.approx(50.0)   # 350 of 700 TFLOP/s, in percent


def test_e2e_summary_names_the_fastest_fastbert_implementation():
    rows = [_e2e_row("hf_eager", 150.0), _e2e_row("fb_torch", 120.0), _e2e_row("fb_triton", 75.0)]
    bench_e2e.add_derived(rows, {"matmul_TFLOPs": 700.0})
    line = bench_e2e.summary_markdown({"env": {}, "rows": rows}, with_header=False).splitlines()[-1]
    assert line.endswith(f"| {rows[-1]['mfu_pct']:.1f}% (fb_triton) |")


def test_e2e_run_case_tokens_per_second_counts_real_tokens(monkeypatch):
    """tokens_per_s is real tokens / median s: the padding of a real-length call is not throughput."""
    monkeypatch.setattr(bench_e2e, "_prepare", lambda case, cfg, keep: (lambda k: None, lambda k: None, {}))
    monkeypatch.setattr(harness, "time_calls", _timed(2.0))
    case = bench_e2e.E2ECase("tiny", "cls", "sst2 B2x2", [[3, 5], [4, 4]], "train", "fb_torch", torch.float32, 2)
    assert case.tokens == 16 and case.padded_tokens == 2 * 5 + 2 * 4
    row = bench_e2e.run_case(case, harness.Settings.make(CPU, quick=True), {})
    assert row["tokens_per_s"] == pytest.approx(16 / 2e-3)          # 8000 tokens/s
    assert row["metric"] == pytest.approx(case.work / 2e9)


def test_e2e_real_length_batches_are_distinct_draws():
    """A call on real lengths is n batches of B different rows (a sample without replacement), not
    one batch repeated."""
    cfg = harness.Settings.make(CPU, quick=True)
    for c in bench_e2e.cases("budget", cfg, "none"):
        if c.label.startswith(("sst2", "squad")) and c.impl == "hf_eager" and c.mode == "train":
            flat = [s for b in c.lengths for s in b]
            assert len(c.lengths) == c.dims["batches"] > 1 and len({tuple(b) for b in c.lengths}) == len(c.lengths)
            assert c.tokens == sum(flat) and len(flat) == c.dims["B"] * c.dims["batches"]


# ----------------------------------------------------------------------------- the GPU suites' case lists

@pytest.fixture
def gpu_case_lists(monkeypatch):
    """The budget profile's cases (what gpu_check.sh's bench and e2e stages run) as a GPU with
    fastbert._C would list them, built here without running any: the device is "cuda" and every
    backend is usable (available_backends answers as it does there)."""
    import fastbert.ops
    from fastbert.ops import _backend

    everything = lambda device: ["torch", "triton", "cuda"]  # noqa: E731
    for module in (fastbert.ops, _backend):
        monkeypatch.setattr(module, "available_backends", everything)
    monkeypatch.setattr(_backend, "triton_problem", lambda: None)
    cfg = harness.Settings(torch.device("cuda", 0), rotate_bytes=150 * 2**20)
    return {name: module.cases("budget", cfg, "key") for name, module in
            (("attention", bench_attention), ("layernorm", bench_layernorm), ("span", bench_span), ("e2e", bench_e2e))}


def test_gpu_budget_suites_hold_issue_6s_matrix(gpu_case_lists):
    """Issue 6's suite, case by case: dropping a shape, a dtype, a mode or a peer from a case builder
    would shrink the published comparison without failing any run, so the list is pinned here.
    Attention: BERT-base and -large (heads 12/16, head_dim 64) at seqlen 128, 384 and 512, head_dim 32
    and 128, fwd and fwd+bwd, bf16 and fp16, with and without padding; fastbert triton and cuda, eager,
    torch.compile of eager, SDPA with each backend (flash takes no mask). LayerNorm family: the three
    ops, fwd and backward, against eager and its compile. Span: eager outer-sum and the Python n-best
    over 10,570 SQuAD windows of 384, n-best 20. End to end: base and large, classification and QA
    heads, train step and inference, S128, S512 and real lengths, fastbert per backend (eager,
    compiled) against transformers eager, sdpa and sdpa compiled."""
    attention = gpu_case_lists["attention"]
    assert {(c.shape["H"], c.shape["D"], c.shape["S"]) for c in attention if c.shape["D"] == 64} == \
        {(h, 64, s) for h in (12, 16) for s in (128, 384, 512)}
    assert {c.shape["D"] for c in attention} == {32, 64, 128}
    assert {c.mode for c in attention} == {"fwd", "fwd+bwd"}
    assert {c.dtype for c in attention} == {torch.bfloat16, torch.float16}
    assert {c.shape["mask"] for c in attention} == {"none", "pad"}
    status = {(c.impl, c.shape["mask"]): c.status for c in attention}
    for impl in ("triton", "cuda", "eager", "compile", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math"):
        assert status[(impl, "none")] == "ok", impl
        assert status[(impl, "pad")] == ("unsupported" if impl == "sdpa_flash" else "ok"), impl
    by_key = {(c.label, str(c.dtype), c.mode) for c in attention if c.impl == "compile"}
    assert ("base B16 S512 H12 D64 nomask", "torch.bfloat16", "fwd+bwd") in by_key

    layernorm = gpu_case_lists["layernorm"]
    assert {(c.op, c.impl, c.status) for c in layernorm} >= \
        {(op, impl, "ok") for op in ("add_layernorm", "layernorm_gelu", "bias_gelu")
         for impl in ("triton", "cuda", "eager", "compile")}
    assert {(c.op, c.mode) for c in layernorm} >= \
        {(op, mode) for op in ("add_layernorm", "layernorm_gelu", "bias_gelu") for mode in ("fwd", "fwd+bwd")}
    assert {c.dtype for c in layernorm} == {torch.bfloat16, torch.float16}

    span = {(c.impl, c.label) for c in gpu_case_lists["span"] if c.status == "ok"}
    squad = "squad-dev B10570 L384 k20"
    assert {(impl, squad) for impl in ("triton", "cuda", "eager", "outer_sum", "python_nbest")} <= span

    e2e = gpu_case_lists["e2e"]
    assert {(c.model, c.head, c.mode) for c in e2e} == \
        {(m, h, mode) for m in ("base", "large") for h in ("cls", "qa") for mode in ("train", "infer")}
    assert {c.label for c in e2e} == {"B32 S128", "B8 S512", "sst2 B32x8", "squad B16x4"}
    ok = {(c.impl, c.model, c.head, c.label, c.mode) for c in e2e if c.status == "ok"}
    key = ("base", "cls", "B8 S512", "train")
    for impl in ("hf_eager", "hf_sdpa", "hf_sdpa_compile", "hf_fastbert", "fb_torch", "fb_triton", "fb_cuda",
                 "fb_torch_compile", "fb_triton_compile", "fb_cuda_compile"):
        assert (impl, *key) in ok, impl


def test_timed_backwards_copy_no_gradient_a_model_would_not():
    """add_layernorm's dx and dresidual are one tensor without dropout; taken into two leaves'
    .grad, autograd copied it inside the timed backward (a third of the bytes the kernel moves).
    The harness takes gradients with autograd.grad, as a model's non-leaf inputs get them."""
    from torch.profiler import ProfilerActivity, profile

    cfg = harness.Settings.make(torch.device("cpu"), quick=True)
    for case in bench_layernorm.cases("quick", cfg, "none"):
        if case.impl != "eager" or case.op != "add_layernorm":
            continue
        for mode in ("bwd", "fwd+bwd"):
            call, before, _ = harness._prepare(dataclasses.replace(case, mode=mode), cfg)
            before(0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call(0)
            copies = [e.key for e in prof.key_averages() if e.key in ("aten::copy_", "aten::clone")]
            assert copies == [], (mode, copies)


def test_host_bound_rows_are_marked_in_every_table_and_the_host_timer_is_named():
    """run_case notes a row whose issue time exceeds its GPU time; the full table blanked the notes
    of rows that ran and the summary/README showed nothing, so such a time read as the GPU's."""
    env = {"gpu": "G", "driver": "1", "torch": "t", "triton": "3", "cuda": "13", "commit": "abc"}

    def row(impl, ms, note="", timer="device", op="attention"):
        return {"op": op, "impl": impl, "shape": "B1 S128", "dims": {}, "dtype": "bfloat16", "mode": "fwd",
                "status": "ok", "note": note, "unit": "TFLOP/s", "work": 1e9, "tier": 1, "timer": timer,
                "ms": ms, "ms_p20": ms, "ms_p80": ms, "reps": 10, "host_us": None, "first_call_s": 0.1,
                "metric": 1.0, "pct_of_ceiling": 1.0, "speedup_vs_eager": 0.5 if impl != "eager" else None,
                "peak_mib": None}

    bound = "fastbert kernels; host-bound: 0.449 ms to issue a call, more than the GPU's time"
    data = {"env": env, "meta": {}, "rows": [row("eager", 0.05, "attention_ref"), row("triton", 0.1, bound),
                                            row("python_nbest", 900.0, "n-best loop", "host", "span_score")]}
    full = report.markdown(data)
    triton_line = next(line for line in full.splitlines() if line.startswith("| triton"))
    assert "host-bound: 0.449 ms" in triton_line and "fastbert kernels" not in triton_line
    assert "attention_ref" not in full and "| host timer |" in full
    summary = report.summary_markdown(data)
    assert "0.1 ms (0.5x) †" in summary and "0.05 ms |" in summary
    block = report.readme_block(data, harness.Path("benchmarks/results/x/kernels.json"))
    assert "† host-bound" in block


@pytest.mark.parametrize("problem", ["triton", "interpreter"])
def test_triton_rows_skip_with_the_reason_the_backend_is_off(monkeypatch, problem):
    """A triton that failed to import, or an interpreter that cannot run with this numpy: the rows
    said "needs CUDA or TRITON_INTERPRET=1" (wrong) or timed an error, and the *_fa2d rows, which
    call the kernel Function directly, died inside the interpreter instead of skipping."""
    from fastbert.ops import _backend

    said = {"triton": "the triton package is not installed",
            "interpreter": "the Triton 3.6.0 interpreter (TRITON_INTERPRET=1) cannot run with numpy 2.4.1"}[problem]
    monkeypatch.setattr(_backend, "interpreter_on", lambda: True)
    monkeypatch.setattr(_backend, "triton_problem", lambda: said if problem == "triton" else None)
    monkeypatch.setattr(_backend, "interpreter_problem", lambda: said if problem == "interpreter" else None)
    cfg = harness.Settings.make(CPU, quick=True)
    for suite in (bench_attention, bench_layernorm, bench_span):
        rows = suite.cases("quick", cfg, compile_scope="none")
        triton = [c for c in rows if c.impl.startswith("triton")]
        assert triton and all(c.status == "skipped" and c.note == f"triton backend not usable here: {said}"
                              for c in triton), [(c.impl, c.status, c.note) for c in triton]
        assert not [c for c in rows if c.impl.startswith("cuda")]


def test_triton_rows_run_where_the_interpreter_can(monkeypatch):
    from fastbert.ops import _backend

    monkeypatch.setattr(_backend, "interpreter_on", lambda: True)
    monkeypatch.setattr(_backend, "triton_problem", lambda: None)
    monkeypatch.setattr(_backend, "interpreter_problem", lambda: None)
    rows = bench_attention.cases("quick", harness.Settings.make(CPU, quick=True), compile_scope="none")
    assert {c.impl for c in rows if c.status == "ok"} >= {"triton", "triton_fa2d", "eager", "sdpa_math"}


@pytest.mark.parametrize("gpu", ["old", "old driver"])
def test_kernel_rows_on_a_gpu_the_kernels_cannot_use_skip_with_the_reason(monkeypatch, gpu):
    """A T4 (compute capability 7.5): the triton rows ran (and the *_fa2d rows call the kernels
    directly) and the cuda row said "fastbert._C not built". A driver older than _C's CUDA: the cuda
    row said the same. Each row now skips with the reason fastbert.ops gives."""
    import torch
    from fastbert.ops import _backend

    class Extension:
        CUDART_VERSION = 13000

        @staticmethod
        def device_count():
            if gpu == "old driver":
                raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")
            return 1

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_backend, "_device_capability",
                        lambda index: (7, 5, "Tesla T4") if gpu == "old" else (9, 0, "NVIDIA H100"))
    monkeypatch.setattr(_backend, "triton_importable", lambda: True)
    monkeypatch.setattr(_backend, "triton_problem", lambda: None)
    monkeypatch.setattr(_backend, "cuda_extension", lambda: Extension)
    cuda = torch.device("cuda")
    rows = pytest.warns(UserWarning) if gpu == "old driver" else contextlib.nullcontext()
    with rows:
        got = harness.kernel_rows(cuda, lambda backend: f"run {backend}")
    if gpu == "old":
        for backend in ("triton", "cuda"):
            fn, status, note = got[backend]
            assert fn is None and status == "skipped" and "Tesla T4) has compute capability 7.5" in note, note
        impls = bench_e2e._impls(cuda, compile_here=False, key=True)
        assert all(impls[f"fb_{b}"][0] == "skipped" and "compute capability 7.5" in impls[f"fb_{b}"][1]
                   for b in ("triton", "cuda")) and impls["fb_torch"] == ("ok", ""), impls
    else:
        assert got["triton"] == ("run triton", "ok", "")
        fn, status, note = got["cuda"]
        assert fn is None and status == "skipped" and "built with CUDA 13.0" in note and "insufficient" in note, note
