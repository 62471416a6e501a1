"""The probe Gram (``balance.gradients: proxy``): the K per-objective gradients measured by K
backward passes on one micro-batch at one timestep before the epoch's update, averaged over ranks
(one all-reduce of a flat buffer, so the Gram is that of the global micro-batch's gradients, as in
one process: an average of per-rank Grams would not be). A cheap stand-in for the Gram of the
whole update that one_backward / k_backward measure (grad/capture.py)."""
from __future__ import annotations

from typing import Callable

import torch

from ..ops import gram as gram_op


def probe_gram(loss_of: Callable[[int], torch.Tensor], K: int, params: list[torch.Tensor],
               all_reduce_mean_: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> torch.Tensor:
    """``loss_of(k)`` -> the surrogate loss with objective k's advantages; returns M [K, K]."""
    rows = []
    for k in range(K):
        grads = torch.autograd.grad(loss_of(k), params, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    J = [torch.stack([rows[k][i] for k in range(K)]) for i in range(len(params))]
    if all_reduce_mean_ is not None:
        J = all_reduce_mean_(J)
    return gram_op(J)
