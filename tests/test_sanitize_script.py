"""scripts/sanitize_csrc.py, the program gpu_check.sh's sanitizer stage runs under compute-sanitizer:
every case goes through (on the GPU, or through the CPU emulation of the kernels), and it fails
loudly, not silently, when a case does."""
import importlib.util
import re
from pathlib import Path

import pytest

from test_model_backends import _cuda_attention_on

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sanitize_csrc.py"


def _script():
    spec = importlib.util.spec_from_file_location("sanitize_csrc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_case_runs(cuda_device, monkeypatch, capsys):
    _cuda_attention_on(cuda_device, monkeypatch)
    script = _script()
    rc = script.main(["--device", cuda_device.type])
    out = capsys.readouterr().out
    assert rc == 0, out
    expected = sum(1 for family in script.CASES.values() for _ in family(cuda_device))
    assert f"sanitize_csrc: {expected} cases, 0 failed" in out, out
    assert len(re.findall(r": ok$", out, flags=re.M)) == expected


def test_a_failing_case_fails_the_run(monkeypatch, capsys):
    script = _script()

    def broken(device):
        def case():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield "broken case", case
    monkeypatch.setitem(script.CASES, "span", broken)
    assert script.main(["--device", "cpu", "--only", "span"]) == 1
    out = capsys.readouterr().out
    assert "broken case: FAILED RuntimeError: CUDA error: an illegal memory access" in out
    assert "sanitize_csrc: 1 cases, 1 failed" in out
    with pytest.raises(SystemExit):
        script.main(["--only", "attention,nonsense"])
