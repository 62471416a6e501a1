"""Gram-form aggregators (SPEC 5) against independent implementations: a generic QP solver (scipy
SLSQP) for MGDA, PCGrad on explicit vectors, TorchJD's UPGrad (test-only oracle), CAGrad on explicit
vectors (the authors' scipy formulation); properties in the style of TorchJD; the balancers."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from apex_fast.balance import (BalanceConfig, cagrad_coefficients, make_balancer, mgda_coefficients,
                               pcgrad_coefficients, upgrad_coefficients)
from apex_fast.balance import aggregators as agg
from apex_fast.ops import group_normalize

torch.set_num_threads(1)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def jacobians(draw, min_p=1, extra_p=None):
    K = draw(st.integers(1, 6))
    P = K + draw(st.integers(0, 4)) if extra_p else draw(st.integers(min_p, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(K, P, generator=g, dtype=torch.float64)
    # common directions make conflicts rarer/commoner; scales differ across objectives
    J = J * torch.exp(torch.randn(K, 1, generator=g, dtype=torch.float64))
    if draw(st.booleans()):
        J = J + torch.randn(1, P, generator=g, dtype=torch.float64) * draw(st.sampled_from([-2.0, 2.0]))
    return J


def simplex_slsqp(f, K):
    cons = [{"type": "eq", "fun": lambda x: x.sum() - 1.0}]
    best = None
    for x0 in [np.ones(K) / K] + [np.eye(K)[i] for i in range(K)]:
        r = minimize(f, x0, method="SLSQP", bounds=[(0, 1)] * K, constraints=cons,
                     options=dict(ftol=1e-15, maxiter=2000))
        if best is None or r.fun < best.fun:
            best = r
    return best


# --------------------------------------------------------------------------------------------- MGDA


def test_mgda_hand_computed():
    # g1 = (1, 0), g2 = (-1, 1): min-norm point of the segment at c = (0.6, 0.4)... solve by hand:
    # |c g1 + (1-c) g2|^2 = (2c - 1)^2 + (1 - c)^2 -> d/dc: 4(2c-1) - 2(1-c) = 0 -> c = 0.6
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(mgda_coefficients(J @ J.T), torch.tensor([0.6, 0.4], dtype=torch.float64))
    # no conflict at all and equal norms -> the midpoint; one gradient inside -> pure
    torch.testing.assert_close(mgda_coefficients(torch.eye(2)), torch.tensor([0.5, 0.5]))


@SETTINGS
@given(jacobians())
def test_mgda_equals_generic_qp_solver(J):
    M = J @ J.T
    K = M.shape[0]
    c = mgda_coefficients(M)
    assert torch.all(c >= 0) and float(c.sum()) == pytest.approx(1.0)
    val = float(c @ M @ c)
    Mn = M.numpy()
    ref = simplex_slsqp(lambda x: x @ Mn @ x, K)
    scale = float(M.diagonal().mean())
    assert val <= ref.fun + 1e-9 * scale  # never worse than the generic solver
    assert val >= ref.fun - 1e-6 * scale
    # and optimal by the KKT certificate of the min-norm point: g_j . d >= |d|^2 for every j
    assert float((M @ c).min()) >= val - 1e-9 * scale
    d_ref = torch.tensor(ref.x) @ J
    assert float((c @ J - d_ref).norm()) <= 1e-3 * max(1.0, scale**0.5)  # the min-norm point is unique


# ------------------------------------------------------------------------------------------- PCGrad


def pcgrad_explicit(J: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PCGrad on the vectors themselves (Yu et al. 2020, Algorithm 1)."""
    K = J.shape[0]
    d = torch.zeros(J.shape[1], dtype=J.dtype)
    for k in range(K):
        order = torch.randperm(K, generator=generator)
        g = J[k].clone()
        for j in order.tolist():
            if j == k:
                continue
            ip = torch.dot(g, J[j])
            if ip < 0:
                g = g - ip / J[j].dot(J[j]) * J[j]
        d = d + g
    return d


