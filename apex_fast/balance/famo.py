"""FAMO (Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023) as a cheap
adaptive-weighting baseline for rewards (docs/SPEC.md section 4, baselines).

FAMO keeps logits xi [K], weights z = softmax(xi), and after each step moves xi against the
objectives that improved faster than the z-weighted average: ``xi <- xi - beta (J_z^T d + gamma xi)``,
``(J_z^T d)_k = z_k (d_k - z . d)``, d_k the improvement of objective k over the step (FAMO: the decrease
of log loss_k on the same batch). Adaptation to reward maximisation in GRPO [design]: d_k is the change
of the batch-mean reward between consecutive epochs divided by the objective's baseline reward std s0_k
(scale-free, like FAMO's log), and the weights act on group-normalised advantages like GDPO / APEX
stage 2: ``A = clip(BatchNorm(Ahat @ c)), c = normalize(w * z)``. No Gram, no extra backward.
"""
from __future__ import annotations

import torch

from ..ops import dual_stage_advantages
from .base import Balancer, register_balancer, validate_rewards


@register_balancer("famo")
class FAMOBalancer(Balancer):
    def __init__(self, weights, cfg=None, names=None, **overrides):
        super().__init__(weights, cfg, names, **overrides)
        self.logits = torch.zeros(self.K, dtype=torch.float64)
        self.prev_rbar = torch.full((self.K,), float("nan"), dtype=torch.float64)

    @property
    def coefficients(self) -> torch.Tensor:
        """c = normalize(w * softmax(xi)) [K] used by the next advantages() call."""
        c = torch.softmax(self.logits, 0) * self.weights.double()
        return c / c.sum()

    def advantages(self, R, group_ids):
        validate_rewards(R, group_ids, self.K)
        R = R.float()
        c = self.coefficients
        A, Ahat, _ = dual_stage_advantages(R, group_ids, c.float().to(R.device), std_floor=None, eps=self.cfg.eps,
                                           clip=self.cfg.adv_clip)
        stats = self._common_stats(R, group_ids, A, Ahat)
        stats.update(self._observe(R, group_ids, Ahat, c))
        return A, stats

    def _after_step(self, res, M):
        if res is None:
            return {}
        obs_rbar = res["rbar"]
        s0 = self.p3.s0
        ok = torch.isfinite(obs_rbar) & torch.isfinite(self.prev_rbar) & torch.isfinite(s0) & (s0 > 0)
        d = torch.where(ok, (obs_rbar - self.prev_rbar) / s0.clamp_min(self.cfg.eps), torch.zeros_like(obs_rbar))
        z = torch.softmax(self.logits, 0)
        grad = z * (d - (z * d).sum())
        self.logits = self.logits - self.cfg.famo_lr * (grad + self.cfg.famo_decay * self.logits)
        self.prev_rbar = torch.where(torch.isfinite(obs_rbar), obs_rbar, self.prev_rbar)
        return {**self._vec("famo_improvement", d), **self._vec("coef_next", self.coefficients)}

    def state_dict(self):
        return {**super().state_dict(), "logits": self.logits.clone(), "prev_rbar": self.prev_rbar.clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for key in ("logits", "prev_rbar"):
            t = torch.as_tensor(state[key], dtype=torch.float64).flatten().cpu()
            if t.numel() != self.K:
                raise ValueError(f"balancer state {key!r} has {t.numel()} values, expected K = {self.K}")
            setattr(self, key, t.clone())
