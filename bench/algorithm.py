"""Algorithm benchmark: which balancer gives the best worst objective on cheap multi-objective RL toys?

    OMP_NUM_THREADS=1 python bench/algorithm.py                         # every shipped scenario + ablations
    OMP_NUM_THREADS=1 python bench/algorithm.py --scenario bench/scenarios/k6.yaml --methods apex,gdpo,mgda
    OMP_NUM_THREADS=1 python bench/algorithm.py --quick                 # 3 seeds x 40 epochs smoke run
    OMP_NUM_THREADS=1 python bench/algorithm.py --scenario paper_jitter --methods apex+mn-gram --merge  # add to the saved results
    OMP_NUM_THREADS=1 python bench/algorithm.py --first-seed 16 --methods gdpo,mgda,apex --ablations none  # fresh seeds

Not a test: CPU-only toys described by scenario files (bench/scenario.py documents the schema and the
toy), trained with Flow-GRPO's clipped loss (SPEC 1: clip range 0.02, KL to the initial policy with
beta 0.01, 2 Adam steps per epoch) and every balancer of apex_fast.balance. All seeds of a scenario run
at once: the toy, the policy gradients (closed form for the Gaussian-linear policy, checked against
autograd of apex_fast.rl.loss.grpo_loss in tests/test_bench_scenarios.py) and Adam are batched over
seeds; only the balancers, the code under test, run per seed.

Gradient methods get the exact per-objective policy gradients at the sampling policy (the surrogate
with Ahat[:, k], clipped to +-5) and their Gram each epoch and use the new coefficients in the same
epoch; APEX, FAMO, static and gdpo commit once per epoch after the step (APEX with that epoch's Gram
when its conflict_source is "gram", with the advantage-correlation proxy otherwise). Both flows go
through apex_fast.grad.sequence, as in the trainer.
Variants with `bench_gram: cross_epoch` get sym(J_t J_{t-1}^T) instead of the batch Gram J_t J_t^T
(the Gram of the mean gradients, without the sampling noise on the diagonal), with `+adam` in Adam's
metric (GramMeasure). Variants with `cone_kl` also hand APEX J g_KL (the objectives' gradients times the KL
term's, kl_gradient, in the same metric) through commit_epoch, as the trainer does with balance.cone_kl.

Reported per scenario and method, mean +- standard error over seeds: improvement of the held-out
deterministic policy (the ODE analogue, noiseless rewards, 64 held-out prompts) over the base policy,
in base-policy reward stds; the worst such improvement and the hypervolume (product of the positive
parts) over the objectives with a signal; the effective share of each objective in the advantage
trained on (last 10 epochs; |share - weight| max over objectives as "share dev"); oscillation (sum over
the eval curve of |step| minus |net change|, mean over objectives: movement later undone). APEX is
compared with every baseline by PAIRED differences over seeds (same environment and initial policy per
seed): "win" = mean difference > 2 SE, "tie" = within -1 SE, "loss" below that.
Writes bench/results/algorithm.json, algorithm.md, algorithm.png (summary), algorithm_<scenario>.png
(per-scenario study: curves, priorities, L, C, N over time).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apex_fast.balance import BalanceConfig, make_balancer  # noqa: E402
from apex_fast.balance.config import CAPTURED_GRADIENT_DEFAULTS  # noqa: E402
from apex_fast.grad import adam_step_scale, commit_epoch, epoch_advantages, gram_persistence  # noqa: E402
from bench.scenario import D, SIGMA, ToyBatch, load_scenario, shipped_scenarios  # noqa: E402

BASELINES = ["static", "gdpo", "famo", "pcgrad", "mgda", "cagrad", "upgrad"]
METHODS = ["static", "gdpo", "famo", "pcgrad", "mgda", "cagrad", "upgrad", "apex"]
# a variant's measurement of the Gram (not a BalanceConfig field): "batch" (default) | "cross_epoch" |
# "cross_epoch:w" (w x cross-epoch + (1 - w) x batch Gram), each optionally "+adam" (in Adam's metric)
GRAM_KEY = "bench_gram"
# ablations of APEX: name -> BalanceConfig overrides (method apex)
VARIANTS = {
    "apex": {},
    "apex-noP3": {"warmup_epochs": 10**9},  # dual-stage normalisation with uniform priorities
    "apex-noL": {"a_l": 0.0},  # no learning potential (neither the progress nor the spread part)
    "apex-nospread": {"spread_ratio": 0.0},  # L without the saturation (in-group spread) part
    "apex-noN": {"a_n": 0.0},
    "apex-nodeadband": {"need_deadband": 0.0},
    "apex-an2": {"a_n": 2.0},
    "apex+I": {"a_i": 0.05},  # integral action: accumulated need (the worst-first variant)
    "apex+C": {"lam": 2.0, "conflict_source": "proxy"},
    "apex+C-gram": {"lam": 2.0, "conflict_source": "gram"},
    "apex-gram": {"conflict_source": "gram"},  # Gram cosines instead of the advantage proxy in C
    "apex-nodamp": {"conflict_damping": 0.0},
    "apex-nofloor": {"kappa": 0.0},
    "apex-warmup0": {"warmup_epochs": 0},
    "apex-warmup20": {"warmup_epochs": 20},
    "apex-rho0.95": {"rho": 0.95},
    "apex-rho0.98": {"rho": 0.98},  # the third revision's smoothing
    "apex-lead0.5": {"need_lead": 0.5},  # leaders ahead of the mean pushed down at half the gain
    "apex-nolearnconf": {"learn_conflict": 0.0},  # learnability blind to conflict (the fourth revision)
    "apex+needL": {"need_learn_power": 1.0},  # the need scaled by the learnability: no push for a no-signal reward
    "apex+mn-gram": {"min_norm_base": True, "conflict_source": "gram"},  # P^3 tilts the min-norm weights (real Gram)
    "apex+mn-proxy": {"min_norm_base": True, "conflict_source": "proxy"},  # ... of the advantage Gram Ahat^T Ahat / N
    # stage 2 = UPGrad with the priorities as its preference vector (EMA of the real Gram); the need undamped
    "apex+cone": {"dual_cone": True, "conflict_damping": 0.0},
    "apex+cone-damp": {"dual_cone": True},  # ... with the conflict damping (C from the Gram switches the need off)
    "apex+cone-last": {"dual_cone": True, "conflict_damping": 0.0, "beta_cone": 0.0},  # ... the last epoch's Gram
    # ... with the Gram measured across epochs, sym(J_t J_{t-1}^T): E = mean gradients' Gram, no sampling-noise diagonal
    "apex+cone-xgram": {"dual_cone": True, "conflict_damping": 0.0, GRAM_KEY: "cross_epoch"},
    "apex+cone-xgram75": {"dual_cone": True, "conflict_damping": 0.0, GRAM_KEY: "cross_epoch:0.75"},  # a blend
    "apex+cone-adam": {"dual_cone": True, "conflict_damping": 0.0, GRAM_KEY: "batch+adam"},  # Adam's metric
    "apex+cone-xgram-adam": {"dual_cone": True, "conflict_damping": 0.0, GRAM_KEY: "cross_epoch+adam"},
    # picked on seeds 0-31 among 9 (cross weight, beta_cone) pairs, validated on seeds 32-63 (README): 7/8 cross-epoch
    # + 1/8 batch Gram in Adam's metric, a 10-epoch Gram EMA (at the k2 front a 20-epoch one lets the step drift)
    "apex+cone-x875-adam-b90": {"dual_cone": True, "conflict_damping": 0.0, "beta_cone": 0.9,
                                GRAM_KEY: "cross_epoch:0.875+adam"},
    # apex+cone-xgram-adam with the KL term counted in the cone (cone_kl: the step, KL included, lowers no
    # objective of the Gram); the trainer takes J g_KL from the same backward (balance.gradients one_backward)
    "apex+cone-kl": {"dual_cone": True, "conflict_damping": 0.0, "cone_kl": True, "gradients": "one_backward",
                     GRAM_KEY: "cross_epoch+adam"},
    "apex+cone-kl-b90": {"dual_cone": True, "conflict_damping": 0.0, "cone_kl": True, "gradients": "one_backward",
                         "beta_cone": 0.9, GRAM_KEY: "cross_epoch+adam"},  # ... with a 10-epoch Gram EMA
    # ... with the objectives P^3 reads as unlearnable (L < 0.25) outside the cone (validated on seeds 96-127)
    "apex+cone-kl-b90-L": {"dual_cone": True, "conflict_damping": 0.0, "cone_kl": True, "gradients": "one_backward",
                           "beta_cone": 0.9, "cone_min_learn": 0.25, GRAM_KEY: "cross_epoch+adam"},
    # APEX as the trainer configures it when it captures the per-objective gradients (balance.gradients
    # one_backward): BalanceConfig.with_captured_gradient_defaults, its Gram measured as those defaults say
    "apex-1bw": {"gradients": "one_backward", **CAPTURED_GRADIENT_DEFAULTS,
                 GRAM_KEY: CAPTURED_GRADIENT_DEFAULTS["gram_estimate"] + "+" + CAPTURED_GRADIENT_DEFAULTS["gram_metric"]},
}
# ... without P^3: the cone's preference vector stays uniform (what P^3 adds inside the cone)
VARIANTS["apex-1bw-noP3"] = {**VARIANTS["apex-1bw"], "warmup_epochs": 10**9}
ABLATIONS = [k for k in VARIANTS if k != "apex"]
# variants whose acceptance checks algorithm.md also lists (opt-in ones, and apex-1bw: APEX with captured gradients)
OPT_IN = {"apex+mn-gram": "min_norm_base with the real Gram", "apex+cone": "dual_cone with conflict_damping 0",
          "apex+cone-xgram": "apex+cone with the Gram measured across epochs",
          "apex+cone-xgram75": "apex+cone with 3/4 cross-epoch + 1/4 batch Gram",
          "apex+cone-adam": "apex+cone with the Gram in Adam's metric",
          "apex+cone-xgram-adam": "apex+cone with the cross-epoch Gram in Adam's metric",
          "apex+cone-x875-adam-b90": "apex+cone, 7/8 cross-epoch Gram in Adam's metric, beta_cone 0.9",
          "apex+cone-kl": "apex+cone-xgram-adam with the KL term in the cone (cone_kl)",
          "apex+cone-kl-b90": "apex+cone-kl with beta_cone 0.9",
          "apex+cone-kl-b90-L": "apex+cone-kl-b90 with cone_min_learn 0.25",
          "apex-1bw": "APEX as the trainer runs it with gradients one_backward: apex+cone-kl-b90-L with cone_min_persistence 0.1",
          "apex-1bw-noP3": "apex-1bw with uniform priorities (no P^3)"}
ABLATION_SCENARIOS = ["paper", "k2_conflict", "k6", "saturating", "noise"]
LR, INNER, CLIP, KL_BETA, ADV_CLIP = 0.005, 2, 0.02, 0.01, 5.0


def make_cfg(method: str) -> BalanceConfig:
    if method in VARIANTS:
        return BalanceConfig(method="apex", **{k: v for k, v in VARIANTS[method].items() if k != GRAM_KEY})
    return BalanceConfig(method=method)


def gram_measurement(method: str) -> str:
    return VARIANTS.get(method, {}).get(GRAM_KEY, "batch")


class Adam:
    """torch.optim.Adam's update on plain tensors (batched over seeds)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.p, self.lr, self.b1, self.b2, self.eps = params, lr, betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, g, m, v in zip(self.p, grads, self.m, self.v):
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.sub_(self.lr * (m / c1) / ((v / c2).sqrt() + self.eps))


