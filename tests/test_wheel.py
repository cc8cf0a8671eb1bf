"""The wheel users ship, built as `python -m build` and pip building from source do: an sdist of
this checkout first (which must carry every csrc/ file, or a wheel built from it has no
fastbert._C), then `pip wheel` of the unpacked sdist. The wheel holds the
package and nothing of the repository around it (fastbert, its Triton kernels as
fastbert.kernels, the data samples, fastbert._C wherever nvcc built it, the `fastbert`
command), and installed away from the checkout it imports and runs the embedded model.

The wheel is built in a copy of the checkout's files (tracked, or new and not ignored), so
nothing stale in the checkout's build/ can slip into it; where nvcc exists that compiles
fastbert._C once more (about 100 s on 2 cores).

Where the wheel carries fastbert._C, `auditwheel repair` (scripts/build_wheels.py's) gives it
a manylinux tag, the form PyPI takes and users ship: the same files (nothing vendored: the
extension needs only system libraries), and installed it still runs. No second build."""
import importlib.util
import os
import re
import shutil
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import fastbert

ROOT = Path(__file__).resolve().parents[1]
WITH_EXTENSION = shutil.which("nvcc") is not None and os.environ.get("FASTBERT_CUDA") != "0"


def _load_build_wheels():
    spec = importlib.util.spec_from_file_location("build_wheels", ROOT / "scripts" / "build_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_wheels = _load_build_wheels()


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("checkout"), tmp_path_factory.mktemp("sdist")
    try:
        build_wheels.copy_checkout(ROOT, src)
    except RuntimeError as err:
        pytest.skip(str(err))
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=src, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, FASTBERT_CUDA="0"))
    assert done.returncode == 0, f"sdist failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    (found,) = out.glob("fastbert_kernels-*.tar.gz")
    return found


def test_sdist_carries_everything_a_build_and_the_tests_need(sdist):
    """Without MANIFEST.in the sdist held csrc/'s .cu and .cpp files only where nvcc was found, and none
    of its headers or build helpers: a wheel built from it (python -m build) crashed or had no fastbert._C."""
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    wanted = {str(p.relative_to(ROOT)) for folder in ("csrc", "tests") for p in (ROOT / folder).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".o", ".pyc")}
    assert wanted <= names, sorted(wanted - names)
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory):
    unpacked, out = tmp_path_factory.mktemp("unpacked"), tmp_path_factory.mktemp("wheel")
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    (src,) = unpacked.iterdir()
    env = dict(os.environ, FASTBERT_MANYLINUX=build_wheels.DEFAULT_MANYLINUX)  # as build_wheels.py links it
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(out), "-q"], capture_output=True, text=True, timeout=1500, env=env)
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    (found,) = out.glob(build_wheels.WHEEL_PATTERN)
    return found


@pytest.fixture(scope="module")
def repaired(wheel, tmp_path_factory):
    """The wheel after `auditwheel repair` (skipped without fastbert._C or the tools)."""
    if not WITH_EXTENSION:
        pytest.skip("no fastbert._C here (no nvcc): a pure-Python wheel needs no manylinux tag")
    if (why := build_wheels.missing_repair_tools()) is not None:
        pytest.skip(why)
    return build_wheels.repair(wheel, tmp_path_factory.mktemp("repaired"))


def _expected_files():
    """What the wheel must hold: every module of the package and its kernels, the data files."""
    files = {f"fastbert/{p.relative_to(ROOT / 'fastbert')}" for p in (ROOT / "fastbert").rglob("*.py")
             if "__pycache__" not in p.parts}
    files |= {f"fastbert/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    files |= {f"fastbert/data/{p.name}" for pattern in ("*.tsv", "*.md") for p in (ROOT / "fastbert" / "data").glob(pattern)}
    # the benchmark suites, so `fastbert bench` runs where the wheel is installed (not their results)
    files |= {f"fastbert/benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py")}
    files |= {f"fastbert/benchmarks/data/{p.name}" for p in (ROOT / "benchmarks" / "data").glob("*.txt")}
    return files


def test_wheel_holds_the_package_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _expected_files() - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    info = f"fastbert_kernels-{fastbert.__version__}.dist-info/"
    stray = sorted(n for n in names if not (n.startswith("fastbert/") or n.startswith(info)))
    assert not stray, f"the wheel carries files outside the package: {stray[:10]}"
    assert not any(n.startswith(("fastbert/tests", "fastbert/benchmarks/results", "fastbert/csrc")) for n in names)
    extensions = [n for n in names if n.startswith("fastbert/_C") and n.endswith(".so")]
    if WITH_EXTENSION:
        assert len(extensions) == 1, f"nvcc is here, so the wheel should carry fastbert._C: {extensions}"
        assert "-cp3" in wheel.name and "linux" in wheel.name, f"a wheel with an extension needs a platform tag: {wheel.name}"
    else:
        assert not extensions and wheel.name.endswith("-py3-none-any.whl"), wheel.name
    entry_points = zipfile.ZipFile(wheel).read(info + "entry_points.txt").decode()
    assert "fastbert = fastbert.cli:main" in entry_points