@SETTINGS
@given(jacobians(), st.integers(0, 1000))
def test_pcgrad_gram_form_equals_explicit_vectors(J, seed):
    c, P = pcgrad_coefficients(J @ J.T, torch.Generator().manual_seed(seed))
    d = pcgrad_explicit(J, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(c @ J, d, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(P.sum(0), c)
    # each projected gradient no longer conflicts with the last objective it was projected on
    assert torch.allclose(torch.diagonal(P), torch.ones_like(c))


def test_pcgrad_hand_computed():
    # g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1 < 0 -> g1' = g1 + 1/2 g2, g2' = g2 + 1 g1 -> c = (2, 1.5)
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    c, P = pcgrad_coefficients(J @ J.T, torch.Generator().manual_seed(0))
    torch.testing.assert_close(P, torch.tensor([[1.0, 0.5], [1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(c, torch.tensor([2.0, 1.5], dtype=torch.float64))


def test_pcgrad_matches_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    for s in range(10):
        J = torch.randn(5, 7, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        torch.manual_seed(s)
        ref = tjd.PCGradWeighting()(J @ J.T)
        torch.manual_seed(s)
        c, _ = pcgrad_coefficients(J @ J.T)  # generator=None: the global RNG, as TorchJD
        torch.testing.assert_close(c, ref)


# ------------------------------------------------------------------------------------------- UPGrad


@SETTINGS
@given(jacobians())
def test_upgrad_never_conflicts(J):
    M = J @ J.T
    c = upgrad_coefficients(M)
    scale = float(M.diagonal().max())
    assert float((M @ c).min()) >= -1e-9 * scale  # g_k . d >= 0 for every k
    assert float(c.min()) >= 1.0 / M.shape[0] - 1e-12
    # no conflict at all -> plain mean
    Jp = J.abs()
    torch.testing.assert_close(upgrad_coefficients(Jp @ Jp.T), torch.full((M.shape[0],), 1.0 / M.shape[0],
                                                                           dtype=torch.float64))


@SETTINGS
@given(jacobians(extra_p=True))
def test_upgrad_matches_torchjd(J):
    pytest.importorskip("qpsolvers")
    pytest.importorskip("quadprog")
    tjd = pytest.importorskip("torchjd.aggregation")
    from torchjd._linalg import QuadprogProjector

    M = J @ J.T
    ev = torch.linalg.eigvalsh(M / M.diagonal().sum())
    assume(float(ev.min()) > 1e-6)  # quadprog needs a well-conditioned positive definite Gram
    try:
        ref = tjd.UPGradWeighting(projector=QuadprogProjector(reg_eps=0.0))(M)
    except ValueError as e:  # quadprog's own PD test is stricter than ours on near-singular draws
        assume("positive definite" not in str(e))
        raise
    c = upgrad_coefficients(M)
    dist2 = float((c - ref) @ M @ (c - ref)) / float(M.diagonal().mean())
    assert dist2 <= 1e-10, (c, ref)


# ------------------------------------------------------------------------------------------- CAGrad


def cagrad_explicit(J: torch.Tensor, alpha: float) -> torch.Tensor:
    """The authors' CAGrad (rescale=1) on explicit vectors, with scipy's SLSQP."""
    Jn = J.numpy()
    K = Jn.shape[0]
    G = Jn @ Jn.T
    g0 = Jn.mean(0)
    c0 = alpha * np.linalg.norm(g0)
    b = G.mean(1)

    def obj(x):
        return x @ b + c0 * np.sqrt(max(x @ G @ x, 0.0) + 1e-20)

    w = simplex_slsqp(obj, K).x
    gw = w @ Jn
    return torch.tensor((g0 + c0 / np.linalg.norm(gw) * gw) / (1 + alpha**2))


@SETTINGS
@given(jacobians(min_p=2), st.sampled_from([0.1, 0.5, 0.9]))
def test_cagrad_matches_explicit_vectors(J, alpha):
    M = J @ J.T
    g0n = float(J.mean(0).norm())
    if J.shape[0] == 1 or g0n < 1e-3:
        return
    c = cagrad_coefficients(M, alpha)
    d_ref = cagrad_explicit(J, alpha)
    assert float((c @ J - d_ref).norm()) <= 2e-4 * max(1.0, float(J.norm(dim=1).max()))
    # CAGrad's guarantee: the update stays within c0 of the mean gradient (before the rescale)
    d = (c @ J) * (1 + alpha**2)
    assert float((d - J.mean(0)).norm()) <= alpha * g0n * (1 + 1e-9)


def test_cagrad_alpha_zero_is_mean():
    J = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(cagrad_coefficients(J @ J.T, 0.0), torch.full((3,), 1 / 3, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- shared


@SETTINGS
@given(jacobians(), st.sampled_from(["mgda", "upgrad", "cagrad"]), st.floats(1e-3, 1e3), st.randoms())
def test_aggregators_scale_invariant_and_permutation_equivariant(J, name, a, rnd):
    fn = {"mgda": mgda_coefficients, "upgrad": upgrad_coefficients, "cagrad": cagrad_coefficients}[name]
    M = J @ J.T
    K = M.shape[0]
    c = fn(M)
    perm = list(range(K))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    cp = fn(M[perm][:, perm])
    cs = fn(a * M)
    # compare update directions d = c^T J (unique even when c is not): |d1 - d2|^2 = (c1-c2)^T M (c1-c2)
    s = float(M.diagonal().mean()) + 1e-300
    assert float((c[perm] - cp) @ M[perm][:, perm] @ (c[perm] - cp)) / s <= 1e-10
    assert float((c - cs) @ M @ (c - cs)) / s <= 1e-10


def test_degenerate_grams():
    for fn in (mgda_coefficients, upgrad_coefficients, cagrad_coefficients, lambda M: pcgrad_coefficients(M)[0]):
        c = fn(torch.zeros(3, 3))
        assert torch.isfinite(c).all() and c.dtype == torch.float32
        c = fn(torch.ones(3, 3))  # three identical gradients
        assert torch.isfinite(c).all()
    with pytest.raises(ValueError, match="square"):
        mgda_coefficients(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        upgrad_coefficients(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_iterative_fallback_for_many_objectives(monkeypatch):
    J = torch.randn(5, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    M = J @ J.T
    exact = [mgda_coefficients(M), upgrad_coefficients(M), cagrad_coefficients(M)]
    monkeypatch.setattr(agg, "MAX_EXACT_K", 2)
    approx = [mgda_coefficients(M), upgrad_coefficients(M), cagrad_coefficients(M)]
    for c1, c2 in zip(exact, approx):
        assert float((c1 - c2) @ M @ (c1 - c2)) / float(M.diagonal().mean()) <= 1e-8


# ------------------------------------------------------------------------------------------- balancers


@pytest.mark.parametrize("method", ["pcgrad", "mgda", "cagrad", "upgrad"])
def test_gram_balancers_flow_and_fallback(method):
    K, N = 3, 24
    gid = torch.arange(N) // 6
    R = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 0.1, 0.01])
    bal = make_balancer(BalanceConfig(method=method), [0.5, 0.3, 0.2], ["a", "b", "c"])
    assert bal.wants_gram
    A0, s0 = bal.advantages(R, gid)
    assert s0["gram_fallback"] == 1.0 and s0["coef/a"] == pytest.approx(0.5)
    with pytest.warns(UserWarning, match="no Gram"):
        u = bal.update()
    assert u["gram_fallback"] == 1.0
    # same-epoch flow: per-objective gradients of a linear surrogate -> Gram -> update -> advantages again
    X = torch.randn(N, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bal.advantages(R, gid)
    Ahat = bal.objective_advantages.double()
    J = -(X.T @ Ahat).T / N  # g_k = d/dtheta of -mean(Ahat[:, k] * x_i . theta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u = bal.update(gram=J @ J.T)
    assert u["gram_fallback"] == 0.0 and "cos/a/b" in u and "grad_norm/c" in u and "L/a" in u
    A, s = bal.advantages(R, gid)
    c = torch.tensor([s[f"coef/{n}"] for n in "abc"], dtype=torch.float64)
    # the advantage re-weighting gives the aggregated direction d = c^T J (up to the batch renormalisation)
    g_A = -(X.T @ A.double()) / N
    d = c @ J
    assert float(torch.nn.functional.cosine_similarity(g_A, d, dim=0)) > 1 - 1e-5
    # without renormalisation it is exactly d
    raw = make_balancer(BalanceConfig(method=method, aggregator_renorm=False, adv_clip=1e9), [0.5, 0.3, 0.2])
    raw.load_state_dict({**bal.state_dict()})
    A2, _ = raw.advantages(R, gid)
    torch.testing.assert_close(-(X.T @ A2.double()) / N, d, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(A2, group_normalize(R, gid) @ c.float())
