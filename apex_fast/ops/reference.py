"""Plain PyTorch implementations of every fused op: the contract (docs/SPEC.md), the CPU fallback
and the benchmark baseline. Kernels and extensions are tested against these functions."""
from __future__ import annotations

import torch


def _check_rewards(R: torch.Tensor, group_ids: torch.Tensor) -> None:
    if R.dim() not in (1, 2):
        raise ValueError(f"R must be [N] or [N, K], got shape {tuple(R.shape)}")
    if group_ids.dim() != 1 or group_ids.shape[0] != R.shape[0]:
        raise ValueError(
            f"group_ids must be [N] with N = R.shape[0] = {R.shape[0]}, got shape {tuple(group_ids.shape)}"
        )
    if group_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"group_ids must be int32/int64, got {group_ids.dtype}")


def group_stats(R: torch.Tensor, group_ids: torch.Tensor):
    """NaN-aware per-group statistics.

    R [N, K] float, group_ids [N] int (arbitrary, unsorted values).
    Returns (inverse [N] dense group index, count [G, K], mean [G, K], std [G, K]) where std is the
    population std (ddof 0, as Flow-GRPO's numpy stat tracker). Groups/objectives with no finite
    entry have count 0, mean 0, std 0.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    G = int(inverse.max().item()) + 1 if inverse.numel() else 0
    # float64 accumulation (as the C++ backend): squares of rewards up to ~1e30 do not overflow
    Rf = R.double()
    valid = torch.isfinite(Rf) & (Rf.abs() <= torch.finfo(torch.float32).max)
    x = torch.where(valid, Rf, torch.zeros_like(Rf))
    K = Rf.shape[1]
    count = torch.zeros(G, K, dtype=torch.float32, device=R.device).index_add_(0, inverse, valid.float())
    s1 = torch.zeros(G, K, dtype=torch.float64, device=R.device).index_add_(0, inverse, x)
    mean = s1 / count.double().clamp_min(1)
    dev = torch.where(valid, x - mean[inverse], torch.zeros_like(x))
    s2 = torch.zeros(G, K, dtype=torch.float64, device=R.device).index_add_(0, inverse, dev * dev)
    std = (s2 / count.double().clamp_min(1)).sqrt()
    # an all-equal group has std exactly 0 even when its fp mean is off by an ulp
    big = torch.finfo(torch.float64).max
    idx = inverse[:, None].expand(-1, K)
    gmax = torch.full((G, K), -big, dtype=torch.float64, device=R.device).scatter_reduce_(
        0, idx, torch.where(valid, x, torch.full_like(x, -big)), "amax")
    gmin = torch.full((G, K), big, dtype=torch.float64, device=R.device).scatter_reduce_(
        0, idx, torch.where(valid, x, torch.full_like(x, big)), "amin")
    std = torch.where(gmax > gmin, std, torch.zeros_like(std))
    return inverse, count, mean.float(), std.float()


def group_normalize(
    R: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    global_std: bool = False,
    eps: float = 1e-4,
    std_floor: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Group-relative advantages (SPEC 1 / 3).

    A[i, k] = (R[i, k] - mean_{g(i), k}) / (std + eps), std = the group's population std, or the
    std over all finite entries of column k when ``global_std``; ``std_floor`` (scalar or [K]) is a
    lower bound on std (APEX's adaptive floor: max(std, floor)). NaN/inf rewards are excluded from the
    statistics and get 0. A group whose entries are all equal gives exactly 0.
    R [N] or [N, K] -> same shape, float32.
    """
    _check_rewards(R, group_ids)
    squeeze = R.dim() == 1
    R2 = R.reshape(R.shape[0], R.shape[1] if R.dim() == 2 else 1)
    if R2.shape[0] == 0:
        return torch.zeros(R.shape, dtype=torch.float32, device=R.device)
    inverse, count, mean, std = group_stats(R2, group_ids)
    Rf = R2.double()  # float64 like group_stats: no overflow for large rewards; A is float32
    valid = torch.isfinite(Rf) & (Rf.abs() <= torch.finfo(torch.float32).max)
    centered = torch.where(valid, Rf - mean.double()[inverse], torch.zeros_like(Rf))
    if global_std:
        n = valid.double().sum(0).clamp_min(1)
        gmean = torch.where(valid, Rf, torch.zeros_like(Rf)).sum(0) / n
        gdev = torch.where(valid, Rf - gmean, torch.zeros_like(Rf))
        denom = ((gdev * gdev).sum(0) / n).sqrt().expand_as(Rf)
    else:
        denom = std.double()[inverse]
    if std_floor is not None:
        floor = torch.as_tensor(std_floor, dtype=torch.float64, device=R.device)
        denom = torch.maximum(denom, floor.expand_as(denom))
    A = (centered / (denom + eps)).float()
    # zero-variance groups give exactly 0 (so zero-advantage masking drops them), also with global_std
    A = torch.where(std[inverse] > 0, A, torch.zeros_like(A))
    return A.reshape(R.shape) if squeeze else A


