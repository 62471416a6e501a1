"""Backend discovery and selection. Nothing here imports triton or the extension eagerly: the
package imports and works without Triton, without a compiler and without a GPU."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

BACKENDS = ("torch", "cpp", "triton")
ENV = "APEX_FAST_BACKEND"

_cache: dict[str, object] = {}


def forced_backend() -> str | None:
    """The backend forced by ``APEX_FAST_BACKEND`` (read at every call), or None."""
    name = os.environ.get(ENV, "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV}={name!r}: choose one of {', '.join(BACKENDS)} (or unset it / 'auto')")
    return name


# ---------------------------------------------------------------------------------------------------
# C++ / CUDA extension (apex_fast._C registers torch.ops.apex_fast.*)

def cpp_ops():
    """``torch.ops.apex_fast`` if the extension is built and loads, else None (reason: cpp_error())."""
    if "cpp" not in _cache:
        try:
            importlib.import_module("apex_fast._C")
            _cache["cpp"] = torch.ops.apex_fast
            _cache["cpp_error"] = None
        except Exception as e:  # not built, or built against another torch
            _cache["cpp"] = None
            _cache["cpp_error"] = f"{type(e).__name__}: {e}"
    return _cache["cpp"]


def cpp_error() -> str | None:
    cpp_ops()
    return _cache["cpp_error"]  # type: ignore[return-value]


def cpp_has(op: str, device: torch.device) -> bool:
    """Whether the built extension has a kernel for ``op`` on ``device``'s dispatch key."""
    ck = ("has", op, device.type)
    hit = _cache.get(ck)
    if hit is not None:
        return hit  # type: ignore[return-value]
    res = False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if cpp_ops() is not None and key is not None:
        try:
            res = torch._C._dispatch_has_kernel_for_dispatch_key(f"apex_fast::{op}", key)
        except RuntimeError:
            res = False
    _cache[ck] = res
    return res


# ---------------------------------------------------------------------------------------------------
# Triton (kernel sources live in the top-level kernel_src/ folder, installed as apex_fast.kernels)

def _import_kernels():
    try:
        return importlib.import_module("apex_fast.kernels")
    except ImportError:
        pass
    # running from a source checkout that is not pip-installed: map kernel_src/ to apex_fast.kernels
    src = Path(__file__).resolve().parents[2] / "kernel_src"
    spec = importlib.util.spec_from_file_location(
        "apex_fast.kernels", src / "__init__.py", submodule_search_locations=[str(src)])
    if spec is None or spec.loader is None:
        raise ImportError(f"apex_fast.kernels not installed and {src} not found")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["apex_fast.kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


def triton_kernels(name: str):
    """Import ``apex_fast.kernels.<name>`` (needs triton); None if triton is unavailable."""
    key = f"triton:{name}"
    if key not in _cache:
        try:
            importlib.import_module("triton")
            _import_kernels()
            _cache[key] = importlib.import_module(f"apex_fast.kernels.{name}")
            _cache["triton_error"] = None
        except Exception as e:
            _cache[key] = None
            _cache["triton_error"] = f"{type(e).__name__}: {e}"
    return _cache[key]


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    return triton_available() and (device.type == "cuda" or (device.type == "cpu" and triton_interpret()))


# ops with no Triton kernel
NO_TRITON = frozenset({"weighted_grads"})
# ops whose CUDA default is the torch reference, and the measurement that put them there: on the H200
# cuBLAS's K GEMMs ran LoRA-shaped weighted_grads (out or in = 32, M = 4096) 3.3x faster than the
# extension's tiled kernel, whose (in/64, out/64, K) grid leaves most SMs idle on thin layers; the
# extension stays one APEX_FAST_BACKEND=cpp away (bench/results/ops_h200.json)
CUDA_PREFERS_TORCH = frozenset({"weighted_grads"})


def choose(op: str, device: torch.device) -> str:
    """Pick the backend for ``op`` on ``device``.

    Default: CUDA -> Triton (or the extension's CUDA kernel when the op has no Triton kernel; the torch
    reference for the ops in CUDA_PREFERS_TORCH); CPU -> the C++ extension if built, else the torch
    reference. ``APEX_FAST_BACKEND`` forces a backend for every op that implements it (an op without
    that backend keeps its default); a forced backend that cannot run here raises."""
    has_triton = op not in NO_TRITON
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "cpp":
        if cpp_ops() is None:
            raise RuntimeError(f"{ENV}=cpp but the apex_fast._C extension is not available ({cpp_error()}); "
                               "build it with `pip install -e . --no-build-isolation`")
        if not cpp_has(op, device):
            raise RuntimeError(f"{ENV}=cpp: the extension has no {device.type} kernel for {op}")
        return "cpp"
    if forced == "triton" and has_triton:
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but triton is not installed")
        if not triton_usable(device):
            raise RuntimeError(f"{ENV}=triton: Triton kernels need CUDA tensors (got {device.type}); "
                               "set TRITON_INTERPRET=1 before importing triton to run them on the CPU")
        return "triton"
    if device.type == "cuda":
        if op in CUDA_PREFERS_TORCH:
            return "torch"
        if has_triton and triton_usable(device) and triton_kernels("gram") is not None:
            return "triton"
        if cpp_has(op, device):
            return "cpp"
        return "torch"
    if device.type == "cpu" and cpp_has(op, device):
        return "cpp"
    return "torch"


def available_backends() -> dict:
    """What this process can use: for the README / bench metadata."""
    return {
        "torch": True,
        "cpp": cpp_ops() is not None,
        "cpp_cuda": cpp_has("weighted_grads", torch.device("cuda")),
        "cpp_error": cpp_error(),
        "triton": triton_available(),
        "triton_interpret": triton_interpret(),
        "forced": os.environ.get(ENV) or None,
    }