def log_prob(z, mu):
    """SPEC 1's per-sample log-prob: mean over latent dims [S, N]."""
    return (-((z - mu) ** 2) / (2 * SIGMA**2) - math.log(SIGMA) - 0.5 * math.log(2 * math.pi)).mean(-1)


def grpo_grad(W, b, e, z, old_lp, A, mu_ref, clip_range=CLIP, kl_beta=KL_BETA, adv_clip=ADV_CLIP):
    """Closed-form gradient of apex_fast.rl.loss.grpo_loss (with KL, mask A != 0, denominator N) for the
    Gaussian-linear policy mu = W e + b: returns (dW [S, D, E], db [S, D])."""
    N = A.shape[-1]
    mu = torch.einsum("sde,sne->snd", W, e) + b[:, None]
    Ac = A.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob(z, mu) - old_lp)
    active = ((Ac > 0) & (ratio <= 1 + clip_range)) | ((Ac < 0) & (ratio >= 1 - clip_range))
    mask = (A != 0).to(z.dtype)
    dlp = (z - mu) / (SIGMA**2 * D)  # d logp / d mu
    dkl = (mu - mu_ref) / (SIGMA**2 * D)  # d KL / d mu
    gmu = mask[..., None] * ((-Ac * ratio * active)[..., None] * dlp + kl_beta * dkl) / N
    return torch.einsum("snd,sne->sde", gmu, e), gmu.sum(1)


