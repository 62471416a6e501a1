"""P^3 statistics and the P^3 priority rule (docs/SPEC.md section 4).

``P3Tracker`` keeps the per-objective running statistics every balancer logs (so L_k, C_k, N_k are
visible for every method) and APEX uses to set its priorities. The flow per epoch:

    observe(...)   inside Balancer.advantages(): computes and caches this batch's statistics, PURE
                   (calling advantages() twice in one epoch does not double-count anything)
    step(gram, pi) inside Balancer.update(): commits the cache into the EMAs, returns L, C, N

With ``min_norm_base`` it also keeps an EMA of the scale-normalised Gram and its min-norm (MGDA) weights
``base``; ``coefficients(pi)`` turns the priorities into stage 2's combination weights.

State is float64 CPU tensors (NaN = "not seen yet", ``gram_ema`` [K, K]) plus a python int epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .aggregators import mgda_coefficients
from .config import BalanceConfig


def gram_cosines(M: torch.Tensor) -> torch.Tensor:
    """Cosine matrix M_ij / sqrt(M_ii M_jj) (0 where a gradient vanishes)."""
    d = M.diagonal().clamp_min(0).sqrt()
    den = d[:, None] * d[None, :]
    return torch.where(den > 0, M / den.clamp_min(1e-300), torch.zeros_like(M)).clamp(-1, 1)


def conflict_from_gram(M: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """cos(g_k, h_k), h_k = sum_{j != k} pi_j g_j, from the Gram alone (SPEC 4):
    g_k . h_k = (M pi)_k - pi_k M_kk,  |h_k|^2 = pi^T M pi - 2 pi_k (M pi)_k + pi_k^2 M_kk."""
    M = M.double()
    pi = pi.double()
    Mpi = M @ pi
    diag = M.diagonal()
    num = Mpi - pi * diag
    h2 = (pi @ Mpi) - 2 * pi * Mpi + pi * pi * diag
    den2 = diag.clamp_min(0) * h2.clamp_min(0)
    scale = float(diag.clamp_min(0).max()) ** 2 if diag.numel() else 0.0
    ok = den2 > 1e-24 * max(scale, 1e-300)
    return torch.where(ok, num / den2.clamp_min(1e-300).sqrt(), torch.zeros_like(num)).clamp(-1, 1)


def conflict_proxy(Ahat: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of Ahat[:, k] with sum_{j != k} pi_j Ahat[:, j] over the batch [K]
    (0 where either side has no variance)."""
    X = Ahat.double()
    p = pi.double().to(X.device)
    Y = (X @ p)[:, None] - X * p  # [N, K]
    Xc = X - X.mean(0)
    Yc = Y - Y.mean(0)
    num = (Xc * Yc).sum(0)
    den = ((Xc * Xc).sum(0) * (Yc * Yc).sum(0)).sqrt()
    return torch.where(den > 1e-12, num / den.clamp_min(1e-300), torch.zeros_like(num)).clamp(-1, 1).cpu()


def floor_simplex(p: torch.Tensor, pi_min: float, active: torch.Tensor) -> torch.Tensor:
    """Raise every active entry of the distribution p to >= pi_min and renormalise the others so the
    result still sums to 1 (repeated until no active entry is below the floor; needs K pi_min <= 1).
    Inactive entries (preference weight 0) stay 0."""
    p = torch.where(active, p, torch.zeros_like(p))
    p = p / p.sum()
    fixed = torch.zeros_like(active)
    for _ in range(p.numel()):
        low = active & ~fixed & (p < pi_min)
        if not low.any():
            break
        fixed = fixed | low
        free = active & ~fixed
        p = torch.where(fixed, torch.full_like(p, pi_min), p)
        rest = 1.0 - pi_min * float(fixed.sum())
        mass = float(p[free].sum())
        if free.any():
            p = torch.where(free, p / mass * rest if mass > 0 else torch.full_like(p, rest / float(free.sum())), p)
    return p


def advantage_gram(Ahat: torch.Tensor) -> torch.Tensor:
    """Ahat^T Ahat / N [K, K] float64 CPU: the Gram of the per-objective gradients when the per-sample
    score gradients are orthogonal and of equal norm (the cheap stand-in for J J^T)."""
    X = Ahat.double()
    return (X.T @ X / max(X.shape[0], 1)).cpu()


