"""scripts/compare_quality.py's report: RESULTS.md is generated from the runs' JSON, so the
arithmetic and the grouping (a reduced run never averages with a full one) are tested here."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_quality.py"


@pytest.fixture(scope="module")
def cq():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("compare_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(task, impl, seed, f1, scale=None, wall=100.0):
    return {"task": task, "impl": impl, "seed": seed, "wall_time_s": wall, "scale": scale or {},
            "train_features": 10, "dev_features": 5, "tokens_per_s": 1000.0,
            "metrics": {"epoch": 1, "step": 3, "train_loss": 1.0, "f1": f1}}


def test_reduced_runs_are_labelled_and_never_averaged_with_full_ones(cq):
    results = [_record("squad", "fastbert", 1, 10.0, {"article_fraction": 0.3}),
               _record("squad", "transformers", 1, 9.0, {"article_fraction": 0.3})]
    for seed, (ours, theirs) in enumerate([(40.0, 38.0), (42.0, 41.0), (38.0, 38.0)], start=1):
        results += [_record("squad", "fastbert", seed, ours), _record("squad", "transformers", seed, theirs)]
    assert cq.label(results[0]) == "squad (reduced: 30% of training articles)"
    assert cq.label(results[2]) == "squad"
    assert cq.label(_record("sst2", "fastbert", 1, 0.0, {"n_train": 8000})) == "sst2"
    assert cq.label(_record("sst2", "fastbert", 1, 0.0, {"n_train": 640})) == "sst2 (reduced: 640 training examples)"
    rows = {line.split(" | ")[0].strip("| "): line for line in cq.summary_markdown(results).splitlines()[2:]}
    full = rows["squad"].split(" | ")
    # means over seeds 1-3: 40.0 vs 39.0, sd of (40, 42, 38) = 2.0, of (38, 41, 38) = sqrt(3)
    assert full[2:6] == ["40.0000 (2.0000)", "39.0000 (1.7321)", "+1.0000", "1,2,3"]
    reduced = rows["squad (reduced: 30% of training articles)"].split(" | ")
    assert reduced[2:6] == ["10.0000 (nan)", "9.0000 (nan)", "+1.0000", "1"]


def test_report_only_writes_the_report_and_runs_nothing(cq, tmp_path, monkeypatch):
    runs = tmp_path / "quality.json"
    runs.write_text(json.dumps([_record("stsb", "fastbert", 1, 0.5), _record("stsb", "transformers", 1, 0.4)]))
    monkeypatch.setattr(cq, "run", lambda *a, **k: pytest.fail("--report-only must not train"))
    report = tmp_path / "RESULTS.md"
    cq.main(["--report-only", "--out", str(runs), "--report", str(report)])
    text = report.read_text()
    assert text.startswith("# Fine-tuning quality") and str(runs) in text
    assert "| stsb | f1 | 0.5000 (nan) | 0.4000 (nan) | +0.1000 | 1 |" in text
    assert "| stsb | transformers | 1 | train_loss 1.0000, f1 0.4000 | 100 | 1000 |" in text


def test_only_seeds_both_sides_ran_are_compared_and_wall_times_stay_in_order(cq):
    """A seed only one side finished (a run cut short) must not enter that side's mean: the difference
    would compare different seeds. Wall times are listed fastbert / transformers, as the header says."""
    results = [_record("stsb", "fastbert", 1, 0.80, wall=100.0), _record("stsb", "transformers", 1, 0.70, wall=300.0),
               _record("stsb", "fastbert", 2, 0.20, wall=100.0)]   # seed 2: no transformers run
    line = cq.summary_markdown(results).splitlines()[2]
    assert line == "| stsb | f1 | 0.8000 (nan) | 0.7000 (nan) | +0.1000 | 1 | 100 / 300 |"
