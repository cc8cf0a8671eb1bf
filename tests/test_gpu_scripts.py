"""The GPU scripts run on the CPU at toy sizes, so a crash costs no device time: the carry
folder is prepared as for the device (float16 MiniLM, the data it needs), then
scripts/gpu_finetune.py fine-tunes for a step with fastbert (bf16 autocast: the GPU default)
and with transformers, and evaluates, SST-2 and SQuAD."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "squad").exists(), reason="needs ../shared/data")
def test_gpu_finetune_runs_at_toy_size_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    carry, out = tmp_path / "carry", tmp_path / "finetune.json"
    prepared = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_gpu_carry.py"), "--out", str(carry)],
                              capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_finetune.py"), "--carry", str(carry),
                           "--out", str(out), "--work", str(tmp_path / "work"), "--device", "cpu",
                           "--impls", "torch", "transformers", "--precision", "bf16", "--max-steps", "1",
                           "--max-train-examples", "32", "--max-dev-examples", "8", "--squad-max-len", "256",
                           "--warmup-steps", "0"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert {(r["task"], r["impl"]) for r in runs} == {(t, i) for t in ("sst2", "squad") for i in ("torch", "transformers")}
    for r in runs:
        assert r["status"] == "ok" and r["precision"] == "bf16", r
        metrics = r["metrics"]
        assert ("accuracy" in metrics) if r["task"] == "sst2" else ("f1" in metrics and "exact_match" in metrics)
