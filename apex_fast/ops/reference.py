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
    Rf = R.float()
    valid = torch.isfinite(Rf)
    x = torch.where(valid, Rf, torch.zeros_like(Rf))
    K = Rf.shape[1]
    count = torch.zeros(G, K, dtype=torch.float32, device=R.device).index_add_(0, inverse, valid.float())
    s1 = torch.zeros(G, K, dtype=torch.float32, device=R.device).index_add_(0, inverse, x)
    mean = s1 / count.clamp_min(1)
    dev = torch.where(valid, x - mean[inverse], torch.zeros_like(x))
    s2 = torch.zeros(G, K, dtype=torch.float32, device=R.device).index_add_(0, inverse, dev * dev)
    std = (s2 / count.clamp_min(1)).sqrt()
    # an all-equal group has std exactly 0 even when its fp mean is off by an ulp
    big = torch.finfo(torch.float32).max
    gmax = torch.full((G, K), -big, device=R.device).index_reduce_(
        0, inverse, torch.where(valid, x, torch.full_like(x, -big)), "amax")
    gmin = torch.full((G, K), big, device=R.device).index_reduce_(
        0, inverse, torch.where(valid, x, torch.full_like(x, big)), "amin")
    std = torch.where(gmax > gmin, std, torch.zeros_like(std))
    return inverse, count, mean, std


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
    R2 = R.reshape(R.shape[0], -1)
    if R2.shape[0] == 0:
        return torch.zeros(R.shape, dtype=torch.float32, device=R.device)
    inverse, count, mean, std = group_stats(R2, group_ids)
    Rf = R2.float()
    valid = torch.isfinite(Rf)
    centered = torch.where(valid, Rf - mean[inverse], torch.zeros_like(Rf))
    if global_std:
        n = valid.float().sum(0).clamp_min(1)
        gmean = torch.where(valid, Rf, torch.zeros_like(Rf)).sum(0) / n
        gdev = torch.where(valid, Rf - gmean, torch.zeros_like(Rf))
        denom = ((gdev * gdev).sum(0) / n).sqrt().expand_as(Rf)
    else:
        denom = std[inverse]
    if std_floor is not None:
        floor = torch.as_tensor(std_floor, dtype=torch.float32, device=R.device)
        denom = torch.maximum(denom, floor.expand_as(denom))
    A = centered / (denom + eps)
    # zero-variance groups give exactly 0 (so zero-advantage masking drops them), also with global_std
    A = torch.where(std[inverse] > 0, A, torch.zeros_like(A))
    return A.reshape(R.shape) if squeeze else A
