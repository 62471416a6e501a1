"""The sample layout: which of an epoch's N samples each rank rolls out and trains on, micro-batch
by micro-batch, the same global micro-batches for any number of processes."""
from __future__ import annotations

import torch

from ..config import ConfigError
from .process import seed_for



class SampleLayout:
    """The epoch's N samples on a grid of micro-batches, identical for any number of processes.

    The grid has ``ceil(N / B)`` rows (global micro-batches) of ``B = micro_batch_size * world``
    columns; rank r owns columns ``[r*M, (r+1)*M)`` (M = per-rank micro-batch size), so global
    micro-batch b is the union over ranks of the ranks' local micro-batch b. Which sample sits in
    which cell depends only on (seed, epoch, N, B), never on the number of processes:

    * rollout: cell c holds sample ``perm_epoch[c]`` (a seeded permutation of the N samples), so
      each rank rolls out the samples of its columns, a random share of the prompts;
    * inner epoch i > 0 re-shuffles each column's rows with its own seeded permutation, so samples
      meet new micro-batch partners but stay on the rank that holds their latents.

    One process with ``micro_batch_size = B`` and W processes with ``B / W`` therefore train on
    the same global micro-batches in the same order: the same gradients, up to float rounding.
    With several processes every rank must hold whole micro-batches (N/W a multiple of M).
    """

    def __init__(self, total: int, micro_batch_size: int, world: int = 1, rank: int = 0, seed: int = 0):
        if total % world:
            raise ConfigError(
                f"sample.prompts_per_epoch * sample.group_size = {total} must be divisible by the number of "
                f"processes ({world}) so every rank samples the same number of images")
        self.total, self.world, self.rank, self.seed = total, world, rank, seed
        self.local_n = total // world
        self.m = min(micro_batch_size, self.local_n)
        if world > 1 and self.local_n % self.m:
            raise ConfigError(
                f"train.micro_batch_size = {micro_batch_size} must divide the {self.local_n} samples each of the "
                f"{world} processes holds (sample.prompts_per_epoch * sample.group_size / processes), so every "
                f"global micro-batch takes the same number of samples from every rank")
        self.width = self.m * world  # global micro-batch size B
        self.rows = -(-total // self.width)

    def _cells(self, rank: int) -> torch.Tensor:
        """Grid cells (row-major indices) of ``rank``'s local positions 0..local_n-1."""
        loc = torch.arange(self.local_n)
        return (loc // self.m) * self.width + rank * self.m + loc % self.m

    def _placement(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_for(self.seed, "layout", epoch))
        return torch.randperm(self.total, generator=g)

    def rollout_indices(self, epoch: int, rank: int | None = None) -> torch.Tensor:
        """Global sample indices [local_n] of ``rank``'s samples, in local order."""
        return self._placement(epoch)[self._cells(self.rank if rank is None else rank)]

    def all_rollout_indices(self, epoch: int) -> torch.Tensor:
        """Global indices [N] of every rank's samples, concatenated in rank order (= all_gather order)."""
        perm = self._placement(epoch)
        return torch.cat([perm[self._cells(r)] for r in range(self.world)])

    def micro_batches(self, epoch: int, inner: int) -> list[torch.Tensor]:
        """Local positions of this rank's micro-batches for inner epoch ``inner``, in training order."""
        cols = []  # for each of my columns: the local positions of its rows, in this inner epoch's order
        for c in range(self.m):
            q = self.rank * self.m + c  # global column
            n_rows = len(range(c, self.local_n, self.m))
            rows = torch.arange(n_rows)
            if inner > 0:
                g = torch.Generator().manual_seed(seed_for(self.seed, "shuffle", epoch, inner, q))
                rows = rows[torch.randperm(n_rows, generator=g)]
            cols.append(rows * self.m + c)
        n_mb = -(-self.local_n // self.m)
        return [torch.stack([col[b] for col in cols if b < len(col)]) for b in range(n_mb)]




def micro_batches_per_epoch(cfg, world: int) -> int:
    """Micro-batches per rank and inner epoch: ceil(local samples / micro-batch size), as SampleLayout."""
    local_n = cfg.sample.prompts_per_epoch * cfg.sample.group_size // world
    return -(-local_n // min(cfg.train.micro_batch_size, local_n))


def gradient_accumulation(cfg, world: int) -> int:
    """Micro-batches per optimizer step: ``train.gradient_accumulation``, or the micro-batches per epoch
    divided by ``train.optimizer_steps_per_epoch``; it must divide the micro-batches per epoch so every
    step averages equally many (errors name the field and the valid values)."""
    t = cfg.train
    n_mb = micro_batches_per_epoch(cfg, world)
    valid = [d for d in range(1, n_mb + 1) if n_mb % d == 0]
    if t.optimizer_steps_per_epoch:
        if n_mb % t.optimizer_steps_per_epoch:
            raise ConfigError(f"train.optimizer_steps_per_epoch: {t.optimizer_steps_per_epoch} must divide the {n_mb} "
                              f"micro-batches of an epoch (sample.prompts_per_epoch x sample.group_size / "
                              f"(train.micro_batch_size x {world} processes)); valid values: {valid}")
        return n_mb // t.optimizer_steps_per_epoch
    if n_mb % t.gradient_accumulation:
        raise ConfigError(f"train.gradient_accumulation: {t.gradient_accumulation} must divide the {n_mb} "
                          f"micro-batches of an epoch (sample.prompts_per_epoch x sample.group_size / "
                          f"(train.micro_batch_size x {world} processes)); valid values: {valid}")
    return t.gradient_accumulation
