"""Which Gram of the epoch's per-objective gradients the balancer gets after the epoch
(``balance.gram_estimate``, ``balance.gram_metric``; README "The dual-cone combination").

* ``batch`` (default): ``M = J_t J_t^T`` of this epoch's summed gradients. It estimates the second
  moment ``mu mu^T + Sigma``: each gradient's sampling noise adds to its own diagonal, so a noisy
  objective (a sparse OCR reward) reads as larger and less opposed to the others than it is.
* ``cross_epoch``: ``M = sym(J_t J_{t-1}^T)``, the Gram of the mean gradients (two epochs' draws are
  independent, so the noise terms average out). Computed by polarization,
  ``(G(J_t + J_{t-1}) - G(J_t - J_{t-1})) / 4``, with the sharded Gram of grad/reduce.py, next to the batch
  Gram (three sharded Grams an epoch, no other collective); each rank keeps its own previous blocks (K x the
  Gram layers' size), and a checkpoint keeps their mean over ranks, so a resume continues with the same Gram.
  The first epoch gets the batch Gram. The estimate is unbiased but not positive semi-definite in general (a
  noise-dominated objective can get a negative diagonal entry); the balancers take it as the benchmark
  measured it, unprojected.
* ``cross_epoch_weight`` w < 1 (with cross_epoch): ``M = w sym(J_t J_{t-1}^T) + (1 - w) J_t J_t^T``, the
  mean gradients' Gram plus (1 - w) of one epoch's sampling noise on the diagonal.
* ``persistence`` (with cross_epoch, from the second epoch): [K] ``cos(g_k,t, g_k,t-1)`` in the metric, each
  objective's gradient against its own previous one, from the diagonals of the three Grams. Its expectation
  is the share of the mean gradient in the second moment, ``|mu_k|^2 / (|mu_k|^2 + noise)``: about 0 for an
  objective whose mean gradient the epochs cannot measure (APEX's ``cone_min_persistence`` leaves those
  outside its cone).
* metric ``adam``: inner products ``<x, y> = sum x P y`` with AdamW's per-coordinate step scale
  ``P = 1 / (sqrt(v_hat) + eps)``, so a direction that conflicts with no objective in M is one whose
  AdamW step conflicts with none (the optimizer steps along ``P m``, not along the gradient).
"""
from __future__ import annotations

import torch

from .reduce import sharded_gram


def adam_step_scale(exp_avg_sq: list[torch.Tensor] | None, step: int, beta2: float, eps: float) -> list[torch.Tensor] | None:
    """AdamW's per-coordinate step scale ``1 / (sqrt(v / (1 - beta2^step)) + eps)`` of each parameter
    (``exp_avg_sq``: its v; ``step``: the optimizer steps taken), normalised to mean 1 over all their
    coordinates (the balancers normalise the Gram's scale anyway); None before the first step."""
    if exp_avg_sq is None or step < 1:
        return None
    out = [1.0 / (((v if v.dtype == torch.float64 else v.float()) / (1 - beta2**step)).sqrt() + eps) for v in exp_avg_sq]
    total = sum(float(s.sum()) for s in out)
    count = sum(s.numel() for s in out)
    return [s * (count / total) for s in out]


class EpochGram:
    """``M = estimate(blocks)`` once per epoch; ``blocks`` [K, *shape] per Gram-layer parameter (this
    rank's sums over the epoch), ``scale`` the metric per parameter (same shapes without K, or None)."""

    def __init__(self, estimate: str = "batch", cross_weight: float = 1.0):
        if estimate not in ("batch", "cross_epoch"):
            raise ValueError(f"balance.gram_estimate must be batch or cross_epoch, got {estimate!r}")
        if not 0.0 <= cross_weight <= 1.0:
            raise ValueError(f"balance.cross_epoch_weight must be in [0, 1], got {cross_weight!r}")
        self.estimate = estimate
        self.cross_weight = float(cross_weight)
        self.prev: list[torch.Tensor] | None = None
        self.persistence: torch.Tensor | None = None  # [K] float64 after a cross-epoch call, else None

    def checkpoint_blocks(self, runtime=None) -> list[torch.Tensor] | None:
        """The previous blocks averaged over ranks (a collective with several processes; None when there are
        none). Every Gram here is of the mean over ranks, so a resume in which every rank holds this mean
        gets the same cross-epoch Gram (one process: exactly; several: up to the rounding of the mean)."""
        if self.prev is None:
            return None
        out = [b.detach().clone() for b in self.prev]
        return out if runtime is None else runtime.all_reduce_mean_(out)

    def restore_blocks(self, blocks: list[torch.Tensor] | None, device=None) -> None:
        """Put back ``checkpoint_blocks``'s blocks (cross_epoch only; None or another estimate: nothing)."""
        if blocks is None or self.estimate != "cross_epoch":
            return
        self.prev = [torch.as_tensor(b).to(device if device is not None else "cpu", torch.float32).clone() for b in blocks]

    def __call__(self, blocks: list[torch.Tensor], runtime=None, scale: list[torch.Tensor] | None = None) -> torch.Tensor:
        def metric(bs):
            return bs if scale is None else [b * s.sqrt().to(b) for b, s in zip(bs, scale)]

        prev = self.prev
        if prev is not None and [tuple(p.shape) for p in prev] != [tuple(b.shape) for b in blocks]:
            prev = None  # restored from a checkpoint of other Gram layers (a forced resume): start again
        self.persistence = None
        if self.estimate == "cross_epoch":
            self.prev = [b.clone() for b in blocks]
        batch = sharded_gram(metric(blocks), runtime)
        if prev is None or self.estimate == "batch":
            return batch
        plus = sharded_gram(metric([a + b for a, b in zip(blocks, prev)]), runtime)
        minus = sharded_gram(metric([a - b for a, b in zip(blocks, prev)]), runtime)
        cross = (plus - minus) / 4
        # |J_{t-1}|^2 in this epoch's metric: diag(plus + minus) / 2 = |J_t|^2 + |J_{t-1}|^2
        now, before = batch.diagonal(), (plus + minus).diagonal() / 2 - batch.diagonal()
        self.persistence = gram_persistence(cross.diagonal(), now, before)
        if self.cross_weight == 1.0:
            return cross
        return self.cross_weight * cross + (1 - self.cross_weight) * batch


def gram_persistence(cross: torch.Tensor, now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """[K] float64 ``cross_k / sqrt(now_k before_k)``: the cosine of each objective's gradient with its previous
    one (``cross``: their inner products, ``now`` / ``before``: their squared norms); 0 where one vanishes."""
    cross, den = cross.double().cpu(), (now.double().cpu().clamp_min(0) * before.double().cpu().clamp_min(0)).sqrt()
    return torch.where(den > 0, cross / den.clamp_min(1e-300), torch.zeros_like(cross)).clamp(-1, 1)


def kl_products(blocks: list[torch.Tensor], kl_blocks: list[torch.Tensor], runtime=None,
                scale: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``b = J P g_KL`` [K] float64 (APEX's cone_kl): each objective's epoch gradient times the KL term's,
    in the Gram's metric, from one sharded Gram of the stacked rows [J; g_KL] (its last column)."""
    rows = [torch.cat([b, k[None].to(b.dtype)]) for b, k in zip(blocks, kl_blocks)]
    if scale is not None:
        rows = [r * s.sqrt().to(r) for r, s in zip(rows, scale)]
    K = blocks[0].shape[0]
    return sharded_gram(rows, runtime)[:K, K].clone()