def _floor_vector(std_floor, K: int, device) -> torch.Tensor | None:
    """std_floor (None, scalar or [K]) -> float32 [K] tensor (or None)."""
    if std_floor is None:
        return None
    floor = torch.as_tensor(std_floor, dtype=torch.float32, device=device).flatten()
    if floor.numel() == 1:
        floor = floor.expand(K)
    if floor.numel() != K:
        raise ValueError(f"std_floor must be a scalar or [K={K}], got {floor.numel()} values")
    return floor


def dual_stage_advantages(
    R: torch.Tensor,
    group_ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    std_floor: torch.Tensor | float | None = None,
    eps: float = 1e-4,
    clip: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """APEX Dual-Stage Adaptive Normalization (SPEC 3).

    R [N, K] rewards (NaN = failed), group_ids [N] int (arbitrary values), weights [K] = the priorities
    pi (used as given, not renormalised), std_floor None / scalar / [K] (kappa * sbar_k).

    Stage 1: ``Ahat[i, k] = (R[i, k] - mean_{g,k}) / (max(std_{g,k}, floor_k) + eps)`` with the
    population std (ddof 0); NaN entries get 0 and are excluded from the statistics; a group whose
    finite entries of column k are all equal gives exactly 0 in that column.
    Stage 2: ``s = Ahat @ pi``; ``A = (s - mean(s)) / (std_pop(s) + eps)`` over all N samples, then
    clipped to [-clip, clip]. A sample with ``s == 0`` exactly (no usable signal in any objective)
    keeps ``A = 0`` so the zero-advantage mask drops it.

    Returns ``(A [N] float32, Ahat [N, K] float32, stats)`` with stats (tensors, no host sync):
    ``inverse`` [N] dense group index, ``count`` / ``mean`` / ``std`` [G, K] per-group statistics (std
    before the floor), ``combined`` [N] = s, ``batch_mean`` / ``batch_std`` (scalars of stage 2) and
    ``clip_frac`` (share of samples with |A| == clip).
    """
    _check_rewards(R, group_ids)
    if R.dim() != 2:
        raise ValueError(f"R must be [N, K], got shape {tuple(R.shape)}")
    N, K = R.shape
    w = torch.as_tensor(weights, dtype=torch.float32, device=R.device).flatten()
    if w.numel() != K:
        raise ValueError(f"weights must be [K={K}], got {w.numel()} values")
    floor = _floor_vector(std_floor, K, R.device)
    if N == 0:
        z = torch.zeros((), device=R.device)
        e = torch.zeros(0, K, device=R.device)
        return (torch.zeros(0, device=R.device), e.clone(),
                dict(inverse=torch.zeros(0, dtype=torch.long, device=R.device), count=e, mean=e, std=e,
                     combined=torch.zeros(0, device=R.device), batch_mean=z, batch_std=z, clip_frac=z))
    inverse, count, mean, std = group_stats(R, group_ids)
    Rf = R.float()
    valid = torch.isfinite(Rf)
    centered = torch.where(valid, Rf - mean[inverse], torch.zeros_like(Rf))
    denom = std if floor is None else torch.maximum(std, floor.expand_as(std))
    Ahat = centered / (denom[inverse] + eps)
    Ahat = torch.where(std[inverse] > 0, Ahat, torch.zeros_like(Ahat))
    s = (Ahat * w).sum(1)
    bmean = s.mean()
    bstd = ((s - bmean) ** 2).mean().sqrt()
    A = ((s - bmean) / (bstd + eps)).clamp(-clip, clip)
    A = torch.where(s == 0, torch.zeros_like(A), A)
    stats = dict(inverse=inverse, count=count, mean=mean, std=std, combined=s, batch_mean=bmean,
                 batch_std=bstd, clip_frac=(A.abs() >= clip).float().mean())
    return A, Ahat, stats


# ---------------------------------------------------------------------------------------------------
# Gradient-conflict ops (SPEC 5). J is a [K, P] tensor or a list of per-parameter tensors [K, ...]:
# the references below never concatenate the list either.


def _blocks(J) -> list[torch.Tensor]:
    if isinstance(J, torch.Tensor):
        return [J.reshape(J.shape[0], -1)]
    return [j.reshape(j.shape[0], -1) for j in J]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram(J) -> torch.Tensor:
    """M = J J^T [K, K] (float32; float64 for float64 J), summed over the per-parameter blocks."""
    blocks = _blocks(J)
    acc = _acc_dtype(blocks[0].dtype)
    K = blocks[0].shape[0]
    M = torch.zeros(K, K, dtype=acc, device=blocks[0].device)
    for b in blocks:
        bf = b.to(acc)
        M += bf @ bf.T
    return M


def cosine_from_gram(M: torch.Tensor) -> torch.Tensor:
    """C = M / sqrt(diag M diag M^T); rows/columns of zero-norm gradients are 0 (diagonal too)."""
    d = M.diagonal().clamp_min(0).sqrt()
    outer = d[:, None] * d[None, :]
    C = torch.where(outer > 0, M / torch.where(outer > 0, outer, torch.ones_like(outer)), torch.zeros_like(M))
    return C.clamp(-1, 1)


def cosine(J) -> torch.Tensor:
    """Pairwise cosine similarities of the K gradients [K, K] (SPEC 5)."""
    return cosine_from_gram(gram(J))


def combine(J, c: torch.Tensor, out=None):
    """d = c^T J. J [K, P] -> d [P]; J list of [K, ...] -> list of [...]. When ``out`` is given (a [P]
    tensor, or a list of tensors shaped like each J_i[0], e.g. the parameters' .grad) the result is
    written into it (overwriting) and ``out`` is returned. Accumulates in float32 (float64 for float64)."""
    single = isinstance(J, torch.Tensor)
    Js = [J] if single else list(J)
    outs = None if out is None else ([out] if single else list(out))
    res = []
    for i, j in enumerate(Js):
        acc = _acc_dtype(j.dtype)
        cf = c.to(device=j.device, dtype=acc).reshape(-1, *([1] * (j.dim() - 1)))
        d = (cf * j.to(acc)).sum(0)
        if outs is not None:
            outs[i].copy_(d.reshape(outs[i].shape))
            res.append(outs[i])
        else:
            res.append(d.to(j.dtype))
    return res[0] if single else res


def weighted_grads(delta: torch.Tensor, a: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Per-objective weight gradients of one linear layer from ONE backward (DESIGN.md):
    ``G[k] = delta^T diag(W[:, k]) a``. delta [M, out], a [M, in], W [M, K] -> G [K, out, in] in
    delta's dtype (accumulated in float32; float64 for float64)."""
    acc = _acc_dtype(delta.dtype)
    d, x, w = delta.to(acc), a.to(acc), W.to(acc)
    return torch.stack([d.T @ (w[:, k, None] * x) for k in range(W.shape[1])]).to(delta.dtype)