def _ema_in_gram_scale(ema: torch.Tensor, x: torch.Tensor, G: torch.Tensor, beta: float, active: torch.Tensor) -> torch.Tensor:
    """``beta * ema + (1 - beta) * x / scale``, scale the mean diagonal of G over the active objectives; x / scale
    itself when ``ema`` is still NaN; ``ema`` unchanged when G has no positive diagonal or x is not finite."""
    G, x = G.double().cpu(), x.double().cpu()
    idx = active.nonzero().flatten()
    scale = float(G[idx, idx].clamp_min(0).mean())
    if not (math.isfinite(scale) and scale > 0) or not bool(torch.isfinite(x).all()):
        return ema
    x = x / scale
    return beta * ema + (1 - beta) * x if bool(torch.isfinite(ema).all()) else x.clone()


def normalised_gram_ema(ema: torch.Tensor, G: torch.Tensor | None, beta: float, active: torch.Tensor) -> torch.Tensor:
    """The EMA of G / (mean active diagonal of G), so the EMA mixes directions, not the gradient scale of the
    moment (G itself first; ``ema`` unchanged when G is None or carries no gradient signal)."""
    return ema if G is None else _ema_in_gram_scale(ema, G, G, beta, active)


def normalised_kl_ema(ema: torch.Tensor, G: torch.Tensor, b: torch.Tensor, beta: float, active: torch.Tensor) -> torch.Tensor:
    """The EMA of b = J g_KL [K] in the scale normalised_gram_ema divides G by, so b stays comparable with
    the cone's Gram."""
    return _ema_in_gram_scale(ema, b.flatten(), G, beta, active)


