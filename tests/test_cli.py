import fastbert.cli


def test_encode_prints_similarities(capsys):
    assert fastbert.cli.main(["encode", "--device", "cpu", "A man plays guitar.", "Someone plays an instrument.", "Stocks fell."]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("A man", "Someone", "Stocks"))]
    sims = [[float(x) for x in row.split()[-3:]] for row in rows]
    assert sims[0][0] == 1.0 and sims[0][1] > sims[0][2]  # related sentences score higher


def test_bad_model_path_is_a_clear_error(capsys, tmp_path):
    assert fastbert.cli.main(["encode", "--model", str(tmp_path / "missing"), "x"]) == 2
    assert "is not a folder" in capsys.readouterr().err


# -- finetune / evaluate / predict on real data, tiny budgets ---------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TASKS = [
    ("sst2", "sst2/train.tsv", "sst2/train.tsv", ["a great movie"], "accuracy"),
    ("stsb", "stsb/train.tsv", "stsb/train.tsv", ["A man plays.", "A man is playing."], "pearson"),
    ("rte", "rte/train.tsv", "rte/dev.tsv", ["It rains.", "It is wet."], "accuracy"),
    ("pos", "ud_ewt/en_ewt-ud-train.conllu", "ud_ewt/en_ewt-ud-dev.conllu", ["The dog barks"], "token_accuracy"),
    ("squad", "squad/train-from-dev-v1.1.json", "squad/train-from-dev-v1.1.json", None, "f1"),
]


@pytest.mark.parametrize("task, train, dev, inputs, metric", TASKS)
def test_finetune_evaluate_predict(tmp_path, capsys, task, train, dev, inputs, metric):
    if not DATA.exists():
        pytest.skip(f"needs the shared datasets at {DATA}")
    out = tmp_path / "run"
    args = ["finetune", "--task", task, "--train", str(DATA / train), "--dev", str(DATA / dev), "--out", str(out),
            "--max-steps", "2", "--batch-size", "4", "--max-train-examples", "16", "--max-dev-examples", "8",
            "--max-seq-len", "96" if task == "squad" else "48", "--no-progress", "--device", "cpu"]
    if task == "squad":
        args += ["--doc-stride", "24"]
    assert fastbert.cli.main(args) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 2 and metric in summary["final_metrics"]
    assert fastbert.cli.main(["evaluate", "--model", str(out / "model"), "--dev", str(DATA / dev),
                              "--max-dev-examples", "8", "--device", "cpu"]) == 0
    assert metric in json.loads(capsys.readouterr().out.split("model saved to")[-1].split("\n", 1)[1])
    if inputs is None:
        assert fastbert.cli.main(["predict", "--model", str(out / "model"), "--device", "cpu",
                                  "--question", "Who won?", "--context", "The Broncos won the game."]) == 0
    else:
        assert fastbert.cli.main(["predict", "--model", str(out / "model"), "--device", "cpu", *inputs]) == 0
    assert capsys.readouterr().out.strip()


def test_finetune_unpad(tmp_path, capsys):
    """--unpad trains the packed encoder (tagging: every token's vector is read), here with
    --gradient-checkpointing too."""
    if not DATA.exists():
        pytest.skip(f"needs the shared datasets at {DATA}")
    out = tmp_path / "run"
    assert fastbert.cli.main(["finetune", "--task", "pos", "--train", str(DATA / "ud_ewt/en_ewt-ud-dev.conllu"),
                              "--dev", str(DATA / "ud_ewt/en_ewt-ud-dev.conllu"), "--out", str(out), "--unpad",
                              "--gradient-checkpointing",
                              "--max-steps", "2", "--batch-size", "4", "--max-train-examples", "16",
                              "--max-dev-examples", "8", "--max-seq-len", "48", "--no-progress",
                              "--device", "cpu"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["unpad"] is True and summary["gradient_checkpointing"] is True and summary["steps"] == 2 and "token_accuracy" in summary["final_metrics"]


def test_finetune_compiled(tmp_path, capsys):
    """--compile BACKEND trains through torch.compile (aot_eager: the graphs without inductor's
    C++ compile time on a CPU); --compile with --unpad is refused with a reason."""
    if not DATA.exists():
        pytest.skip(f"needs the shared datasets at {DATA}")
    out = tmp_path / "run"
    args = ["finetune", "--task", "sst2", "--train", str(DATA / "sst2/train.tsv"), "--out", str(out),
            "--max-steps", "2", "--batch-size", "4", "--max-train-examples", "8", "--max-seq-len", "32",
            "--no-progress", "--device", "cpu"]
    assert fastbert.cli.main(args + ["--compile", "aot_eager", "--unpad"]) == 2
    assert "--unpad and --compile" in capsys.readouterr().err
    assert fastbert.cli.main(args + ["--compile", "aot_eager"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["compile"] == "aot_eager" and summary["steps"] == 2


def test_resume_continues_from_checkpoint(tmp_path, capsys):
    if not DATA.exists():
        pytest.skip(f"needs the shared datasets at {DATA}")
    args = ["finetune", "--task", "sst2", "--train", str(DATA / "sst2/train.tsv"), "--out", str(tmp_path),
            "--max-steps", "4", "--save-every", "2", "--batch-size", "4", "--max-train-examples", "16",
            "--max-seq-len", "32", "--no-progress", "--device", "cpu"]
    assert fastbert.cli.main(args) == 0
    assert fastbert.cli.main(args + ["--resume"]) == 0
    assert "resumed from step 4" in capsys.readouterr().out


def test_finetune_needs_a_task(tmp_path, capsys):
    assert fastbert.cli.main(["finetune", "--train", "x", "--out", str(tmp_path)]) == 2
    assert "give --task" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    """The README's main job (`fastbert demo`), on 32 training examples: fine-tunes the embedded
    MiniLM, evaluates on the shipped dev sample, saves, reloads and predicts the demo reviews."""
    assert fastbert.cli.main(["demo", "--out", str(tmp_path / "demo"), "--max-train-examples", "32"]) == 0
    summary = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert summary["steps"] == 1 and 0.0 <= summary["final_metrics"]["accuracy"] <= 1.0
    printed = capsys.readouterr().out
    assert "predictions of the fine-tuned model" in printed
    assert sum(line.strip()[:1] in "01" for line in printed.split("predictions")[-1].splitlines()[1:]) == 4
