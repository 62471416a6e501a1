"""The public ops: one function each, validating its inputs and dispatching by device
(see _backend.choose). Not differentiable: they work on rewards and gradients, so inputs are
detached and outputs never require grad."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from . import reference as ref
from ._backend import choose, cpp_ops

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------------
# validation (clear errors, same for every backend)

def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def _check_contig(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {tuple(t.stride())} for shape "
                         f"{tuple(t.shape)}); call .contiguous() first (the ops never copy gradients silently)")


def _rewards(R, group_ids, *, need_2d: bool):
    _check_float("R", R)
    if R.dim() not in ((2,) if need_2d else (1, 2)):
        raise ValueError(f"R must be {'[N, K]' if need_2d else '[N] or [N, K]'}, got shape {tuple(R.shape)}")
    if not isinstance(group_ids, torch.Tensor):
        if isinstance(group_ids, (list, tuple)) and all(isinstance(g, int) and not isinstance(g, bool) for g in group_ids):
            group_ids = torch.tensor(group_ids, dtype=torch.int64, device=R.device)  # a plain list of prompt ids
        else:
            raise TypeError(f"group_ids must be a torch.Tensor or a list of ints, got {type(group_ids).__name__}")
    if group_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"group_ids must be int32/int64 (e.g. prompt indices), got {group_ids.dtype}")
    if group_ids.dim() != 1 or group_ids.shape[0] != R.shape[0]:
        raise ValueError(f"group_ids must be [N] with N = R.shape[0] = {R.shape[0]}, got shape "
                         f"{tuple(group_ids.shape)}")
    if group_ids.device != R.device:
        raise ValueError(f"group_ids is on {group_ids.device} but R on {R.device}")
    if R.numel() > _INT32_MAX:
        raise ValueError(f"R has {R.numel()} entries; the kernels index rewards with int32 (max {_INT32_MAX})")
    R2 = R if R.dim() == 2 else R.unsqueeze(1)
    if R2.requires_grad:  # rewards carry no gradient through these ops
        R2 = R2.detach()
    # rewards and ids are tiny: make them contiguous / int64 here instead of failing
    if not R2.is_contiguous():
        R2 = R2.contiguous()
    ids = group_ids
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    return R2, ids


def _floor(std_floor, K: int, device) -> torch.Tensor | None:
    """std_floor (None, scalar or [K]) -> contiguous float32 [K] on ``device``. Values are checked
    (finite, >= 0) for Python scalars and CPU tensors; CUDA tensors are not read back (no sync)."""
    if std_floor is None:
        return None
    if isinstance(std_floor, (int, float)) and not isinstance(std_floor, bool):
        v = float(std_floor)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"std_floor must be finite and >= 0, got {v}")
        return torch.full((K,), v, dtype=torch.float32, device=device)
    if not isinstance(std_floor, torch.Tensor) or std_floor.is_complex() or not std_floor.is_floating_point():
        raise TypeError(f"std_floor must be a float scalar or a float [K] tensor, got {std_floor!r:.80}")
    f = std_floor.to(device=device, dtype=torch.float32).reshape(-1)
    if f.numel() == 1:
        f = f.expand(K)
    if f.numel() != K:
        raise ValueError(f"std_floor must be a scalar or [K={K}], got {f.numel()} values")
    f = f.contiguous()
    if f.device.type == "cpu":
        vals = f.tolist()
        if not all(math.isfinite(v) and v >= 0 for v in vals):
            raise ValueError(f"std_floor must be finite and >= 0, got {vals}")
    return f


def _blocks(J: TensorOrList, name: str = "J") -> tuple[list[torch.Tensor], bool]:
    """J [K, P] or a list of per-parameter tensors [K, ...] -> list of [K, n_i] views (no copies)."""
    single = isinstance(J, torch.Tensor)
    if single:
        if J.dim() != 2:
            raise ValueError(f"{name} must be [K, P] (or a list of per-parameter tensors [K, ...]), got "
                             f"shape {tuple(J.shape)}")
        Js = [J]
    else:
        Js = list(J)
        if not Js:
            raise ValueError(f"{name} is an empty list")
    K = None
    for i, j in enumerate(Js):
        nm = name if single else f"{name}[{i}]"
        _check_float(nm, j)
        if j.dim() < 1:
            raise ValueError(f"{nm} must be [K, ...], got a 0-d tensor")
        if K is None:
            K, dtype, device = j.shape[0], j.dtype, j.device
        if j.shape[0] != K:
            raise ValueError(f"{nm} has {j.shape[0]} rows, expected K = {K} (every tensor is [K, ...])")
        if j.dtype != dtype:
            raise TypeError(f"{nm} is {j.dtype} but {name}[0] is {dtype}: all blocks must share a dtype")
        if j.device != device:
            raise ValueError(f"{nm} is on {j.device} but {name}[0] on {device}")
        _check_contig(nm, j)
    if K == 0:
        raise ValueError(f"{name} has K = 0 objectives")
    return [(j.detach() if j.requires_grad else j).reshape(K, -1) for j in Js], single


def _coeffs(c, K: int, device) -> torch.Tensor:
    if not isinstance(c, torch.Tensor):
        c = torch.as_tensor(c, dtype=torch.float32)
    if not c.is_floating_point():
        raise TypeError(f"c must be a float tensor, got {c.dtype}")
    if c.dim() != 1 or c.shape[0] != K:
        raise ValueError(f"c must be [K={K}], got shape {tuple(c.shape)}")
    return c.to(device)


def _outs(out, blocks, single: bool, J):
    if out is None:
        if single:
            return [torch.empty(blocks[0].shape[1], dtype=blocks[0].dtype, device=blocks[0].device)]
        return [torch.empty(j.shape[1:], dtype=j.dtype, device=j.device) for j in J]
    outs = [out] if single else list(out) if not isinstance(out, torch.Tensor) else None
    if outs is None:
        raise TypeError("out must be a list of tensors when J is a list")
    if len(outs) != len(blocks):
        raise ValueError(f"out has {len(outs)} tensors but J has {len(blocks)}")
    dt = None
    for i, (o, b) in enumerate(zip(outs, blocks)):
        nm = "out" if single else f"out[{i}]"
        _check_float(nm, o)
        want = (b.shape[1],) if single else tuple(J[i].shape[1:])
        if tuple(o.shape) != want:
            raise ValueError(f"{nm} has shape {tuple(o.shape)}, expected {want}")
        if o.device != b.device:
            raise ValueError(f"{nm} is on {o.device} but J on {b.device}")
        dt = dt or o.dtype
        if o.dtype != dt:
            raise TypeError(f"{nm} is {o.dtype} but out[0] is {dt}: all outputs must share a dtype")
        _check_contig(nm, o)
    return outs


# ---------------------------------------------------------------------------------------------------
# ops

def group_normalize(
    R: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    global_std: bool = False,
    eps: float = 1e-4,
    std_floor: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Group-relative advantages; see reference.group_normalize for the contract.
    R [N] or [N, K] (any float dtype), group_ids [N] int (arbitrary values) -> float32, R's shape."""
    R2, ids = _rewards(R, group_ids, need_2d=False)
    if not (isinstance(eps, (int, float)) and 0 <= eps < float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    N, K = R2.shape
    floor = _floor(std_floor, K, R.device)
    backend = choose("group_normalize", R.device)
    if N == 0 or K == 0 or backend == "torch":
        A = ref.group_normalize(R2, ids, global_std=global_std, eps=eps, std_floor=floor)
    elif backend == "cpp":
        A = cpp_ops().group_normalize(R2, ids, bool(global_std), float(eps), floor)
    else:
        from . import _triton
        A = _triton.group_normalize(R2, ids, global_std, eps, floor)
    return A if R.dim() == 2 else A.view(R.shape)


def dual_stage_advantages(
    R: torch.Tensor,
    group_ids: torch.Tensor,
    weights,
    *,
    std_floor: torch.Tensor | float | None = None,
    eps: float = 1e-4,
    clip: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """APEX dual-stage normalisation (SPEC 3) in one pass over R; see
    reference.dual_stage_advantages for the contract and the stats dict.
    Returns (A [N], Ahat [N, K], stats)."""
    R2, ids = _rewards(R, group_ids, need_2d=True)
    N, K = R2.shape
    w = weights if isinstance(weights, torch.Tensor) else torch.as_tensor(weights, dtype=torch.float32)
    if not w.is_floating_point():
        raise TypeError(f"weights must be float, got {w.dtype}")
    if w.dtype != torch.float32 or w.device != R.device or w.dim() != 1 or not w.is_contiguous():
        w = w.to(device=R.device, dtype=torch.float32).reshape(-1).contiguous()
    if w.numel() != K:
        raise ValueError(f"weights must be [K={K}], got {w.numel()} values")
    if not 0 < clip < float("inf") or not 0 < eps < float("inf"):
        raise ValueError(f"clip and eps must be finite and > 0, got clip={clip}, eps={eps}")
    floor = _floor(std_floor, K, R.device)
    backend = choose("dual_stage_advantages", R.device)
    if N == 0 or K == 0 or backend == "torch":
        return ref.dual_stage_advantages(R2, ids, w, std_floor=floor, eps=eps, clip=clip)
    if backend == "cpp":
        A, Ahat, inv, count, mean, std, s, st = cpp_ops().dual_stage_advantages(
            R2, ids, w, floor, float(eps), float(clip))
        stats = dict(inverse=inv, count=count, mean=mean, std=std, combined=s, batch_mean=st[0],
                     batch_std=st[1], clip_frac=st[2])
        return A, Ahat, stats
    from . import _triton
    return _triton.dual_stage_advantages(R2, ids, w, floor, eps, clip)


def gram(J: TensorOrList) -> torch.Tensor:
    """M = J J^T [K, K] in ONE pass over J, J a [K, P] tensor or a list of per-parameter tensors
    [K, ...] (never concatenated). float32 (float64 for float64 J), accumulated in float32 or wider."""
    blocks, _ = _blocks(J)
    backend = choose("gram", blocks[0].device)
    if backend == "cpp":
        return cpp_ops().gram(blocks)
    if backend == "triton":
        from . import _triton
        return _triton.gram(blocks)
    return ref.gram(blocks)


def cosine(J: TensorOrList) -> torch.Tensor:
    """Pairwise cosine similarity of the K gradients [K, K] (zero-norm gradients give 0)."""
    return ref.cosine_from_gram(gram(J))


def combine(J: TensorOrList, c, out: TensorOrList | None = None):
    """d = c^T J, written blockwise into ``out`` (overwritten) and returned. J [K, P] -> [P]; J a list
    of [K, ...] -> list of [...] (e.g. ``out=[p.grad for p in params]``). ``out`` may have another
    float dtype than J; accumulation is float32 (float64 for float64 J)."""
    blocks, single = _blocks(J)
    K = blocks[0].shape[0]
    cf = _coeffs(c, K, blocks[0].device)
    outs = _outs(out, blocks, single, J)
    backend = choose("combine", blocks[0].device)
    with torch.no_grad():
        if backend == "cpp":
            cpp_ops().combine(blocks, cf, [o.view(-1) for o in outs])
        elif backend == "triton":
            from . import _triton
            _triton.combine(blocks, cf, [o.view(-1) for o in outs])
        else:
            ref.combine(blocks, cf, [o.view(-1) for o in outs])
    return outs[0] if single else outs


def weighted_grads(delta: torch.Tensor, a: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """All K per-objective weight gradients of a linear layer from one backward (DESIGN.md):
    ``G[k] = delta^T diag(W[:, k]) a``. delta [M, out], a [M, in], W [M, K] -> G [K, out, in] in
    delta's dtype. delta and a must share a dtype; W any float dtype."""
    _check_float("delta", delta)
    _check_float("a", a)
    _check_float("W", W)
    if delta.dim() != 2 or a.dim() != 2 or W.dim() != 2:
        raise ValueError(f"expected delta [M, out], a [M, in], W [M, K], got shapes {tuple(delta.shape)}, "
                         f"{tuple(a.shape)}, {tuple(W.shape)}")
    if not (delta.shape[0] == a.shape[0] == W.shape[0]):
        raise ValueError(f"delta, a and W must have the same number of rows M, got {delta.shape[0]}, "
                         f"{a.shape[0]}, {W.shape[0]}")
    if delta.dtype != a.dtype:
        raise TypeError(f"delta ({delta.dtype}) and a ({a.dtype}) must share a dtype")
    if not (delta.device == a.device == W.device):
        raise ValueError(f"delta, a, W must be on one device, got {delta.device}, {a.device}, {W.device}")
    for nm, t in (("delta", delta), ("a", a), ("W", W)):
        _check_contig(nm, t)
    backend = choose("weighted_grads", delta.device)
    if delta.requires_grad or a.requires_grad or W.requires_grad:
        delta, a, W = delta.detach(), a.detach(), W.detach()
    if backend == "cpp":
        return cpp_ops().weighted_grads(delta, a, W)
    return ref.weighted_grads(delta, a, W)
