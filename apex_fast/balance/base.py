"""The balancer interface: how K per-objective rewards become one advantage per sample.

A balancer sees tensors only (no models, no scorers). Trainers call, per epoch:

    A, stats = balancer.advantages(R, group_ids)   # R [N, K] (NaN = failed), group_ids [N]
    ...train on A...                                # balancer.objective_advantages: Ahat [N, K]
    stats |= balancer.update(gram=None)             # once per epoch; M [K, K] if balancer.wants_gram

and checkpoint ``state_dict()`` / ``load_state_dict()`` between epochs (after ``update``).

``advantages()`` is pure with respect to the balancer's state: it only caches this batch's
statistics; ``update()`` commits them (EMAs, priorities, aggregator coefficients). So calling
``advantages()`` again after ``update(gram)`` in the same epoch is allowed (the "same-epoch" flow of
gradient aggregators: first call -> Ahat -> per-objective gradients -> Gram -> update(gram) -> second
call uses the new coefficients).

Every balancer logs, as flat ``{"key/<reward name>": float}`` stats: the hijack share rho_k (SPEC 3,
with the preference weights), the effective share of each objective in the advantage actually used,
the priorities / effective weights, the usable-group share u_k and the std floor; ``update()`` adds
the P^3 quantities L_k, C_k, N_k (also for methods that do not use them) and, when a Gram is given,
the per-objective gradient norms and cosine matrix (``cos/<a>/<b>``).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch

from ..ops import group_normalize, group_stats
from .config import BalanceConfig
from .priorities import P3Tracker, gram_cosines


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


def effective_share(A: torch.Tensor, Ahat: torch.Tensor) -> torch.Tensor:
    """Which objective really drives the advantage A [N] that is trained on: corr(A, Ahat_k)^2,
    normalised to sum 1 [K] (for uncorrelated objectives and A = sum_k b_k Ahat_k this is
    b_k^2 / sum_j b_j^2, i.e. rho_k for the static sum). Uniform when A carries no signal."""
    X = Ahat.double()
    a = A.double()[:, None]
    Xc, ac = X - X.mean(0), a - a.mean(0)
    den = ((Xc * Xc).sum(0) * (ac * ac).sum(0)).sqrt()
    r2 = torch.where(den > 1e-12, (Xc * ac).sum(0) / den.clamp_min(1e-300), torch.zeros_like(den)) ** 2
    tot = r2.sum()
    return (r2 / tot if tot > 0 else torch.full_like(r2, 1.0 / r2.numel())).float().cpu()


class Balancer:
    """Base class. Subclasses implement ``advantages`` (calling ``_observe``); stateful ones extend
    ``update``, ``state_dict`` and ``load_state_dict``.

    ``Balancer(weights, cfg=None, names=None, **overrides)``: weights [K] preference weights
    (normalised to sum 1), cfg a BalanceConfig, names the K reward names used in stats keys;
    keyword overrides replace config fields, e.g. ``APEX([1, 1, 1, 1], kappa=0.2)``.
    """

    name = "base"

    def __init__(self, weights, cfg: BalanceConfig | None = None, names: list[str] | None = None, **overrides):
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.numel() == 0:
            raise ValueError("balance: at least one reward weight is needed")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"rewards[*].weight must be finite and >= 0, got {w.tolist()}")
        if w.sum() <= 0:
            raise ValueError("rewards[*].weight are all zero: give at least one reward a positive weight")
        self.weights = w / w.sum()
        self.K = w.numel()
        if cfg is None:
            cfg = BalanceConfig(method=self.name if self.name in _REGISTRY else "static")
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        cfg.validate_for(self.K)
        self.cfg = cfg
        if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"balance: names must be a list of strings, got {names!r}")
        self.names = list(names) if names is not None else [f"r{k}" for k in range(self.K)]
        self._named = names is not None  # unnamed balancers match state by position
        if len(self.names) != self.K:
            raise ValueError(f"balance: {len(self.names)} reward names for {self.K} weights")
        if len(set(self.names)) != self.K:
            raise ValueError(f"balance: reward names must be unique, got {self.names}")
        self.p3 = P3Tracker(self.weights, cfg)
        self._Ahat: torch.Tensor | None = None
        self._gram_seen = False
        self._kl_products: torch.Tensor | None = None  # update(kl_products=) of this epoch (APEX cone_kl)
        self._persistence: torch.Tensor | None = None  # update(persistence=) of this epoch (APEX cone_min_persistence)

    # ----------------------------------------------------------------------------- interface
    @property
    def wants_gram(self) -> bool:
        """True when update() needs the K x K Gram of the per-objective gradients (the trainer then
        computes g_k from ``objective_advantages[:, k]`` and passes ``M = J J^T``)."""
        return self.cfg.conflict_source == "gram"

    @property
    def objective_advantages(self) -> torch.Tensor | None:
        """Ahat [N, K] of the last ``advantages()`` call: per-objective advantages whose policy
        gradients g_k make the Gram (None before the first call)."""
        return self._Ahat

    def advantages(self, R: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def update(self, gram: torch.Tensor | None = None, kl_products: torch.Tensor | None = None,
               persistence: torch.Tensor | None = None) -> dict:
        """Once per epoch, after advantages(): commits this epoch's statistics; returns diagnostics.
        ``kl_products`` [K] (with a Gram): ``J g_KL``, each objective's gradient times the KL term's, in
        the Gram's scale; only APEX with ``cone_kl`` uses it. ``persistence`` [K] (with a Gram): each
        objective's gradient cosine with its previous epoch's (grad.EpochGram, cross_epoch); only APEX
        with ``cone_min_persistence`` uses it."""
        M = self._check_gram(gram)
        self._kl_products = self._per_objective(kl_products, "kl_products") if M is not None else None
        self._persistence = self._per_objective(persistence, "persistence") if M is not None else None
        res = self.p3.step(M, self._conflict_source(M))
        stats = {}
        if res is None:
            warnings.warn("balancer.update() called without a preceding advantages() call: no statistics to "
                          "commit", stacklevel=2)
        else:
            stats.update(self._p3_stats(res))
        if M is not None:
            stats.update(self._gram_stats(M))
        stats.update(self._after_step(res, M))
        return stats

    def _per_objective(self, x, name: str) -> torch.Tensor | None:
        """x as a [K] float64 CPU vector (None when absent or not finite)."""
        if x is None:
            return None
        v = torch.as_tensor(x).detach().to("cpu", torch.float64).flatten()
        if v.numel() != self.K:
            raise ValueError(f"{name} must be [K] = [{self.K}], got shape {tuple(v.shape)}")
        return v if bool(torch.isfinite(v).all()) else None

    def _after_step(self, res: dict | None, M: torch.Tensor | None) -> dict:
        """Subclass hook run by update() after the P^3 statistics are committed (res is None when
        there was nothing to commit); returns extra stats."""
        return {}

    def state_dict(self) -> dict:
        """Flat dict of tensors and python scalars (safetensors + JSON friendly, no pickle)."""
        named = {"names": list(self.names)} if self._named else {}
        return {"method": self.name, "K": self.K, **named, **self.p3.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Per-objective state is matched by reward name (key), never by position: a state saved with
        the same names in another order is permuted; other names or another K raise ValueError."""
        method = state.get("method", self.name)
        if method != self.name:
            raise ValueError(f"balancer state is for method {method!r}, this balancer is {self.name!r} "
                             "(balance.method changed between runs?)")
        if int(state.get("K", self.K)) != self.K:
            raise ValueError(f"balancer state has K = {int(state['K'])} objectives, this run has {self.K}")
        names = state.get("names")
        if names is not None and self._named and list(names) != self.names:
            if sorted(names) != sorted(self.names):
                raise ValueError(f"balancer state is for rewards {list(names)}, this balancer has {self.names}")
            order = torch.tensor([list(names).index(n) for n in self.names])
            def permute(v):
                if not (isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == self.K):
                    return v
                v = v[order]
                return v[:, order] if v.dim() == 2 and v.shape[1] == self.K else v  # a [K, K] Gram: both axes
            state = {k: permute(v) for k, v in state.items()}
        self._load_state(state)

    def _load_state(self, state: dict) -> None:
        self.p3.load_state_dict(state)

    # ----------------------------------------------------------------------------- helpers
    def _vec(self, prefix: str, v) -> dict:
        return {f"{prefix}/{n}": float(x) for n, x in zip(self.names, torch.as_tensor(v).flatten().tolist())}

    def _check_gram(self, gram) -> torch.Tensor | None:
        if gram is None:
            return None
        self._gram_seen = True
        M = torch.as_tensor(gram).detach().to("cpu", torch.float64)
        if M.shape != (self.K, self.K):
            raise ValueError(f"gram must be [K, K] = [{self.K}, {self.K}], got shape {tuple(M.shape)}")
        if not torch.isfinite(M).all():
            raise ValueError("gram has NaN/inf entries (a per-objective gradient overflowed?)")
        return 0.5 * (M + M.T)

    def _conflict_source(self, M) -> str:
        """gram | proxy | hold (conflict_source "gram" on an epoch without a Gram, e.g. with the
        trainer's gram_every > 1: C keeps its last value)."""
        src = self.cfg.conflict_source
        if src == "proxy" or (src == "auto" and M is None):
            return "proxy"
        if M is not None:
            return "gram"
        if not self._gram_seen and not getattr(self, "_hold_warned", False) and self.p3.cache is not None:
            warnings.warn("balance.conflict_source is 'gram' but update() got no Gram matrix (none so far): the "
                          "conflict penalty C stays 0 until one is given. Pass update(gram=M), M = J J^T of the "
                          "per-objective gradients (balancer.wants_gram is True), or use conflict_source auto/proxy",
                          stacklevel=3)
            self._hold_warned = True
        return "hold"

    def _observe(self, R, group_ids, Ahat, pi, count=None, std=None, sbar=None) -> dict:
        """Cache this batch's statistics (pure) and return the per-batch diagnostics."""
        if count is None:
            _, count, _, std = group_stats(R, group_ids)
        if sbar is None:
            sbar = self.p3.sbar_estimate(count, std)
        floor = self._floor(sbar)
        self.p3.observe(R, count, std, sbar, floor, Ahat, pi)
        self._Ahat = Ahat
        stats = self._vec("priority", pi)
        stats.update(self._vec("usable", self.p3.cache.usable))
        stats.update(self._vec("std_floor", floor))
        return stats

    def _floor(self, sbar: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isfinite(sbar), self.cfg.kappa * sbar, torch.zeros_like(sbar))

    def _plain_Ahat(self, R, group_ids) -> torch.Tensor:
        return group_normalize(R, group_ids, eps=self.cfg.eps)

    def _common_stats(self, R, group_ids, A, Ahat=None) -> dict:
        rho = hijack_share(R, group_ids, self.weights)
        stats = self._vec("hijack_share", rho)
        if Ahat is not None:
            stats.update(self._vec("effective_share", effective_share(A, Ahat)))
        stats["zero_adv_ratio"] = float((A == 0).float().mean())
        stats["adv_clip_frac"] = float((A.abs() >= self.cfg.adv_clip).float().mean())
        return stats

    def _p3_stats(self, res: dict) -> dict:
        stats = {}
        for key in ("L", "C", "N", "v", "p", "conflict_cos"):
            if bool(torch.isfinite(res[key]).all()):  # conflict_cos is NaN when nothing was measured
                stats.update(self._vec(key, res[key]))
        stats["conflict_from_gram"] = float(res["from_gram"]) if "from_gram" in res else 0.0
        stats["balance_epoch"] = float(self.p3.epoch)
        return stats

    def _gram_stats(self, M: torch.Tensor) -> dict:
        stats = self._vec("grad_norm", M.diagonal().clamp_min(0).sqrt())
        C = gram_cosines(M)
        for i in range(self.K):
            for j in range(i + 1, self.K):
                stats[f"cos/{self.names[i]}/{self.names[j]}"] = float(C[i, j])
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
