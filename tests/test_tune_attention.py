"""benchmarks/tune_attention.py on the CPU (--quick, Triton interpreter): the plumbing of the GPU
tuning run: every candidate of every kernel runs through CONFIG_OVERRIDE, is compared with the
default tile's outputs and timed against it in the same run. No timing is asserted."""
import json

import pytest

from conftest import ON_GPU

pytestmark = pytest.mark.skipif(ON_GPU, reason="the quick mode is the CPU check; on a GPU run it for real")


def test_quick_run_times_every_candidate_against_the_default(tmp_path):
    pytest.importorskip("triton")
    from benchmarks import tune_attention
    from fastbert.kernels import attention as KA

    out = tmp_path / "tune.json"
    assert tune_attention.main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert KA.CONFIG_OVERRIDE == {}
    for p in (0.0, 0.1):
        for kernel in ("fwd", "bwd_dq", "bwd"):
            mine = [r for r in rows if r["kernel"] == kernel and r["dropout_p"] == p]
            labels = {r["label"] for r in mine}
            assert {"16x16/w1/s1", "32x16/w1/s1"} <= labels, labels
            assert sum(r["default"] for r in mine) == 1
            assert all(r["status"] == "ok" and r["ms"] > 0 and r["rel_diff"] <= 1e-4 for r in mine), mine
            assert [r["vs_default"] for r in mine if r["default"]] == [1.0]


def test_a_candidate_that_disagrees_is_a_mismatch(tmp_path, monkeypatch):
    """Every candidate's outputs are checked: with no tolerance at all, the differently tiled ones
    (summation order) are reported and the run fails."""
    pytest.importorskip("triton")
    from benchmarks import tune_attention
    import torch

    monkeypatch.setitem(tune_attention.TOLERANCE, torch.float32, -1.0)
    out = tmp_path / "tune.json"
    assert tune_attention.main(["--quick", "--dropout", "0", "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert {r["status"] for r in rows} == {"mismatch"}


def test_a_default_tile_that_fails_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """The default tile may fail on some GPU (out of shared memory): its row says so, the other
    candidates are timed without a ratio (the log line formatted None and killed the run, losing
    every row), the JSON is written, and the run fails since the default must work."""
    pytest.importorskip("triton")
    from benchmarks import tune_attention
    from fastbert.kernels import attention as KA

    real = KA.attention_fwd
    default = dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)

    def attention_fwd(*args, **kwargs):
        if KA.CONFIG_OVERRIDE.get("fwd") == default:
            raise RuntimeError("out of resource: shared memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(KA, "attention_fwd", attention_fwd)
    out = tmp_path / "tune.json"
    assert tune_attention.main(["--quick", "--dropout", "0", "--out", str(out)]) == 1
    rows = [r for r in json.loads(out.read_text())["rows"] if r["kernel"] == "fwd"]
    assert [r["status"] for r in rows if r["default"]] == ["error"], rows
    others = [r for r in rows if not r["default"]]
    assert others and all(r["status"] == "ok" and r["ms"] > 0 and r["vs_default"] is None for r in others)
    assert "out of resource" in capsys.readouterr().out
