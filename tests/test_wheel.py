"""The wheel users ship, built from this checkout (`pip wheel . --no-deps`): it holds the
package and nothing of the repository around it (fastbert, its Triton kernels as
fastbert.kernels, the data samples, fastbert._C wherever nvcc built it, the `fastbert`
command), and installed away from the checkout it imports and runs the embedded model.

The wheel is built in a copy of the checkout's files (tracked, or new and not ignored), so
nothing stale in the checkout's build/ can slip into it; where nvcc exists that compiles
fastbert._C once more (about 70 s on 2 cores)."""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WITH_EXTENSION = shutil.which("nvcc") is not None and os.environ.get("FASTBERT_CUDA") != "0"


def _copy_checkout(dest):
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the files of the source distribution are unknown")
    for name in filter(None, listed.stdout.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("checkout"), tmp_path_factory.mktemp("wheel")
    _copy_checkout(src)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(out), "-q"], capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    (found,) = out.glob("fastbert-*.whl")
    return found


def _expected_files():
    """What the wheel must hold: every module of the package and its kernels, the data files."""
    files = {f"fastbert/{p.relative_to(ROOT / 'fastbert')}" for p in (ROOT / "fastbert").rglob("*.py")
             if "__pycache__" not in p.parts}
    files |= {f"fastbert/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    files |= {f"fastbert/data/{p.name}" for pattern in ("*.tsv", "*.md") for p in (ROOT / "fastbert" / "data").glob(pattern)}
    return files


def test_wheel_holds_the_package_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _expected_files() - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    info = "fastbert-0.1.0.dist-info/"
    stray = sorted(n for n in names if not (n.startswith("fastbert/") or n.startswith(info)))
    assert not stray, f"the wheel carries files outside the package: {stray[:10]}"
    assert not any(n.startswith(("fastbert/tests", "fastbert/benchmarks", "fastbert/csrc")) for n in names)
    extensions = [n for n in names if n.startswith("fastbert/_C") and n.endswith(".so")]
    if WITH_EXTENSION:
        assert len(extensions) == 1, f"nvcc is here, so the wheel should carry fastbert._C: {extensions}"
        assert "-cp3" in wheel.name and "linux" in wheel.name, f"a wheel with an extension needs a platform tag: {wheel.name}"
    else:
        assert not extensions and wheel.name.endswith("-py3-none-any.whl"), wheel.name
    entry_points = zipfile.ZipFile(wheel).read(info + "entry_points.txt").decode()
    assert "fastbert = fastbert.cli:main" in entry_points


def test_installed_wheel_runs_away_from_the_checkout(wheel, tmp_path):
    """Installed into a folder of its own and imported from outside the checkout (that folder
    first on sys.path, ahead of the editable install): the package, its kernels, the extension
    when built, and the embedded model tokenizing and encoding a sentence."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(site),
                           str(wheel), "-q"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    script = textwrap.dedent(f"""
        import importlib.util, sys
        from pathlib import Path
        import torch
        import fastbert, fastbert.ops
        site = Path({str(site)!r})
        assert Path(fastbert.__file__).resolve().is_relative_to(site), fastbert.__file__
        if importlib.util.find_spec("triton") is not None:
            import fastbert.kernels.attention as kernels
            assert Path(kernels.__file__).resolve().is_relative_to(site), kernels.__file__
        if {WITH_EXTENSION!r}:
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
    """)
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    assert run.stdout.startswith("ok")
