"""APEX (SPEC 3-4) and the balancer contract shared by every method: hand-computed stages, P^3,
hypothesis properties (variance hijacking, permutation, degenerate groups, NaN), exact resume."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from apex_fast.balance import (APEX, METHODS, BalanceConfig, conflict_from_gram, conflict_proxy, hijack_share,
                               make_balancer)
from apex_fast.ops import group_normalize

torch.set_num_threads(1)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPS = 1e-4


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- numpy oracle of stage 1/2


def np_dual_stage(R, gid, pi, kappa=0.1, eps=EPS, clip=5.0):
    """Independent numpy implementation of SPEC 3 for a fresh balancer (sbar = this batch's median)."""
    R = np.asarray(R, dtype=np.float64)
    gid = np.asarray(gid)
    N, K = R.shape
    groups = np.unique(gid)
    mean = np.zeros((len(groups), K))
    std = np.zeros((len(groups), K))
    cnt = np.zeros((len(groups), K))
    for gi, g in enumerate(groups):
        for k in range(K):
            x = R[gid == g, k]
            x = x[np.isfinite(x)]
            cnt[gi, k] = len(x)
            if len(x):
                mean[gi, k] = x.mean()
                std[gi, k] = x.std() if np.ptp(x) > 0 else 0.0
    floor = np.zeros(K)
    for k in range(K):
        s = std[(cnt[:, k] >= 2) & (std[:, k] > 0), k]
        floor[k] = kappa * np.median(s) if len(s) else 0.0
    Ahat = np.zeros((N, K))
    for i in range(N):
        gi = int(np.searchsorted(groups, gid[i]))
        for k in range(K):
            if np.isfinite(R[i, k]) and std[gi, k] > 0:
                Ahat[i, k] = (R[i, k] - mean[gi, k]) / (max(std[gi, k], floor[k]) + eps)
    s = Ahat @ np.asarray(pi, dtype=np.float64)
    A = np.clip((s - s.mean()) / (s.std() + eps), -clip, clip)
    A[s == 0] = 0.0
    return A, Ahat


@st.composite
def batches(draw, nan=False, ties=False, min_group=1):
    G = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(min_group, 6), min_size=G, max_size=G))
    K = draw(st.integers(1, 4))
    N = sum(sizes)
    if ties:  # few distinct values: zero-variance groups, ties
        vals = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=N * K, max_size=N * K))
        R = torch.tensor(vals, dtype=torch.float32).reshape(N, K)
    else:
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        scale = torch.tensor(draw(st.lists(st.sampled_from([0.01, 0.1, 1.0, 30.0]), min_size=K, max_size=K)))
        R = torch.randn(N, K, generator=g) * scale + torch.randn(K, generator=g)
    if nan:
        mask = draw(st.lists(st.booleans(), min_size=N * K, max_size=N * K))
        R = torch.where(torch.tensor(mask).reshape(N, K), torch.full_like(R, float("nan")), R)
    labels = draw(st.permutations(list(range(100, 100 + G))))  # arbitrary, unsorted group ids
    gid = torch.tensor([labels[g] for g, n in enumerate(sizes) for _ in range(n)], dtype=torch.long)
    return R, gid


# --------------------------------------------------------------------------- hand-computed stages


def test_stage1_hand_computed_floor():
    # group 0: [0, 2] (mean 1, std 1); group 1: [1.00, 1.02] (std 0.01, nearly degenerate); group 2: [5, 5]
    R = torch.tensor([[0.0], [2.0], [1.0], [1.02], [5.0], [5.0]])
    gid = torch.tensor([7, 7, 3, 3, 9, 9])
    bal = APEX([1.0])
    A, stats = bal.advantages(R, gid)
    Ahat = bal.objective_advantages[:, 0]
    sbar = (1.0 + 0.01) / 2  # median of the informative group stds {1, 0.01}
    floor = 0.1 * sbar
    assert stats["std_floor/r0"] == pytest.approx(floor, rel=1e-5)
    a = 1.0 / (1.0 + EPS)
    b = 0.01 / (floor + EPS)  # the floor, not the tiny std, divides: 0.198 instead of ~1
    torch.testing.assert_close(Ahat, torch.tensor([-a, a, -b, b, 0.0, 0.0]), atol=2e-5, rtol=1e-4)
    sd = math.sqrt((2 * a * a + 2 * b * b) / 6)
    torch.testing.assert_close(A, torch.tensor([-a, a, -b, b, 0, 0]) / (sd + EPS), atol=1e-5, rtol=1e-5)
    assert stats["usable/r0"] == pytest.approx(1 / 3)  # only group 0 exceeds the floor
    # gdpo (no floor) turns the near-degenerate group into full-size signal
    Ag, _ = make_balancer(BalanceConfig(method="gdpo"), [1.0]).advantages(R, gid)
    assert float(Ag[3] / Ag[1]) == pytest.approx(1.0, abs=0.01)
    assert float(A[3] / A[1]) == pytest.approx(b / a, rel=1e-4)  # ~0.2
    # next epoch: sbar is an EMA (0.9) of the medians
    bal.update()
    R2 = torch.tensor([[0.0], [4.0], [1.0], [1.02], [5.0], [5.0]])  # stds {2, 0.01}: median 1.005
    _, s2 = bal.advantages(R2, gid)
    assert s2["std_floor/r0"] == pytest.approx(0.1 * (0.9 * sbar + 0.1 * 1.005), rel=1e-5)


