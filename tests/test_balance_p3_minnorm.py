"""P^3's fifth revision (issue 17): conflict-aware learnability (learn_conflict) and the opt-in
min-norm base (min_norm_base): hand-computed cases, permutation of objectives, invariance to reward
scale, degenerate / NaN input, exact state round trip, config errors naming the field."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_fast.balance import APEX, BalanceConfig
from apex_fast.balance.aggregators import mgda_coefficients
from apex_fast.balance.priorities import advantage_gram, floor_simplex, min_norm_weights
from apex_fast.ops import dual_stage_advantages

torch.set_num_threads(1)


def _run(bal, batches, grams=None):
    out = []
    for i, (R, gid) in enumerate(batches):
        bal.advantages(R, gid)
        out.append(bal.update(gram=None if grams is None else grams[i]))
    return out


def _conflict_batches(epochs=30, seed=0, drift=(0.3, 0.01)):
    """Two objectives whose in-group differences are opposite (strong conflict, C near 1) while their
    means drift up at different speeds (objective 1 barely moves: the stall conflict explains)."""
    g = torch.Generator().manual_seed(seed)
    gid = torch.arange(32) // 8
    out = []
    for e in range(epochs):
        x = torch.randn(32, generator=g)
        R = torch.stack([x + drift[0] * e, -x + 0.2 * torch.randn(32, generator=g) + drift[1] * e], 1)
        out.append((R, gid))
    return out


def _batches(K=3, epochs=12, seed=0, drift=(0.3, 0.1, 0.0)):
    g = torch.Generator().manual_seed(seed)
    gid = torch.arange(32) // 8
    return [(torch.randn(32, K, generator=g) + torch.tensor(drift[:K]) * e, gid) for e in range(epochs)]


# --------------------------------------------------------------------------- conflict-aware learnability


@pytest.mark.parametrize("lc", [0.0, 0.5, 1.0])
def test_learnability_threshold_shrinks_with_conflict_hand_computed(lc):
    """L_k = clip(p_k / (learn_ratio (1 - learn_conflict C_k) pbar), 0, 1) once pbar > learn_after,
    recomputed from the logged p and C (spread part off)."""
    bal = APEX([1, 1], warmup_epochs=2, spread_ratio=0.0, learn_conflict=lc, conflict_source="proxy")
    seen = False
    for u in _run(bal, _conflict_batches()):
        p = np.array([u["p/r0"], u["p/r1"]])
        C = np.array([u["C/r0"], u["C/r1"]])
        pbar = p.mean()
        if pbar > 0.2:
            seen = True
            L = np.clip(p / (0.25 * (1 - lc * C) * pbar), 0, 1)
            assert [u["L/r0"], u["L/r1"]] == pytest.approx(L.tolist(), abs=1e-9)
        else:
            assert [u["L/r0"], u["L/r1"]] == [1.0, 1.0]
    assert seen and C.min() > 0.8  # the regime the term is for: strong conflict


def test_conflict_keeps_a_held_back_objective_learnable():
    """The stalled objective of a strongly conflicting pair: the conflict-blind rule reads it as
    unlearnable and drops its priority; the conflict-aware one keeps it near its weight."""
    blind = APEX([1, 1], warmup_epochs=2, learn_conflict=0.0, conflict_source="proxy")
    aware = APEX([1, 1], warmup_epochs=2, learn_conflict=1.0, conflict_source="proxy")
    bs = _conflict_batches(epochs=40)
    ub, ua = _run(blind, bs)[-1], _run(aware, bs)[-1]
    assert ub["L/r1"] < 0.6 and ua["L/r1"] > ub["L/r1"] + 0.3
    assert float(aware.priorities[1]) > float(blind.priorities[1])


def test_no_conflict_learnability_unchanged():
    """Without conflict (C = 0) the rule is the conflict-blind one: a stalled objective still reaches L 0."""
    bs = _batches(drift=(0.3, 0.3, 0.0), epochs=25)
    a = APEX([1, 1, 1], warmup_epochs=2, rho=0.0, learn_conflict=1.0)
    b = APEX([1, 1, 1], warmup_epochs=2, rho=0.0, learn_conflict=0.0)
    ua, ub = _run(a, bs)[-1], _run(b, bs)[-1]
    assert ub["L/r2"] < 0.5
    assert ua["C/r2"] < 0.3 and ua["L/r2"] <= ub["L/r2"] / (1 - ua["C/r2"]) + 1e-9


# --------------------------------------------------------------------------- min-norm base


def test_min_norm_weights_hand_computed():
    # two orthogonal gradients of norms 1 and 2: lambda = (4, 1) / 5 (equal first-order progress)
    G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 9.0]], dtype=torch.float64)
    lam = min_norm_weights(G, torch.tensor([True, True, False]))
    torch.testing.assert_close(lam, torch.tensor([0.8, 0.2, 0.0], dtype=torch.float64))
    # NaN Gram: uniform over the active objectives
    nan = torch.full((3, 3), float("nan"), dtype=torch.float64)
    assert min_norm_weights(nan, torch.tensor([True, True, True])).tolist() == pytest.approx([1 / 3] * 3)


def test_min_norm_base_hand_computed_with_a_gram():
    """base = MGDA(EMA_beta_gram(G_t / mean diag G_t)); stage 2 uses floor(normalize(pi * base))."""
    bal = APEX([1, 1, 1], warmup_epochs=100, min_norm_base=True, conflict_source="gram", beta_gram=0.5, kappa=0.0)
    bs = _batches(epochs=3)
    G1 = torch.tensor([[2.0, 0.2, 0.0], [0.2, 1.0, -0.3], [0.0, -0.3, 0.5]], dtype=torch.float64)
    G2 = torch.tensor([[1.0, 0.0, 0.1], [0.0, 3.0, 0.0], [0.1, 0.0, 2.0]], dtype=torch.float64)
    _run(bal, bs[:2], [G1, G2])
    n1, n2 = G1 / G1.diagonal().mean(), G2 / G2.diagonal().mean()
    ema = 0.5 * n1 + 0.5 * n2
    torch.testing.assert_close(bal.p3.gram_ema, ema)
    lam = mgda_coefficients(ema).double()
    torch.testing.assert_close(bal.p3.base, lam)
    # the third epoch's advantages: A from c = floor(normalize(pi * lam)), pi uniform (warm-up)
    c = floor_simplex(lam / lam.sum(), 0.05, torch.ones(3, dtype=torch.bool))
    R, gid = bs[2]
    A, st = bal.advantages(R, gid)
    ref, _, _ = dual_stage_advantages(R, gid, c.float(), std_floor=torch.zeros(3), eps=1e-4, clip=5.0)
    torch.testing.assert_close(A, ref)
    assert [st[f"coef/r{k}"] for k in range(3)] == pytest.approx(c.tolist(), rel=1e-6)
    assert [st[f"priority/r{k}"] for k in range(3)] == pytest.approx([1 / 3] * 3)


def test_min_norm_base_from_the_advantage_proxy():
    """Without a Gram (conflict_source proxy) the base is MGDA of Ahat^T Ahat / N, normalised."""
    bal = APEX([1, 1, 1], warmup_epochs=100, min_norm_base=True, conflict_source="proxy")
    R, gid = _batches(epochs=1)[0]
    bal.advantages(R, gid)
    P = advantage_gram(bal.objective_advantages)
    bal.update()
    torch.testing.assert_close(bal.p3.gram_ema, P / P.diagonal().mean())
    torch.testing.assert_close(bal.p3.base, mgda_coefficients(P / P.diagonal().mean()).double())


def test_min_norm_base_permutation_and_scale_invariant():
    """Equivariant to the order of the objectives; invariant to each reward's scale and offset up to the
    eps (1e-4) in Ahat's std denominator (a reward scaled by 1e-2 moves the base by ~6e-3, by 0.1 ~6e-4)."""
    perm = [2, 0, 1]
    scale, shift = torch.tensor([1e3, 0.1, 7.0]), torch.tensor([-5.0, 100.0, 0.3])
    bs = _batches(drift=(0.3, 0.2, 0.05), epochs=12)
    kw = dict(warmup_epochs=2, min_norm_base=True, conflict_source="proxy")
    a, b, c = (APEX([0.5, 0.3, 0.2], **kw), APEX(torch.tensor([0.5, 0.3, 0.2])[perm], **kw), APEX([0.5, 0.3, 0.2], **kw))
    _run(a, bs)
    _run(b, [(R[:, perm], g) for R, g in bs])
    _run(c, [(R * scale + shift, g) for R, g in bs])
    torch.testing.assert_close(b.p3.base, a.p3.base[perm], atol=1e-9, rtol=0)
    torch.testing.assert_close(b.p3.gram_ema, a.p3.gram_ema[perm][:, perm], atol=1e-9, rtol=0)
    torch.testing.assert_close(c.p3.base, a.p3.base, atol=2e-3, rtol=0)
    torch.testing.assert_close(c.p3.coefficients(c.pi), a.p3.coefficients(a.pi), atol=2e-3, rtol=0)
    assert float((a.p3.base - 1 / 3).abs().max()) > 0.02  # the base is not trivially uniform here


