"""The one place that names the logged metrics (metrics.csv columns, TensorBoard tags). Balancer
diagnostics (hijack_share/, effective_share/, priority/, L/, C/, N/, cos/, ...) are named by
balance/base.py; everything the training loop itself logs is built here."""
from __future__ import annotations

import torch

from .ops import group_stats

# per optimizer step / trained timestep of a GRPO epoch, averaged over the epoch (and ranks)
GRPO_STEP_STATS = ("clipfrac", "approx_kl", "kl", "policy_loss", "grad_norm")
# optimizer steps of the epoch skipped for a non-finite loss or gradient (learner.Learner.count_step)
SKIPPED_STEPS = "skipped_steps"


def eval_key(name: str) -> str:
    return f"eval/{name}"


def eval_metrics(means: dict[str, float]) -> dict[str, float]:
    """``eval/<reward>``: mean reward per objective on the held-out prompts (ODE sampler)."""
    return {eval_key(n): v for n, v in means.items()}


def reward_key(name: str, stat: str = "mean") -> str:
    return f"reward/{name}/{stat}"


def reward_metrics(R: torch.Tensor, group_ids: torch.Tensor, names: list[str], timings: dict) -> dict[str, float]:
    """Per objective k of the epoch's rewards R [N, K] (NaN = failed): ``reward/<k>/{mean,std,nan_count}``,
    ``zero_std_ratio/<k>`` (share of groups whose rewards are all equal) and ``time/reward/<k>``."""
    out = {}
    _, count, _, std = group_stats(R, group_ids)
    for k, n in enumerate(names):
        col = R[:, k]
        ok = torch.isfinite(col)
        out[reward_key(n, "mean")] = float(col[ok].mean()) if ok.any() else float("nan")
        out[reward_key(n, "std")] = float(col[ok].std(unbiased=False)) if ok.any() else float("nan")
        out[reward_key(n, "nan_count")] = float((~ok).sum())
        out[f"zero_std_ratio/{n}"] = float(((std[:, k] == 0) & (count[:, k] > 0)).float().mean())
        out[f"time/reward/{n}"] = timings.get(n, 0.0)
    return out


def advantage_metrics(A: torch.Tensor, group_ids: torch.Tensor) -> dict[str, float]:
    """``zero_std_ratio``: share of groups whose trained advantages are all 0 (no learning signal)."""
    adv_groups = torch.zeros(int(group_ids.max()) + 1).index_add_(0, group_ids, (A != 0).float())
    return {"zero_std_ratio": float((adv_groups == 0).float().mean())}


def timing_metrics(sample_s: float, reward_s: float, train_s: float) -> dict[str, float]:
    return {
        "time/sample": sample_s,  # sampling + decoding, and the wait for the last scoring batch
        "time/reward": reward_s,  # scorer time, overlapped with sampling
        "time/train": train_s,
    }


def scalars(metrics: dict) -> dict[str, float]:
    """Only the loggable (int/float) entries."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# ------------------------------------------------------------------ DPO (dpo/learner.py)

# per optimizer step of a DPO epoch, averaged over the epoch's real pairs (and ranks): the loss, the
# implicit accuracy (z > 0), the reward margin (mean z), the velocity errors of model and reference on
# winner and loser, and the model / reference terms e(w) - e(l)
DPO_STEP_STATS = ("dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/err_w", "dpo/err_l", "dpo/ref_err_w",
                  "dpo/ref_err_l", "dpo/model_term", "dpo/ref_term")


def dpo_pair_metrics(pairs, names: list[str]) -> dict[str, float]:
    """Of one labelling (dpo.labels.Pairs): ``dpo/pairs`` trained, ``dpo/dropped_ties`` (votes cancel),
    ``dpo/dropped_abstained`` (no scorer could judge), ``dpo/label_p`` (mean label probability; < 1
    only for the soft vote) and ``dpo/agree/<scorer>``: how often each scorer agreed with the labels
    used (1 minus it: how often it was outvoted)."""
    out = {"dpo/pairs": float(len(pairs)), "dpo/dropped_ties": float(pairs.n_ties),
           "dpo/dropped_abstained": float(pairs.n_abstained),
           "dpo/label_p": float(pairs.p.mean()) if len(pairs) else float("nan")}
    for m, n in enumerate(names):
        out[f"dpo/agree/{n}"] = float(pairs.agree[m]) / float(pairs.opinions[m]) if pairs.opinions[m] else float("nan")
    return out


def winrate_key(name: str) -> str:
    """``winrate/<scorer>`` and ``winrate/consensus`` in the eval results (logged as eval/winrate/...)."""
    return f"winrate/{name}"
