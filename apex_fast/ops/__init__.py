"""Fused multi-objective ops (functional API). Each op dispatches on the device of its inputs:
CUDA -> Triton kernel / CUDA extension, CPU -> C++ extension if built, else the torch reference.
``APEX_FAST_BACKEND=torch|cpp|triton`` forces one backend (see _backend.choose).

    group_normalize(R, group_ids, *, global_std=False, eps=1e-4, std_floor=None) -> A
    dual_stage_advantages(R, group_ids, weights, *, std_floor=None, eps=1e-4, clip=5.0) -> A, Ahat, stats
    gram(J) -> [K, K];  cosine(J) -> [K, K];  combine(J, c, out=None) -> c^T J
    weighted_grads(delta, a, W) -> G [K, out, in]
"""
from . import reference
from ._backend import available_backends, choose
from .functional import combine, cosine, dual_stage_advantages, gram, group_normalize, weighted_grads
from .reference import cosine_from_gram, group_stats

__all__ = [
    "group_normalize", "dual_stage_advantages", "gram", "cosine", "combine", "weighted_grads",
    "group_stats", "cosine_from_gram", "available_backends", "choose", "reference",
]
