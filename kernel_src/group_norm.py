"""Triton kernels for group-relative normalisation (SPEC 1, SPEC 3 APEX dual-stage).

Layout: R is [N, K] row-major (a 1-D R is K = 1), group ids int64 with arbitrary values. Statistics
are NaN-aware (non-finite entries are excluded and get 0), population std (ddof 0), and a group whose
finite entries are all equal gives exactly 0. All arithmetic in float32.

* ``group_norm_pairwise_kernel``: ONE launch for all K and all groups, no sort and no host sync:
  every row block scans all rows and matches group ids (O(N^2 K) compares, which is nothing for the
  N <= a few thousand of an RL batch).
* ``group_norm_segmented_kernel``: one program per group over a group-sorted permutation (for large N
  and for the dual-stage op, which reports per-group statistics); writes Ahat, and with DUAL the
  per-group mean/std/count and the stage-2 input ``s = Ahat @ pi``.
* ``column_stats_kernel``: per-column mean/std over all finite entries (global_std).
* ``batch_renorm_kernel``: APEX stage 2, ``A = clip((s - mean) / (std + eps))`` with ``s == 0`` kept 0.
"""
import triton
import triton.language as tl

# module constants used inside @triton.jit code must be constexpr (compiled mode rejects plain globals),
# and never NaN: compiled Triton re-checks each global by equality at every launch, and NaN != NaN.
# Masked loads fill with INF, which _finite excludes exactly as it excludes NaN.
INF = tl.constexpr(float("inf"))


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) < INF)


@triton.jit
def group_norm_pairwise_kernel(
    R_ptr, ids_ptr, floor_ptr, A_ptr, N, K, eps,
    GLOBAL_STD: tl.constexpr, HAS_FLOOR: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    ri = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    kk = tl.arange(0, BLOCK_K)
    mi = ri < N
    mk = kk < K
    gi = tl.load(ids_ptr + ri, mask=mi, other=0)

    cnt = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    mx = tl.full((BLOCK_I, BLOCK_K), -INF, dtype=tl.float32)
    mn = tl.full((BLOCK_I, BLOCK_K), INF, dtype=tl.float32)
    gcnt = tl.zeros((BLOCK_K,), dtype=tl.float32)
    gs1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        mj = rj < N
        gj = tl.load(ids_ptr + rj, mask=mj, other=0)
        xj = tl.load(R_ptr + rj[:, None] * K + kk[None, :], mask=mj[:, None] & mk[None, :],
                     other=INF).to(tl.float32)
        vj = _finite(xj)
        xz = tl.where(vj, xj, 0.0)
        match = (gi[:, None] == gj[None, :]) & mj[None, :]
        w = match[:, :, None] & vj[None, :, :]
        cnt += tl.sum(w.to(tl.float32), axis=1)
        s1 += tl.sum(tl.where(w, xz[None, :, :], 0.0), axis=1)
        mx = tl.maximum(mx, tl.max(tl.where(w, xz[None, :, :], -INF), axis=1))
        mn = tl.minimum(mn, tl.min(tl.where(w, xz[None, :, :], INF), axis=1))
        if GLOBAL_STD:
            gcnt += tl.sum(vj.to(tl.float32), axis=0)
            gs1 += tl.sum(xz, axis=0)
    mean = s1 / tl.maximum(cnt, 1.0)
    gmean = gs1 / tl.maximum(gcnt, 1.0)

    s2 = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    gs2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        mj = rj < N
        gj = tl.load(ids_ptr + rj, mask=mj, other=0)
        xj = tl.load(R_ptr + rj[:, None] * K + kk[None, :], mask=mj[:, None] & mk[None, :],
                     other=INF).to(tl.float32)
        vj = _finite(xj)
        xz = tl.where(vj, xj, 0.0)
        match = (gi[:, None] == gj[None, :]) & mj[None, :]
        w = match[:, :, None] & vj[None, :, :]
        d = xz[None, :, :] - mean[:, None, :]
        s2 += tl.sum(tl.where(w, d * d, 0.0), axis=1)
        if GLOBAL_STD:
            dg = tl.where(vj, xz - gmean[None, :], 0.0)
            gs2 += tl.sum(dg * dg, axis=0)
    std = tl.sqrt(s2 / tl.maximum(cnt, 1.0))
    if GLOBAL_STD:
        denom = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32) + tl.sqrt(gs2 / tl.maximum(gcnt, 1.0))[None, :]
    else:
        denom = std
    if HAS_FLOOR:
        floor = tl.load(floor_ptr + kk, mask=mk, other=0.0)
        denom = tl.maximum(denom, floor[None, :])
    m2 = mi[:, None] & mk[None, :]
    xi = tl.load(R_ptr + ri[:, None] * K + kk[None, :], mask=m2, other=INF).to(tl.float32)
    A = (xi - mean) / (denom + eps)
    A = tl.where(_finite(xi) & (mx > mn) & (std > 0), A, 0.0)
    tl.store(A_ptr + ri[:, None] * K + kk[None, :], A, mask=m2)


