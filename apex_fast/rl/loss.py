"""Flow-GRPO's clipped policy loss with KL to the reference (docs/SPEC.md section 1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOut:
    loss: torch.Tensor  # scalar to backpropagate
    policy_loss: torch.Tensor  # per-sample [n]
    kl: torch.Tensor  # per-sample [n] (zeros when no reference is given)
    ratio: torch.Tensor  # [n]


def kl_std(step, kl_form: str) -> torch.Tensor:
    """The std the KL term divides by (docs/SPEC.md section 1): ``flow_grpo`` sigma_t (Flow-GRPO's
    std_dev_t), ``exact`` the step's std sigma_t sqrt|dt|. ``step``: an rl.sde.SDEStep."""
    if kl_form == "flow_grpo":
        return step.noise_std
    if kl_form == "exact":
        return step.std
    raise ValueError(f"train.kl_form: {kl_form!r} is not one of flow_grpo, exact")


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    adv_clip: float = 5.0,
    mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    step_std: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    denominator: int | None = None,
) -> LossOut:
    """Per trained timestep: ``L = sum_i m_i (L_pol_i + beta KL_i) / denominator``.

    log_prob, old_log_prob, advantages: [n]. mean/ref_mean [n, C, H, W] and step_std [n, 1, 1, 1]
    give KL_i = mean_CHW (mu - mu_ref)^2 / (2 step_std^2): with the step's std sigma_t sqrt|dt| the
    exact KL of the two Gaussian steps (``train.kl_form: exact``), with sigma_t Flow-GRPO's form
    (``kl_form: flow_grpo``, see ``kl_std``). m_i masks samples with advantage exactly 0 (SPEC 1). The denominator
    defaults to n: a fixed count (not the number of unmasked samples) so that splitting a batch
    across ranks and averaging their gradients gives the single-process gradient.
    """
    A = advantages.float().clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -A * ratio
    clipped = -A * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pol = torch.maximum(unclipped, clipped)
    if kl_beta > 0 and mean is not None and ref_mean is not None:
        kl = ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * step_std.flatten() ** 2)
    else:
        kl = torch.zeros_like(pol)
    mask = (advantages != 0).float()
    n = denominator or advantages.shape[0]
    loss = (mask * (pol + kl_beta * kl)).sum() / n
    return LossOut(loss, pol.detach(), kl.detach(), ratio.detach())


def unclipped_mask(ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """[n] 1.0 where the gradient of ``max(-A ratio, -A clip(ratio))`` flows through ratio (the
    unclipped branch is the max, or the ratio is inside the clip range), else 0.0. With it the policy
    loss's gradient is ``sum_i A_i mask_i d(-ratio_i)``: linear in the advantages, which is what lets
    one backward give every objective's gradient (grad/capture.py). Ties split the gradient between
    equal branches whose derivatives are equal, so the mask is exact there too."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return (unclipped >= clipped).to(ratio.dtype)


def step_kl(mean: torch.Tensor, ref_mean: torch.Tensor, step_std: torch.Tensor) -> torch.Tensor:
    """[n] KL of the two Gaussian steps: mean over (C, H, W) of (mu - mu_ref)^2 / (2 std^2) (as grpo_loss)."""
    return ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * step_std.flatten() ** 2)
