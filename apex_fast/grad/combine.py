"""The gradient aggregators' update from the captured gradients: c from the K x K Gram by the
balancer's own aggregator function (balance/aggregators.py, with its config and its checkpointed
PCGrad generator), then ``d = c^T J`` written blockwise by ``ops.combine``.

Scale: a Gram balancer trains on ``A = BatchNorm(Ahat c)`` when ``balance.aggregator_renorm`` (its
advantages() does so); Ahat's columns are group-normalised, so ``Ahat c`` has batch mean 0 and the
renormalisation is the division by its batch std. The same scale is applied to c here, so the update
``c_eff^T J`` is the gradient of the surrogate with advantages ``Ahat c_eff`` = what the balancer's
advantages would give with this step's c (without the +-adv_clip clip, which would break linearity)."""
from __future__ import annotations

import torch

from ..ops import combine


def is_aggregator(balancer) -> bool:
    """True for the Gram-form aggregator balancers, whose update is ``c^T J``."""
    from ..balance.aggregators import AGGREGATORS

    return getattr(balancer, "name", None) in AGGREGATORS


def aggregator_coefficients(balancer, M: torch.Tensor) -> torch.Tensor | None:
    """c [K] float64 from the Gram M for a Gram-form aggregator balancer (pcgrad, mgda, cagrad,
    upgrad); None for any other balancer (its update is the trained advantages' gradient)."""
    from ..balance.aggregators import AGGREGATORS

    if not is_aggregator(balancer):
        return None
    c = AGGREGATORS[balancer.name](M, balancer.cfg, generator=getattr(balancer, "generator", None))
    return torch.as_tensor(c).double().cpu()


def scaled_coefficients(c: torch.Tensor, Ahat: torch.Tensor, renorm: bool, eps: float) -> torch.Tensor:
    """c scaled by 1 / (batch std of Ahat c + eps) when ``renorm`` (Ahat [N, K]: the whole batch)."""
    if not renorm:
        return c
    std = (Ahat.double().cpu() @ c).std(unbiased=False)
    return c / (std + eps)


def aggregated_update(J: list[torch.Tensor], c: torch.Tensor) -> list[torch.Tensor]:
    """d = c^T J per parameter (J: per-parameter [K, ...] blocks)."""
    return combine(J, c.to(device=J[0].device, dtype=torch.float32 if J[0].dtype != torch.float64 else J[0].dtype))