@triton.jit
def column_stats_kernel(R_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[0, k] = mean, out[1, k] = population std of the finite entries of column k (one program)."""
    kk = tl.arange(0, BLOCK_K)
    mk = kk < K
    cnt = tl.zeros((BLOCK_K,), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        x = tl.load(R_ptr + rn[:, None] * K + kk[None, :], mask=(rn < N)[:, None] & mk[None, :],
                    other=INF).to(tl.float32)
        v = _finite(x)
        cnt += tl.sum(v.to(tl.float32), axis=0)
        s1 += tl.sum(tl.where(v, x, 0.0), axis=0)
    mean = s1 / tl.maximum(cnt, 1.0)
    s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        x = tl.load(R_ptr + rn[:, None] * K + kk[None, :], mask=(rn < N)[:, None] & mk[None, :],
                    other=INF).to(tl.float32)
        d = tl.where(_finite(x), x - mean[None, :], 0.0)
        s2 += tl.sum(d * d, axis=0)
    tl.store(out_ptr + kk, mean, mask=mk)
    tl.store(out_ptr + K + kk, tl.sqrt(s2 / tl.maximum(cnt, 1.0)), mask=mk)


@triton.jit
def group_norm_segmented_kernel(
    R_ptr, perm_ptr, offs_ptr, cnts_ptr, floor_ptr, gstat_ptr, w_ptr,
    A_ptr, S_ptr, mean_ptr, std_ptr, count_ptr, K, eps,
    GLOBAL_STD: tl.constexpr, HAS_FLOOR: tl.constexpr, DUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(offs_ptr + g)
    n = tl.load(cnts_ptr + g)
    kk = tl.arange(0, BLOCK_K)
    mk = kk < K
    cnt = tl.zeros((BLOCK_K,), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    mx = tl.full((BLOCK_K,), -INF, dtype=tl.float32)
    mn = tl.full((BLOCK_K,), INF, dtype=tl.float32)
    for m0 in range(0, n, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mm = rm < n
        idx = tl.load(perm_ptr + start + rm, mask=mm, other=0)
        x = tl.load(R_ptr + idx[:, None] * K + kk[None, :], mask=mm[:, None] & mk[None, :],
                    other=INF).to(tl.float32)
        v = _finite(x)
        xz = tl.where(v, x, 0.0)
        cnt += tl.sum(v.to(tl.float32), axis=0)
        s1 += tl.sum(xz, axis=0)
        mx = tl.maximum(mx, tl.max(tl.where(v, x, -INF), axis=0))
        mn = tl.minimum(mn, tl.min(tl.where(v, x, INF), axis=0))
    mean = s1 / tl.maximum(cnt, 1.0)
    s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for m0 in range(0, n, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mm = rm < n
        idx = tl.load(perm_ptr + start + rm, mask=mm, other=0)
        x = tl.load(R_ptr + idx[:, None] * K + kk[None, :], mask=mm[:, None] & mk[None, :],
                    other=INF).to(tl.float32)
        d = tl.where(_finite(x), x - mean[None, :], 0.0)
        s2 += tl.sum(d * d, axis=0)
    std = tl.sqrt(s2 / tl.maximum(cnt, 1.0))
    live = (mx > mn) & (std > 0)
    std = tl.where(live, std, 0.0)
    if GLOBAL_STD:
        denom = tl.load(gstat_ptr + K + kk, mask=mk, other=0.0)
    else:
        denom = std
    if HAS_FLOOR:
        denom = tl.maximum(denom, tl.load(floor_ptr + kk, mask=mk, other=0.0))
    if DUAL:
        tl.store(mean_ptr + g * K + kk, mean, mask=mk)
        tl.store(std_ptr + g * K + kk, std, mask=mk)
        tl.store(count_ptr + g * K + kk, cnt, mask=mk)
        w = tl.load(w_ptr + kk, mask=mk, other=0.0)
    for m0 in range(0, n, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mm = rm < n
        idx = tl.load(perm_ptr + start + rm, mask=mm, other=0)
        m2 = mm[:, None] & mk[None, :]
        x = tl.load(R_ptr + idx[:, None] * K + kk[None, :], mask=m2, other=INF).to(tl.float32)
        a = (x - mean[None, :]) / (denom[None, :] + eps)
        a = tl.where(_finite(x) & live[None, :], a, 0.0)
        tl.store(A_ptr + idx[:, None] * K + kk[None, :], a, mask=m2)
        if DUAL:
            s = tl.sum(tl.where(m2, a * w[None, :], 0.0), axis=1)
            tl.store(S_ptr + idx, s, mask=mm)


@triton.jit
def batch_renorm_kernel(S_ptr, A_ptr, stats_ptr, N, eps, clip, BLOCK_N: tl.constexpr):
    """APEX stage 2 in one program: A = clip((s - mean) / (std_pop + eps)), A = 0 where s == 0;
    stats = [mean, std, clip_frac]."""
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        acc += tl.load(S_ptr + rn, mask=rn < N, other=0.0)
    mean = tl.sum(acc, axis=0) / N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        s = tl.load(S_ptr + rn, mask=rn < N, other=0.0)
        d = tl.where(rn < N, s - mean, 0.0)
        acc += d * d
    std = tl.sqrt(tl.sum(acc, axis=0) / N)
    nclip = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mn = rn < N
        s = tl.load(S_ptr + rn, mask=mn, other=0.0)
        a = (s - mean) / (std + eps)
        a = tl.minimum(tl.maximum(a, -clip), clip)
        a = tl.where(s == 0.0, 0.0, a)
        nclip += tl.where(mn & (tl.abs(a) >= clip), 1.0, 0.0)
        tl.store(A_ptr + rn, a, mask=mn)
    tl.store(stats_ptr, mean)
    tl.store(stats_ptr + 1, std)
    tl.store(stats_ptr + 2, tl.sum(nclip, axis=0) / N)
