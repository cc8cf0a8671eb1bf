"""The CUDA extension fastbert._C as CI sees it: built where nvcc exists, importable, and
failing cleanly (RuntimeError with the CUDA error text, no crash) when there is no GPU.
Plus the pure-Python parts of csrc/build_ext.py (arch flags, the ptxas report).

The build itself happens in the install step (`make test` -> pip install -e .).

This file also holds the CPU emulation that tests/test_cuda_layernorm.py and
tests/test_cuda_span.py run the LayerNorm/GELU/span kernels with where there is no GPU:
`emulated_extension()` compiles csrc/ (the same kernels, launchers and bindings) with g++
against EMU_HEADER, a fiber-per-thread model of a block with emulated warp collectives
and barriers, into the module _fastbert_emu (cached under build/, keyed by the sources'
hash; about a minute of compiling on 2 cores, once); `emulate(monkeypatch)` points
fastbert/ops/_cuda.py at it so that CPU tensors go through the whole cuda path.
"""
import concurrent.futures
import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
MY_LAUNCHERS = ["add_layernorm_fwd", "add_layernorm_bwd", "layernorm_gelu_fwd", "layernorm_gelu_bwd",
                "add_layernorm_keep_mask", "bias_gelu_fwd", "bias_gelu_bwd", "span_score_fwd", "device_count"]