def objective_gram(Ahat, e, z, mu):
    """M = J J^T of the per-objective surrogate gradients at the sampling policy (ratio 1, no KL):
    g_k = -(1/N) sum_i Ahat[i, k] grad logp_i, grad logp_i = ((z - mu) / (sigma^2 D)) x [e_i, 1]. [K, K]."""
    N = Ahat.shape[0]
    dlp = (z - mu) / (SIGMA**2 * D)
    Kx = (dlp @ dlp.T) * (e @ e.T + 1)  # <grad logp_i, grad logp_j> over (W, b)
    A = Ahat.double().clamp(-ADV_CLIP, ADV_CLIP)
    return A.T @ Kx @ A / N**2


def kl_gradient(e, mu, mu_ref, kl_beta=KL_BETA):
    """The KL term's gradient at the sampling policy (ratio 1), in objective_jacobian's layout: grpo_grad's
    KL part, kl_beta (mu - mu_ref) / (sigma^2 D) per sample, through mu = W e + b, over N."""
    N = e.shape[0]
    dkl = kl_beta * (mu - mu_ref).double() / (SIGMA**2 * D) / N
    return torch.cat([torch.einsum("nd,ne->de", dkl, e.double()).flatten(), dkl.sum(0)])


def objective_jacobian(Ahat, e, z, mu):
    """J [K, D * E + D]: the per-objective surrogate gradients of objective_gram as vectors (dW flattened, then db)."""
    N = Ahat.shape[0]
    dlp = (z - mu).double() / (SIGMA**2 * D)
    A = Ahat.double().clamp(-ADV_CLIP, ADV_CLIP)
    dW = -torch.einsum("nk,nd,ne->kde", A, dlp, e.double()).flatten(1) / N
    return torch.cat([dW, -(A.T @ dlp) / N], 1)


