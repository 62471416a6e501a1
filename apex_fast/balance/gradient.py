"""Gradient-aggregation balancers (docs/SPEC.md section 5): pcgrad, mgda, cagrad, upgrad.

Each turns the K x K Gram M of the per-objective policy gradients into coefficients c (see
aggregators.py) and trains on ``A = Ahat @ c`` (batch-renormalised and clipped like APEX's stage 2
unless ``aggregator_renorm`` is false), Ahat the group-normalised per-objective advantages. Because the
surrogate is linear in the advantages this is the update direction ``d = c^T J``.

``wants_gram`` is True: after ``advantages()``, the trainer computes g_k from
``objective_advantages[:, k]``, the Gram ``M = J J^T`` and calls ``update(gram=M)``; the new c is
used by the next ``advantages()`` call -- the next epoch (lagged flow), or this epoch again if the
trainer calls ``advantages()`` a second time (same-epoch flow). Until a Gram has been given, c is
the preference weights and the stats say so (``gram_fallback = 1``).
"""
from __future__ import annotations

import warnings

import torch

from ..ops import dual_stage_advantages, group_normalize
from .aggregators import AGGREGATORS
from .base import Balancer, register_balancer, validate_rewards


class GramAggregatorBalancer(Balancer):
    def __init__(self, weights, cfg=None, names=None, **overrides):
        super().__init__(weights, cfg, names, **overrides)
        self.coef = self.weights.double().clone()
        self.coef_from_gram = False
        self.generator = torch.Generator().manual_seed(int(self.cfg.pcgrad_seed))
        self._warned = False

    @property
    def wants_gram(self) -> bool:
        return True

    def advantages(self, R, group_ids):
        validate_rewards(R, group_ids, self.K)
        R = R.float()
        c = self.coef.float().to(R.device)
        if self.cfg.aggregator_renorm:
            A, Ahat, _ = dual_stage_advantages(R, group_ids, c, std_floor=None, eps=self.cfg.eps,
                                               clip=self.cfg.adv_clip)
        else:
            Ahat = group_normalize(R, group_ids, eps=self.cfg.eps)
            A = (Ahat @ c).clamp(-self.cfg.adv_clip, self.cfg.adv_clip)
        tot = self.coef.sum()
        pi_eff = self.coef / tot if tot > 0 else self.weights.double()
        stats = self._common_stats(R, group_ids, A, Ahat)
        stats.update(self._observe(R, group_ids, Ahat, pi_eff))
        stats.update(self._vec("coef", self.coef))
        stats["gram_fallback"] = 0.0 if self.coef_from_gram else 1.0
        return A, stats

    def _after_step(self, res, M):
        if M is None:
            if not self.coef_from_gram and not self._warned:
                warnings.warn(f"balance.method={self.name}: update() got no Gram matrix, so the preference "
                              "weights are used as coefficients (stats: gram_fallback = 1). Pass "
                              "update(gram=M), M = J J^T of the per-objective gradients.", stacklevel=3)
                self._warned = True
        else:
            self.coef = AGGREGATORS[self.name](M, self.cfg, generator=self.generator).double().cpu()
            self.coef_from_gram = True
        stats = self._vec("coef_next", self.coef)
        stats["gram_fallback"] = 0.0 if self.coef_from_gram else 1.0
        return stats

    def state_dict(self):
        return {**super().state_dict(), "coef": self.coef.clone(), "coef_from_gram": int(self.coef_from_gram),
                "rng": self.generator.get_state().clone()}

    def _load_state(self, state):
        super()._load_state(state)
        coef = torch.as_tensor(state["coef"], dtype=torch.float64).flatten().cpu()
        if coef.numel() != self.K:
            raise ValueError(f"balancer state 'coef' has {coef.numel()} values, expected K = {self.K}")
        self.coef = coef.clone()
        self.coef_from_gram = bool(int(state["coef_from_gram"]))
        self.generator.set_state(torch.as_tensor(state["rng"], dtype=torch.uint8).clone())


@register_balancer("pcgrad")
class PCGradBalancer(GramAggregatorBalancer):
    """PCGrad (random projection order from a checkpointed generator seeded by pcgrad_seed)."""


@register_balancer("mgda")
class MGDABalancer(GramAggregatorBalancer):
    """MGDA: min-norm point of the convex hull of the per-objective gradients."""


@register_balancer("cagrad")
class CAGradBalancer(GramAggregatorBalancer):
    """CAGrad with alpha = cagrad_alpha."""


@register_balancer("upgrad")
class UPGradBalancer(GramAggregatorBalancer):
    """UPGrad: mean of the projections of each g_k onto the dual cone of all gradients."""