def test_stage2_hand_computed():
    R = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 10.0], [0.0, 30.0]])
    gid = torch.tensor([0, 0, 1, 1])
    bal = APEX([1.0, 3.0], warmup_priority="weights")  # pi = (0.25, 0.75) during warm-up
    A, _ = bal.advantages(R, gid)
    a, b = 1.0 / (1.0 + EPS), 10.0 / (10.0 + EPS)  # each column is +-1 in its informative group
    s = torch.tensor([-0.25 * a, 0.25 * a, -0.75 * b, 0.75 * b])
    sd = math.sqrt((2 * (0.25 * a) ** 2 + 2 * (0.75 * b) ** 2) / 4)
    torch.testing.assert_close(A, s / (sd + EPS), atol=1e-6, rtol=1e-5)
    # the batch renormalisation makes the scale independent of K and pi
    assert float(A.pow(2).mean().sqrt()) == pytest.approx(1.0, abs=1e-3)


def test_stage2_clip():
    R = torch.zeros(40, 1)
    R[0, 0] = 1.0  # one outlier in one group of 40
    A, _ = APEX([1.0]).advantages(R, torch.zeros(40, dtype=torch.long))
    assert float(A.max()) == pytest.approx(5.0)


# P^3 (SPEC 4) hand-computed cases and properties: tests/test_balance_p3.py


def test_conflict_from_gram_matches_explicit_vectors():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(4, 9, generator=g, dtype=torch.float64)
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    cos = conflict_from_gram(J @ J.T, pi)
    for k in range(4):
        h = sum(pi[j] * J[j] for j in range(4) if j != k)
        assert float(cos[k]) == pytest.approx(float(torch.dot(J[k], h) / (J[k].norm() * h.norm())), abs=1e-12)
    # the proxy is the Pearson correlation
    A = torch.randn(50, 3, generator=g)
    p = torch.tensor([0.2, 0.3, 0.5])
    y = 0.3 * A[:, 1] + 0.5 * A[:, 2]
    assert float(conflict_proxy(A, p)[0]) == pytest.approx(float(np.corrcoef(A[:, 0], y)[0, 1]), abs=1e-6)


