"""Smoke test of the end-to-end benchmark suite: `fastbert bench --suite e2e --quick` runs a
fine-tuning step and an inference pass of a tiny BERT per implementation (fastbert backends,
transformers eager/sdpa, torch.compile of both) on the CPU, and writes the JSON rows, the
markdown table and the plot. No timing is asserted."""
import json
import re

import pytest
import torch

from fastbert.ops import available_backends

ROW_KEYS = {"op", "impl", "shape", "dims", "dtype", "mode", "status", "note", "unit", "work", "ms", "ms_p20",
            "ms_p80", "metric", "pct_of_ceiling", "mfu_pct", "speedup_vs_eager", "speedup_vs_hf_compile",
            "tokens", "padded_tokens", "tokens_per_s", "peak_mib", "first_call_s", "max_abs_diff", "utc",
            "gpu", "driver", "torch", "triton", "cuda", "commit"}
GROUPS = {("tiny-cls", "B2 S32"), ("tiny-cls", "sst2 B4x2"), ("tiny-qa", "squad B2x2")}
KEY = ("tiny-cls", "B2 S32")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from fastbert.bench import main

    out = tmp_path_factory.mktemp("bench_e2e")
    rc = main(["--suite", "e2e", "--quick", "--out", str(out)])
    yield rc, out, json.loads((out / "e2e.json").read_text())
    torch._dynamo.reset()  # leave no compiled models behind for later tests


def test_quick_run_writes_rows_table_and_plot(quick_run):
    rc, out, data = quick_run
    assert rc == 0
    assert data["ceilings"]["matmul_TFLOPs"] > 0
    rows = data["rows"]
    assert {(r["op"], r["shape"]) for r in rows} == GROUPS
    for r in rows:
        assert ROW_KEYS <= r.keys(), f"row misses {ROW_KEYS - r.keys()}: {r}"
        assert r["status"] in ("ok", "skipped", "unsupported", "error")
        assert r["unit"] == "TFLOP/s" and r["work"] > 0
        assert 0 < r["tokens"] <= r["padded_tokens"]
    for op, shape in GROUPS:
        assert {r["mode"] for r in rows if (r["op"], r["shape"]) == (op, shape)} == {"train", "infer"}
    # Real lengths are padded per batch: some positions are padding.
    assert any(r["padded_tokens"] > r["tokens"] for r in rows if r["shape"].startswith("sst2"))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from fastbert.transformers_integration import transformers_supported

    drop_in = ("hf_fastbert",) if transformers_supported() else ()
    must_run = {(op, shape, impl) for op, shape in GROUPS for impl in ("hf_eager", "hf_sdpa", "fb_torch") + drop_in}
    must_run |= {KEY + (impl,) for impl in ("hf_sdpa_compile", "fb_torch_compile")}
    if "triton" in available_backends(device):
        must_run.add(KEY + ("fb_triton",))
        must_run |= {(op, shape, "fb_triton_unpad") for op, shape in GROUPS if not shape.startswith("B")}
    broken = [(r["op"], r["shape"], r["mode"], r["impl"], r["note"]) for r in rows
              if (r["op"], r["shape"], r["impl"]) in must_run and r["status"] != "ok"]
    assert not broken, broken
    for r in rows:
        if r["status"] == "ok":
            assert r["ms_p20"] <= r["ms"] <= r["ms_p80"] and r["metric"] > 0 and r["tokens_per_s"] > 0
            assert r["speedup_vs_eager"] is not None and r["mfu_pct"] is not None
    assert (out / "e2e.png").stat().st_size > 0
    md = (out / "e2e.md").read_text()
    assert "## tiny-cls" in md and "## tiny-qa" in md and "## Summary" in md


def test_every_implementation_gets_the_same_weights(quick_run):
    """Inference logits on the first batch agree with transformers eager (float32 on the CPU)."""
    _, _, data = quick_run
    infer = [r for r in data["rows"] if r["mode"] == "infer" and r["status"] == "ok" and r["impl"] != "hf_eager"]
    assert infer
    for r in infer:
        assert r["max_abs_diff"] is not None and r["max_abs_diff"] < 1e-4, r


def test_report_rebuilds_e2e_tables_and_readme_block(quick_run, tmp_path):
    """`python -m benchmarks.report e2e.json --out DIR` rebuilds e2e.md/png (a run killed by its time
    limit leaves only the JSON); the README block carries the e2e summary beside the kernels one."""
    from benchmarks import report

    _, out, data = quick_run
    assert report.main([str(out / "e2e.json"), "--out", str(tmp_path / "again")]) == 0
    assert "## Summary" in (tmp_path / "again" / "e2e.md").read_text()
    assert (tmp_path / "again" / "e2e.png").stat().st_size > 0
    kernels = {"env": data["env"], "meta": {"suite": "kernels"}, "ceilings": {}, "rows": []}
    (out / "kernels.json").write_text(json.dumps(kernels))
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{report.START}\n{report.END}\n")
    assert report.main([str(out / "kernels.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "### End to end" in text and "| tiny-cls | B2 S32 | train |" in text
    assert "### Issue 6's targets (set for an H100) against this run" in text
    (out / "kernels.json").unlink()
    # a kernels run without an e2e.json beside it takes another run's: the targets' heading names both
    other = tmp_path / "kernels-only"
    other.mkdir()
    (other / "kernels.json").write_text(json.dumps({**kernels, "env": {**data["env"], "commit": "abc1234"}}))
    block = report.readme_block(report.load(other / "kernels.json"), other / "kernels.json", out / "e2e.json")
    assert re.search(r"### Issue 6's targets \(set for an H100\) against two runs: kernels from `.*kernels-only` "
                     r"\(.*, commit `abc1234`\), end to end from `.*` \(", block), block


@pytest.mark.parametrize("head", ["cls", "qa"])
def test_flops_counts_the_matrix_products(head):
    from benchmarks import bench_e2e

    model = bench_e2e._build_fastbert("tiny", head, "torch", torch.device("cpu"))
    per_token = sum(m.weight.numel() for m in model.bert.layers.modules() if isinstance(m, torch.nn.Linear))
    per_seq = 0
    if head == "cls":
        per_seq = model.bert.pooler.weight.numel() + model.classifier.weight.numel()
    else:
        per_token += model.qa_outputs.weight.numel()
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    lengths = [5, 17, 32]
    attention = 4 * layers * hidden * sum(s * s for s in lengths)
    forward = 2 * per_token * sum(lengths) + 2 * per_seq * len(lengths) + attention
    assert bench_e2e.flops("tiny", head, lengths, "infer") == pytest.approx(forward)
    assert bench_e2e.flops("tiny", head, lengths, "train") == pytest.approx(3 * forward)


def test_length_files_hold_real_token_counts():
    from benchmarks import bench_e2e

    sst2, squad = bench_e2e.read_lengths("sst2"), bench_e2e.read_lengths("squad")
    assert len(sst2) == 2000 and 2 <= min(sst2) and max(sst2) <= 128
    assert len(squad) > 5000 and max(squad) == 384
