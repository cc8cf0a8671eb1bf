"""The benchmark harness and report without running a suite (CPU, seconds): L2 handling of input sets,
saving inside a case group, derived ratios, the work formulas checked by hand, the newest run, the
targets table. No timing is asserted."""
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


# ----------------------------------------------------------------------------- work formulas, by hand

def test_attention_flops_by_hand():
    # BERT-base, B16 S512 H12 D64: QK^T and PV, 2 * 512 * 512 * 64 FLOPs each per (batch, head)
    fwd = 16 * 12 * 2 * (2 * 512 * 512 * 64)
    assert fwd == 12_884_901_888
    assert bench_attention.flops(16, 512, 12, 64, "fwd") == fwd
    assert bench_attention.flops(16, 512, 12, 64, "fwd+bwd") == 3.5 * fwd
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


def test_memory_bound_bytes_by_hand():
    n, h = 16384, 768
    # add_layernorm bf16 forward: read x and residual, write y (2 bytes each), read weight and bias
    assert bench_layernorm.bytes_moved("add_layernorm", n, h, 2, "fwd") == 3 * n * h * 2 + 2 * h * 2 == 75_500_544
    # bias_gelu bf16 backward: read dy and x, write dx; read bias, write dbias
    assert bench_layernorm.bytes_moved("bias_gelu", n, 3072, 2, "bwd") == 3 * n * 3072 * 2 + 2 * 3072 * 2
    # span score, SQuAD dev fp32: both logits, the bool mask, 20 x (int64, int64, float32) per window
    assert bench_span.bytes_moved(10570, 384, 4, 20) == 2 * 10570 * 384 * 4 + 10570 * 384 + 10570 * 20 * 20 \
        == 40_757_920


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