def test_min_norm_base_degenerate_and_nan_input():
    bal = APEX([1, 1, 1], warmup_epochs=1, min_norm_base=True, conflict_source="auto")
    gid = torch.arange(16) // 4
    for e in range(6):
        R = torch.randn(16, 3, generator=torch.Generator().manual_seed(e))
        R[:, 1] = 0.5  # no spread ever: its column of Ahat is 0
        R[::3, 2] = float("nan")
        gram = None
        if e == 2:
            gram = torch.zeros(3, 3)  # no gradient signal: the EMA is kept
        A, st = bal.advantages(R, gid)
        before = bal.p3.gram_ema.clone()
        bal.update(gram=gram)
        if e == 2:
            torch.testing.assert_close(bal.p3.gram_ema, before, equal_nan=True)
        assert torch.isfinite(A).all()
        c = bal.p3.coefficients(bal.pi)
        assert torch.isfinite(c).all() and float(c.sum()) == pytest.approx(1.0) and float(c.min()) >= 0.05 - 1e-9
    with pytest.raises(ValueError, match="NaN"):
        bal.update(gram=torch.full((3, 3), float("nan")))


def test_min_norm_base_state_round_trip_is_exact_and_reorders():
    bs = _batches(epochs=10, drift=(0.3, 0.2, 0.05))
    kw = dict(warmup_epochs=2, min_norm_base=True, conflict_source="proxy")
    a = APEX([1, 1, 1], names=["x", "y", "z"], **kw)
    _run(a, bs[:5])
    state = a.state_dict()
    b = APEX([1, 1, 1], names=["x", "y", "z"], **kw)
    b.load_state_dict({k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()})
    assert _run(a, bs[5:]) == _run(b, bs[5:])
    torch.testing.assert_close(a.p3.gram_ema, b.p3.gram_ema, atol=0, rtol=0)
    # the same state loaded by a balancer whose rewards are listed in another order: both axes permuted
    c = APEX([1, 1, 1], names=["z", "x", "y"], **kw)
    c.load_state_dict(state)
    order = [2, 0, 1]
    torch.testing.assert_close(c.p3.gram_ema, torch.as_tensor(state["gram_ema"])[order][:, order])
    torch.testing.assert_close(c.p3.base, torch.as_tensor(state["base"])[order])
    # an older state without the min-norm fields loads (the base starts afresh)
    old = {k: v for k, v in state.items() if k not in ("gram_ema", "base")}
    d = APEX([1, 1, 1], names=["x", "y", "z"], **kw)
    d.load_state_dict(old)
    assert torch.isnan(d.p3.gram_ema).all() and d.p3.base.tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="gram_ema"):
        APEX([1, 1, 1], **kw).load_state_dict({**state, "gram_ema": torch.zeros(2, 2), "names": None})


@pytest.mark.parametrize("field,value", [("beta_gram", 1.0), ("beta_gram", -0.1), ("min_norm_base", "yes"),
                                         ("learn_conflict", -1.0)])
def test_bad_fields_name_themselves(field, value):
    with pytest.raises(ValueError, match=field):
        BalanceConfig(method="apex", **{field: value}).validate()


def test_min_norm_base_off_is_the_plain_rule():
    """min_norm_base false (default): stage 2 uses pi itself, whatever Gram update() gets."""
    bs = _batches(epochs=8)
    a = APEX([1, 1, 1], warmup_epochs=2)
    b = APEX([1, 1, 1], warmup_epochs=2, min_norm_base=False)
    G = [torch.eye(3) * (k + 1) for k in range(8)]
    _run(a, bs), _run(b, bs, G)
    torch.testing.assert_close(a.p3.coefficients(a.pi), a.pi)
    assert not a.cfg.min_norm_base