class GramMeasure:
    """The Gram a variant's balancer gets, from the closed-form J_t [K, P] of this epoch:

    * ``cross_weight`` w: ``w sym(J_t J_{t-1}^T) + (1 - w) J_t J_t^T``. The batch Gram J_t J_t^T estimates
      the second moment mu mu^T + Sigma (each gradient's sampling noise inflates its diagonal); the product
      of two epochs' independent draws estimates the mean gradients' Gram mu mu^T. The first epoch (no
      previous J) gives the batch Gram.
    * ``metric`` [P] or None: inner products in that metric, ``J diag(metric) J^T`` (Adam's 1 / (sqrt(v) +
      eps): a direction that conflicts with no gradient in the step Adam actually takes)."""

    def __init__(self, cross_weight: float = 0.0):
        self.prev, self.w = None, cross_weight
        self.persistence = None  # [K] cos(J_t, J_{t-1}) per objective in the metric (the trainer's EpochGram)

    def __call__(self, Ahat, e, z, mu, metric=None):
        J = objective_jacobian(Ahat, e, z, mu)
        Jm = J if metric is None else J * metric
        M = Jm @ J.T
        self.persistence = None
        if self.w and self.prev is not None:
            M = self.w * 0.5 * (Jm @ self.prev.T + self.prev @ Jm.T) + (1 - self.w) * M
            before = self.prev * (1 if metric is None else metric) * self.prev
            self.persistence = gram_persistence((Jm * self.prev).sum(1), (Jm * J).sum(1), before.sum(1))
        self.prev = J
        return M


def parse_gram_measurement(how: str) -> tuple[float, bool]:
    """"batch" | "cross_epoch[:w]", optionally "+adam" -> (cross-epoch weight, Adam metric)."""
    base, _, metric = how.partition("+")
    if metric not in ("", "adam") or not (base == "batch" or base.startswith("cross_epoch")):
        raise ValueError(f"{GRAM_KEY}: expected batch or cross_epoch[:w], optionally +adam, got {how!r}")
    w = 0.0 if base == "batch" else float(base.partition(":")[2] or 1)
    return w, metric == "adam"


def adam_metric(opt, s: int):
    """Adam's per-coordinate step scale of seed s (the trainer's apex_fast.grad.adam_step_scale) in
    objective_jacobian's layout (dW flattened, then db); None before the first step."""
    P = adam_step_scale([opt.v[0][s].flatten(), opt.v[1][s]], opt.t, opt.b2, opt.eps)
    return None if P is None else torch.cat(P)


