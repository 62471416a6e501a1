"""Flow-GRPO's SDE step with per-step log-probability (docs/SPEC.md section 1). All in fp32.

sigma (``t``) runs from 1 (noise) to 0 (data); one step goes from sigma t to t_prev, dt = t_prev - t < 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SDEStep:
    prev_sample: torch.Tensor  # x_prev [N, C, H, W]
    log_prob: torch.Tensor | None  # [N], mean over (C, H, W); None for the deterministic ODE step
    mean: torch.Tensor  # mu [N, C, H, W]
    std: torch.Tensor  # sigma_t * sqrt(|dt|) [N, 1, 1, 1]: the step's std (0 for the ODE step)
    noise_std: torch.Tensor | None = None  # sigma_t [N, 1, 1, 1] (Flow-GRPO's std_dev_t; its KL divides by it)


def sde_noise_std(sigma: torch.Tensor, sigma_next_of_one: float, noise_level: float) -> torch.Tensor:
    """sigma_t = a * sqrt(t / (1 - t)); at t == 1 the next sigma replaces t in the denominator."""
    denom = 1 - torch.where(sigma == 1, torch.full_like(sigma, sigma_next_of_one), sigma)
    return noise_level * torch.sqrt(sigma / denom)


def _as_col(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float32, device=like.device)
    if x.dim() == 0:
        x = x.expand(like.shape[0])
    return x.reshape(-1, *([1] * (like.dim() - 1)))


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_prev: torch.Tensor | float,
    *,
    noise_level: float,
    sigma_max: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """One SDE (noise_level > 0) or Euler ODE (noise_level == 0) step and the log-prob of ``prev_sample``.

    velocity, sample [N, C, H, W]; sigma, sigma_prev scalars or [N]; sigma_max: the scheduler's
    second sigma, used at t == 1. If ``prev_sample`` is given (training), its log-prob under this
    step's Gaussian is returned; otherwise x_prev = mu + std * noise, with ``noise`` given or drawn
    from ``generator``.
    """
    v = velocity.float()
    x = sample.float()
    t = _as_col(sigma, x)
    t_prev = _as_col(sigma_prev, x)
    dt = t_prev - t
    if noise_level == 0:
        mean = x + v * dt
        out = mean if prev_sample is None else prev_sample.float()
        return SDEStep(out, None, mean, torch.zeros_like(t), torch.zeros_like(t))
    std_t = sde_noise_std(t, sigma_max, noise_level)
    mean = x + (v + std_t**2 / (2 * t) * (x + (1 - t) * v)) * dt
    step_std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        eps = noise if noise is not None else torch.randn(x.shape, generator=generator, device=x.device)
        prev_sample = mean + step_std * eps
    prev_sample = prev_sample.float()
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - LOG_SQRT_2PI
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.dim())))
    return SDEStep(prev_sample, log_prob, mean, step_std, std_t)
