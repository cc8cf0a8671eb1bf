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


def _tiny_hf_classifier(num_labels=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config)


def test_hf_trainer_arguments_are_the_budget_in_transformers_terms(cq, tmp_path):
    import torch
    pytest.importorskip("accelerate")
    budget = {"lr": 8e-5, "batch_size": 32, "epochs": 3}
    args = cq.hf_trainer_arguments(tmp_path, budget, seed=2, total_steps=25, device=torch.device("cpu"))
    assert (args.learning_rate, args.per_device_train_batch_size, args.num_train_epochs, args.seed) == (8e-5, 32, 3, 2)
    assert args.warmup_steps == 3   # transformers rounds 10% of 25 steps up; fastbert's Trainer takes int(2.5)
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    assert (args.weight_decay, args.max_grad_norm, schedule) == (0.01, 1.0, "linear")
    sampler = getattr(args, "train_sampling_strategy", None) or ("group_by_length" if args.group_by_length else None)
    assert sampler == "group_by_length"


def test_hf_trainer_trains_transformers_model_through_its_own_loop(cq, tmp_path):
    """The step count and the train loss come from transformers' Trainer (2 epochs of 3 batches), the
    dev metrics from the evaluation given, on transformers' model behind fastbert's interface."""
    import torch
    pytest.importorskip("accelerate")
    from fastbert import tasks

    torch.manual_seed(0)
    model = _tiny_hf_classifier()
    before = model.classifier.weight.detach().clone()
    rows = torch.Generator().manual_seed(1)
    features = []
    for i in range(10):
        n = 3 + i % 5
        ids = torch.randint(5, 50, (n,), generator=rows).tolist()
        features.append({"input_ids": [2] + ids, "token_type_ids": [0] * (n + 1), "labels": i % 2, "example_index": i})
    seen = []
    summary = cq.train_with_hf_trainer(model, tasks.TaskData(features), lambda m: seen.append(m) or {"accuracy": 0.5},
                                       tmp_path / "run", {"lr": 1e-2, "batch_size": 4, "epochs": 2}, seed=1,
                                       device=torch.device("cpu"))
    metrics = summary["epochs"][-1]
    assert metrics["step"] == 6 and metrics["epoch"] == 2 and metrics["accuracy"] == 0.5   # 2 epochs of 3 batches
    assert summary["tokens_per_s"] > 0
    losses = [entry["loss"] for entry in summary["log_history"] if "loss" in entry]
    assert len(losses) == 2 and metrics["train_loss"] == losses[1]    # the last epoch's, as fastbert's Trainer
    assert isinstance(seen[0], cq.HFAdapter) and seen[0].model is model
    assert not torch.equal(model.classifier.weight.detach(), before)


def test_squad_v2_budget_asks_each_paragraph_its_neighbours_questions(cq):
    """squad_v2's data: every question kept; after each paragraph's own, up to two of the next
    paragraph's (the last takes the first's), whose answers are not in it, without an answer."""
    from fastbert.data import SquadExample

    def ex(qid, title, context, answer):
        return SquadExample(qid, title, f"{qid}?", context, [answer], [context.index(answer)])

    examples = [ex("a1", "A", "red fox", "fox"), ex("a2", "A", "red fox", "red"),
                ex("b1", "A", "blue jay", "jay"), ex("b2", "A", "blue jay", "blue"), ex("b3", "A", "blue jay", "jay"),
                ex("c1", "A", "red jay", "red jay"), ex("s1", "S", "lone", "lone")]
    out = cq.add_unanswerable(examples, per_paragraph=2)
    assert [e.id for e in out if e.answers] == [e.id for e in examples]
    moved = {(e.id, e.context) for e in out if not e.answers}
    # red fox asks b1, b2 (jay, blue: absent); blue jay asks c1 (red jay: absent); red jay asks nothing
    # (fox absent but a2's red is there; a1's fox: absent -> asked); one-paragraph article S asks nothing
    assert moved == {("b1-none", "red fox"), ("b2-none", "red fox"), ("c1-none", "blue jay"), ("a1-none", "red jay")}
    assert len({e.id for e in out}) == len(out)
    assert cq.BUDGETS["squad_v2"]["file"] == cq.BUDGETS["squad"]["file"]


def test_summary_leaves_out_thresholds_and_undefined_metrics(cq):
    rows = []
    for seed in (1, 2):
        for impl, f1 in (("fastbert", 50.0 + seed), ("transformers", 49.0 + seed)):
            record = _record("squad_v2", impl, seed, f1)
            record["metrics"].update(best_f1_threshold=-1.5 * seed, no_answer_f1=None)
            rows.append(record)
    table = cq.summary_markdown(rows)
    assert "| squad_v2 | f1 | 51.5000 (0.7071) | 50.5000 (0.7071) | +1.0000 |" in table
    assert "threshold" not in table and "no_answer_f1" not in table
    assert "no_answer_f1 undefined" in cq.runs_markdown(rows)


def test_bf16_runs_get_their_own_table_against_transformers(cq, tmp_path, monkeypatch):
    """fastbert_bf16 is compared with transformers (fp32) in a table of its own, never averaged into
    fastbert's; and it trains fastbert's model under bf16 autocast."""
    rows = [_record("stsb", "fastbert", 1, 0.80), _record("stsb", "transformers", 1, 0.70),
            _record("stsb", "fastbert_bf16", 1, 0.75, wall=40.0)]
    report = cq.report_markdown(rows, "quality.json")
    first, bf16 = report.split("fastbert under bf16 autocast")
    assert "| stsb | f1 | 0.8000 (nan) | 0.7000 (nan) | +0.1000 | 1 | 100 / 100 |" in first
    assert "| task | metric | fastbert bf16 mean (sd) | transformers mean (sd) |" in bf16
    assert "| stsb | f1 | 0.7500 (nan) | 0.7000 (nan) | +0.0500 | 1 | 40 / 100 |" in bf16
    seen = {}

    class Stop(Exception):
        pass

    def trainer(model, features, collate, cfg, *args):
        seen.update(precision=cfg.precision, model=type(model).__module__)
        raise Stop

    monkeypatch.setattr(cq.train, "Trainer", trainer)
    monkeypatch.setattr(cq, "split_data", lambda *a: (cq.tasks.TaskData([]), cq.tasks.TaskData([])))
    budget = dict(cq.BUDGETS["stsb"])
    for impl, precision in (("fastbert_bf16", "bf16"), ("fastbert", "fp32")):
        with pytest.raises(Stop):
            cq.run("stsb", impl, 1, tmp_path, budget, cq.torch.device("cpu"))
        assert seen == {"precision": precision, "model": "fastbert.heads"}
