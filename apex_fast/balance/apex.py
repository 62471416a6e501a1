"""APEX: Dual-Stage Adaptive Normalization + P^3 adaptive priorities (docs/SPEC.md sections 3-4).

    from apex_fast.balance import APEX
    bal = APEX(weights=[1, 1, 1, 1], names=["pickscore", "deqa", "aesthetic", "ocr"])
    A, stats = bal.advantages(R, group_ids)   # R [N, K], group_ids [N] -> A [N]
    ...train...
    stats |= bal.update()                      # or bal.update(gram=M) with M = J J^T [K, K]
"""
from __future__ import annotations

import torch

from ..ops import dual_stage_advantages, group_normalize, group_stats
from .aggregators import offset_cone_coefficients, upgrad_coefficients
from .base import Balancer, register_balancer, validate_rewards
from .priorities import normalised_gram_ema, normalised_kl_ema


@register_balancer("apex")
class APEX(Balancer):
    """Stage 1: per objective and group, ``Ahat = (R - mean) / (max(std, kappa * sbar_k) + eps)``
    with sbar_k an EMA (beta_s) of the median in-group std (this batch included). Stage 2:
    ``A = clip(BatchNorm(Ahat @ pi), +-adv_clip)``. Priorities pi are uniform during
    ``warmup_epochs`` epochs, then follow P^3 (learning potential L, conflict penalty C, progress
    need N), updated once per epoch by ``update()``.

    Conflict penalty: with ``conflict_source`` auto (default) it uses the Gram passed to
    ``update(gram=M)`` when there is one, else the advantage-correlation proxy; ``gram`` requires a
    Gram (``wants_gram`` is then True), ``proxy`` never uses one.

    ``min_norm_base`` (opt-in): stage 2 combines with ``floor(normalize(pi * lambda))``, lambda the
    min-norm weights of an EMA of the Gram from the same source (the real one, or ``Ahat^T Ahat / N``).

    ``dual_cone`` (opt-in): stage 2 combines with UPGrad's coefficients for the preference vector pi,
    ``c = normalize(sum_k argmin_{v >= pi_k e_k} v^T G v)``, G an EMA (beta_cone) of the scale-normalised
    Gram ``update()`` gets (pi until the first): the direction conflicts with no objective of G; where no
    two gradients conflict, c = pi.

    ``cone_kl`` (opt-in, with ``dual_cone``): the step also carries the KL term's gradient g, which can
    lower an objective the cone protects. With b an EMA (beta_cone) of ``J g`` (``update(kl_products=)``,
    scaled like G) the coefficients are raised to ``c = argmin_{v >= c_cone} v^T G v + 2 s b^T v``,
    s = std(Ahat c_cone) / sum(c_cone) (the batch renormalisation's scale of the reward part), so that
    the whole step, KL included, conflicts with no objective of G.

    ``cone_min_persistence`` (opt-in, with ``dual_cone``): an objective joins the cone only once the EMA
    (beta_cone) of its gradient persistence (``update(persistence=)``: the cosine of its gradient with the
    previous epoch's, about |mu|^2 / (|mu|^2 + noise)) is at least this. Below it the epochs do not
    measure its mean gradient, and the cone would act on the noise of G; it keeps its priority.
    """

    def __init__(self, weights, cfg=None, names=None, **overrides):
        super().__init__(weights, cfg, names, **overrides)
        self.pi = self._warmup_pi()
        self.cone_gram = torch.full((self.K, self.K), float("nan"), dtype=torch.float64)  # dual_cone only
        self.cone_kl = torch.full((self.K,), float("nan"), dtype=torch.float64)  # cone_kl only: EMA of J g_KL
        self.cone_learn = torch.ones(self.K, dtype=torch.float64)  # the last P^3 learnability L (cone_min_learn)
        # EMA of the gradient persistence, from 0 (bias kept: an objective shows persistence over a few epochs to join)
        self.cone_persist = torch.zeros(self.K, dtype=torch.float64)

    @property
    def wants_gram(self) -> bool:
        return super().wants_gram or self.cfg.dual_cone

    def _warmup_pi(self) -> torch.Tensor:
        if self.cfg.warmup_priority == "weights":
            return self.weights.double().clone()
        active = (self.weights > 0).double()
        return active / active.sum()

    @property
    def priorities(self) -> torch.Tensor:
        """The priorities pi [K] the next ``advantages()`` call uses."""
        return self.pi.float().clone()

    def advantages(self, R, group_ids):
        validate_rewards(R, group_ids, self.K)
        R = R.float()
        _, count, _, std = group_stats(R, group_ids)
        sbar = self.p3.sbar_estimate(count, std)
        floor = self._floor(sbar)
        c = self.p3.coefficients(self.pi)  # pi, or pi tilted by the min-norm weights (min_norm_base)
        if self.cfg.dual_cone and bool(torch.isfinite(self.cone_gram).all()):
            m = self.cone_members  # the others (read as unlearnable) keep their priority, outside the cone
            if bool(m.any()):
                c = self._on_members(m, c, lambda G, cm: upgrad_coefficients(G, cm))
                if self.cfg.cone_kl and bool(torch.isfinite(self.cone_kl).all()):
                    c = self._kl_offset(R, group_ids, c, floor, m)
        A, Ahat, _ = dual_stage_advantages(
            R, group_ids, c.float().to(R.device), std_floor=floor.float().to(R.device),
            eps=self.cfg.eps, clip=self.cfg.adv_clip)
        stats = self._common_stats(R, group_ids, A, Ahat)
        stats.update(self._observe(R, group_ids, Ahat, c, count, std, sbar))
        if self.cfg.min_norm_base or self.cfg.dual_cone:
            stats.update(self._vec("coef", c))
            stats.update(self._vec("priority", self.pi))
        if self.cfg.dual_cone:
            stats.update(self._vec("cone_member", self.cone_members.double()))
        if self.cfg.min_norm_base:
            stats.update(self._vec("min_norm", self.p3.base))
        return A, stats

    def _on_members(self, m, c, solve):
        """c with its cone members' entries replaced by ``solve(G over the members, their c)``, normalised."""
        c = c.double().clone()
        c[m] = solve(self.cone_gram[m][:, m], c[m]).double()
        return c / c.sum()

    def _kl_offset(self, R, group_ids, c, floor, m):
        """The cone's c raised until the step with the KL term conflicts with no objective (cone_kl).
        The reward part of the step is J^T c / std(Ahat c) after the batch renormalisation, the KL part
        carries beta itself, so the offset is weighed by s = std(Ahat c) (c summing to 1; Ahat is stage 1,
        which does not depend on c)."""
        Ahat = group_normalize(R, group_ids, eps=self.cfg.eps, std_floor=floor.float().to(R.device))
        s = float((Ahat.double().cpu() @ c).std(unbiased=False))
        if not (s > 0):
            return c
        b = self.cone_kl[m]
        return self._on_members(m, c, lambda G, cm: offset_cone_coefficients(G, cm, b, s))

    @property
    def cone_members(self) -> torch.Tensor:
        """[K] bool: the objectives the dual cone protects: those with a weight and, with cone_min_learn,
        a last learnability L_k at least that (a reward with no signal has a near-zero mean gradient,
        which makes its coefficient free in the cone while its advantages add noise), and with
        cone_min_persistence, a gradient persistence EMA at least that (it starts at 0: not yet measured)."""
        m = (self.weights > 0) & (self.cone_learn >= self.cfg.cone_min_learn)
        if self.cfg.cone_min_persistence > 0:
            m &= self.cone_persist >= self.cfg.cone_min_persistence
        return m

    def _after_step(self, res, M):
        if res is not None and self.cfg.cone_min_learn > 0:
            self.cone_learn = torch.as_tensor(res["L"], dtype=torch.float64).flatten().cpu().clone()
        stats = {}
        if self.cfg.dual_cone:  # the conflicts that persist, not one batch's sampling noise
            if self._persistence is not None:
                b = self.cfg.beta_cone
                self.cone_persist = b * self.cone_persist + (1 - b) * self._persistence
                stats.update(self._vec("persistence", self.cone_persist))
            if self.cfg.cone_kl and M is not None and self._kl_products is not None:
                self.cone_kl = normalised_kl_ema(self.cone_kl, M, self._kl_products, self.cfg.beta_cone, self.weights > 0)
            self.cone_gram = normalised_gram_ema(self.cone_gram, M, self.cfg.beta_cone, self.weights > 0)
        if res is None:
            return stats
        if self.p3.epoch < self.cfg.warmup_epochs:
            self.pi = self._warmup_pi()
        else:
            self.pi = self.p3.priorities(res["L"], res["C"], res["N"], self.pi)
        return {**stats, **self._vec("priority_next", self.pi)}

    def state_dict(self):
        return {**super().state_dict(), "pi": self.pi.clone(), "cone_gram": self.cone_gram.clone(),
                "cone_kl": self.cone_kl.clone(), "cone_learn": self.cone_learn.clone(),
                "cone_persist": self.cone_persist.clone()}

    def _load_state(self, state):
        super()._load_state(state)
        pi = torch.as_tensor(state["pi"], dtype=torch.float64).flatten().cpu()
        if pi.numel() != self.K:
            raise ValueError(f"balancer state 'pi' has {pi.numel()} values, expected K = {self.K}")
        self.pi = pi.clone()
        if "cone_gram" in state:  # absent in checkpoints from before dual_cone
            G = torch.as_tensor(state["cone_gram"], dtype=torch.float64).cpu()
            if G.shape != (self.K, self.K):
                raise ValueError(f"balancer state 'cone_gram' has shape {tuple(G.shape)}, expected ({self.K}, {self.K})")
            self.cone_gram = G.clone()
        for key in ("cone_learn", "cone_kl", "cone_persist"):  # absent in checkpoints from before each option
            if key in state:
                v = torch.as_tensor(state[key], dtype=torch.float64).flatten().cpu()
                if v.numel() != self.K:
                    raise ValueError(f"balancer state {key!r} has {v.numel()} values, expected K = {self.K}")
                setattr(self, key, v.clone())