def run_scenario(sc, method: str, seeds: list[int], epochs: int, eval_every: int = 5, trace: bool = False) -> dict:
    """Train every seed of ``sc`` with ``method``; returns per-seed metrics (and per-epoch traces)."""
    S, P, G, K = len(seeds), sc.prompts_per_epoch, sc.group_size, sc.K
    N = P * G
    dt = torch.float64
    W = torch.stack([torch.randn(D, 8, generator=torch.Generator().manual_seed(20_000 + s)) * 0.1
                     for s in seeds]).to(dt)
    b = torch.zeros(S, D, dtype=dt)
    toy = ToyBatch(sc, seeds, W, b)
    opt = Adam([W, b], LR)
    W0, b0 = W.clone(), b.clone()
    cfg = make_cfg(method)
    bals = [make_balancer(cfg, sc.w, sc.names) for _ in seeds]
    cross_weight, in_adam_metric = parse_gram_measurement(gram_measurement(method))
    plain = not cross_weight and not in_adam_metric  # the closed form, as every stored run measured it
    grams = [GramMeasure(cross_weight) for _ in seeds]

    def measure_of(s):
        if plain:
            return lambda Ahat: objective_gram(Ahat, e[s], z[s], mu[s])
        return lambda Ahat: grams[s](Ahat, e[s], z[s], mu[s], adam_metric(opt, s) if in_adam_metric else None)
    gen = torch.Generator().manual_seed(30_000 + seeds[0] * 7919)
    gid = torch.arange(P).repeat_interleave(G)
    ev = toy.eval_prompts

    def evaluate():
        mu = torch.einsum("sde,sne->snd", W, ev) + b[:, None]
        return toy.rewards(mu, ev).mean(1)  # [S, K]

    egen = torch.Generator().manual_seed(40_000 + seeds[0])
    mu0 = torch.einsum("sde,sne->snd", W0, ev) + b0[:, None]
    base = torch.cat([toy.rewards(mu0 + SIGMA * torch.randn(mu0.shape, generator=egen, dtype=dt), ev)
                      for _ in range(16)], 1)
    base_std = base.std(1)
    base_std = torch.where(base_std > 0, base_std, torch.ones_like(base_std))  # noise objectives: 0 / 1
    curve = [evaluate()]
    eff_hist, trace_hist = [], {k: [] for k in ("priority", "L", "C", "N", "p", "usable", "std_floor", "rbar", "eff", "coef",
                                                     "hijack")}
    same_epoch = method in ("pcgrad", "mgda", "cagrad", "upgrad")
    for epoch in range(epochs):
        idx = torch.randint(0, toy.train_prompts.shape[1], (S, P), generator=gen)
        e = torch.gather(toy.train_prompts, 1, idx[..., None].expand(S, P, 8)).repeat_interleave(G, 1)
        mu = torch.einsum("sde,sne->snd", W, e) + b[:, None]
        z = mu + SIGMA * torch.randn(S, N, D, generator=gen, dtype=dt)
        old_lp = log_prob(z, mu)
        R = toy.rewards(z, e, gen).float()
        A = torch.empty(S, N, dtype=dt)
        advs, kl_products = [], []
        mu_ref = torch.einsum("sde,sne->snd", W0, e) + b0[:, None]
        for s, bal in enumerate(bals):  # advantages -> Gram -> update -> advantages (apex_fast.grad.sequence)
            measure = measure_of(s) if bal.wants_gram else None
            adv = epoch_advantages(bal, R[s], gid, measure, same_epoch=same_epoch)
            A[s] = adv.A.double()
            advs.append(adv)
            b_kl = None
            if cfg.cone_kl:  # J g_KL in the Gram's metric (the trainer's kl_products)
                J = objective_jacobian(bal.objective_advantages, e[s], z[s], mu[s])
                metric = adam_metric(opt, s) if in_adam_metric else None
                b_kl = (J if metric is None else J * metric) @ kl_gradient(e[s], mu[s], mu_ref[s])
            kl_products.append(b_kl)
        for _ in range(INNER):
            opt.step(grpo_grad(W, b, e, z, old_lp, A, mu_ref))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # apex with conflict_source gram warns on no Gram; not here
            for s, (bal, adv, kl) in enumerate(zip(bals, advs, kl_products)):
                commit_epoch(bal, adv, kl_products=kl, persistence=None if plain else grams[s].persistence)  # lagged flow (APEX, FAMO, static, gdpo); no-op after same-epoch
        stats_all = [adv.stats | adv.update_stats for adv in advs]
        eff_hist.append([[st.get(f"effective_share/{n}", float("nan")) for n in sc.names] for st in stats_all])
        if trace:
            for key, pre in (("priority", "priority"), ("L", "L"), ("C", "C"), ("N", "N"), ("p", "p"), ("usable", "usable"),
                             ("std_floor", "std_floor"), ("eff", "effective_share"), ("hijack", "hijack_share"), ("coef", "coef")):
                trace_hist[key].append([[st.get(f"{pre}/{n}", float("nan")) for n in sc.names] for st in stats_all])
            trace_hist["rbar"].append(R.double().mean(1).tolist())
        if (epoch + 1) % eval_every == 0:
            curve.append(evaluate())
    curve_t = torch.stack(curve, 1)  # [S, T, K]
    rel = (curve_t - curve_t[:, :1]) / base_std[:, None]
    imp = rel[:, -1]  # [S, K]
    sig = torch.tensor(sc.signal)
    steps = rel[:, 1:] - rel[:, :-1]
    osc = (steps.abs().sum(1) - imp.abs())[:, sig].mean(1)
    eff = np.nanmean(np.array(eff_hist[-10:]), 0)  # [S, K]
    w = np.array(sc.w)
    out = dict(improvement=imp.tolist(), worst=imp[:, sig].min(1).values.tolist(),
               hypervolume=imp[:, sig].clamp_min(0).prod(1).tolist(), oscillation=osc.tolist(),
               effective_share=eff.tolist(), share_dev=np.abs(eff - w).max(1).tolist(),
               curve=rel.tolist())
    if trace:
        out["trace"] = {k: np.array(v).transpose(1, 0, 2).tolist() for k, v in trace_hist.items()}  # [S, T, K]
    return out


# ----------------------------------------------------------------------------------- reporting

def mse(x):
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean(0)) if x.ndim == 1 else x.mean(0), (x.std(0, ddof=1) / math.sqrt(x.shape[0]))


def paired(a, b):
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def verdict(mean, se):
    return "win" if mean > 2 * se else ("tie" if mean >= -se else "loss")


def summarise(res: dict) -> dict:
    out = {}
    for m, r in res.items():
        imp_m, imp_se = mse(r["improvement"])
        row = {"improvement": [imp_m.tolist(), imp_se.tolist()]}
        for key in ("worst", "hypervolume", "oscillation", "share_dev"):
            mm, ss = mse(r[key])
            row[key] = [mm, float(ss)]
        row["effective_share"] = np.mean(r["effective_share"], 0).tolist()
        out[m] = row
    if "apex" in res:
        out["_apex_vs"] = versus(res, "apex")
    return out


