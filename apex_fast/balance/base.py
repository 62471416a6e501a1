"""The balancer interface: how K per-objective rewards become one advantage per sample.

A balancer sees tensors only (no models, no scorers). Trainers call, per epoch:

    A, stats = balancer.advantages(R, group_ids)   # R [N, K] (NaN = failed), group_ids [N]
    ...train on A...
    balancer.update(gram=None)                      # once per epoch, optional K x K gradient Gram

and checkpoint ``state_dict()`` / ``load_state_dict()``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ops import group_stats
from .config import BalanceConfig


def validate_rewards(R: torch.Tensor, group_ids: torch.Tensor, K: int) -> None:
    if R.dim() != 2 or R.shape[1] != K:
        raise ValueError(f"R must be [N, K={K}] (one column per reward), got shape {tuple(R.shape)}")
    if R.shape[0] == 0:
        raise ValueError("R is empty (N = 0): no samples were scored in this batch")
    if group_ids.shape != (R.shape[0],):
        raise ValueError(f"group_ids must be [N={R.shape[0]}], got shape {tuple(group_ids.shape)}")


def hijack_share(R: torch.Tensor, group_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rho_k = w_k^2 sigma_k^2 / sum_j w_j^2 sigma_j^2, sigma_k = mean in-group std (SPEC 3) [K]."""
    _, count, _, std = group_stats(R, group_ids)
    has = (count > 0).float()
    sigma = (std * has).sum(0) / has.sum(0).clamp_min(1)
    share = (weights.to(sigma) * sigma) ** 2
    total = share.sum()
    return share / total if total > 0 else torch.full_like(share, 1.0 / share.numel())


class Balancer:
    """Base class. Subclasses implement ``advantages``; stateful ones override the rest."""

    name = "base"

    def __init__(self, weights, cfg: BalanceConfig | None = None, names: list[str] | None = None):
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.numel() == 0:
            raise ValueError("balance: at least one reward weight is needed")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"rewards[*].weight must be finite and >= 0, got {w.tolist()}")
        if w.sum() <= 0:
            raise ValueError("rewards[*].weight are all zero: give at least one reward a positive weight")
        self.weights = w / w.sum()
        self.K = w.numel()
        self.cfg = cfg or BalanceConfig()
        self.names = list(names) if names is not None else [f"r{k}" for k in range(self.K)]

    def advantages(self, R: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def update(self, gram: torch.Tensor | None = None) -> dict:
        """Called once per epoch after training; returns diagnostics (may be empty)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _common_stats(self, R, group_ids, A) -> dict:
        rho = hijack_share(R, group_ids, self.weights)
        stats = {f"hijack_share/{n}": float(v) for n, v in zip(self.names, rho)}
        stats["zero_adv_ratio"] = float((A == 0).float().mean())
        return stats


_REGISTRY: dict[str, Callable[..., Balancer]] = {}


def register_balancer(name: str):
    def deco(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def make_balancer(cfg: BalanceConfig, weights, names: list[str] | None = None) -> Balancer:
    cfg.validate()
    if cfg.method not in _REGISTRY:
        raise ValueError(
            f"balance.method: {cfg.method!r} is not implemented yet; available: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[cfg.method](weights, cfg, names)