def min_norm_weights(G: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """MGDA's min-norm weights over the active objectives of the Gram G [K, K] (0 for the inactive ones;
    uniform over them when G carries nothing finite)."""
    idx = active.nonzero().flatten()
    lam = torch.zeros(G.shape[0], dtype=torch.float64)
    sub = G.double()[idx][:, idx]
    if not bool(torch.isfinite(sub).all()):
        lam[idx] = 1.0 / idx.numel()
        return lam
    lam[idx] = mgda_coefficients(sub).double()
    return lam


@dataclass
class Observation:
    """This epoch's statistics (the cache between advantages() and update())."""

    rbar: torch.Tensor  # [K] batch mean reward (NaN: no finite reward)
    bstd: torch.Tensor  # [K] batch std of the rewards (population)
    usable: torch.Tensor  # [K] u_k: share of groups whose std exceeds the floor
    sbar: torch.Tensor  # [K] EMA of the median in-group std including this batch (NaN: none yet)
    floor: torch.Tensor  # [K] kappa * sbar used for these advantages (0 where unknown)
    proxy: torch.Tensor  # [K] advantage-correlation proxy cos (Pearson), with pi
    pi: torch.Tensor  # [K] the priorities / effective weights used for these advantages
    gram_proxy: torch.Tensor | None = None  # [K, K] advantage_gram(Ahat)


class P3Tracker:
    def __init__(self, weights: torch.Tensor, cfg: BalanceConfig):
        self.K = weights.numel()
        self.cfg = cfg
        self.weights = weights.double().cpu()
        nan = torch.full((self.K,), float("nan"), dtype=torch.float64)
        self.epoch = 0  # number of update() calls so far
        self.sbar = nan.clone()
        self.r0 = nan.clone()  # baseline mean reward: average of rbar over the first baseline epochs
        self.s0 = nan.clone()  # baseline reward std (same epochs)
        self.n0 = torch.zeros(self.K, dtype=torch.float64)  # epochs averaged into r0, s0 so far
        self.sb0 = nan.clone()  # baseline median in-group std: average of sbar over the first baseline epochs
        self.nb0 = torch.zeros(self.K, dtype=torch.float64)  # epochs averaged into sb0 so far
        self.ema_fast = nan.clone()
        self.ema_slow = nan.clone()
        self.conflict = nan.clone()
        self.integral = torch.zeros(self.K, dtype=torch.float64)  # accumulated need (after warm-up)
        self.gram_ema = torch.full((self.K, self.K), float("nan"), dtype=torch.float64)  # min_norm_base only
        active = (self.weights > 0).double()
        self.base = active / active.sum()  # min-norm weights lambda (uniform until a Gram was seen)
        self.cache: Observation | None = None

    @property
    def baseline_epochs(self) -> int:
        """r0, s0 average the first max(1, warmup_epochs) epochs with a reward spread (one epoch's
        batch mean over a few prompts is too noisy a baseline for progress measured in base stds)."""
        return max(1, int(min(self.cfg.warmup_epochs, 10)))

    # ------------------------------------------------------------------ per batch (pure)
    def sbar_estimate(self, count: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """EMA (beta_s) of the median in-group std, including this batch [K] float64 CPU.
        The median is over groups with >= 2 finite rewards and std > 0 (groups with no spread carry
        no scale information; counting them would drive the floor to 0 exactly when most groups are
        degenerate, which is what the floor is for). NaN until some group had a spread."""
        m = torch.where((count >= 2) & (std > 0), std, torch.full_like(std, float("nan")))
        med = torch.nanquantile(m.double(), 0.5, dim=0).cpu() if m.shape[0] else torch.full((self.K,), float("nan"))
        med = med.double()
        b = self.cfg.beta_s
        prev = self.sbar
        out = torch.where(torch.isfinite(prev), b * prev + (1 - b) * med, med)
        return torch.where(torch.isfinite(out), out, prev)

    def observe(self, R, count, std, sbar, floor, Ahat, pi) -> Observation:
        Rf = R.double()
        valid = torch.isfinite(Rf)
        n = valid.sum(0)
        x = torch.where(valid, Rf, torch.zeros_like(Rf))
        mean = x.sum(0) / n.clamp_min(1)
        var = torch.where(valid, (Rf - mean) ** 2, torch.zeros_like(Rf)).sum(0) / n.clamp_min(1)
        rbar = torch.where(n > 0, mean, torch.full_like(mean, float("nan")))
        has = count > 0  # [G, K]
        over = has & (std.double() > floor.to(std.device, torch.float64))
        usable = over.sum(0).double() / has.sum(0).clamp_min(1).double()
        obs = Observation(
            rbar=rbar.cpu(), bstd=var.sqrt().cpu(), usable=usable.cpu(), sbar=sbar.clone(),
            floor=floor.double().cpu(), proxy=conflict_proxy(Ahat, pi), pi=pi.double().cpu().clone(),
            gram_proxy=advantage_gram(Ahat) if self.cfg.min_norm_base else None,  # only the min-norm base reads it
        )
        self.cache = obs
        return obs

    # ------------------------------------------------------------------ per epoch (commits)
    def step(self, gram: torch.Tensor | None, source: str) -> dict | None:
        """Commit the cached observation; ``source``: "gram" (cosines from ``gram``), "proxy" (the
        advantage correlation) or "hold" (no new conflict measurement: C keeps its value, 0 if none).
        Returns dict(L, C, N, v, p, conflict_cos, pi_used, rbar) [K] tensors, or None when nothing was
        observed since the last step."""
        o = self.cache
        if o is None:
            return None
        self.cache = None
        cfg, eps = self.cfg, self.cfg.eps
        self.sbar = o.sbar.clone()
        fin = torch.isfinite(o.rbar)
        # r0, s0: running average over the first baseline epochs whose rewards have a spread (an objective
        # whose rewards are all equal at first, e.g. a sparse OCR reward, would otherwise get s0 = 0)
        acc = fin & (o.bstd > 0) & (self.n0 < self.baseline_epochs)
        n1 = self.n0 + 1
        self.r0 = torch.where(acc, torch.where(self.n0 > 0, self.r0 + (o.rbar - self.r0) / n1, o.rbar), self.r0)
        self.s0 = torch.where(acc, torch.where(self.n0 > 0, self.s0 + (o.bstd - self.s0) / n1, o.bstd), self.s0)
        self.n0 = torch.where(acc, n1, self.n0)
        accs = torch.isfinite(o.sbar) & (o.sbar > 0) & (self.nb0 < self.baseline_epochs)
        nb1 = self.nb0 + 1
        self.sb0 = torch.where(accs, torch.where(self.nb0 > 0, self.sb0 + (o.sbar - self.sb0) / nb1, o.sbar), self.sb0)
        self.nb0 = torch.where(accs, nb1, self.nb0)
        bf, bs = cfg.beta_fast, cfg.beta_slow
        seen = torch.isfinite(self.ema_fast)
        first = fin & ~seen
        upd = fin & seen
        self.ema_fast = torch.where(first, o.rbar, torch.where(upd, bf * self.ema_fast + (1 - bf) * o.rbar, self.ema_fast))
        self.ema_slow = torch.where(first, o.rbar, torch.where(upd, bs * self.ema_slow + (1 - bs) * o.rbar, self.ema_slow))
        init = torch.isfinite(self.r0)
        # progress p_k in base stds (or in units of (target - r0) / delta where a target is given)
        unit = self.s0.clone()
        if cfg.targets is not None:
            t = torch.tensor([float("nan") if x is None else float(x) for x in cfg.targets], dtype=torch.float64)
            unit = torch.where(torch.isfinite(t), (t - self.r0) / cfg.delta, unit)
        unit = torch.where(unit.abs() > eps, unit, torch.full_like(unit, eps))
        p = torch.where(init, (self.ema_fast - self.r0) / unit, torch.zeros_like(self.r0))
        v = torch.where(init, (self.ema_fast - self.ema_slow) / unit.abs(), torch.zeros_like(self.r0))
        active = (self.weights > 0) & init
        wa = torch.where(active, self.weights, torch.zeros_like(self.weights))
        pbar = float((wa * p).sum() / wa.sum()) if bool(active.any()) else 0.0
        # conflict C_k (before L: the learnability reads it)
        if source == "hold":
            cos = torch.full_like(p, float("nan"))
            C = torch.where(torch.isfinite(self.conflict), self.conflict, torch.zeros_like(p))
        else:
            cos = conflict_from_gram(gram, o.pi) if source == "gram" else o.proxy
            raw = (-cos).clamp_min(0)
            bc = cfg.beta_conflict
            self.conflict = torch.where(torch.isfinite(self.conflict), bc * self.conflict + (1 - bc) * raw, raw)
            C = self.conflict.clone()
        if cfg.min_norm_base and source != "hold":
            self._update_base(gram if source == "gram" else o.gram_proxy)
        # learning potential: an objective that has made less than learn_ratio of the mean progress (once the
        # mean progress exceeds learn_after) is not (yet) learnable in proportion: pushing it is wasted. Conflict
        # holds an objective back too: the threshold shrinks by (1 - learn_conflict C_k), so a stall that the
        # conflict explains is not read as unlearnable (k2_conflict: it starved the small objective)
        L = torch.ones_like(p)
        if pbar > cfg.learn_after and cfg.learn_ratio > 0:
            thr = cfg.learn_ratio * (1 - cfg.learn_conflict * C).clamp(0, 1) * pbar
            # C_k = 1 (total conflict): no threshold left, only a negative progress reads as unlearnable
            L = torch.where(thr > 0, (p / thr.clamp_min(1e-300)).clamp(0, 1), (p >= 0).double())
        # saturation: GRPO learns only from in-group differences; an objective whose median in-group std fell
        # far more than the others' (z_k = sbar_k / sbar0_k below spread_ratio x the weighted mean) is flat
        # where the policy samples: pushing it takes priority from objectives that can still move
        if cfg.spread_ratio > 0:
            z = torch.where(torch.isfinite(self.sbar) & torch.isfinite(self.sb0) & (self.sb0 > 0),
                            self.sbar / self.sb0.clamp_min(1e-300), torch.ones_like(p))
            zbar = float((wa * z).sum() / wa.sum()) if bool(active.any()) else 1.0
            if zbar > 0:
                L = L * (z / (cfg.spread_ratio * zbar)).clamp(0, 1)
        L = torch.where(active, L, torch.ones_like(L))
        # progress need: how far objective k is behind the weighted mean progress (base stds), projected ahead by
        # the trend (need_lookahead x v_k: a lagging objective that is already catching up needs less, which damps
        # the seesaw of conflicting objectives); gaps within the deadband are batch noise (moving priorities on
        # them is what made the eval curves oscillate), the rest is clipped
        q = p + cfg.need_lookahead * v
        qbar = float((wa * q).sum() / wa.sum()) if bool(active.any()) else 0.0
        gap = qbar - q
        gap = gap.sign() * (gap.abs() - cfg.need_deadband).clamp_min(0)
        N = torch.where(active, gap.clamp(-cfg.need_clip, cfg.need_clip), torch.zeros_like(p))
        if self.epoch >= cfg.warmup_epochs:
            self.integral = (self.integral + N).clamp(-cfg.i_clip, cfg.i_clip)
        self.epoch += 1
        return dict(L=L, C=C, N=N, v=v, p=p, conflict_cos=cos, pi_used=o.pi, rbar=o.rbar, from_gram=source == "gram",
                    base=self.base.clone())

    def _update_base(self, G: torch.Tensor | None) -> None:
        """The EMA (beta_gram) of the normalised Gram, then its min-norm weights."""
        active = self.weights > 0
        self.gram_ema = normalised_gram_ema(self.gram_ema, G, self.cfg.beta_gram, active)
        self.base = min_norm_weights(self.gram_ema, active)

    def coefficients(self, pi: torch.Tensor) -> torch.Tensor:
        """Stage 2's combination weights: pi, or with min_norm_base floor(normalize(pi * lambda)) [K] float64."""
        if not self.cfg.min_norm_base:
            return pi.double().clone()
        c = pi.double() * self.base
        active = self.weights > 0
        if not float(c.sum()) > 0:
            return pi.double().clone()
        return floor_simplex(c / c.sum(), self.cfg.pi_min, active)

    def scores(self, L, C, N) -> torch.Tensor:
        """s_k = a_L log(L_k + eps) + damp_k (a_N (N_k^+ + need_lead N_k^-) + a_I I_k) - lambda C_k [N_k < 0]
        (need_lead scales the negative need of objectives ahead of the mean). The conflict penalty applies only
        to objectives ahead of the mean progress (pushing a leader that conflicts with the others only
        costs them; penalising a lagging objective for conflicting would keep it behind)."""
        cfg, eps = self.cfg, self.cfg.eps
        damp = (1 - cfg.conflict_damping * C).clamp(0, 1) ** cfg.damping_power
        need = N.clamp_min(0) + cfg.need_lead * N.clamp_max(0)
        if cfg.need_learn_power > 0:  # a reward with no learnable signal lags forever: its lag is no reason to push it
            need = need * L.clamp(0, 1) ** cfg.need_learn_power
        return cfg.a_l * torch.log(L + eps) + damp * (cfg.a_n * need + cfg.a_i * self.integral) - cfg.lam * C * (N < 0).double()

    def priorities(self, L, C, N, pi_prev) -> torch.Tensor:
        """pihat = normalize(softmax(s / T) * w), floored at pi_min, smoothed with pi_prev (SPEC 4)."""
        cfg = self.cfg
        s = self.scores(L, C, N)
        pihat = torch.softmax(s / cfg.temperature, 0) * self.weights
        active = self.weights > 0
        pihat = floor_simplex(pihat / pihat.sum(), cfg.pi_min, active)
        return (1 - cfg.rho) * pihat + cfg.rho * pi_prev.double()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "sbar": self.sbar.clone(), "r0": self.r0.clone(), "s0": self.s0.clone(),
                "n0": self.n0.clone(), "sb0": self.sb0.clone(), "nb0": self.nb0.clone(), "ema_fast": self.ema_fast.clone(), "ema_slow": self.ema_slow.clone(),
                "conflict": self.conflict.clone(), "integral": self.integral.clone(), "gram_ema": self.gram_ema.clone(),
                "base": self.base.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        keys = ["sbar", "r0", "s0", "ema_fast", "ema_slow", "conflict"]
        if "n0" in state:
            keys.append("n0")
        else:  # a checkpoint from before the baseline window: its r0, s0 are final
            self.n0 = torch.where(torch.isfinite(torch.as_tensor(state["r0"], dtype=torch.float64).flatten()),
                                  float(self.baseline_epochs), 0.0).double()
        if "integral" in state:
            keys.append("integral")
        else:
            self.integral = torch.zeros(self.K, dtype=torch.float64)
        if "sb0" in state:
            keys += ["sb0", "nb0"]
        else:  # a checkpoint from before the spread baseline: start it from the current sbar
            self.sb0 = torch.as_tensor(state["sbar"], dtype=torch.float64).flatten().cpu().clone()
            self.nb0 = torch.where(torch.isfinite(self.sb0), float(self.baseline_epochs), 0.0).double()
        if "gram_ema" in state:  # states from before the min-norm base start it afresh
            g = torch.as_tensor(state["gram_ema"], dtype=torch.float64).cpu()
            if tuple(g.shape) != (self.K, self.K):
                raise ValueError(f"balancer state 'gram_ema' has shape {tuple(g.shape)}, expected [{self.K}, {self.K}]")
            self.gram_ema = g.clone()
            keys.append("base")
        for k in keys:
            t = torch.as_tensor(state[k], dtype=torch.float64).flatten().cpu()
            if t.numel() != self.K:
                raise ValueError(f"balancer state {k!r} has {t.numel()} values, expected K = {self.K}")
            setattr(self, k, t.clone())
        self.cache = None