def versus(res: dict, method: str) -> dict:
    """Paired comparisons of ``method`` with every other method of ``res`` (per-seed runs): worst and HV
    as method - other, oscillation as other - method (positive: ``method`` oscillates less)."""
    cmp = {}
    for m in res:
        if m == method:
            continue
        c = {}
        for key in ("worst", "hypervolume"):
            dm, ds = paired(res[method][key], res[m][key])
            c[key] = {"diff": dm, "se": ds, "verdict": verdict(dm, ds)}
        dm, ds = paired(res[m]["oscillation"], res[method]["oscillation"])
        c["oscillation"] = {"diff": dm, "se": ds, "verdict": verdict(dm, ds)}
        cmp[m] = c
    return cmp


def markdown_table(names: list[str], summ: dict, methods: list[str]) -> str:
    lines = ["| method | " + " | ".join(names) + " | worst | HV | share dev | osc | APEX worst diff | APEX HV diff | APEX osc diff |",
             "|---|" + "---|" * (len(names) + 7)]
    cmp = summ.get("_apex_vs", {})
    for m in methods:
        r = summ[m]
        cells = [f"{a:+.2f} ± {s:.2f}" for a, s in zip(*r["improvement"])]
        cells += [f"{r['worst'][0]:+.2f} ± {r['worst'][1]:.2f}", f"{r['hypervolume'][0]:.2f} ± {r['hypervolume'][1]:.2f}",
                  f"{r['share_dev'][0]:.2f}", f"{r['oscillation'][0]:.2f}"]
        for key in ("worst", "hypervolume", "oscillation"):
            if m in cmp:
                c = cmp[m][key]
                cells.append(f"{c['diff']:+.2f} ± {c['se']:.2f} {c['verdict']}")
            else:
                cells.append("")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_study(sc, res: dict, path: Path, eval_every: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    ax = axes[0, 0]
    for m, r in res.items():
        if m.startswith("apex") and m != "apex":
            continue
        c = np.array(r["curve"])  # [S, T, K]
        sig = np.array(sc.signal)
        worst = c[:, :, sig].min(2).mean(0)
        ax.plot(np.arange(len(worst)) * eval_every, worst, label=m, lw=2.2 if m == "apex" else 1.2)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="epoch", ylabel="worst-objective improvement (base stds)", title=f"{sc.name}: worst objective")
    ax.legend(fontsize=7)
    tr = res.get("apex", {}).get("trace")
    panels = [("priority", "APEX priority pi"), ("L", "learning potential L"), ("C", "conflict penalty C"),
              ("N", "progress need N")]
    for ax, (key, title) in zip([axes[0, 1], axes[0, 2], axes[1, 0], axes[1, 1]], panels):
        if tr is None:
            ax.set_axis_off()
            continue
        x = np.array(tr[key])  # [S, T, K]
        for k, n in enumerate(sc.names):
            ax.plot(np.nanmean(x[:, :, k], 0), label=n)
        ax.set(xlabel="epoch", title=f"{title} (mean over seeds)")
        ax.legend(fontsize=7)
    ax = axes[1, 2]
    if "apex" in res:
        c = np.array(res["apex"]["curve"]).mean(0)
        for k, n in enumerate(sc.names):
            ax.plot(np.arange(c.shape[0]) * eval_every, c[:, k], label=f"apex {n}")
        if "gdpo" in res:
            c = np.array(res["gdpo"]["curve"]).mean(0)
            for k, n in enumerate(sc.names):
                ax.plot(np.arange(c.shape[0]) * eval_every, c[:, k], ls="--", color=f"C{k}", alpha=0.6)
        ax.set(xlabel="epoch", ylabel="improvement (base stds)", title="per objective: apex (solid), gdpo (dashed)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_summary(blob: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = list(blob)
    fig, axes = plt.subplots(1, 2, figsize=(16, 4.8))
    for ax, key, title in ((axes[0], "worst", "worst-objective improvement (base stds)"),
                           (axes[1], "hypervolume", "hypervolume of the improvements")):
        # the baselines, APEX, and APEX as the trainer runs it with captured gradients when it ran everywhere
        methods = [m for m in [*METHODS, "apex-1bw"] if all(m in blob[s]["summary"] for s in scen)]
        width = 0.8 / max(1, len(methods))
        x = np.arange(len(scen))
        for i, m in enumerate(methods):
            vals = [blob[s]["summary"][m][key][0] for s in scen]
            errs = [blob[s]["summary"][m][key][1] for s in scen]
            apex = m.startswith("apex")
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, yerr=errs, capsize=2,
                   label="apex, one_backward" if m == "apex-1bw" else m, color="gold" if m == "apex-1bw" else None,
                   edgecolor="k" if apex else None, lw=1.5 if apex else 0)
        ax.set_xticks(x, scen)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(title + ", mean ± SE over seeds")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def criteria(blob: dict, method: str = "apex") -> list[dict]:
    """The acceptance criteria of issue 17, per scenario: the method's (APEX's) worst and HV at least every
    baseline's within 1 SE (paired), above static and gdpo by > 2 SE on paper-shaped scenarios,
    oscillation no more than gdpo's (within 1 SE). Scenarios where the method did not run are skipped."""
    rows = []
    for name, b in blob.items():
        if method not in b["runs"]:
            continue
        cmp = versus(b["runs"], method)
        base = [m for m in BASELINES if m in cmp]
        row = {"scenario": name, "paper_shaped": b["paper_shaped"]}
        for key in ("worst", "hypervolume"):
            row[f"{key}_not_below"] = [m for m in base if cmp[m][key]["verdict"] == "loss"]
        row["paper_wins"] = (all(cmp[m][k]["verdict"] == "win" for m in ("static", "gdpo") if m in cmp
                                 for k in ("worst", "hypervolume")) if b["paper_shaped"] else None)
        row["osc_vs_gdpo"] = cmp["gdpo"]["oscillation"] if "gdpo" in cmp else None
        rows.append(row)
    return rows


