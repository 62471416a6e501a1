"""Gradient aggregators in Gram form (docs/SPEC.md section 5).

Each function takes the K x K Gram matrix ``M = J J^T`` of the per-objective gradients
``J = [g_1 .. g_K]`` (K x P) and returns coefficients ``c`` [K] such that the update direction is
``d = c^T J``. Because the GRPO surrogate is linear in the advantages, the same direction is the
gradient of the surrogate with advantages ``Ahat @ c``: an aggregator is an advantage re-weighting.

Only K x K numbers are touched, so the functions run on the host in float64 whatever the size of the
model; the result has M's dtype and device. The small problems are solved exactly:

- MGDA (min-norm point over the simplex), UPGrad's projections (``min v^T M v s.t. v >= u``) and
  CAGrad's inner problem are convex; their optimum is attained on some "support" (set of active
  coordinates) whose gradients are linearly/affinely independent, where the KKT conditions are a
  small linear system. For K <= ``MAX_EXACT_K`` every support is tried (batched, pseudo-inverse for
  rank-deficient Grams) and the best feasible candidate is returned; for larger K an accelerated
  projected-gradient method is used (documented as approximate).
"""
from __future__ import annotations

import itertools

import torch

MAX_EXACT_K = 12  # 2^12 supports; beyond that the iterative fallback is used
_TINY = 1e-12


def _gram(M) -> torch.Tensor:
    """Validate M [K, K] and return a symmetric float64 CPU copy."""
    M = torch.as_tensor(M)
    if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"the Gram matrix must be square [K, K] with K >= 1, got shape {tuple(M.shape)}")
    G = M.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(G).all():
        raise ValueError("the Gram matrix has NaN/inf entries (a per-objective gradient overflowed?)")
    return 0.5 * (G + G.T)


def _out(c: torch.Tensor, M) -> torch.Tensor:
    M = torch.as_tensor(M)
    dtype = M.dtype if M.is_floating_point() else torch.float32
    return c.to(device=M.device, dtype=dtype)


def _scale(G: torch.Tensor) -> float:
    """Mean diagonal (mean squared gradient norm); the solutions below are invariant to it."""
    return float(G.diagonal().clamp_min(0).mean())


def _supports(K: int):
    """All non-empty subsets of range(K), grouped by size: {size: LongTensor [B, size]}."""
    return {n: torch.tensor(list(itertools.combinations(range(K), n)), dtype=torch.long) for n in range(1, K + 1)}


