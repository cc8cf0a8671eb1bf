"""Build fastbert._C from csrc/ with nvcc and pybind11 (no torch C++ headers).

setup.py calls `cuda_extension(sources)` when csrc/ has sources and nvcc is on PATH (or
FASTBERT_CUDA=1); it returns the (ext_modules, cmdclass) pair for setuptools.setup.

Every .cu and .cpp file is compiled by nvcc (for .cpp it only drives the host compiler,
adding CUDA's include path), several at a time, and nvcc links the shared object with
the static CUDA runtime (nvcc's default), so the module needs only the driver at run time.
After linking, the module is imported once in a subprocess: an undefined symbol fails the
build instead of the first `import fastbert._C`.

Environment (build switches; STYLE.md habit 12):
    FASTBERT_CUDA=0/1        0: no extension; 1: required (a failed build fails the install);
                             unset: built where nvcc exists, a failure is a warning
    FASTBERT_CUDA_ARCH       targets, default "80;90": SASS for sm_80 and sm_90 plus PTX of the
                             highest (JIT-compiled by newer drivers). Items like "90a" (wgmma,
                             setmaxnreg) or "86"; "+PTX" on an item puts PTX there instead.
    FASTBERT_PTXAS_VERBOSE=1 pass -Xptxas -v; the register/spill report of every kernel goes to
                             build/ptxas.log (FASTBERT_PTXAS_LOG overrides the path). Summarise
                             it with `python csrc/build_ext.py report build/ptxas.log`.
    MAX_JOBS / FASTBERT_BUILD_JOBS   parallel nvcc processes (default: CPU count)
    FASTBERT_NVCC_FLAGS      extra nvcc flags (split on spaces), e.g. "-G" or "-DFOO=1"
    FASTBERT_MANYLINUX=2_28  relink so the module loads on glibc 2.28 / GCC 8's libstdc++ (or 2_17)
                             whatever this machine's glibc: csrc/manylinux.py. scripts/build_wheels.py
                             sets 2_28; a source build for this machine needs nothing of it.

Objects are reused when newer than their source, every csrc/ header, this file and the
flags they were built with (recorded beside each object), so an edit rebuilds only what
it touches; `python setup.py build_ext --inplace --force` rebuilds everything.

`python csrc/build_ext.py stamp` prints `build_stamp()`: the sha256 of what the module is built
from and for here. scripts/build_wheels.py --prebuilt writes it beside a module it built, and
scripts/device_install.sh uses such a prebuilt module instead of compiling when the stamps match.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent  # csrc/
ROOT = HERE.parent
EXT_NAME = "fastbert._C"
DEFAULT_ARCH = "80;90"


def cuda_arch_flags(spec: str | None = None) -> list[str]:
    """nvcc -gencode flags for FASTBERT_CUDA_ARCH: SASS for each item, PTX for the highest
    (or for the items marked +PTX)."""
    spec = spec if spec is not None else os.environ.get("FASTBERT_CUDA_ARCH", DEFAULT_ARCH)
    items = [s.strip() for s in re.split(r"[;, ]+", spec) if s.strip()]
    if not items:
        raise ValueError(f"FASTBERT_CUDA_ARCH is empty ({spec!r}); expected e.g. '80;90'")
    archs, ptx = [], []
    for item in items:
        plus_ptx = item.upper().endswith("+PTX")
        name = item[:-4] if plus_ptx else item
        name = name.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", name):
            raise ValueError(f"FASTBERT_CUDA_ARCH item {item!r} is not an architecture like '80', '90' or '90a'")
        archs.append(name)
        if plus_ptx:
            ptx.append(name)
    if not ptx:
        ptx = [max(archs, key=lambda a: int(re.match(r"\d+", a).group()))]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags += [f"-gencode=arch=compute_{a},code=compute_{a}" for a in ptx]
    return flags


def _jobs() -> int:
    for var in ("FASTBERT_BUILD_JOBS", "MAX_JOBS"):
        if os.environ.get(var, "").strip().isdigit():
            return max(1, int(os.environ[var]))
    return max(1, os.cpu_count() or 1)


def _pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as err:  # pyproject.toml's build requirements bring it in isolated builds
        raise RuntimeError("building fastbert._C needs pybind11 (pip install 'pybind11>=2.12'), "
                           "or set FASTBERT_CUDA=0 to install without the CUDA extension") from err
    return pybind11.get_include()


class BuildExt(build_ext):
    """build_ext that compiles fastbert._C with nvcc in parallel and links it with nvcc."""

    def build_extension(self, ext):
        if ext.name != EXT_NAME:
            return super().build_extension(ext)
        started = time.perf_counter()
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            raise _compile_error("nvcc is not on PATH")
        sources = [Path(s) if Path(s).is_absolute() else ROOT / s for s in ext.sources]
        verbose_ptxas = os.environ.get("FASTBERT_PTXAS_VERBOSE", "") == "1"
        common = ["-std=c++17", "-O3", f"-I{HERE}", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
        if not (HERE / "attention_bind.cpp").exists():
            common.append("-DFASTBERT_NO_ATTENTION")  # bindings.cpp then skips bind_attention(m)
        common += os.environ.get("FASTBERT_NVCC_FLAGS", "").split()
        cu_flags = common + cuda_arch_flags() + ["-lineinfo"] + (["-Xptxas", "-v"] if verbose_ptxas else [])
        cpp_flags = common + [f"-I{_pybind11_include()}", f"-I{sysconfig.get_paths()['include']}"]

        obj_dir = Path(self.build_temp).resolve() / "fastbert_C"
        obj_dir.mkdir(parents=True, exist_ok=True)
        headers = sorted(HERE.glob("*.h")) + sorted(HERE.glob("*.cuh")) + [Path(__file__).resolve()]
        newest_header = max(p.stat().st_mtime for p in headers)
        jobs = []
        for src in sources:
            flags = cu_flags if src.suffix == ".cu" else cpp_flags
            obj = obj_dir / (src.name + ".o")
            cmd = [nvcc, "-c", str(src), "-o", str(obj)] + flags
            jobs.append((src, obj, cmd))

        todo = [job for job in jobs if self.force or not _up_to_date(*job, newest_header)]
        print(f"fastbert._C: compiling {len(todo)} of {len(jobs)} files with {_jobs()} parallel nvcc "
              f"({' '.join(cuda_arch_flags())})", flush=True)
        failures = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=_jobs()) as pool:
            for src, ok, seconds, output in pool.map(lambda job: _compile(*job), todo):
                print(f"  {src.name}: {'ok' if ok else 'FAILED'} in {seconds:.1f}s", flush=True)
                if not ok:
                    failures.append(f"--- {src.name}\n{output}")
                elif output.strip() and not verbose_ptxas:
                    print(output, flush=True)  # warnings
        if failures:
            raise _compile_error("nvcc failed:\n" + "\n".join(failures))
        if verbose_ptxas:
            _write_ptxas_log([obj for _, obj, _ in jobs if obj.name.endswith(".cu.o")])

        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        link = [nvcc, "-shared", "-o", str(out)] + [str(obj) for _, obj, _ in jobs] + \
            ["-Xcompiler", "-fPIC", "--cudart=static"]
        done = subprocess.run(link, capture_output=True, text=True)
        if done.returncode != 0:
            raise _compile_error(f"linking failed:\n{' '.join(link)}\n{done.stdout}{done.stderr}")
        if (target := os.environ.get("FASTBERT_MANYLINUX", "").strip()):
            try:
                _manylinux().portable_link(link, out, target)
            except (RuntimeError, ValueError) as err:
                out.unlink(missing_ok=True)
                raise _compile_error(f"FASTBERT_MANYLINUX={target}: {err}") from err
            print(f"fastbert._C: relinked for manylinux_{target} (csrc/manylinux.py)", flush=True)
        _check_import(out)
        print(f"fastbert._C: built {out} in {time.perf_counter() - started:.1f}s", flush=True)


def _manylinux():
    """csrc/manylinux.py, loaded by path (setup.py and the tests load this file by path too)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastbert_manylinux", HERE / "manylinux.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile_error(msg):
    from setuptools.errors import CompileError

    return CompileError(f"fastbert._C: {msg}")