def render(blob: dict, meta: dict) -> str:
    head = ("Toy multi-objective GRPO (bench/algorithm.py, scenarios in bench/scenarios/). Improvements of the "
            "held-out deterministic policy over the base policy in base-policy reward stds, mean ± SE over seeds "
            "(higher is better). worst / HV over the objectives with a signal. share dev: max over objectives of "
            "|effective share - weight| (last 10 epochs). osc: movement later undone (lower is better). "
            "APEX diff: paired difference APEX - method over seeds ± SE (osc: method - APEX, so positive is "
            "better for APEX everywhere); win > 2 SE, tie >= -1 SE, else loss.\n\n")
    def table(method: str, label: str) -> list[str]:
        lines = [f"| scenario | {label} worst/HV below a baseline by > 1 SE | beats static and gdpo by > 2 SE "
                 f"(paper-shaped) | osc gdpo - {label} |", "|---|---|---|---|"]
        for r in criteria(blob, method):
            below = sorted(set(r["worst_not_below"]) | set(r["hypervolume_not_below"]))
            detail = ", ".join(f"{m} ({'worst' if m in r['worst_not_below'] else ''}"
                               f"{'+' if m in r['worst_not_below'] and m in r['hypervolume_not_below'] else ''}"
                               f"{'HV' if m in r['hypervolume_not_below'] else ''})" for m in below) or "none"
            pw = "n/a" if r["paper_wins"] is None else ("yes" if r["paper_wins"] else "no")
            o = r["osc_vs_gdpo"]
            lines.append(f"| {r['scenario']} | {detail} | {pw} | {o['diff']:+.3f} ± {o['se']:.3f} {o['verdict']} |"
                         if o else f"| {r['scenario']} | {detail} | {pw} | |")
        return lines

    lines = table("apex", "APEX")
    for variant, what in OPT_IN.items():
        if criteria(blob, variant):
            lines += ["", f"The same checks for `{variant}` ({what}), on the scenarios it ran on:", ""]
            lines += table(variant, variant)
    report = []
    for name, b in blob.items():
        report.append(f"### scenario `{name}`: {b.get('description', '')}\n\n{b['seeds']} seeds"
                      f"{' from ' + str(b['first_seed']) if b.get('first_seed') else ''} x {b['epochs']} epochs, "
                      f"weights {[round(x, 3) for x in b['weights']]}{', paper-shaped' if b['paper_shaped'] else ''}."
                      f"\n\n" + markdown_table(b["names"], b["summary"], b.get("methods", list(b["runs"]))))
    merged = "".join(f"Merged into it: `{c}`\n" for c in meta.get("merged", []))
    return (head + "#### Acceptance criteria\n\n" + "\n".join(lines) + "\n\n" + "\n".join(report)
            + f"\n`{meta['command']}`: {meta['seconds']} s on {meta['machine']} ({meta['processor']}), "
            f"{meta['cpu_threads']} thread, load {meta['load_avg']}\n" + merged)


def merge_into(path: Path, blob: dict, meta: dict) -> tuple[dict, dict]:
    """The saved results of ``path`` with the runs of ``blob`` added (per scenario, same seeds and epochs;
    a method run again replaces its old runs); the merge command is recorded in meta["merged"]."""
    if not path.exists():
        raise SystemExit(f"--merge: {path} does not exist; run without --merge first")
    data = json.loads(path.read_text())
    old_meta = data.pop("meta")
    for name, b in blob.items():
        if name not in data:
            data[name] = b
            continue
        d = data[name]
        if (d["seeds"], d.get("first_seed", 0), d["epochs"]) != (b["seeds"], b.get("first_seed", 0), b["epochs"]):
            raise SystemExit(f"--merge: scenario {name!r} has {d['seeds']} seeds from {d.get('first_seed', 0)} x "
                             f"{d['epochs']} epochs in {path}, this run {b['seeds']} from {b.get('first_seed', 0)} x "
                             f"{b['epochs']}; use --seeds/--first-seed/--epochs to match")
        d["runs"].update(b["runs"])
        d["methods"] = list(d.get("methods", list(d["runs"]))) + [m for m in b["methods"] if m not in d.get("methods", [])]
        d["summary"] = summarise(d["runs"])
    old_meta.setdefault("merged", []).append(f"{meta['command']} ({meta['seconds']} s)")
    return data, old_meta