def _sub(G: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Batched principal submatrices G[S, S]: S [B, n] -> [B, n, n]."""
    return G[S[:, :, None], S[:, None, :]]


# ------------------------------------------------------------------------------------------- PCGrad


def pcgrad_coefficients(M, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PCGrad (Yu et al. 2020) in Gram form.

    For each k (in order 0..K-1) a random order ``torch.randperm(K, generator=generator)`` of the
    other objectives is drawn; along it, whenever ``g_k^PC . g_j < 0`` the projection
    ``g_k^PC -= (g_k^PC . g_j / |g_j|^2) g_j`` is applied (against the ORIGINAL g_j, as in the paper
    and TorchJD). ``P[k]`` holds the coefficients of ``g_k^PC`` in terms of g_1..g_K, so
    ``g_k^PC = P[k] @ J`` and ``d = sum_k g_k^PC = c^T J`` with ``c = P.sum(0)``.

    Returns ``(c [K], P [K, K])``. ``generator=None`` uses torch's global RNG.
    """
    G = _gram(M)
    K = G.shape[0]
    P = torch.eye(K, dtype=torch.float64)
    for k in range(K):
        order = torch.randperm(K, generator=generator) if generator is not None else torch.randperm(K)
        p = P[k]
        for j in order.tolist():
            if j == k or G[j, j] <= 0:
                continue
            ip = float(G[j] @ p)  # g_k^PC . g_j
            if ip < 0.0:
                p[j] -= ip / G[j, j]
    return _out(P.sum(0), M), _out(P, M)


# --------------------------------------------------------------------------------------------- MGDA


def _mgda_exact(G: torch.Tensor) -> torch.Tensor:
    K = G.shape[0]
    best_val, best = float("inf"), None
    for n, S in _supports(K).items():
        B = S.shape[0]
        kkt = torch.zeros(B, n + 1, n + 1, dtype=torch.float64)
        kkt[:, :n, :n] = _sub(G, S)
        kkt[:, :n, n] = 1.0
        kkt[:, n, :n] = 1.0
        rhs = torch.zeros(B, n + 1, 1, dtype=torch.float64)
        rhs[:, n] = 1.0
        x = (torch.linalg.pinv(kkt, hermitian=True) @ rhs)[:, :n, 0]  # [B, n]
        ok = (x >= -1e-9).all(1) & torch.isfinite(x).all(1)
        if not ok.any():
            continue
        x = x[ok].clamp_min(0)
        x = x / x.sum(1, keepdim=True)
        c = torch.zeros(x.shape[0], K, dtype=torch.float64).scatter_(1, S[ok], x)
        val = torch.einsum("bi,ij,bj->b", c, G, c)
        i = int(val.argmin())
        if float(val[i]) < best_val:
            best_val, best = float(val[i]), c[i]
    return best


def _project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of v [K] onto the probability simplex."""
    u, _ = torch.sort(v, descending=True)
    css = u.cumsum(0) - 1
    idx = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    r = int((u - css / idx > 0).nonzero().max())
    return (v - css[r] / (r + 1)).clamp_min(0)


def _fista(grad, project, x0: torch.Tensor, lipschitz: float, iters: int = 20000) -> torch.Tensor:
    x, y, t = x0, x0, 1.0
    step = 1.0 / max(lipschitz, _TINY)
    for _ in range(iters):
        x_new = project(y - step * grad(y))
        t_new = 0.5 * (1 + (1 + 4 * t * t) ** 0.5)
        y = x_new + (t - 1) / t_new * (x_new - x)
        if float((x_new - x).abs().max()) < 1e-13:
            x = x_new
            break
        x, t = x_new, t_new
    return x


def mgda_coefficients(M) -> torch.Tensor:
    """MGDA (Desideri 2012; Sener & Koltun 2018): ``c = argmin_{c in simplex} c^T M c``, the
    min-norm point of the convex hull of the gradients. Returns c [K] (>= 0, sums to 1)."""
    G = _gram(M)
    K = G.shape[0]
    s = _scale(G)
    if s <= _TINY:
        return _out(torch.full((K,), 1.0 / K, dtype=torch.float64), M)
    G = G / s
    if K <= MAX_EXACT_K:
        c = _mgda_exact(G)
    else:
        lip = 2 * float(torch.linalg.eigvalsh(G).max())
        c = _fista(lambda x: 2 * G @ x, _project_simplex, torch.full((K,), 1.0 / K, dtype=torch.float64), lip)
    return _out(c, M)


# ------------------------------------------------------------------------------------------- UPGrad


def _project_dual_cone_exact(G: torch.Tensor, U: torch.Tensor, Q: torch.Tensor | None = None) -> torch.Tensor:
    """For each row u of U [R, K] (and q of Q [R, K], zero if None): argmin_v v^T G v + 2 q^T v s.t.
    v >= u. Exact support enumeration."""
    R, K = U.shape
    Q = torch.zeros_like(U) if Q is None else Q
    best_val = torch.einsum("ri,ij,rj->r", U, G, U) + 2 * (U * Q).sum(-1)  # the empty free set: v = u
    best = U.clone()
    GU = U @ G + Q  # [R, K] = (G u + q)^T
    for n, S in _supports(K).items():
        B = S.shape[0]
        # v_F solves G_FF v_F = -G_FB u_B = -(G u)_F + G_FF u_F
        GFF = _sub(G, S)  # [B, n, n]
        pinv = torch.linalg.pinv(GFF, hermitian=True)  # [B, n, n]
        uF = U[:, S]  # [R, B, n]
        rhs = -GU[:, S] + torch.einsum("bij,rbj->rbi", GFF, uF)
        vF = torch.einsum("bij,rbj->rbi", pinv, rhs)  # [R, B, n]
        ok = (vF >= uF - 1e-9).all(-1) & torch.isfinite(vF).all(-1)  # [R, B]
        if not ok.any():
            continue
        V = U[:, None, :].expand(R, B, K).clone()
        V.scatter_(2, S[None].expand(R, B, n), torch.maximum(vF, uF))
        val = torch.einsum("rbi,ij,rbj->rb", V, G, V) + 2 * torch.einsum("rbi,ri->rb", V, Q)
        val = torch.where(ok, val, torch.full_like(val, float("inf")))
        vmin, imin = val.min(1)
        better = vmin < best_val
        best_val = torch.where(better, vmin, best_val)
        best = torch.where(better[:, None], V[torch.arange(R), imin], best)
    return best


def upgrad_coefficients(M, pref=None) -> torch.Tensor:
    """UPGrad (Quinton & Rey 2024, TorchJD): project each g_k onto the dual cone
    ``{v : J v >= 0}`` and average. In weight space (TorchJD's Proposition 1) the projection of
    ``J^T u`` is ``J^T w`` with ``w = argmin_v v^T M v s.t. v >= u``; with ``u = e_k / K`` and
    summing, ``c = sum_k w_k``. The result never conflicts: ``(M c)_k = g_k . d >= 0`` for all k.
    ``pref`` [K] >= 0 (TorchJD's ``pref_vector``) replaces 1/K: ``u = pref_k e_k``. Returns c [K]
    (every entry >= its u)."""
    G = _gram(M)
    K = G.shape[0]
    s = _scale(G)
    if pref is None:
        U = torch.eye(K, dtype=torch.float64) / K
    else:
        p = torch.as_tensor(pref, dtype=torch.float64).flatten().cpu()
        if p.numel() != K or not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
            raise ValueError(f"upgrad pref must be {K} finite numbers >= 0, got {p.tolist()}")
        U = torch.diag(p)
    if s <= _TINY:
        return _out(U.sum(0), M)
    G = G / s
    if K <= MAX_EXACT_K:
        W = _project_dual_cone_exact(G, U)
    else:
        lip = 2 * float(torch.linalg.eigvalsh(G).max())
        W = torch.stack([_fista(lambda x: 2 * G @ x, lambda x, u=u: torch.maximum(x, u), u.clone(), lip) for u in U])
    return _out(W.sum(0), M)


def offset_cone_coefficients(M, c0, b, s: float = 1.0) -> torch.Tensor:
    """The smallest raise of the cone's coefficients c0 [K] after which the step ``J^T c + s g``, g a term
    outside the objectives (the KL to the reference), conflicts with no objective:
    ``c = argmin_{v >= c0} v^T M v + 2 s b^T v`` with M = J J^T [K, K] and b = J g [K] in the same
    scale. Where M is positive definite, KKT gives ``M c + s b >= 0`` (= 0 where c > c0), and c = c0 when
    ``M c0 + s b >= 0`` already. Returns c [K] (every entry >= c0's)."""
    G = _gram(M)
    K = G.shape[0]
    c0 = torch.as_tensor(c0, dtype=torch.float64).flatten().cpu()
    q = torch.as_tensor(b, dtype=torch.float64).flatten().cpu() * float(s)
    if c0.numel() != K or q.numel() != K or not bool(torch.isfinite(c0).all() & torch.isfinite(q).all()):
        raise ValueError(f"offset_cone_coefficients: c0 and b must be {K} finite numbers, got {c0.tolist()}, {q.tolist()}")
    scale = _scale(G)
    if scale <= _TINY:
        return _out(c0, M)
    G, q = G / scale, q / scale
    if K <= MAX_EXACT_K:
        return _out(_project_dual_cone_exact(G, c0[None], q[None])[0], M)
    lip = 2 * float(torch.linalg.eigvalsh(G).abs().max())
    return _out(_fista(lambda x: 2 * (G @ x + q), lambda x: torch.maximum(x, c0), c0.clone(), lip), M)


# ------------------------------------------------------------------------------------------- CAGrad


def _cagrad_weights_exact(G: torch.Tensor, b: torch.Tensor, c0: float) -> torch.Tensor:
    """argmin_{w in simplex} F(w) = b^T w + c0 sqrt(w^T G w).

    On a support S (w_S > 0), stationarity is ``b_S + c0 G_SS w_S / |g_w| = mu 1``. With
    ``y = w_S / |g_w|`` (so ``y^T G_SS y = 1``): ``y = G_SS^+ (mu 1 - b_S) / c0`` and ``mu`` solves
    ``(mu 1 - b_S)^T G_SS^+ (mu 1 - b_S) = c0^2``; then ``w_S = y / 1^T y``. Every feasible
    candidate (plus the vertices and the MGDA point) is evaluated exactly; the best one is returned."""
    K = G.shape[0]

    def F(W):  # [B, K] -> [B]
        return W @ b + c0 * torch.einsum("bi,ij,bj->b", W, G, W).clamp_min(0).sqrt()

    cands = [torch.eye(K, dtype=torch.float64), _mgda_exact(G)[None]]
    for n, S in _supports(K).items():
        pinv = torch.linalg.pinv(_sub(G, S), hermitian=True)  # [B, n, n]
        bS = b[S]  # [B, n]
        one = torch.ones_like(bS)
        a2 = torch.einsum("bi,bij,bj->b", one, pinv, one)
        a1 = torch.einsum("bi,bij,bj->b", one, pinv, bS)
        a0 = torch.einsum("bi,bij,bj->b", bS, pinv, bS) - c0 * c0
        disc = a1 * a1 - a2 * a0
        good = (a2 > _TINY) & (disc >= 0)
        if not good.any():
            continue
        root = disc.clamp_min(0).sqrt()
        for sign in (1.0, -1.0):
            mu = (a1 + sign * root) / a2.clamp_min(_TINY)
            y = torch.einsum("bij,bj->bi", pinv, mu[:, None] * one - bS) / c0
            tot = y.sum(1)
            ok = good & (tot > _TINY) & (y >= -1e-9 * tot.abs()[:, None]).all(1) & torch.isfinite(y).all(1)
            if ok.any():
                w = (y[ok] / tot[ok, None]).clamp_min(0)
                w = w / w.sum(1, keepdim=True)
                cands.append(torch.zeros(w.shape[0], K, dtype=torch.float64).scatter_(1, S[ok], w))
    W = torch.cat(cands)
    return W[int(F(W).argmin())]


def cagrad_coefficients(M, alpha: float = 0.5) -> torch.Tensor:
    """CAGrad (Liu et al. 2021, the authors' ``rescale=1`` variant) in Gram form.

    ``g0 = mean_k g_k``, ``c0 = alpha |g0|``, ``w = argmin_{w in simplex} g_w . g0 + c0 |g_w|``,
    ``d = (g0 + c0 / |g_w| g_w) / (1 + alpha^2)``. Returns c [K] with ``d = c^T J``:
    ``c = (1/K + c0 / |g_w| w) / (1 + alpha^2)``."""
    if not alpha >= 0:
        raise ValueError(f"balance.cagrad_alpha must be >= 0, got {alpha}")
    G = _gram(M)
    K = G.shape[0]
    u0 = torch.full((K,), 1.0 / K, dtype=torch.float64)
    s = _scale(G)
    if s <= _TINY or alpha == 0:
        return _out(u0 / (1 + alpha**2), M)
    G = G / s
    b = G @ u0
    g0_norm = float(u0 @ b) ** 0.5
    c0 = alpha * g0_norm
    if c0 <= _TINY:  # the mean gradient vanishes: d = 0 + c0 * (...) = 0
        return _out(u0 / (1 + alpha**2), M)
    if K <= MAX_EXACT_K:
        w = _cagrad_weights_exact(G, b, c0)
    else:
        eps = 1e-12

        def grad(x):
            return b + c0 * (G @ x) / float(x @ G @ x + eps) ** 0.5

        lip = 2 * float(torch.linalg.eigvalsh(G).max()) / max(g0_norm, 1e-6) * (1 + alpha)
        w = _fista(grad, _project_simplex, u0.clone(), lip)
    gw_norm = float(w @ G @ w) ** 0.5
    if gw_norm <= 1e-9:
        return _out(u0 / (1 + alpha**2), M)
    c = (u0 + c0 / gw_norm * w) / (1 + alpha**2)
    return _out(c, M)


AGGREGATORS = {
    "pcgrad": lambda M, cfg, generator=None: pcgrad_coefficients(M, generator)[0],
    "mgda": lambda M, cfg, generator=None: mgda_coefficients(M),
    "cagrad": lambda M, cfg, generator=None: cagrad_coefficients(M, cfg.cagrad_alpha),
    "upgrad": lambda M, cfg, generator=None: upgrad_coefficients(M),
}