def _build_ext_module():
    spec = importlib.util.spec_from_file_location("fastbert_build_ext", ROOT / "csrc" / "build_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_path():
    spec = importlib.util.find_spec("fastbert._C")
    return None if spec is None else spec.origin


def test_extension_is_built_where_nvcc_exists():
    """On a machine with nvcc (CI), the install step must have built fastbert._C: a build
    that failed quietly (the extension is optional unless FASTBERT_CUDA=1) fails here."""
    if shutil.which("nvcc") is None or os.environ.get("FASTBERT_CUDA") == "0":
        pytest.skip("no nvcc on PATH (or FASTBERT_CUDA=0): the extension is not expected")
    assert _extension_path() is not None, (
        "nvcc is on PATH but fastbert._C is not built: rerun `pip install -e .` (or "
        "`FASTBERT_CUDA=1 python setup.py build_ext --inplace` to see the compiler's error)")


def test_extension_imports_and_exposes_its_launchers():
    if _extension_path() is None:
        pytest.skip("fastbert._C is not built here")
    from fastbert import _C

    import fastbert.ops._cuda as cuda_ops

    missing = [name for name in MY_LAUNCHERS if not hasattr(_C, name)]
    assert not missing, f"fastbert._C lacks {missing}"
    assert {_C.DTYPE_FLOAT32, _C.DTYPE_FLOAT16, _C.DTYPE_BFLOAT16} == {0, 1, 2}
    assert cuda_ops.DTYPES == {torch.float32: _C.DTYPE_FLOAT32, torch.float16: _C.DTYPE_FLOAT16,
                               torch.bfloat16: _C.DTYPE_BFLOAT16}
    assert _C.LAYERNORM_MAX_COLS == cuda_ops.LAYERNORM_MAX_HIDDEN and _C.SPAN_MAX_TOPK == cuda_ops.SPAN_MAX_TOPK
    assert _C.CUDART_VERSION >= 12000
    assert "rows" in _C.add_layernorm_fwd.__doc__  # one docstring per launcher


# Each call gets plausible, non-null (but fake) pointers: with no GPU the first CUDA call
# fails, so no pointer is ever dereferenced. Run in a subprocess: a crash would be a
# failed test, not a dead test run. The module is loaded straight from its file (no torch).
_NO_GPU_SCRIPT = r'''
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fastbert._C", sys.argv[1])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
P = 1 << 20  # a fake, 16-byte aligned device address
calls = {
    "device_count": lambda: C.device_count(),
    "add_layernorm_fwd": lambda: C.add_layernorm_fwd(P, P, P, P, 0, P, P, P, rows=4, cols=768, stride_x=768,
        stride_r=768, stride_y=768, eps=1e-5, dropout_p=0.0, dtype=1, param_dtype=1, stream=0),
    "add_layernorm_fwd dropout": lambda: C.add_layernorm_fwd(P, P, P, P, P, P, P, P, rows=4, cols=7, stride_x=7,
        stride_r=7, stride_y=7, eps=1e-5, dropout_p=0.1, dtype=0, param_dtype=0, stream=0),
    "add_layernorm_bwd": lambda: C.add_layernorm_bwd(P, P, P, P, P, P, 0, P, 0, P, P, P, rows=4, cols=768,
        stride_dy=768, stride_x=768, stride_r=768, stride_dh=768, stride_dx=768, max_partials=8, dropout_p=0.0,
        dtype=2, param_dtype=0, stream=0),
    "layernorm_gelu_fwd": lambda: C.layernorm_gelu_fwd(P, P, P, P, P, P, rows=3, cols=4096, stride_x=4096,
        stride_y=4096, eps=1e-5, dtype=0, param_dtype=0, stream=0),
    "layernorm_gelu_bwd": lambda: C.layernorm_gelu_bwd(P, P, P, P, P, P, P, P, P, P, rows=3, cols=1000,
        stride_dy=1000, stride_x=1000, stride_dx=1000, max_partials=8, dtype=1, param_dtype=1, stream=0),
    "add_layernorm_keep_mask": lambda: C.add_layernorm_keep_mask(P, P, rows=2, cols=9, dropout_p=0.5, stream=0),
    "bias_gelu_fwd": lambda: C.bias_gelu_fwd(P, P, P, rows=5, cols=3072, stride_x=3072, stride_y=3072,
        approximate="tanh", dtype=1, bias_dtype=0, stream=0),
    "bias_gelu_bwd": lambda: C.bias_gelu_bwd(P, P, P, P, P, P, rows=5, cols=3072, stride_dy=3072, stride_x=3072,
        stride_dx=3072, max_partials=8, approximate="none", dtype=2, bias_dtype=2, stream=0),
    "span_score_fwd": lambda: C.span_score_fwd(P, P, 0, P, P, P, batch=2, L=384, D=30, topk=20, stride_sb=384,
        stride_sl=1, stride_eb=384, stride_el=1, stride_mb=0, stride_ml=0, dtype=0, stream=0),
}
for name, call in calls.items():
    try:
        call()
    except RuntimeError as err:
        print(f"{name}: RuntimeError: {err}")
    else:
        print(f"{name}: NO ERROR")
'''


def assert_calls_fail_cleanly_without_gpu(path):
    """Every launcher of the module at `path` raises fastbert._C's RuntimeError naming the
    missing GPU, in a subprocess that does not crash (tests/test_wheel.py runs it on the
    extension of the installed, repaired wheel)."""
    done = subprocess.run([sys.executable, "-c", _NO_GPU_SCRIPT, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"the calls crashed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 10, done.stdout + done.stderr
    for line in lines:
        assert "RuntimeError: fastbert._C:" in line and "failed with cuda" in line, line
        assert "no usable CUDA GPU" in line or "no CUDA-capable device" in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_calls_without_gpu_raise_a_clear_runtime_error():
    path = _extension_path()
    if path is None:
        pytest.skip("fastbert._C is not built here")
    assert_calls_fail_cleanly_without_gpu(path)


def test_bad_arguments_raise_value_error_before_any_cuda_call():
    if _extension_path() is None:
        pytest.skip("fastbert._C is not built here")
    from fastbert import _C

    P = 1 << 20
    fwd = dict(rows=4, cols=768, stride_x=768, stride_r=768, stride_y=768, eps=1e-5, dropout_p=0.0, dtype=1,
               param_dtype=1, stream=0)
    with pytest.raises(ValueError, match=r"cols \(hidden size\) must be in 1\.\.4096, got 4097"):
        _C.add_layernorm_fwd(P, P, P, P, 0, P, P, P, **{**fwd, "cols": 4097, "stride_x": 4097})
    with pytest.raises(ValueError, match="dtype must be a dtype code"):
        _C.add_layernorm_fwd(P, P, P, P, 0, P, P, P, **{**fwd, "dtype": 7})
    with pytest.raises(ValueError, match="weight/bias must have x's dtype or float32"):
        _C.add_layernorm_fwd(P, P, P, P, 0, P, P, P, **{**fwd, "param_dtype": 2})
    with pytest.raises(ValueError, match="seed must not be null when dropout_p > 0"):
        _C.add_layernorm_fwd(P, P, P, P, 0, P, P, P, **{**fwd, "dropout_p": 0.1})
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        _C.bias_gelu_fwd(P, P, P, rows=1, cols=8, stride_x=8, stride_y=8, approximate="sigmoid", dtype=0,
                         bias_dtype=0, stream=0)
    with pytest.raises(ValueError, match="topk must be in 1..32, got 33"):
        _C.span_score_fwd(P, P, 0, P, P, P, batch=1, L=8, D=4, topk=33, stride_sb=8, stride_sl=1, stride_eb=8,
                          stride_el=1, stride_mb=0, stride_ml=0, dtype=0, stream=0)
    with pytest.raises(ValueError, match="must be < 2\\^31"):
        _C.span_score_fwd(P, P, 0, P, P, P, batch=1, L=2**20, D=2**12, topk=1, stride_sb=8, stride_sl=1,
                          stride_eb=8, stride_el=1, stride_mb=0, stride_ml=0, dtype=0, stream=0)


# ----------------------------------------------------------------------------- csrc/build_ext.py

def test_cuda_arch_flags():
    B = _build_ext_module()
    assert B.cuda_arch_flags("80;90") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    assert B.cuda_arch_flags("9.0a") == ["-gencode=arch=compute_90a,code=sm_90a",
                                         "-gencode=arch=compute_90a,code=compute_90a"]
    assert B.cuda_arch_flags("sm_80+PTX, 90") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_80,code=compute_80"]
    for bad in ("", "hopper", "8"):
        with pytest.raises(ValueError, match="FASTBERT_CUDA_ARCH"):
            B.cuda_arch_flags(bad)


def test_ptxas_report_parses_registers_and_spills():
    B = _build_ext_module()
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 12.0 ms
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 356 bytes cmem[0]
"""
    assert B.ptxas_report(log) == [
        {"kernel": "_Z3fooPf", "arch": "sm_90", "registers": 72, "stack": 16, "spill_stores": 8, "spill_loads": 4,
         "smem": 2048},
        {"kernel": "_Z3barv", "arch": "sm_80", "registers": 32, "stack": 0, "spill_stores": 0, "spill_loads": 0,
         "smem": 0},
    ]


def test_build_stamp_follows_the_sources_and_the_flags(monkeypatch, tmp_path):
    """The stamp a prebuilt module is matched by (scripts/device_install.sh) changes with any
    csrc/ source or header and with the arch flags, and not with csrc/'s notes."""
    shutil.copytree(CSRC, tmp_path / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.util.spec_from_file_location("stamped_build_ext", tmp_path / "csrc" / "build_ext.py")
    B = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(B)
    monkeypatch.delenv("FASTBERT_CUDA_ARCH", raising=False)
    monkeypatch.delenv("FASTBERT_NVCC_FLAGS", raising=False)
    first = B.build_stamp()
    assert first == _build_ext_module().build_stamp()  # the checkout's csrc/, same bytes
    (tmp_path / "csrc" / "README.md").write_text("notes")
    assert B.build_stamp() == first
    monkeypatch.setenv("FASTBERT_CUDA_ARCH", "90a")
    assert B.build_stamp() != first
    monkeypatch.delenv("FASTBERT_CUDA_ARCH")
    with open(tmp_path / "csrc" / "span.cuh", "a") as f:
        f.write("\n")
    assert B.build_stamp() != first


def test_build_switches_are_wired_in_setup_py():
    """setup.py hands csrc/ to build_ext.cuda_extension; pyproject.toml brings pybind11."""
    setup_py = (ROOT / "setup.py").read_text()
    assert "from build_ext import cuda_extension" in setup_py and "FASTBERT_CUDA" in setup_py
    assert "pybind11" in (ROOT / "pyproject.toml").read_text()
    B = _build_ext_module()
    ext_modules, cmdclass = B.cuda_extension(["csrc/bindings.cpp"])
    assert [e.name for e in ext_modules] == ["fastbert._C"] and "build_ext" in cmdclass


# ----------------------------------------------------------------------------- CPU emulation

EMU_HEADER = r'''// A CPU emulation of the CUDA execution model, enough for the csrc/ LayerNorm, GELU and
// span kernels (tests only; tests/test_cuda_build.py writes this file and builds
// csrc/*.cu with g++ -DFASTBERT_EMULATE -include it).
//
// Each CUDA thread of a block is a fiber (ucontext) in one OS thread; the scheduler runs
// them round-robin and switches only at barriers, so kernel code runs unchanged. Warp
// collectives (__shfl*_sync, __ballot_sync) are a warp barrier around a per-lane slot;
// __syncthreads is a block barrier. It flags a collective or barrier that some threads
// never reach (deadlock) and one reached after a thread of the warp / block exited.
// Blocks run one after another; __shared__ variables are function-local statics.
// It does not model timing, memory ordering, bank conflicts or register pressure.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace fbemu {

constexpr size_t kStack = 128 * 1024;

struct Fiber {
  ucontext_t ctx;
  bool done = false;
  int wait = 0;  // 0 runnable, 1 warp barrier, 2 block barrier
  uint64_t gen = 0;
};

struct Block {
  dim3 block_idx, grid_dim, block_dim;
  int n = 0;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int current = -1;
  int block_arrived = 0;
  uint64_t block_gen = 0;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_gen;
  std::vector<uint64_t> slot;  // one 8-byte value per thread for warp collectives
  const std::function<void()>* body = nullptr;
  std::string error;
};

inline Block*& current() {
  static Block* b = nullptr;
  return b;
}

inline std::vector<std::unique_ptr<char[]>>& stacks() {
  static std::vector<std::unique_ptr<char[]>> s;
  return s;
}

inline void fail(Block& b, const std::string& what) {
  if (b.error.empty()) {
    b.error = what + " [thread " + std::to_string(b.current) + " of block (" + std::to_string(b.block_idx.x) + ", " +
              std::to_string(b.block_idx.y) + ")]";
  }
}

inline uint3 thread_idx() {
  const Block& b = *current();
  const unsigned t = static_cast<unsigned>(b.current);
  return make_uint3(t % b.block_dim.x, t / b.block_dim.x % b.block_dim.y, t / (b.block_dim.x * b.block_dim.y));
}
inline uint3 block_idx() {
  const Block& b = *current();
  return make_uint3(b.block_idx.x, b.block_idx.y, b.block_idx.z);
}
inline dim3 block_dim() { return current()->block_dim; }
inline dim3 grid_dim() { return current()->grid_dim; }

inline void yield(Block& b) { swapcontext(&b.fibers[b.current].ctx, &b.sched); }

inline void warp_barrier() {
  Block& b = *current();
  const int w = b.current / 32;
  for (int l = 0; l < 32; ++l) {
    if (b.fibers[w * 32 + l].done) fail(b, "warp collective after lane " + std::to_string(l) + " exited");
  }
  Fiber& f = b.fibers[b.current];
  f.wait = 1;
  f.gen = b.warp_gen[w];
  if (++b.warp_arrived[w] == 32) {
    b.warp_arrived[w] = 0;
    ++b.warp_gen[w];
  }
  yield(b);
  f.wait = 0;
}

inline void block_barrier() {
  Block& b = *current();
  for (int t = 0; t < b.n; ++t) {
    if (b.fibers[t].done) fail(b, "__syncthreads after thread " + std::to_string(t) + " exited");
  }
  Fiber& f = b.fibers[b.current];
  f.wait = 2;
  f.gen = b.block_gen;
  if (++b.block_arrived == b.n) {
    b.block_arrived = 0;
    ++b.block_gen;
  }
  yield(b);
  f.wait = 0;
}

inline bool runnable(const Block& b, int i) {
  const Fiber& f = b.fibers[i];
  if (f.done) return false;
  if (f.wait == 0) return true;
  if (f.wait == 1) return b.warp_gen[i / 32] != f.gen;
  return b.block_gen != f.gen;
}

inline void entry(int i) {
  Block& b = *current();
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    fail(b, std::string("exception in a kernel: ") + e.what());
  }
  b.fibers[i].done = true;
}

inline void run_block(Block& b) {
  current() = &b;
  b.fibers.assign(b.n, Fiber{});
  while (stacks().size() < static_cast<size_t>(b.n)) stacks().emplace_back(new char[kStack]);
  for (int i = 0; i < b.n; ++i) {
    Fiber& f = b.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks()[i].get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(entry), 1, i);
  }
  // FBEMU_SCHEDULE: "" round robin (every warp one collective a pass: warps move in step, so a
  // race between warps through shared memory goes unseen); "greedy" / "greedy_desc": the first
  // runnable thread in ascending / descending order runs again after each yield, so one warp runs
  // as far ahead of the others as the barriers let it (a missing __syncthreads shows).
  const char* schedule = std::getenv("FBEMU_SCHEDULE");
  const bool greedy = schedule && std::strncmp(schedule, "greedy", 6) == 0;
  const bool descending = schedule && std::strcmp(schedule, "greedy_desc") == 0;
  for (;;) {
    bool all_done = true, progress = false;
    for (int k = 0; k < b.n; ++k) {
      const int i = descending ? b.n - 1 - k : k;
      if (b.fibers[i].done) continue;
      all_done = false;
      if (!runnable(b, i)) continue;
      b.current = i;
      swapcontext(&b.sched, &b.fibers[i].ctx);
      progress = true;
      if (greedy) {
        all_done = false;
        break;
      }
    }
    if (all_done) break;
    if (!progress) {
      b.current = -1;
      fail(b, "deadlock: threads wait at a barrier or collective that others never reach");
      break;
    }
  }
  current() = nullptr;
}

template <typename F>
void launch(dim3 grid, dim3 block, F&& call) {
  const std::function<void()> body = call;
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n % 32 != 0 || n > 1024) throw std::runtime_error("fbemu: block of " + std::to_string(n) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("fbemu: empty grid");
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.block_idx = dim3(x, y, z);
        b.grid_dim = grid;
        b.block_dim = block;
        b.n = n;
        b.warp_arrived.assign(n / 32, 0);
        b.warp_gen.assign(n / 32, 0);
        b.slot.assign(n, 0);
        b.body = &body;
        run_block(b);
        if (!b.error.empty()) throw std::runtime_error("fbemu: " + b.error);
      }
    }
  }
}

// A warp collective: every lane deposits 8 bytes, then reads what `pick` selects.
template <typename T, typename Pick>
T exchange(unsigned mask, T v, Pick pick) {
  static_assert(sizeof(T) <= 8, "8-byte slots");
  Block& b = *current();
  if (mask != 0xffffffffu) fail(b, "partial-warp mask");
  const int w = b.current / 32, lane = b.current % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.slot[b.current] = bits;
  warp_barrier();
  const int src = pick(lane);
  T out = v;
  if (src >= 0) std::memcpy(&out, &b.slot[w * 32 + src], sizeof(T));
  warp_barrier();
  return out;
}

inline unsigned ballot(unsigned mask, bool pred) {
  Block& b = *current();
  if (mask != 0xffffffffu) fail(b, "partial-warp mask");
  const int w = b.current / 32;
  b.slot[b.current] = pred ? 1 : 0;
  warp_barrier();
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= static_cast<unsigned>(b.slot[w * 32 + l] & 1) << l;
  warp_barrier();
  return bits;
}

}  // namespace fbemu

#define threadIdx (::fbemu::thread_idx())
#define blockIdx (::fbemu::block_idx())
#define blockDim (::fbemu::block_dim())
#define gridDim (::fbemu::grid_dim())

inline void __syncthreads() { ::fbemu::block_barrier(); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return ::fbemu::exchange(mask, v, [&](int lane) { return (lane ^ lane_mask) & 31; });
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src) {
  return ::fbemu::exchange(mask, v, [&](int) { return src & 31; });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  return ::fbemu::exchange(mask, v, [&](int lane) { return lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1; });
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::fbemu::ballot(mask, pred != 0); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
'''

EMU_MODULE = r'''// fastbert._C's LayerNorm/GELU/span functions with the kernels run by the CPU emulation
// (fastbert_emu.h) as the module _fastbert_emu: the same binding code (csrc/*_bind.cpp),
// launchers and kernels; "device" pointers are host pointers. The CUDA runtime calls the
// launchers make are answered here: 2 SMs with 5 resident blocks each, so the backward
// kernels that loop over rows do loop, and the column sums that finish them get up to 10
// partial rows (all 8 of their slices, and a second pass of the loop over rows).
#include <pybind11/pybind11.h>

#include "fastbert.h"

extern "C" {
cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* count) { *count = 1; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? 2 : 0;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*, int, size_t, unsigned) {
  *blocks = 5;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}
const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
}

PYBIND11_MODULE(_fastbert_emu, m) {
  m.doc() = "fastbert LayerNorm/GELU/span kernels run by a CPU emulation of the GPU (tests only)";
  bind_layernorm(m);
  bind_gelu(m);
  bind_span(m);
  m.attr("EMULATED") = true;
}
'''

# The translation units of the emulated module (attention is the other helper's and has its
# own emulation in tests/cuda_emu).
EMU_SOURCES = ["layernorm.cu", "layernorm_fwd_f32.cu", "layernorm_fwd_f16.cu", "layernorm_fwd_bf16.cu",
               "layernorm_bwd_f32.cu", "layernorm_bwd_f16.cu", "layernorm_bwd_bf16.cu", "gelu.cu", "span.cu",
               "layernorm_bind.cpp", "gelu_bind.cpp", "span_bind.cpp"]
_EMU_FLAGS = ["-std=c++17", "-O1", "-fPIC", "-ffp-contract=off", "-fvisibility=hidden", "-DFASTBERT_EMULATE"]


def _cuda_include():
    """CUDA's include directory (cuda_fp16.h & co.), from nvcc --dryrun, CUDA_HOME or /usr/local/cuda."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "x.cu"
            src.write_text("")
            out = subprocess.run([nvcc, "--dryrun", "-c", str(src)], capture_output=True, text=True).stderr
        m = re.search(r'INCLUDES="-I([^"]+?)"', out)
        if m and (Path(m.group(1).strip()) / "cuda_fp16.h").exists():
            return Path(m.group(1).strip())
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").exists():
            return Path(root) / "include"
    return None


def emulated_extension():
    """The _fastbert_emu module (built once per source hash), or pytest.skip with the reason."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    include = _cuda_include()
    try:
        import pybind11
    except ImportError:
        pybind11 = None
    if cxx is None or include is None or pybind11 is None:
        pytest.skip("the CPU emulation needs a C++ compiler, CUDA's headers and pybind11")
    sources = [CSRC / name for name in EMU_SOURCES]
    headers = sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))
    digest = hashlib.sha256()
    for part in [EMU_HEADER, EMU_MODULE, " ".join(_EMU_FLAGS), cxx, str(include)]:
        digest.update(part.encode())
    for path in sources + headers:
        digest.update(path.name.encode() + path.read_bytes())
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    out_dir = ROOT / "build" / f"emu-{digest.hexdigest()[:16]}"
    target = out_dir / f"_fastbert_emu{suffix}"
    if not target.exists():
        _build_emulation(cxx, include, pybind11.get_include(), sources, out_dir, target)
    spec = importlib.util.spec_from_file_location("_fastbert_emu", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_emulation(cxx, include, pybind_include, sources, out_dir, target):
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="emu-", dir=out_dir.parent))
    (work / "fastbert_emu.h").write_text(EMU_HEADER)
    (work / "fastbert_emu.cpp").write_text(EMU_MODULE)
    flags = _EMU_FLAGS + ["-include", str(work / "fastbert_emu.h"), f"-I{CSRC}", f"-I{include}",
                          f"-I{pybind_include}", f"-I{sysconfig.get_paths()['include']}"]
    units = [(src, ["-x", "c++", str(src)]) for src in sources] + [(work / "fastbert_emu.cpp", [str(work / "fastbert_emu.cpp")])]

    def compile_one(unit):
        src, args = unit
        obj = work / (src.name + ".o")
        done = subprocess.run([cxx, *flags, "-c", *args, "-o", str(obj)], capture_output=True, text=True)
        return obj, done.returncode, done.stderr

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(compile_one, units))
    errors = [err for _, rc, err in results if rc != 0]
    assert not errors, "compiling the emulation failed:\n" + "\n".join(e[-4000:] for e in errors)
    tmp_target = work / target.name
    done = subprocess.run([cxx, "-shared", "-o", str(tmp_target), *[str(obj) for obj, _, _ in results]],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"linking the emulation failed:\n{done.stderr[-4000:]}"
    out_dir.mkdir(exist_ok=True)
    os.replace(tmp_target, target)  # atomic: a concurrent run sees all or nothing
    shutil.rmtree(work, ignore_errors=True)


def _check_any_device(op, **tensors):
    """_cuda.check_cuda_tensors without the CUDA requirement: one device for all."""
    devices = {t.device for t in tensors.values() if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors on several devices {devices}")
    return devices.pop() if devices else torch.device("cpu")


def emulate(monkeypatch):
    """Run the 'cuda' backend's launchers on CPU tensors through the emulated kernels.

    fastbert/ops/_cuda.py gets the emulated module instead of fastbert._C (host pointers
    for device pointers, stream 0, 2 SMs), and the op modules resolve to 'cuda' whenever
    use_backend('cuda') asks for it, so the public functions, the autograd Functions, the
    Python launchers, the bindings, the C++ launchers and the kernels all run."""
    module = emulated_extension()
    import fastbert.ops._backend as B
    import fastbert.ops._cuda as C
    import fastbert.ops.gelu as G
    import fastbert.ops.layernorm as L
    import fastbert.ops.span as S

    monkeypatch.setattr(C, "ext", lambda: module)
    monkeypatch.setattr(C, "check_cuda_tensors", _check_any_device)
    monkeypatch.setattr(C, "stream", lambda device: 0)
    monkeypatch.setattr(C, "on_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(C, "sm_count", lambda device: 2)
    for op_module in (G, L, S):
        real = op_module.resolve
        monkeypatch.setattr(op_module, "resolve",
                            lambda device, real=real: "cuda" if B.get_backend() == "cuda" else real(device))
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the emulation is for machines without a GPU")
def test_emulated_module_runs_a_launcher():
    """The emulated module builds and runs a launcher on host memory."""
    module = emulated_extension()
    assert module.EMULATED
    x = torch.randn(3, 8)
    y = torch.empty_like(x)
    bias = torch.zeros(8)
    module.bias_gelu_fwd(x.data_ptr(), bias.data_ptr(), y.data_ptr(), 3, 8, 8, 8, "none", 0, 0, 0)
    torch.testing.assert_close(y, torch.nn.functional.gelu(x))
