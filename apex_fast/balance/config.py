"""Hyperparameters of every balancing method (docs/SPEC.md sections 3-5), with SPEC's defaults.
The top-level run config embeds this dataclass as ``balance``; every error names the field as
``balance.<field>``."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

METHODS = ("static", "gdpo", "apex", "famo", "pcgrad", "mgda", "cagrad", "upgrad")
CONFLICT_SOURCES = ("auto", "gram", "proxy")
WARMUP_PRIORITIES = ("uniform", "weights")
GRADIENTS = ("proxy", "one_backward", "k_backward")
GRAM_ESTIMATES = ("batch", "cross_epoch")
GRAM_METRICS = ("parameters", "adam")

# APEX's defaults when the trainer captures the per-objective gradients (gradients one_backward / k_backward):
# the dual cone over the measured mean gradients that counts the KL term's pull, with the objectives it cannot
# help (unlearnable, or whose mean gradient the epochs do not measure) outside it. Chosen on the algorithm
# benchmark's seeds 0-95 and checked on fresh ones (README "What the algorithm benchmark shows").
CAPTURED_GRADIENT_DEFAULTS = {"dual_cone": True, "conflict_damping": 0.0, "cone_kl": True, "beta_cone": 0.9,
                              "cone_min_learn": 0.25, "cone_min_persistence": 0.1, "gram_estimate": "cross_epoch",
                              "gram_metric": "adam"}


@dataclass
class BalanceConfig:
    method: str = "static"  # one of METHODS
    global_std: bool = False  # static: normalise by the whole-batch std (all SD3.5 configs do)
    eps: float = 1e-4  # added to every std denominator (and inside the logs of P^3)
    adv_clip: float = 5.0  # advantages are clipped to [-adv_clip, adv_clip]

    # --- APEX Dual-Stage Adaptive Normalization (SPEC 3) ---
    kappa: float = 0.1  # std floor = kappa * sbar_k (0 disables the floor)
    beta_s: float = 0.9  # EMA of sbar_k, the median in-group std of objective k

    # --- P^3 adaptive priorities (SPEC 4) ---
    beta_fast: float = 0.9  # EMA of the batch-mean reward rbar_k whose progress p_k drives P^3
    beta_slow: float = 0.95  # slow EMA of rbar_k (only for the logged trend v_k)
    beta_conflict: float = 0.7  # EMA of the conflict penalty C_k [design: SPEC names no value]
    need_lookahead: float = 1.0  # N_k uses the projected progress p_k + need_lookahead * v_k
    # strongly conflicting objectives keep priorities near their weights (a small shift moves a lot: seesaw)
    conflict_damping: float = 1.0  # the need's gain is a_n * (1 - conflict_damping * C_k) ** damping_power
    damping_power: float = 2.0  # the damping factor is (1 - conflict_damping * C_k) ** damping_power
    need_deadband: float = 0.05  # gaps below this many base stds are batch noise: N_k = sign(g) max(|g| - deadband, 0)
    need_clip: float = 1.0  # progress need N_k = clip(mean progress - p_k, +-need_clip), in base stds
    learn_ratio: float = 0.25  # L_k = clip(p_k / (learn_ratio * mean progress), 0, 1) (0 disables)
    learn_conflict: float = 1.0  # the learn_ratio threshold shrinks by (1 - learn_conflict * C_k) (0: off)
    learn_after: float = 0.2  # ... once the mean progress exceeds this many base stds
    # saturation: GRPO learns only from in-group spread; an objective whose median in-group std fell to a
    # small fraction of its baseline, relative to the others, has (almost) nothing left to learn
    spread_ratio: float = 0.5  # L_k *= clip(z_k / (spread_ratio * zbar), 0, 1), z_k = sbar_k / sbar0_k (0 disables)
    delta: float = 3.0  # with a target r*_k: progress unit (r*_k - r0_k) / delta instead of s0_k
    targets: list | None = None  # per-objective targets r*_k (a list of K numbers or nulls); None: unit s0_k
    a_l: float = 1.0  # weight of log L_k in the score s_k
    a_n: float = 3.0  # weight of the progress need N_k
    need_lead: float = 1.0  # gain on the negative need of objectives ahead of the mean (0: only laggards are pushed)
    need_learn_power: float = 0.0  # the need's gain is scaled by L_k ** need_learn_power: no push for what cannot be learned (0: off)
    a_i: float = 0.0  # weight of the accumulated need I_k = clip(sum_t N_k(t), +-i_clip) (integral action)
    i_clip: float = 10.0  # bound of the accumulated need (anti wind-up)
    lam: float = 0.0  # lambda, weight of the conflict penalty C_k (objectives ahead of the mean only; 0: off)
    temperature: float = 1.0  # T of softmax(s / T) [design: SPEC names no value]
    pi_min: float = 0.05  # floor of every priority (objectives with weight 0 stay 0)
    rho: float = 0.99  # smoothing pi = (1 - rho) pihat + rho pi_prev
    warmup_epochs: int = 5  # epochs with fixed priorities before P^3 starts
    warmup_priority: str = "uniform"  # uniform (SPEC) | weights (the preference weights) during warm-up
    conflict_source: str = "auto"  # auto: Gram when update() gets one, else proxy | gram (required) | proxy
    # opt-in: stage 2 uses c = floor(normalize(pi * lambda)), lambda the min-norm (MGDA) weights of an EMA (beta_gram)
    # of the scale-normalised Gram (from the source conflict_source picks: the real Gram or the advantage proxy)
    min_norm_base: bool = False  # P^3 tilts the min-norm combination instead of the preference weights
    beta_gram: float = 0.98  # EMA decay of the normalised Gram behind the min-norm base
    # stage 2 uses UPGrad with pi as its preference vector, c = sum_k argmin_{v >= pi_k e_k} v^T G v, G an EMA
    # (beta_cone) of the scale-normalised real Gram: the direction conflicts with no objective (use it with
    # conflict_damping 0, the cone removes the conflicts the damping guards against). Off by default; APEX with
    # gradients one_backward / k_backward turns it on with CAPTURED_GRADIENT_DEFAULTS for the fields not set.
    dual_cone: bool = False  # APEX's dual cone (default off; on with gradients one_backward/k_backward unless set)
    cone_kl: bool = False  # dual_cone: raise the cone's coefficients so the step WITH the KL term lowers no objective (needs J g_KL)
    cone_min_learn: float = 0.0  # dual_cone: objectives whose learnability L_k is below this stay outside the cone (0: none)
    # gradient persistence: EMA (beta_cone, from 0) of the cosine of each epoch's gradient with the previous one
    cone_min_persistence: float = 0.0  # dual_cone + cross_epoch: objectives whose gradient persistence is below this stay outside the cone (0: none)
    beta_cone: float = 0.95  # EMA decay of the normalised Gram behind dual_cone (0: the last epoch's Gram)

    # --- FAMO baseline (adaptive weighting, no Gram) ---
    famo_lr: float = 0.025  # beta, step size of FAMO's logits (FAMO's default)
    famo_decay: float = 0.001  # gamma, weight decay of FAMO's logits (FAMO's default)

    # --- Gram-form aggregators (SPEC 5) ---
    cagrad_alpha: float = 0.5  # CAGrad's c0 = alpha |g0|
    pcgrad_seed: int = 0  # seed of PCGrad's random projection order (its generator is checkpointed)
    aggregator_renorm: bool = True  # batch-renormalise Ahat @ c (direction from c, scale as APEX's stage 2)

    # --- where the per-objective gradients come from (apex_fast/grad/, README "Per-objective gradients") ---
    # proxy: K extra backward passes on the first micro-batch at the first trained timestep, before the
    #   update, every train.gram_every epochs, only for balancers that want a Gram;
    # one_backward: all K gradients of the whole update from the update's own backward (LoRA only);
    #   aggregators (pcgrad/mgda/cagrad/upgrad) then write c^T J as the update of every step, and every
    #   method's update() gets the Gram of the epoch's summed gradients;
    # k_backward: the same as one_backward by K separate backward passes per timestep (the reference).
    gradients: str = "proxy"  # where per-objective gradients come from: proxy | one_backward | k_backward (README "Per-objective gradients")
    gram_every_steps: int = 1  # one_backward/k_backward: optimizer steps between captures (others: plain steps)
    gram_layers: list | None = None  # module-name globs/substrings of the LoRA layers whose gradients enter the Gram (None: all)
    # one_backward/k_backward only (apex_fast/grad/estimate.py): the Gram update() gets after the epoch
    gram_estimate: str = "batch"  # batch: J_t J_t^T (second moment: noise on the diagonal) | cross_epoch: sym(J_t J_{t-1}^T), the mean gradients'
    cross_epoch_weight: float = 1.0  # cross_epoch: M = w sym(J_t J_{t-1}^T) + (1 - w) J_t J_t^T (1: the mean gradients' Gram alone)
    gram_metric: str = "parameters"  # parameters | adam: inner products in AdamW's step metric 1 / (sqrt(v_hat) + eps)

    def validate(self) -> None:
        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"balance.{field} {msg}")

        def number(field: str) -> float:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"balance.{field} must be a finite number, got {v!r}")
            return float(v)

        if self.method not in METHODS:
            raise ValueError(f"balance.method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        need(number("eps") > 0, "eps", f"must be > 0, got {self.eps}")
        need(number("adv_clip") > 0, "adv_clip", f"must be > 0, got {self.adv_clip}")
        need(number("kappa") >= 0, "kappa", f"must be >= 0 (0 disables the std floor), got {self.kappa}")
        for f in ("beta_s", "beta_fast", "beta_slow", "beta_conflict", "beta_gram", "beta_cone"):
            need(0 <= number(f) < 1, f, f"is an EMA decay and must be in [0, 1), got {getattr(self, f)}")
        need(number("delta") > 0, "delta", f"must be > 0, got {self.delta}")
        need(number("need_clip") > 0, "need_clip", f"must be > 0, got {self.need_clip}")
        need(0 <= number("conflict_damping") <= 1, "conflict_damping", f"must be in [0, 1], got {self.conflict_damping}")
        for f in ("damping_power", "need_lookahead", "learn_ratio", "learn_after", "learn_conflict", "spread_ratio", "need_deadband",
                  "a_l", "a_n", "need_lead", "need_learn_power", "a_i", "i_clip", "lam", "cagrad_alpha", "famo_lr", "famo_decay"):
            need(number(f) >= 0, f, f"must be >= 0, got {getattr(self, f)}")
        need(number("temperature") > 0, "temperature", f"must be > 0, got {self.temperature}")
        need(0 <= number("pi_min") < 1, "pi_min",
             f"must be in [0, 1) (and K * pi_min <= 1 for K objectives), got {self.pi_min}")
        need(0 <= number("rho") <= 1, "rho", f"must be in [0, 1], got {self.rho}")
        need(isinstance(self.warmup_epochs, int) and not isinstance(self.warmup_epochs, bool)
             and self.warmup_epochs >= 0, "warmup_epochs", f"must be an integer >= 0, got {self.warmup_epochs!r}")
        need(self.warmup_priority in WARMUP_PRIORITIES, "warmup_priority",
             f"must be one of {', '.join(WARMUP_PRIORITIES)}, got {self.warmup_priority!r}")
        need(self.conflict_source in CONFLICT_SOURCES, "conflict_source",
             f"must be one of {', '.join(CONFLICT_SOURCES)}, got {self.conflict_source!r}")
        need(isinstance(self.pcgrad_seed, int) and not isinstance(self.pcgrad_seed, bool), "pcgrad_seed",
             f"must be an integer, got {self.pcgrad_seed!r}")
        need(isinstance(self.min_norm_base, bool), "min_norm_base",
             f"must be true or false, got {self.min_norm_base!r}")
        need(isinstance(self.dual_cone, bool), "dual_cone", f"must be true or false, got {self.dual_cone!r}")
        need(not (self.dual_cone and self.min_norm_base), "dual_cone",
             "and min_norm_base are two ways to combine the priorities with the Gram; set one of them")
        need(0 <= number("cone_min_learn") < 1, "cone_min_learn", f"must be in [0, 1) (L_k is in [0, 1]), got {self.cone_min_learn}")
        need(self.cone_min_learn == 0 or self.dual_cone, "cone_min_learn", "applies to the dual cone: set dual_cone: true")
        need(0 <= number("cone_min_persistence") < 1, "cone_min_persistence",
             f"must be in [0, 1) (a cosine; 0: off), got {self.cone_min_persistence}")
        need(self.cone_min_persistence == 0 or self.dual_cone, "cone_min_persistence",
             "applies to the dual cone: set dual_cone: true")
        need(self.cone_min_persistence == 0 or self.gram_estimate == "cross_epoch", "cone_min_persistence",
             "needs each gradient next to the previous epoch's: set gram_estimate: cross_epoch")
        need(isinstance(self.cone_kl, bool), "cone_kl", f"must be true or false, got {self.cone_kl!r}")
        need(not self.cone_kl or self.dual_cone, "cone_kl", "counts the KL term in the dual cone: set dual_cone: true")
        need(isinstance(self.aggregator_renorm, bool), "aggregator_renorm",
             f"must be true or false, got {self.aggregator_renorm!r}")
        need(self.gradients in GRADIENTS, "gradients", f"must be one of {', '.join(GRADIENTS)}, got {self.gradients!r}")
        need(self.gram_estimate in GRAM_ESTIMATES, "gram_estimate",
             f"must be one of {', '.join(GRAM_ESTIMATES)}, got {self.gram_estimate!r}")
        need(0 <= number("cross_epoch_weight") <= 1, "cross_epoch_weight", f"must be in [0, 1], got {self.cross_epoch_weight}")
        need(self.cross_epoch_weight == 1 or self.gram_estimate == "cross_epoch", "cross_epoch_weight",
             "only applies to gram_estimate: cross_epoch (the batch Gram is weight 0); set gram_estimate: cross_epoch")
        need(self.gram_metric in GRAM_METRICS, "gram_metric", f"must be one of {', '.join(GRAM_METRICS)}, got {self.gram_metric!r}")
        for f, default in (("gram_estimate", "batch"), ("gram_metric", "parameters")):
            need(getattr(self, f) == default or self.gradients != "proxy", f,
                 f"{getattr(self, f)} needs the epoch's per-objective gradients: set balance.gradients: one_backward "
                 f"(or k_backward); the proxy probes one micro-batch")
        need(not self.cone_kl or self.gradients != "proxy", "cone_kl",
             "needs the KL term's gradient next to the objectives': set balance.gradients: one_backward (or k_backward)")
        need(isinstance(self.gram_every_steps, int) and not isinstance(self.gram_every_steps, bool)
             and self.gram_every_steps >= 1, "gram_every_steps",
             f"must be an integer >= 1, got {self.gram_every_steps!r}")
        if self.gram_layers is not None:
            need(isinstance(self.gram_layers, (list, tuple)) and len(self.gram_layers) > 0
                 and all(isinstance(g, str) and g for g in self.gram_layers), "gram_layers",
                 f"must be null or a non-empty list of module-name patterns (e.g. ['transformer_blocks.23.*']), "
                 f"got {self.gram_layers!r}")
        if self.targets is not None:
            need(isinstance(self.targets, (list, tuple)), "targets",
                 f"must be a list with one target (or null) per reward, got {self.targets!r}")
            for i, t in enumerate(self.targets):
                ok = t is None or (not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t))
                need(ok, f"targets[{i}]", f"must be a finite number or null, got {t!r}")

    def with_captured_gradient_defaults(self, given=(), kl: bool = True) -> "BalanceConfig":
        """APEX with gradients one_backward / k_backward: the fields not in ``given`` (those the user set) take
        CAPTURED_GRADIENT_DEFAULTS (cone_kl only when the run has a KL term, ``kl``; cone_min_persistence only with
        the cross-epoch estimate). Any other method, the
        proxy, an explicit ``dual_cone: false`` or ``min_norm_base: true``: this config unchanged."""
        given = set(given)
        if self.method != "apex" or self.gradients == "proxy" or self.min_norm_base or \
                ("dual_cone" in given and not self.dual_cone):
            return self
        over = {k: v for k, v in CAPTURED_GRADIENT_DEFAULTS.items() if k not in given and (k != "cone_kl" or kl)}
        if over.get("gram_estimate", self.gram_estimate) != "cross_epoch":  # the persistence needs the previous epoch
            over.pop("cone_min_persistence", None)
        return dataclasses.replace(self, **over)

    def validate_for(self, K: int) -> None:
        """Checks that depend on the number of objectives K (called when a balancer is built)."""
        self.validate()
        if self.pi_min * K > 1 + 1e-12:
            raise ValueError(f"balance.pi_min = {self.pi_min} is too large for {K} objectives: "
                             f"K * pi_min must be <= 1 (use pi_min <= {1.0 / K:.4g})")
        if self.targets is not None and len(self.targets) != K:
            raise ValueError(f"balance.targets has {len(self.targets)} entries but there are {K} rewards; "
                             "give one target (or null) per reward, in the order of `rewards`")