# Run with the install folder (argv[1]) first on sys.path; prints "ok", the backends, then _C's path.
_RUN_FROM_SITE = """
import importlib.util, sys
from pathlib import Path
import torch
import fastbert, fastbert.ops
site = Path(sys.argv[1])
with_extension = sys.argv[2] == "True"
assert Path(fastbert.__file__).resolve().is_relative_to(site), fastbert.__file__
if importlib.util.find_spec("triton") is not None:
    import fastbert.kernels.attention as kernels
    assert Path(kernels.__file__).resolve().is_relative_to(site), kernels.__file__
if with_extension:
    import fastbert._C as ext
    assert Path(ext.__file__).resolve().is_relative_to(site), ext.__file__
    assert hasattr(ext, "attention_fwd") and hasattr(ext, "add_layernorm_fwd")
tokenizer = fastbert.Tokenizer.from_pretrained("default")
model = fastbert.BertModel.from_pretrained("default").eval()
with torch.no_grad():
    out = model(**tokenizer(["the wheel works"]))
assert out.last_hidden_state.shape[-1] == model.config.hidden_size
assert torch.isfinite(out.last_hidden_state).all()
print("ok", fastbert.ops.available_backends(torch.device("cpu")))
print(ext.__file__ if with_extension else "")
"""


def _install_and_run(wheel, tmp_path):
    """Install `wheel` into a folder of its own and run _RUN_FROM_SITE there; _C's path or None."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(site),
                           str(wheel), "-q"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "-c", _RUN_FROM_SITE, str(site), str(WITH_EXTENSION)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    lines = run.stdout.splitlines()
    assert lines[0].startswith("ok"), run.stdout
    return lines[1] if WITH_EXTENSION else None


def test_installed_wheel_runs_away_from_the_checkout(wheel, tmp_path):
    """Installed into a folder of its own and imported from outside the checkout (that folder
    first on sys.path, ahead of the editable install): the package, its kernels, the extension
    when built, and the embedded model tokenizing and encoding a sentence."""
    _install_and_run(wheel, tmp_path)


def test_installed_wheel_runs_the_benchmark_suite(wheel, tmp_path):
    """`fastbert bench` from a wheel, no checkout in sight: the suites come from fastbert.benchmarks,
    the results go under ./fastbert-bench/ and record the release instead of a commit."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(site),
                           str(wheel), "-q"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("FASTBERT_REPO", "FASTBERT_COMMIT")}
    env.update(PYTHONPATH=str(site), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "fastbert.bench", "--quick", "--suite", "kernels", "--ops", "span"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    written = list((tmp_path / "fastbert-bench").glob("*/kernels.json"))
    assert len(written) == 1, run.stdout[-2000:]
    data = json.loads(written[0].read_text())
    assert data["env"]["commit"] == "fastbert 0.1.0"
    assert {r["impl"] for r in data["rows"] if r["status"] == "ok"} >= {"eager", "outer_sum"}


def test_repaired_wheel_is_manylinux_and_holds_the_same_files(wheel, repaired):
    """A manylinux platform tag (PyPI refuses linux_x86_64) for the same Python and ABI, and
    the same files: fastbert._C kept, nothing vendored (a .so that needed a library outside
    the manylinux policy, e.g. a shared CUDA runtime, would bring a fastbert.libs/)."""
    py, abi, platforms = build_wheels.wheel_tags(repaired)
    assert (py, abi) == build_wheels.wheel_tags(wheel)[:2], (wheel.name, repaired.name)
    assert platforms and all(re.fullmatch(r"manylinux(_\d+_\d+|1|2010|2014)_x86_64", p) for p in platforms), \
        f"auditwheel did not give a manylinux tag: {repaired.name}"
    # linked for manylinux_2_28 (csrc/manylinux.py) whatever this machine's glibc: RHEL 8 / Ubuntu 20.04 load it
    floor = tuple(int(x) for x in build_wheels.DEFAULT_MANYLINUX.split("_"))
    assert min(map(build_wheels.manylinux_version, platforms)) <= floor, repaired.name

    def files(path):  # auditwheel adds folder entries ("fastbert/")
        return {n for n in zipfile.ZipFile(path).namelist() if not n.endswith("/")}

    names = files(repaired)
    assert [n for n in names if n.startswith("fastbert/_C") and n.endswith(".so")], f"fastbert._C is gone: {repaired}"
    assert not build_wheels.grafted(repaired), f"auditwheel vendored libraries: {build_wheels.grafted(repaired)}"
    assert names == files(wheel), f"the repaired wheel differs in {sorted(names ^ files(wheel))}"


def test_repaired_wheel_installs_runs_and_its_extension_fails_cleanly_without_gpu(repaired, tmp_path):
    """Installed away from the checkout the repaired wheel runs as the built one does, and its
    fastbert._C (patched by auditwheel) raises the clear no-GPU error of every launcher."""
    from test_cuda_build import assert_calls_fail_cleanly_without_gpu

    extension = _install_and_run(repaired, tmp_path)
    if not torch.cuda.is_available():  # with a GPU the calls would run, on fake pointers
        assert_calls_fail_cleanly_without_gpu(extension)
