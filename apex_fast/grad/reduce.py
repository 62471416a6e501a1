"""The Gram of the rank-averaged per-objective gradients without gathering them: one reduce-scatter
gives each rank its shard of the averaged J [K, P] (its share of the flat gradient, as a ZeRO rank
owns a partition), each rank computes the partial Gram over its shard, and ONE all-reduce of K x K
values sums the partials. Every rank gets the same M (so the same coefficients c), equal to the
one-process Gram up to float rounding."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ops import gram as gram_op


def sharded_gram(blocks: list[torch.Tensor], runtime=None) -> torch.Tensor:
    """M [K, K] float64 of ``J = mean over ranks of this rank's J`` (blocks: per-parameter [K, ...])."""
    if runtime is None or not runtime.distributed:
        return gram_op(blocks).double().cpu()
    world = runtime.world_size
    K = blocks[0].shape[0]
    flat = torch.cat([b.reshape(K, -1).float() for b in blocks], 1).to(runtime.device)  # [K, P]
    pad = (-flat.shape[1]) % world
    if pad:
        flat = F.pad(flat, (0, pad))
    width = flat.shape[1] // world
    chunks = flat.view(K, world, width).transpose(0, 1).contiguous()  # [world, K, width]: rank r's shard r
    shard = torch.empty(K * width, dtype=flat.dtype, device=flat.device)
    dist.reduce_scatter_tensor(shard, chunks.view(-1))
    shard = shard.view(K, width) / world
    partial = gram_op(shard).double()
    dist.all_reduce(partial)  # the one K x K all-reduce
    return partial.cpu()
