"""Benchmark code that only runs on a GPU, run here on synthetic results: what
scripts/gpu_check.sh does with the JSON a device call leaves in $OUT."""
import json

import pytest

import torch

from benchmarks import bench_e2e, harness, report


def _e2e_json(folder):
    """An e2e.json as `fastbert bench --suite e2e --budget` writes it on a GPU (timings made up)."""
    cfg = harness.Settings(torch.device("cpu"))
    env = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580", "torch": "2.11.0+cu130", "triton": "3.6.0",
           "cuda": "13.0", "commit": "abc"}
    results = bench_e2e.E2EResults(folder / "e2e.json", env, cfg, meta={"suite": "e2e", "profile": "budget"})
    results.ceilings = {"copy_GBps": 3000.0, "matmul_TFLOPs": 700.0, "matmul_shape": "8192x8192x8192 bfloat16"}
    for impl, ms in (("hf_eager", 150.0), ("fb_triton", 90.0)):
        case = bench_e2e.E2ECase("base", "cls", "B8 S512", [[512] * 8], "train", impl, torch.bfloat16, 1)
        row = bench_e2e._row(case)
        row.update(ms=ms, ms_p20=ms, ms_p80=ms, reps=5, host_us=100.0, first_call_s=2.0, peak_mib=1000.0,
                   metric=case.work / (ms * 1e9), tokens_per_s=case.tokens / (ms * 1e-3))
        results.add(row)
    results.save()
    return results.path


def test_summary_of_an_e2e_run_alone(tmp_path, capsys):
    """gpu_check.sh's second call: $OUT holds e2e.json and no kernels.json. `report --summary` must
    print this run's e2e summary and targets, not fail for want of a kernels run (it returned 2 with
    "no results under benchmarks/results") nor show another run's kernels table."""
    path = _e2e_json(tmp_path)
    assert json.loads(path.read_text())["meta"]["suite"] == "e2e"
    assert report.main([str(path), "--summary"]) == 0
    printed = capsys.readouterr().out
    assert "| model | shape | mode |" in printed and "fb_triton" in printed
    assert "BERT-base fine-tuning step, S512, vs transformers eager" in printed
    assert "### Kernels" not in printed


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    """A capture that runs its body once, eagerly; a replay does nothing."""
    replays = 0

    def replay(self):
        _FakeGraph.replays += 1


def test_graph_impls_run_through_a_faked_capture(monkeypatch):
    """fb_<backend>_graph (GPU only) on the CPU with the CUDA graph API faked (make_graphed_callables
    hands back the eager module, a capture runs its body once): _prepare_graphed's wiring (the
    batch's keys, autocast without its cast cache, the fused AdamW, the inference graph's static
    logits) runs, and a training call still updates the weights."""
    import contextlib

    import fastbert.ops._backend as B

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda module, args: module)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    backend = "triton" if "triton" in B.available_backends("cpu") else "torch"
    cfg = harness.Settings(torch.device("cpu"), quick=True)
    for head, mode in (("cls", "train"), ("cls", "infer"), ("qa", "infer")):
        case = bench_e2e.E2ECase("tiny", head, "B2 S32", [[32, 17]], mode, f"fb_{backend}_graph", torch.float32, 1)
        keep = []
        call, before, extras = bench_e2e._prepare(case, cfg, keep)
        module = keep[0]
        weights = [p.detach().clone() for p in module.parameters()]
        replays = _FakeGraph.replays
        call(0)
        if mode == "train":
            assert any(not torch.equal(w, p) for w, p in zip(weights, module.parameters())), "no update"
        else:
            assert _FakeGraph.replays == replays + 1
            logits = extras["first_logits"]()
            assert torch.isfinite(logits).all() and logits.shape[0] == 2
    two = bench_e2e.E2ECase("tiny", "cls", "sst2 B1x2", [[32], [17]], "train", f"fb_{backend}_graph", torch.float32, 2)
    with pytest.raises(ValueError, match="one batch shape"):
        bench_e2e._prepare(two, cfg, [])
    assert "fb_triton_graph" not in bench_e2e._impls(torch.device("cpu"), False, True), "graphs need a GPU"
