"""pytest entry point to the kernel benchmarks, through pytest-benchmark:

    pytest benchmarks/ --benchmark-json results.json

collects the `test_*` functions of benchmarks/bench_*.py (the same cases and
inputs `fastbert bench` times). They need a CUDA GPU and are skipped without one.
"""
import importlib.util
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # As in tests/conftest.py: kernels must be defined for the interpreter before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAVE_PYTEST_BENCHMARK = importlib.util.find_spec("pytest_benchmark") is not None
HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with `pytest -m gpu`)")


def pytest_collect_file(parent, file_path):
    """bench_*.py are benchmark modules, not test_*.py: collect them here (pytest-benchmark needed)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and HAVE_PYTEST_BENCHMARK:
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="kernel benchmarks need a CUDA GPU")
    for item in items:
        if str(item.path).startswith(HERE) and "gpu" in item.keywords:
            item.add_marker(skip)
