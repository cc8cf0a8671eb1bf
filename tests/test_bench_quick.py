"""Smoke test of the kernel benchmark suite: `fastbert bench --quick` runs every
benchmark once at tiny sizes (Triton through the interpreter on a CPU) and writes
the results JSON, the markdown table and the plot. No timing is asserted."""
import json
import re

import pytest
import torch

from fastbert.ops import available_backends

OPS = {"attention", "add_layernorm", "add_layernorm_amp", "layernorm_gelu", "bias_gelu", "span_score"}
ROW_KEYS = {"op", "impl", "shape", "dtype", "mode", "status", "ms", "ms_p20", "ms_p80", "unit", "metric",
            "pct_of_ceiling", "speedup_vs_eager", "peak_mib", "utc",
            "gpu", "driver", "torch", "triton", "cuda", "commit"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from fastbert.bench import main

    out = tmp_path_factory.mktemp("bench")
    rc = main(["--suite", "kernels", "--quick", "--out", str(out)])
    yield rc, out
    torch._dynamo.reset()  # leave no compiled baselines behind for later tests


def test_quick_run_writes_json_table_and_plot(quick_run):
    rc, out = quick_run
    assert rc == 0
    data = json.loads((out / "kernels.json").read_text())
    assert data["ceilings"]["copy_GBps"] > 0 and data["ceilings"]["matmul_TFLOPs"] > 0
    rows = data["rows"]
    assert {r["op"] for r in rows} == OPS
    for r in rows:
        assert ROW_KEYS <= r.keys(), f"row misses {ROW_KEYS - r.keys()}: {r}"
        assert r["status"] in ("ok", "skipped", "unsupported", "error")
    for op in OPS - {"span_score"}:
        assert {r["mode"] for r in rows if r["op"] == op} == {"fwd", "bwd", "fwd+bwd"}, op
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    must_run = {"eager", "compile", "outer_sum", "outer_sum_compile", "python_nbest", "sdpa_math"}
    if "triton" in available_backends(device):
        must_run.add("triton")
    broken = [(r["op"], r["impl"], r["mode"], r["note"]) for r in rows if r["impl"] in must_run and r["status"] != "ok"]
    assert not broken, broken
    for r in rows:
        if r["status"] == "ok":
            assert r["ms_p20"] <= r["ms"] <= r["ms_p80"] and r["metric"] > 0
            assert r["speedup_vs_eager"] is not None
            assert r["speedup_vs"].get("eager", 1.0) == pytest.approx(r["speedup_vs_eager"])
    span = {r["impl"]: r for r in rows if r["op"] == "span_score"}
    assert {"outer_sum", "python_nbest"} <= span["eager"]["speedup_vs"].keys()
    attention = [r for r in rows if r["op"] == "attention" and r["impl"] == "eager" and r["status"] == "ok"]
    assert all("sdpa_best" in r["speedup_vs"] for r in attention)  # sdpa_math runs on the CPU
    assert (out / "kernels.png").stat().st_size > 0
    assert "## attention" in (out / "kernels.md").read_text()


def test_report_rebuilds_table_and_readme_block(quick_run, tmp_path):
    from benchmarks import report

    _, out = quick_run
    assert report.main([str(out / "kernels.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "kernels.md").exists() and (tmp_path / "kernels.png").exists()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.START}\nold table\n{report.END}\nafter\n")
    report.update_readme(readme, report.load(out / "kernels.json"), out / "kernels.json")
    text = readme.read_text()
    assert "old table" not in text and "| attention |" in text and "### Issue 6's targets" in text
    assert text.startswith("# x\n\nbefore\n") and text.endswith("after\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_full_run_refused_without_gpu(tmp_path, capsys):
    from fastbert.bench import main

    assert main(["--out", str(tmp_path)]) == 2
    assert "--quick" in capsys.readouterr().err


def test_table_cells():
    from benchmarks import report
    rows = [dict(op="ln", shape="s", dtype="f", mode="fwd", impl="eager", status="ok", ms=2.0, speedup_vs_eager=1.0),
            dict(op="ln", shape="s", dtype="f", mode="fwd", impl="triton", status="ok", ms=0.5, speedup_vs_eager=4.0),
            dict(op="ln", shape="s", dtype="f", mode="fwd", impl="cuda", status="unsupported", ms=None,
                 speedup_vs_eager=None)]
    (key, by_impl), = report.group_by_case(rows).items()
    assert key == ("ln", "s", "f", "fwd")
    assert report.timing_cells(by_impl, ["eager", "triton", "cuda", "compile"], baseline="eager") == \
        ["2 ms", "0.5 ms (4x)", "unsupported", ""]
    assert report.timing_cells(by_impl, ["triton"], "eager", speedup_format=".2f") == ["0.5 ms (4.00x)"]


@pytest.mark.parametrize("impl, rc", [("eager", 1), ("triton", 1), ("cuda", 1), ("compile", 0)])
def test_exit_status_and_time_limit_of_a_run(tmp_path, monkeypatch, impl, rc):
    """`fastbert bench` exits 1 when a fastbert kernel or the eager reference errors (a broken
    baseline makes every ratio meaningless), 0 when only an optional baseline (torch.compile)
    does (an "unsupported" fastbert case does not count); --time-limit counts from the start of the run, so run_cases gets an absolute deadline
    on time.monotonic(). The suite is one synthetic case pair (no measurement of the CPU)."""
    import time

    from benchmarks import bench_layernorm, harness
    from fastbert.bench import main

    def broken(x):
        raise RuntimeError("kernel failed")

    def cases(profile, cfg, compile_scope):
        return [harness.Case(op="add_layernorm", impl=name, label="s", shape={}, dtype=torch.float32, mode="fwd",
                             fn=broken if name == impl else (lambda x: x * 2),
                             make_inputs=lambda k: (torch.ones(8),), work=1.0, unit=harness.GBPS)
                for name in dict.fromkeys(["eager", impl])] + [
            # a kernel without this shape is recorded, not a failure
            harness.Case(op="add_layernorm", impl="triton", label="t", shape={}, dtype=torch.float32, mode="fwd",
                         fn=None, make_inputs=lambda k: (), work=1.0, unit=harness.GBPS, status="unsupported",
                         note="no kernel for this shape")]
    deadlines = []
    real_run_cases = harness.run_cases
    monkeypatch.setattr(bench_layernorm, "cases", cases)
    monkeypatch.setattr(harness, "measure_ceilings", lambda cfg: {"copy_GBps": 1.0, "copy_bytes": 1,
                                                                  "matmul_TFLOPs": 1.0, "matmul_shape": "1x1x1"})
    monkeypatch.setattr(harness, "run_cases", lambda cases, cfg, results, deadline, log:
                        deadlines.append(deadline) or real_run_cases(cases, cfg, results, deadline, log))
    before = time.monotonic()
    assert main(["--quick", "--ops", "layernorm", "--time-limit", "3600", "--out", str(tmp_path)]) == rc
    after = time.monotonic()
    assert len(deadlines) == 1 and before + 3600 <= deadlines[0] <= after + 3600, (before, deadlines, after)
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert {(r["impl"], r["shape"]): r["status"] for r in rows}[impl, "s"] == "error"


@pytest.mark.parametrize("args, said", [
    (["--ops", "layernorm,attn"], "--ops must name one or more of attention, layernorm, span .*got 'layernorm,attn'"),
    (["--ops", ","], "--ops must name one or more"),                       # ran nothing and exited 0 before
    (["--suite", "all", "--ops", "bogus"], "--ops must name"),             # ran the e2e suite anyway before
    (["--time-limit", "0"], r"--time-limit must be a number of seconds > 0, got 0\.0"),   # 0 meant no limit
    (["--time-limit", "-5"], r"--time-limit must be .* got -5\.0"),       # skipped every case silently
    (["--time-limit", "nan"], "--time-limit must be"),
    (["--suite", "e2e", "--filter", "["], "--filter '\\[' is not a regular expression"),  # a traceback before
    (["--filter", "base"], "--filter selects end-to-end cases"),          # the kernel suite ignored it
    (["--suite", "e2e", "--ops", "span"], "--ops selects kernel benchmarks"),  # the e2e suite ignored it
])
def test_bad_arguments_are_refused_before_any_suite_runs(tmp_path, capsys, args, said):
    from fastbert.bench import main

    with pytest.raises(SystemExit) as exited:
        main(["--quick", "--out", str(tmp_path / "run"), *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert re.search(f"fastbert bench: error: {said}", err) and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_e2e_without_transformers_is_refused_up_front(tmp_path, capsys, monkeypatch):
    import importlib.util

    from fastbert.bench import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    assert main(["--quick", "--suite", "all", "--out", str(tmp_path / "run")]) == 2
    assert "the e2e suite compares against transformers, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_out_that_cannot_be_a_folder_is_refused_before_timing(tmp_path, capsys):
    """--out naming a file: a FileExistsError traceback when the results were saved, after every timing."""
    from fastbert.bench import main

    a_file = tmp_path / "taken"
    a_file.write_text("")
    for out, message in ((a_file, "is a file; it must be a folder"), (a_file / "sub", "is a file, not a folder")):
        assert main(["--quick", "--ops", "span", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"fastbert bench: error: --out {str(out)!r}" in err and message in err, err