def _signature(cmd) -> str:
    return hashlib.sha256("\0".join(cmd[5:]).encode()).hexdigest()  # the flags, not the paths


def _up_to_date(src: Path, obj: Path, cmd, newest_header: float) -> bool:
    stamp = obj.with_suffix(obj.suffix + ".cmd")
    if not obj.exists() or not stamp.exists() or stamp.read_text() != _signature(cmd):
        return False
    return obj.stat().st_mtime > max(src.stat().st_mtime, newest_header)


def _compile(src: Path, obj: Path, cmd):
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode == 0:
        obj.with_suffix(obj.suffix + ".cmd").write_text(_signature(cmd))
        obj.with_suffix(obj.suffix + ".log").write_text(output)
    return src, done.returncode == 0, time.perf_counter() - start, output


def _write_ptxas_log(objects):
    path = Path(os.environ.get("FASTBERT_PTXAS_LOG", ROOT / "build" / "ptxas.log"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as log:
        for obj in objects:
            part = obj.with_suffix(obj.suffix + ".log")
            log.write(f"##### {obj.name[:-2]}\n")
            log.write(part.read_text() if part.exists() else "(no log: built without FASTBERT_PTXAS_VERBOSE=1)\n")
    print(f"fastbert._C: ptxas report in {path} (summary: python csrc/build_ext.py report {path})", flush=True)


def _check_import(path: Path):
    """Load the fresh module once, in a clean interpreter: catches undefined symbols."""
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location({EXT_NAME!r}, sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        path.unlink(missing_ok=True)
        raise _compile_error(f"the built module does not import:\n{done.stderr[-3000:]}")


def build_stamp() -> str:
    """sha256 over what a build of fastbert._C here depends on: csrc/'s sources and headers,
    this file and csrc/manylinux.py, the arch and extra nvcc flags (not FASTBERT_MANYLINUX: the
    link target changes where the module loads, not what it runs), and the running Python's extension suffix (so a
    module built for another Python never matches). Not the nvcc version: the same sources
    from another nvcc are the same kernels (a driver too old for the runtime linked in shows
    when the module is loaded, and device_install.sh checks that)."""
    digest = hashlib.sha256()
    files = sorted(p for p in HERE.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")) + \
        [Path(__file__).resolve(), HERE / "manylinux.py"]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    flags = cuda_arch_flags() + os.environ.get("FASTBERT_NVCC_FLAGS", "").split()
    digest.update("\0".join(flags + [sysconfig.get_config_var("EXT_SUFFIX")]).encode())
    return digest.hexdigest()


def cuda_extension(sources):
    """(ext_modules, cmdclass) for setuptools.setup: fastbert._C from `sources` (paths relative
    to the repository root). The extension is optional unless FASTBERT_CUDA=1: a failed build
    then installs fastbert without it (the 'cuda' backend off) after a warning."""
    required = os.environ.get("FASTBERT_CUDA", "") == "1"
    ext = Extension(EXT_NAME, sources=list(sources), optional=not required)
    return [ext], {"build_ext": BuildExt}


# ----------------------------------------------------------------------------- ptxas report

_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_report(log_text: str) -> list[dict]:
    """One row per (kernel, arch) of a `-Xptxas -v` log: registers, spills, stack, shared memory."""
    rows, current = [], None
    for line in log_text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "stack": 0,
                       "spill_stores": 0, "spill_loads": 0, "smem": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        if (s := _SPILL.search(line)) and "Function properties" not in line:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, s.groups())
        if (u := _USED.search(line)):
            current["registers"] = int(u.group(1))
            if (sm := _SMEM.search(line)):
                current["smem"] = int(sm.group(1))
    return rows


def _demangle(names):
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None:
        return names
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = done.stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(name: str) -> str:
    name = re.sub(r"\bfastbert::(\w+::)?", "", name)
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "f16").replace("float", "f32")
    name = re.sub(r"\(.*\)$", "", name).removeprefix("void ")
    return name


def _main(argv):
    """`report LOG [FILTER]`: a markdown table, one row per kernel, registers per arch.
    `stamp`: build_stamp()."""
    if argv == ["stamp"]:
        print(build_stamp())
        return 0
    if len(argv) not in (2, 3) or argv[0] != "report":
        print("usage: python csrc/build_ext.py report build/ptxas.log [substring of kernel names]\n"
              "       python csrc/build_ext.py stamp", file=sys.stderr)
        return 2
    rows = ptxas_report(Path(argv[1]).read_text())
    names = dict(zip((r["kernel"] for r in rows), _demangle([r["kernel"] for r in rows])))
    archs = sorted({r["arch"] for r in rows})
    kernels: dict[str, dict] = {}
    for row in rows:
        name = _short(names[row["kernel"]])
        if len(argv) == 3 and argv[2] not in name:
            continue
        entry = kernels.setdefault(name, {"regs": {}, "spill": 0, "stack": 0, "smem": 0})
        entry["regs"][row["arch"]] = row["registers"]
        entry["spill"] = max(entry["spill"], row["spill_stores"] + row["spill_loads"])
        entry["stack"] = max(entry["stack"], row["stack"])
        entry["smem"] = max(entry["smem"], row["smem"])
    print("| kernel | " + " | ".join(f"registers {a}" for a in archs) +
          " | spill bytes (stores + loads) | stack bytes | static smem bytes |")
    print("|---|" + "---|" * len(archs) + "---|---|---|")
    for name in sorted(kernels):
        e = kernels[name]
        regs = " | ".join(str(e["regs"].get(a, "")) for a in archs)
        print(f"| `{name}` | {regs} | {e['spill']} | {e['stack']} | {e['smem']} |")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