def rerender(path: Path) -> None:
    """Rebuild the summaries, algorithm.md and the summary plot from a saved algorithm.json (per-seed runs)."""
    data = json.loads(path.read_text())
    meta = data.pop("meta")
    for name, b in data.items():
        b["summary"] = summarise(b["runs"])
        b.setdefault("methods", list(b["runs"]))
        b.setdefault("description", load_scenario(name).description if (Path(b.get("scenario", "")).exists()) else "")
    md = render(data, meta)
    path.write_text(json.dumps({"meta": meta, **data}, indent=1))
    path.with_suffix(".md").write_text(md)
    plot_summary(data, path.with_suffix(".png"))
    print(md)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", action="append", default=None,
                    help="scenario YAML file (or a shipped name); repeatable; default: every bench/scenarios/*.yaml")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list; APEX variants: " + ",".join(VARIANTS))
    ap.add_argument("--ablations", default=None,
                    help=f"comma list of APEX variants to add on the ablation scenarios ({','.join(ABLATION_SCENARIOS)}); "
                         "default: all when no --methods/--scenario is given, 'none' to skip")
    ap.add_argument("--seeds", type=int, default=None, help="override the scenario's seed count")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds first..first+count-1 (e.g. 16 with 16 seeds: fresh seeds no default was chosen on)")
    ap.add_argument("--epochs", type=int, default=None, help="override the scenario's epoch count")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 seeds x 40 epochs (smoke run), writes *_quick files")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--render", metavar="JSON", help="only rebuild algorithm.md and the summary plot from a saved JSON")
    ap.add_argument("--merge", action="store_true",
                    help="add these methods' runs to the scenarios of the existing <out>/algorithm.json (same seeds "
                         "and epochs) and re-render it, instead of replacing it; the per-scenario plots are kept")
    args = ap.parse_args(argv)
    if args.render:
        return rerender(Path(args.render))
    torch.set_num_threads(1)
    full = args.scenario is None and args.methods == ",".join(METHODS)
    scen_paths = args.scenario or [str(p) for p in shipped_scenarios()]
    scens = [load_scenario(p) for p in scen_paths]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        make_cfg(m).validate()
    if args.ablations is None:
        ablations = ABLATIONS if full else []
    else:
        ablations = [] if args.ablations == "none" else args.ablations.split(",")
    if args.quick:
        args.seeds, args.epochs = 3, 40
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("_quick" if args.quick else "") + (f"_first_seed{args.first_seed}" if args.first_seed else "")
    t0 = time.time()
    blob = {}
    for sc in scens:
        seeds = list(range(args.first_seed, args.first_seed + (args.seeds or sc.seeds)))
        epochs = args.epochs or sc.epochs
        ms = methods + [a for a in ablations if sc.name in ABLATION_SCENARIOS and a not in methods]
        res = {}
        for m in ms:
            t = time.time()
            res[m] = run_scenario(sc, m, seeds, epochs, args.eval_every, trace=(m == "apex"))
            print(f"{sc.name:13s} {m:14s} {time.time() - t:6.1f}s  worst {np.mean(res[m]['worst']):+.3f} "
                  f"HV {np.mean(res[m]['hypervolume']):.3f}", flush=True)
        summ = summarise(res)
        blob[sc.name] = {"scenario": sc.path, "description": sc.description, "paper_shaped": sc.paper_shaped,
                         "names": sc.names, "signal": sc.signal, "weights": sc.w, "seeds": len(seeds),
                         "first_seed": seeds[0], "epochs": epochs,
                         "methods": ms, "summary": summ,
                         "runs": {m: {k: v for k, v in r.items() if k not in ("curve", "trace")} for m, r in res.items()},
                         "apex_trace_mean": {k: np.nanmean(np.array(v), 0).tolist()
                                             for k, v in res.get("apex", {}).get("trace", {}).items()}}
        if not args.merge:
            plot_study(sc, res, out / f"algorithm{suffix}_{sc.name}.png", args.eval_every)
    meta = dict(command="OMP_NUM_THREADS=1 python bench/algorithm.py " + " ".join(sys.argv[1:] if argv is None else argv),
                seconds=round(time.time() - t0, 1), torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), processor=platform.processor(), cpu_threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None)
    if args.merge:
        blob, meta = merge_into(out / f"algorithm{suffix}.json", blob, meta)
    md = render(blob, meta)
    print(md)
    (out / f"algorithm{suffix}.json").write_text(json.dumps({"meta": meta, **blob}, indent=1))
    (out / f"algorithm{suffix}.md").write_text(md)
    if len(blob) > 1:
        plot_summary(blob, out / f"algorithm{suffix}.png")
    print(f"wrote {out}/algorithm{suffix}.json/.md/.png in {round(time.time() - t0, 1)}s")


if __name__ == "__main__":
    main()
