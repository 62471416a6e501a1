"""Launchers for the Triton kernels (apex_fast.kernels). Imported only when the Triton backend is
chosen. Inputs arrive validated and contiguous (see functional.py)."""
from __future__ import annotations

from collections import OrderedDict

import torch

from ._backend import triton_interpret, triton_kernels

# row counts up to this use the sort-free, single-launch pairwise kernel
PAIRWISE_MAX_N = 8192


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}[dtype]


def _densify(ids: torch.Tensor):
    """Dense group index sorted by id (same order as torch.unique), group-sorted permutation,
    group start offsets and sizes."""
    _, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
    perm = torch.argsort(inverse, stable=True)
    offs = torch.cumsum(counts, 0) - counts
    return inverse, perm, offs, counts


def group_normalize(R2: torch.Tensor, ids: torch.Tensor, global_std: bool, eps: float, floor):
    k = triton_kernels("group_norm")
    N, K = R2.shape
    BK = _next_pow2(K)
    A = torch.empty(N, K, dtype=torch.float32, device=R2.device)
    floor_t = floor if floor is not None else A  # dummy pointer when HAS_FLOOR is off
    interp = triton_interpret()
    if N <= PAIRWISE_MAX_N:
        if interp:
            BI = BJ = min(256, max(16, _next_pow2(N)))
        else:
            BI, BJ = 32, max(16, 128 // BK)
        grid = (triton_cdiv(N, BI),)
        k.group_norm_pairwise_kernel[grid](
            R2, ids, floor_t, A, N, K, float(eps), GLOBAL_STD=bool(global_std),
            HAS_FLOOR=floor is not None, BLOCK_I=BI, BLOCK_J=BJ, BLOCK_K=BK)
        return A
    _, perm, offs, counts = _densify(ids)
    gstat = torch.empty(2, K, dtype=torch.float32, device=R2.device)
    if global_std:
        k.column_stats_kernel[(1,)](R2, gstat, N, K, BLOCK_N=4096 if interp else 1024, BLOCK_K=BK)
    BM = 1024 if interp else max(16, 1024 // BK)
    k.group_norm_segmented_kernel[(counts.numel(),)](
        R2, perm, offs, counts, floor_t, gstat, A, A, A, A, A, A, K, float(eps),
        GLOBAL_STD=bool(global_std), HAS_FLOOR=floor is not None, DUAL=False, BLOCK_M=BM, BLOCK_K=BK)
    return A


def dual_stage_advantages(R2, ids, w, floor, eps: float, clip: float):
    k = triton_kernels("group_norm")
    N, K = R2.shape
    BK = _next_pow2(K)
    dev = R2.device
    inverse, perm, offs, counts = _densify(ids)
    G = counts.numel()
    Ahat = torch.empty(N, K, dtype=torch.float32, device=dev)
    S = torch.empty(N, dtype=torch.float32, device=dev)
    mean = torch.empty(G, K, dtype=torch.float32, device=dev)
    std = torch.empty(G, K, dtype=torch.float32, device=dev)
    count = torch.empty(G, K, dtype=torch.float32, device=dev)
    interp = triton_interpret()
    BM = 1024 if interp else max(16, 1024 // BK)
    k.group_norm_segmented_kernel[(G,)](
        R2, perm, offs, counts, floor if floor is not None else S, S, w, Ahat, S, mean, std, count,
        K, float(eps), GLOBAL_STD=False, HAS_FLOOR=floor is not None, DUAL=True, BLOCK_M=BM, BLOCK_K=BK)
    A = torch.empty(N, dtype=torch.float32, device=dev)
    st = torch.empty(3, dtype=torch.float32, device=dev)
    k.batch_renorm_kernel[(1,)](S, A, st, N, float(eps), float(clip), BLOCK_N=4096 if interp else 1024)
    stats = dict(inverse=inverse, count=count, mean=mean, std=std, combined=S, batch_mean=st[0],
                 batch_std=st[1], clip_frac=st[2])
    return A, Ahat, stats


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---------------------------------------------------------------------------------------------------
# multi-tensor gram / combine

_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLES_MAX = 64


def _ref_index(blocks) -> int:
    """The tensor whose data pointer is passed to the kernel: the first non-empty one."""
    return next((i for i, b in enumerate(blocks) if b.numel() > 0), 0)


def _elem_offsets(ts, r: int):
    """Element offsets of each tensor's data relative to ts[r] (same dtype, so exact), and whether
    they are all multiples of 16 elements."""
    es = ts[r].element_size()
    p0 = ts[r].data_ptr()
    offs = []
    for t in ts:
        d = t.data_ptr() - p0
        assert d % es == 0, "tensors of one dtype are element-aligned"
        offs.append(d // es)
    return offs, all(o % 16 == 0 for o in offs) and p0 % 16 == 0


def _tables(blocks, outs, BLOCK: int):
    """Device tables (element offsets relative to the first tensor, per-row sizes, chunk -> tensor,
    chunk -> start). They depend on addresses and sizes only, so they are cached (gradient buffers
    keep their addresses)."""
    dev = blocks[0].device
    key = (dev, BLOCK, tuple((b.data_ptr(), b.shape[1]) for b in blocks),
           None if outs is None else tuple(o.data_ptr() for o in outs))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    ns = [int(b.shape[1]) for b in blocks]
    chunk_t, chunk_s = [], []
    for t, n in enumerate(ns):
        nc = triton_cdiv(n, BLOCK)
        chunk_t += [t] * nc
        chunk_s += range(0, nc * BLOCK, BLOCK)
    T, C = len(blocks), len(chunk_t)
    r = _ref_index(blocks)
    offs, aligned = _elem_offsets(blocks, r)
    if outs is not None:
        ooffs, oal = _elem_offsets(outs, r)
    else:
        ooffs, oal = [0] * T, True
    aligned = aligned and oal and all(n % 16 == 0 for n in ns)
    packed = torch.tensor(offs + ns + ooffs + chunk_t + list(chunk_s), dtype=torch.int64).to(dev, non_blocking=True)
    tab, n_t, out_tab = packed[:T], packed[T:2 * T], packed[2 * T:3 * T]
    ct, cs = packed[3 * T:3 * T + C], packed[3 * T + C:]
    res = (tab, n_t, out_tab, ct, cs, C, aligned)
    _TABLES[key] = res
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return res


def _sizes(K: int):
    BK = _next_pow2(K)
    if triton_interpret():
        BLOCK = 1 << 16  # few, big program instances: the interpreter pays per instance
        return BK, BLOCK, min(BLOCK, (1 << 20) // (BK * BK)), min(BLOCK, (1 << 20) // BK)
    BLOCK = 8192
    return BK, BLOCK, max(16, 8192 // (BK * BK)), max(64, 4096 // BK)


def gram(blocks):
    k = triton_kernels("gram")
    K = blocks[0].shape[0]
    dtype = blocks[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    BK, BLOCK, SUB_G, _ = _sizes(K)
    tab, n_t, _, ct, cs, C, aligned = _tables(blocks, None, BLOCK)
    if C == 0:
        return torch.zeros(K, K, dtype=acc, device=blocks[0].device)
    part = torch.empty(C, BK, BK, dtype=acc, device=blocks[0].device)
    k.gram_partial_kernel[(C,)](blocks[_ref_index(blocks)], tab, ct, cs, n_t, part, K, ACC=_tl_dtype(acc),
                                BLOCK=BLOCK, SUB=SUB_G, BLOCK_K=BK, ALIGNED=aligned)
    return part.sum(0)[:K, :K]


def combine(blocks, c, outs):
    k = triton_kernels("gram")
    K = blocks[0].shape[0]
    dtype = blocks[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    BK, BLOCK, _, SUB_C = _sizes(K)
    tab, n_t, out_tab, ct, cs, C, aligned = _tables(blocks, outs, BLOCK)
    if C == 0:
        return
    cf = c.to(device=blocks[0].device, dtype=acc).contiguous()
    r = _ref_index(blocks)
    k.combine_kernel[(C,)](blocks[r], outs[r], tab, out_tab, ct, cs, n_t, cf, K, ACC=_tl_dtype(acc),
                           BLOCK=BLOCK, SUB=SUB_C, BLOCK_K=BK, ALIGNED=aligned)
