"""Flow-matching Diffusion-DPO loss (docs/SPEC.md section 6).

For a pair (w, l) of clean latents sharing one noise eps and one t (logit-normal):
    x_t = (1 - t) x0 + t eps,   target u = eps - x0,   e(x) = mean over (C, H, W) of (v(x_t, t) - u)^2
    z   = -beta / 2 * [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))]
    L   = -log sigmoid(z)                          (hard label)
    L   = -[p log sigmoid(z) + (1 - p) log sigmoid(-z)]   (soft label p = P(w preferred): label smoothing)
``flow_dpo_loss`` is the vectorised form used in training; ``flow_dpo_loss_reference`` is the plain,
pair-by-pair transcription of the formulas above that the tests hold it to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def logit_normal_t(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t = sigmoid(mean + std * N(0, 1)) [n] float32 (SD3's training distribution of t)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def noisy_latents(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps (t [n] broadcast over C, H, W)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * eps


def velocity_error(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """e = mean over (C, H, W) of (v - (eps - x0))^2, [n] float32."""
    return ((v.float() - (eps.float() - x0.float())) ** 2).mean(dim=tuple(range(1, v.dim())))


@dataclass
class DPOOut:
    loss: torch.Tensor  # scalar: sum over pairs / denominator
    per_pair: torch.Tensor  # [P] loss of each pair (detached)
    logits: torch.Tensor  # [P] z (detached): the implicit reward margin
    accuracy: torch.Tensor  # [P] 1 where z > 0: the model already prefers the winner more than the reference does
    err_w: torch.Tensor  # [P] e_theta(w)  (detached)
    err_l: torch.Tensor  # [P] e_theta(l)
    ref_err_w: torch.Tensor  # [P] e_ref(w)
    ref_err_l: torch.Tensor  # [P] e_ref(l)


def flow_dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, *,
                  beta: float, p: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                  denominator: int | None = None) -> DPOOut:
    """Loss of P pairs from their velocity errors [P] (model with grad, reference without).
    ``p`` [P]: probability that w is preferred (None: 1). The loss is a sum over pairs divided by
    ``denominator`` (default P): a fixed count, so ranks' averaged gradients equal one process's.
    ``weight`` [P] multiplies each pair's loss (0: a padding pair that only keeps ranks in step)."""
    z = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    if p is None:
        per = -F.logsigmoid(z)
    else:
        p = p.to(z.dtype)
        per = -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))
    n = denominator or z.shape[0]
    d = lambda x: x.detach()  # noqa: E731
    total = per.sum() if weight is None else (weight.to(per.dtype) * per).sum()
    return DPOOut(total / n, d(per), d(z), (d(z) > 0).float(), d(err_w), d(err_l), d(ref_err_w), d(ref_err_l))


def flow_dpo_loss_reference(v_w, v_l, ref_v_w, ref_v_l, x0_w, x0_l, eps, *, beta: float, p=None) -> list[float]:
    """SPEC 6 literally, one pair at a time in float64 Python: velocities [P, C, H, W] of the
    model and the reference on the winner and loser noised with the shared eps [P, C, H, W]."""
    out = []
    for i in range(v_w.shape[0]):
        def err(v, x0):
            u = eps[i].double() - x0[i].double()
            return float(((v[i].double() - u) ** 2).mean())

        z = -beta / 2 * ((err(v_w, x0_w) - err(ref_v_w, x0_w)) - (err(v_l, x0_l) - err(ref_v_l, x0_l)))
        logsig = lambda x: -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))  # noqa: E731
        pi = 1.0 if p is None else float(p[i])
        out.append(-(pi * logsig(z) + (1 - pi) * logsig(-z)))
    return out