def test_conflict_source_gram_proxy_auto():
    R = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    gid = torch.arange(16) // 4
    M = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])  # cos = -0.5 -> raw conflict 0.5
    out = {}
    for src in ("auto", "gram", "proxy"):
        bal = APEX([1, 1], conflict_source=src)
        assert bal.wants_gram == (src == "gram")
        bal.advantages(R, gid)
        out[src] = bal.update(gram=M)
    assert out["auto"]["C/r0"] == pytest.approx(0.5) and out["gram"]["C/r0"] == pytest.approx(0.5)
    assert out["auto"]["conflict_from_gram"] == 1.0 and out["proxy"]["conflict_from_gram"] == 0.0
    assert out["proxy"]["conflict_cos/r0"] == pytest.approx(float(conflict_proxy(bal.objective_advantages,
                                                                                 torch.tensor([0.5, 0.5]))[0]))
    assert out["proxy"]["cos/r0/r1"] == pytest.approx(-0.5)  # the cosine matrix is logged whatever the source
    # "gram" on an epoch without a Gram (trainer's gram_every > 1): C holds its last value
    bal = APEX([1, 1], conflict_source="gram")
    bal.advantages(R, gid)
    with pytest.warns(UserWarning, match="conflict_source is 'gram'"):
        assert bal.update()["C/r0"] == 0.0  # nothing measured yet
    bal.advantages(R, gid)
    assert bal.update(gram=M)["C/r0"] == pytest.approx(0.5)  # the first measurement starts the EMA
    bal.advantages(R, gid)
    u = bal.update()
    assert u["C/r0"] == pytest.approx(0.5) and u["conflict_from_gram"] == 0.0 and "conflict_cos/r0" not in u


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(batches(min_group=2), st.integers(0, 3), st.data())
def test_scaling_one_reward_apex_invariant_static_hijacked(batch, k, data):
    R, gid = batch
    K = R.shape[1]
    assume(K >= 2)
    k = k % K
    std_k = torch.stack([R[gid == g, k].std(unbiased=False) for g in gid.unique()])
    assume(bool((std_k > 0.05 * R[:, k].std()).all()))  # every group carries signal in objective k
    scaled = R.clone()
    scaled[:, k] *= 1000.0
    # eps (1e-4, a division guard) breaks scale invariance by eps / std; shrink it to see the exact property
    bal1, bal2 = APEX([1.0] * K, eps=1e-8), APEX([1.0] * K, eps=1e-8)
    a1, _ = bal1.advantages(R, gid)
    a2, _ = bal2.advantages(scaled, gid)
    torch.testing.assert_close(bal2.objective_advantages, bal1.objective_advantages, atol=1e-4, rtol=1e-4)
    if float((bal1.objective_advantages @ bal1.priorities).std()) > 0.1:  # (objectives that cancel exactly
        torch.testing.assert_close(a2, a1, atol=1e-4, rtol=1e-4)  # leave only rounding noise to renormalise)
    # with the default eps it holds up to eps / (smallest in-group std)
    b1, b2 = APEX([1.0] * K), APEX([1.0] * K)
    b1.advantages(R, gid)
    b2.advantages(scaled, gid)
    tol = 3 * EPS / float(std_k.min())
    torch.testing.assert_close(b2.objective_advantages, b1.objective_advantages, atol=tol, rtol=tol)
    # static: the scaled objective takes over (variance hijacking, measured)
    static = make_balancer(BalanceConfig(method="static"), [1.0] * K)
    b1, st1 = static.advantages(R, gid)
    b2, st2 = static.advantages(scaled, gid)
    rho1, rho2 = st1[f"hijack_share/r{k}"], st2[f"hijack_share/r{k}"]
    j = max((i for i in range(K) if i != k), key=lambda i: st1[f"hijack_share/r{i}"])
    assume(st1[f"hijack_share/r{j}"] > 1e-6 and st2[f"hijack_share/r{j}"] > 1e-12)
    # rho_k / rho_j grows by 1000^2: the scaled objective's effective weight grows 1000x
    assert rho2 / st2[f"hijack_share/r{j}"] == pytest.approx(1e6 * rho1 / st1[f"hijack_share/r{j}"], rel=1e-2)
    target = group_normalize(R[:, k], gid)
    d1, d2 = float((b1 - target).norm()), float((b2 - target).norm())
    if rho2 > 0.999 and d1 > 0.5:  # hijacked: static now follows objective k alone
        assert d2 < 0.5 * d1


@SETTINGS
@given(batches(), st.sampled_from(METHODS), st.randoms(use_true_random=False))
def test_permutation_equivariance(batch, method, rnd):
    R, gid = batch
    K = R.shape[1]
    perm = list(range(R.shape[0]))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    w = [1.0 + k for k in range(K)]
    a, _ = make_balancer(BalanceConfig(method=method), w).advantages(R, gid)
    b, _ = make_balancer(BalanceConfig(method=method), w).advantages(R[perm], gid[perm])
    torch.testing.assert_close(b, a[perm], atol=1e-4, rtol=1e-4)


