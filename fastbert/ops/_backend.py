"""Which implementation runs an op: "torch" (plain PyTorch, the reference, runs
anywhere), "triton" (kernels/, GPU or the Triton interpreter) or "cuda"
(csrc/, built into fastbert._C).

The choice is made once per call from the tensor's device, never inside the
model: `use_backend("triton")` scopes it, `set_backend` sets the process
default, and "auto" picks the fastest backend that can run on the device and whose
kernels take the inputs (on a GPU: cuda, then triton, then torch for float64, a head dim
or a row width past the kernels').
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import sys

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = BACKENDS + ("auto",)

_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastbert_backend", default=None)
_default = "auto"


def interpreter_on() -> bool:
    """True when fastbert's Triton kernels run on the CPU through the interpreter: built with
    TRITON_INTERPRET=1 set, which triton.jit reads when `import fastbert` imports them."""
    built = sys.modules.get("fastbert.kernels.gelu")
    return built.BUILT_FOR_INTERPRETER if built is not None else _interpreter_asked()


def _interpreter_asked() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _NoLaunch:
    """kernel[grid](...) that launches nothing: Dynamo's shape propagation on fake tensors."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def triton_wrap(t: torch.Tensor, op: str):
    """The `wrap` a launcher inside a registered triton_op launches its kernels through, given
    one of the op's input tensors: torch.library.wrap_triton on a GPU; with the interpreter,
    kernels.gelu.interpreter_launchable's rule (the kernel, no launch on fake tensors, or an error
    in a graph capture), the one kernels/attention.py's _launch follows."""
    from torch.library import wrap_triton

    if not interpreter_on():
        return wrap_triton
    from fastbert.kernels.gelu import interpreter_launchable

    def wrap(kernel):
        launchable = interpreter_launchable(kernel, t, op)
        return _NoLaunch() if launchable is None else launchable
    return wrap


def graph_capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph captures the current stream (t on a GPU): no host sync may run
    then, and a value drawn on the host now would be replayed unchanged at every launch."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def host_sync_allowed(t: torch.Tensor, compiling: bool) -> bool:
    """May a check read t's values on the host now? Not while torch.compile traces (a graph
    break) nor during a CUDA graph capture (refused): the eager runs, a graph's warm-up runs
    included, make such checks.

    compiling: `torch.compiler.is_compiling()` read by the caller, in its own frame. Read here, it
    could be True while the caller runs eagerly: Dynamo compiles the frames a skipped frame calls
    (a frame it fell back to eager on, or past its recompile limit), and in a compiled frame of
    this function it folds to True. The caller's check was then skipped, and so was an in-graph
    check guarded by its own `is_compiling()`, which was False."""
    return not compiling and not graph_capturing(t)


TRITON_KERNEL_MODULES = ("gelu", "layernorm", "attention", "span")


@functools.lru_cache(maxsize=None)
def triton_problem() -> str | None:
    """Why fastbert's Triton kernels cannot be used here, or None.

    "Installed" is not enough: a triton whose compiled part is missing or built for another
    Python or torch raises on import (often something other than ImportError), and a backend
    listed as usable on the strength of find_spec alone then died in the ops with
    AttributeError on a None module. The kernels' own import decides, and its error is kept."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        for name in TRITON_KERNEL_MODULES:
            importlib.import_module(f"fastbert.kernels.{name}")
    except Exception as err:  # noqa: BLE001 - any failure turns the backend off, with its reason
        import warnings

        problem = f"triton is installed but fastbert's Triton kernels fail to import ({type(err).__name__}: {err})"
        warnings.warn(f"fastbert: {problem}; the 'triton' backend is off, 'torch' (and 'cuda') remain.",
                      stacklevel=2)
        return problem
    return None


def triton_importable() -> bool:
    return triton_problem() is None


def triton_kernels(name: str):
    """The module fastbert.kernels.<name>, or None when the Triton kernels cannot be used here."""
    return sys.modules[f"fastbert.kernels.{name}"] if triton_importable() else None


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The compiled fastbert._C module, or None (the reason is reported once)."""
    try:
        from fastbert import _C  # type: ignore[attr-defined]
    except ImportError as err:  # not built on this machine: Triton/PyTorch serve instead
        import warnings

        warnings.warn(f"fastbert: CUDA extension fastbert._C not available ({err}); "
                      "the 'cuda' backend is off, 'triton' and 'torch' remain.", stacklevel=2)
        return None
    return _C


