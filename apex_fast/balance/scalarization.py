"""Baselines: static linear scalarization (Flow-GRPO) and normalize-then-sum (GDPO). SPEC 3."""
from __future__ import annotations

import torch

from ..ops import group_normalize
from .base import Balancer, register_balancer, validate_rewards


@register_balancer("static")
class StaticBalancer(Balancer):
    """A = GroupNorm(sum_k w_k R[:, k]); a sample with any NaN reward is excluded (advantage 0)."""

    def advantages(self, R, group_ids):
        validate_rewards(R, group_ids, self.K)
        R = R.float()
        total = (R * self.weights.to(R.device)).sum(1)  # NaN in any column -> NaN -> excluded
        A = group_normalize(total, group_ids, global_std=self.cfg.global_std, eps=self.cfg.eps)
        A = A.clamp(-self.cfg.adv_clip, self.cfg.adv_clip)
        Ahat = self._plain_Ahat(R, group_ids)  # per-objective view, for diagnostics and the Gram
        stats = self._common_stats(R, group_ids, A, Ahat)
        stats.update(self._observe(R, group_ids, Ahat, self.weights))
        return A, stats


@register_balancer("gdpo")
class NormalizeThenSumBalancer(Balancer):
    """A = BatchNorm(sum_k w_k GroupNorm(R[:, k])); NaN entries contribute 0 to their column."""

    def advantages(self, R, group_ids):
        validate_rewards(R, group_ids, self.K)
        R = R.float()
        Ahat = group_normalize(R, group_ids, eps=self.cfg.eps)
        s = (Ahat * self.weights.to(R.device)).sum(1)
        std = s.std(unbiased=False)
        A = (s - s.mean()) / (std + self.cfg.eps)
        A = torch.where(s == 0, torch.zeros_like(A), A)  # keep fully uninformative samples masked
        A = A.clamp(-self.cfg.adv_clip, self.cfg.adv_clip)
        stats = self._common_stats(R, group_ids, A, Ahat)
        stats.update(self._observe(R, group_ids, Ahat, self.weights))
        return A, stats