@SETTINGS
@given(batches(ties=True, nan=True), st.sampled_from(METHODS))
def test_degenerate_groups_give_zero_never_nan(batch, method):
    R, gid = batch
    K = R.shape[1]
    bal = make_balancer(BalanceConfig(method=method), [1.0] * K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            A, stats = bal.advantages(R, gid)
            assert torch.isfinite(A).all()
            assert all(math.isfinite(v) for v in stats.values())
            u = bal.update(gram=torch.eye(K) if bal.wants_gram else None)
            assert all(math.isfinite(v) for v in u.values())
    for g in gid.unique():
        rows = gid == g
        Rg = R[rows]
        single = int(rows.sum()) == 1
        constant = all(torch.unique(Rg[torch.isfinite(Rg[:, k]), k]).numel() <= 1 for k in range(K))
        if single or constant:
            assert (A[rows] == 0).all(), (method, Rg, A[rows])
    if method in ("apex", "gdpo"):
        assert (bal.objective_advantages[~torch.isfinite(R)] == 0).all()


@SETTINGS
@given(batches(nan=True))
def test_apex_matches_numpy_oracle_with_nan(batch):
    """NaN rewards are excluded from every statistic (independent numpy oracle of SPEC 3)."""
    R, gid = batch
    K = R.shape[1]
    bal = APEX([1.0] * K)
    A, _ = bal.advantages(R, gid)
    A_np, Ahat_np = np_dual_stage(R.numpy(), gid.numpy(), [1.0 / K] * K)
    np.testing.assert_allclose(bal.objective_advantages.numpy(), Ahat_np, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(A.numpy(), A_np, atol=1e-3, rtol=1e-3)
    assert (bal.objective_advantages[~torch.isfinite(R)] == 0).all()


def test_nan_sample_excluded_from_static_and_stats():
    R = torch.tensor([[0.0, 1.0], [1.0, 2.0], [float("nan"), 3.0], [2.0, 0.0]])
    gid = torch.tensor([0, 0, 0, 0])
    A, stats = make_balancer(BalanceConfig(method="static"), [1, 1]).advantages(R, gid)
    assert A[2] == 0 and torch.isfinite(A).all()
    bal = APEX([1, 1])
    bal.advantages(R, gid)
    Ah = bal.objective_advantages
    keep = torch.tensor([0, 1, 3])
    ref = APEX([1, 1])
    ref.advantages(R[keep], gid[keep])
    torch.testing.assert_close(Ah[keep, 0], ref.objective_advantages[:, 0])
    assert Ah[2, 0] == 0


def test_hijack_share_hand_computed():
    R = torch.tensor([[0.0, 0.0], [2.0, 0.1], [0.0, 0.0], [2.0, 0.1]])
    gid = torch.tensor([0, 0, 1, 1])
    rho = hijack_share(R, gid, torch.tensor([0.5, 0.5]))  # sigma = (1, 0.05)
    torch.testing.assert_close(rho, torch.tensor([1 / (1 + 0.0025), 0.0025 / (1 + 0.0025)]))


# --------------------------------------------------------------------------- resume


def _roundtrip(state: dict) -> dict:
    """Save as the trainer does: tensors to safetensors, scalars to JSON (no pickle)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    out = dict(st_load(st_save(tensors)))
    out.update(json.loads(json.dumps(scalars)))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_resumes_exactly(method):
    K = 3
    gid = torch.arange(24) // 6
    cfg = BalanceConfig(method=method, warmup_epochs=1)

    def batch(e):
        g = torch.Generator().manual_seed(100 + e)
        R = torch.randn(24, K, generator=g) * torch.tensor([1.0, 0.1, 0.01]) + 0.05 * e
        J = torch.randn(K, 7, generator=g)
        return R, J @ J.T

    def run(bal, epochs):
        out = []
        for e in epochs:
            R, M = batch(e)
            A, s = bal.advantages(R, gid)
            u = bal.update(gram=M if (bal.wants_gram or e % 2) else None)
            out.append((A, s, u))
        return out

    a = make_balancer(cfg, [0.5, 0.3, 0.2])
    run(a, range(4))
    state = _roundtrip(a.state_dict())
    b = make_balancer(cfg, [0.5, 0.3, 0.2])
    b.load_state_dict(state)
    ra, rb = run(a, range(4, 9)), run(b, range(4, 9))
    for (A1, s1, u1), (A2, s2, u2) in zip(ra, rb):
        assert torch.equal(A1, A2)
        assert s1 == s2 and u1 == u2
    with pytest.raises(ValueError, match="method"):
        make_balancer(BalanceConfig(method="apex" if method != "apex" else "mgda"), [0.5, 0.3, 0.2]).load_state_dict(state)