def cuda_runtime_problem() -> str | None:
    """Why fastbert._C cannot use this machine's GPUs though torch can, or None. The module carries its
    CUDA runtime (static, the toolkit it was built with: CUDA 13 for our wheels), which needs a driver
    at least that new; torch's CUDA 12 wheels run on older drivers, where every launch of ours failed."""
    ext = cuda_extension()
    if ext is None or not torch.cuda.is_available():
        return None
    return _runtime_problem(ext)


@functools.lru_cache(maxsize=None)
def _runtime_problem(ext) -> str | None:
    try:
        ext.device_count()
    except RuntimeError as err:
        version = getattr(ext, "CUDART_VERSION", 0)
        problem = (f"fastbert._C, built with CUDA {version // 1000}.{version % 1000 // 10}, cannot use this "
                   f"machine's GPUs ({err}): its CUDA runtime needs an NVIDIA driver at least that new")
        import warnings

        warnings.warn(f"fastbert: {problem}; the 'cuda' backend is off, 'triton' and 'torch' remain.", stacklevel=3)
        return problem
    return None


def release(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _installed_versions() -> tuple[str, str]:
    """(triton, numpy) versions, from the modules themselves: a pytorch-triton wheel installs the
    import name triton under another distribution name, so package metadata does not find it."""
    import numpy
    import triton

    return triton.__version__, numpy.__version__


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run our kernels here, or None.

    Triton 3.6's interpreter turns a scalar into an int with int(<1-element array>), which
    numpy 2.4 refuses ("only 0-dimensional arrays can be converted"): every kernel whose
    loop bound is a runtime length fails. Triton 3.7 squeezes the array first.
    """
    triton_version, numpy_version = _installed_versions()
    if release(triton_version) < (3, 7) and release(numpy_version) >= (2, 4):
        return (f"the Triton {triton_version} interpreter (TRITON_INTERPRET=1) cannot run with numpy "
                f"{numpy_version}: install numpy<2.4 or triton>=3.7")
    return None


# fastbert's kernels need compute capability 8.0 (Ampere) or newer: csrc/ is built for sm_80 and sm_90
# plus compute_90 PTX, which an older device cannot load ("no kernel image"), and its attention uses
# Ampere's mma.sync shapes and bfloat16; Triton supports 8.0 and newer.
MIN_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def _device_capability(index: int) -> tuple[int, int, str]:
    return (*torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index))


def capability_problem(device: torch.device | str) -> str | None:
    """Why fastbert's kernels cannot run on the GPU `device` (a T4, a V100), or None."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor, name = _device_capability(index)
    if torch.version.hip:  # a ROCm build of torch calls its GPUs "cuda" too
        return (f"cuda:{index} ({name}) is an AMD GPU (ROCm), and fastbert's kernels are built and tested for "
                "NVIDIA GPUs only; the 'torch' backend runs there")
    if (major, minor) >= MIN_CAPABILITY:
        return None
    return (f"cuda:{index} ({name}) has compute capability {major}.{minor}, and fastbert's kernels need "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ampere and later); the 'torch' backend runs there")


def available_backends(device: torch.device | str = "cuda") -> list[str]:
    """Backends that can run an op on tensors of `device`."""
    device = torch.device(device)
    found = ["torch"]
    if capability_problem(device):
        return found
    if triton_importable() and (device.type == "cuda" or interpreter_on()):
        found.append("triton")
    if device.type == "cuda" and torch.cuda.is_available() and (ext := cuda_extension()) is not None \
            and _runtime_problem(ext) is None:
        found.append("cuda")
    return found


def check_backend_name(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("auto" restores the automatic choice)."""
    global _default
    _default = check_backend_name(name)
    _mirror_for_compile()


# Scopes opened inside a torch.compile'd region (a model built with backend=...): Dynamo
# cannot trace ContextVar.set, but it traces this list's push and pop, and get_backend below
# reads them while tracing, so the compiled graph keeps the scoped choice.
_compiled_scopes: list[str] = []

# What compiled code reads for the backend asked for outside it: `_scoped.get() or _default`, kept
# in step by set_backend and use_backend. Dynamo cannot trace the ContextVar, but it guards a module
# global it reads, so a compiled graph is re-traced when the choice changes. (It was read once as an
# unguarded constant: set_backend or use_backend around a compiled model changed nothing, silently.)
# One value for the process: under torch.compile, threads that ask for different backends at once
# see the latest choice (a block closing in one thread puts back that thread's outer choice for all).
_for_compile = "auto"


def _mirror_for_compile() -> None:
    global _for_compile
    _for_compile = _scoped.get() or _default


def get_backend() -> str:
    """The backend requested right now (may be "auto")."""
    if torch.compiler.is_compiling():
        return _compiled_scopes[-1] if _compiled_scopes else _for_compile
    return _scoped.get() or _default


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops called inside the block on backend `name` (also inside torch.compile).

    The scope is a context variable: threads started inside the block (nn.DataParallel's replicas)
    do not see it. There, build the model with BertModel(backend=...) or use set_backend.
    Nor does a backward run after the block: BertModel's and patch_transformers' gradient
    checkpointing reopen the forward's scope for their reruns; a torch.utils.checkpoint of your
    own must run its backward inside the block, or reopen it in the checkpointed function.
    Under torch.compile the choice a compiled function reads from outside it is one value for the
    process: the last use_backend entered or left, in any thread, or set_backend. Threads that run
    compiled code on different backends at once: give each model its own (BertModel(backend=...))."""
    check_backend_name(name)
    if torch.compiler.is_compiling():
        _compiled_scopes.append(name)
        try:
            yield name
        finally:
            _compiled_scopes.pop()
        return
    token = _scoped.set(name)
    _mirror_for_compile()
    try:
        yield name
    finally:
        _scoped.reset(token)
        _mirror_for_compile()


# Fastest first: "auto" takes the first of these that can run on the device.
_PREFERENCE = ("cuda", "triton", "torch")


def resolve(device: torch.device) -> str:
    """The concrete backend for an op whose inputs live on `device`."""
    return _resolve(get_backend(), device)


# Under torch.compile the choice is made while tracing and the compiled graph keeps it; `requested`
# comes from get_backend's guarded global, so another request re-traces.
@torch.compiler.assume_constant_result
def _resolve(requested: str, device: torch.device) -> str:
    usable = available_backends(device)
    if requested == "auto":
        if device.type != "cuda":
            return "torch"  # the interpreter is for testing kernels, never a default
        return next(name for name in _PREFERENCE if name in usable)
    if requested not in usable:
        why = {
            "triton": "needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors) and the triton package",
            "cuda": "needs a CUDA tensor and the compiled extension fastbert._C",
        }[requested]
        if requested == "triton" and (problem := triton_problem()):
            why = f"needs fastbert's Triton kernels, and {problem}"
        if requested == "cuda" and device.type == "cuda" and (problem := cuda_runtime_problem()):
            why = f"needs a newer NVIDIA driver: {problem}"
        if problem := capability_problem(device):
            why = f"needs an NVIDIA GPU of compute capability 8.0 or newer: {problem}"
        if requested == "triton" and device.type != "cuda" and _interpreter_asked() and not interpreter_on():
            why = ("needs TRITON_INTERPRET=1 set before fastbert is imported: triton.jit reads it when it builds "
                   "the kernels, and these were built for a GPU")
        raise RuntimeError(f"fastbert backend {requested!r} cannot run on a {device.type} tensor: it {why}")
    if requested == "triton" and device.type != "cuda" and (problem := interpreter_problem()):
        raise RuntimeError(f"fastbert backend 'triton' on {device.type} tensors: {problem}")
    return requested


def auto_fallback(backend: str) -> str:
    """For inputs that `backend`'s kernels do not take (float64, a head dim or width past them):
    under "auto", "torch", which runs anything (as SDPA falls back to its math kernel); a backend
    asked for by name is kept, and its checks then raise the error naming what it cannot take."""
    return "torch" if get_backend() == "auto" else backend


def describe_default(device: torch.device | str = "cuda") -> str:
    """One line saying which backend "auto" picks on `device` and why."""
    device = torch.device(device)
    usable = available_backends(device)
    chosen = "torch" if device.type != "cuda" else next(n for n in _PREFERENCE if n in usable)
    line = f"fastbert: ops on {device.type} run on backend {chosen!r} (usable: {', '.join(usable)})"
    problem = capability_problem(device)
    return f"{line}: {problem}" if problem else line
