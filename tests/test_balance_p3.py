"""P^3 adaptive priorities (SPEC 4, revised) and the FAMO baseline: hand-computed epochs, properties
(permutation of objectives, invariance to reward scale and shift, degenerate and NaN input) and exact
state round trips."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apex_fast.balance import APEX, BalanceConfig, FAMOBalancer, make_balancer

torch.set_num_threads(1)
EPS = 1e-4


def _run(bal, batches):
    out = []
    for R, gid in batches:
        bal.advantages(R, gid)
        out.append(bal.update())
    return out


def _batches(K=3, epochs=12, seed=0, drift=(0.3, 0.1, 0.0)):
    """Rewards whose means drift up at different speeds (objective 0 fastest)."""
    g = torch.Generator().manual_seed(seed)
    gid = torch.arange(32) // 8
    out = []
    for e in range(epochs):
        R = torch.randn(32, K, generator=g)
        R += torch.tensor(drift[:K]) * e
        out.append((R, gid))
    return out


def test_p3_hand_computed_two_epochs():
    """p, N, L, C, scores and pi over two epochs, recomputed from SPEC 4's formulas."""
    bal = APEX([1.0, 1.0], kappa=0.0, warmup_epochs=0, conflict_source="proxy", lam=2.0, rho=0.0, a_n=2.0,
               damping_power=2.0, need_deadband=0.05, spread_ratio=0.0)
    # epoch 0: the two objectives' advantages are exact opposites (corr -1 -> C = 1)
    R0 = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.0, 0.0], [2.0, -2.0]])
    _, st = bal.advantages(R0, torch.tensor([0, 0, 1, 1]))
    assert st["priority/r0"] == pytest.approx(0.5)
    u0 = bal.update()
    r0, sd0 = 0.75, math.sqrt(np.var([0.0, 1.0, 0.0, 2.0]))
    for n in ("r0", "r1"):  # no progress yet: N = 0, L = 1, C = 1 -> equal scores
        assert (u0[f"p/{n}"], u0[f"N/{n}"], u0[f"L/{n}"]) == pytest.approx((0.0, 0.0, 1.0))
        assert u0[f"C/{n}"] == pytest.approx(1.0, abs=1e-6)
        assert u0[f"priority_next/{n}"] == pytest.approx(0.5)
    # epoch 1: objective 0's mean rises by x, objective 1's stays; advantages uncorrelated (C -> 0.7)
    x = 4.0
    sgn0 = [-1, 1, -1, 1, -1, 1, -1, 1]
    sgn1 = [-1, 1, 1, -1, -1, 1, 1, -1]
    R1 = torch.tensor([[r0 + x + 0.5 * a, -r0 + 0.5 * b] for a, b in zip(sgn0, sgn1)])
    bal.advantages(R1, torch.arange(8) // 2)
    u1 = bal.update()
    ef0, es0 = 0.9 * r0 + 0.1 * (r0 + x), 0.95 * r0 + 0.05 * (r0 + x)
    p0, v0 = (ef0 - r0) / sd0, (ef0 - es0) / sd0
    q = np.array([p0 + v0, 0.0])  # projected progress, lookahead 1
    gap = q.mean() - q
    N = np.clip(np.sign(gap) * np.maximum(np.abs(gap) - 0.05, 0), -1, 1)  # deadband 0.05, clip 1
    pbar = p0 / 2
    assert pbar > 0.2  # learnability active: objective 1 made no progress -> L = 0
    L = np.array([1.0, 0.0])
    C = 0.7 * 1.0 + 0.3 * 0.0
    assert u1["p/r0"] == pytest.approx(p0, rel=1e-6) and u1["v/r0"] == pytest.approx(v0, rel=1e-6)
    assert [u1["N/r0"], u1["N/r1"]] == pytest.approx(N.tolist(), rel=1e-6)
    assert [u1["L/r0"], u1["L/r1"]] == pytest.approx(L.tolist())
    assert u1["C/r0"] == pytest.approx(C, abs=1e-6) and u1["C/r1"] == pytest.approx(C, abs=1e-6)
    s = np.log(L + EPS) + 2.0 * (1 - C) ** 2 * N - 2.0 * C * (N < 0)
    pihat = np.exp(s) / np.exp(s).sum()
    pihat = np.where(pihat < 0.05, 0.05, 0.95)  # floor at pi_min, the rest renormalised
    assert [u1["priority_next/r0"], u1["priority_next/r1"]] == pytest.approx(pihat.tolist(), rel=1e-6)


def test_lagging_objective_gains_priority_and_stalled_one_is_floored():
    # objective 2 lags (slower drift) -> highest priority; without learnability a stalled objective would win
    bal = APEX([1, 1, 1], warmup_epochs=2)
    u = _run(bal, _batches(drift=(0.3, 0.3, 0.15), epochs=25))[-1]
    pri = [u[f"priority_next/r{k}"] for k in range(3)]
    assert pri[2] > max(pri[0], pri[1]) and sum(pri) == pytest.approx(1.0)
    stalled = APEX([1, 1, 1], warmup_epochs=2, rho=0.0)
    u = _run(stalled, _batches(drift=(0.3, 0.3, 0.0), epochs=25))[-1]
    assert u["L/r2"] < 0.5 and u["priority_next/r2"] == pytest.approx(0.05)  # at the floor pi_min
    no_l = APEX([1, 1, 1], warmup_epochs=2, rho=0.0, a_l=0.0)
    u = _run(no_l, _batches(drift=(0.3, 0.3, 0.0), epochs=25))[-1]
    assert u["priority_next/r2"] > 0.4


def test_baseline_averages_warmup_epochs_and_targets_set_the_unit():
    bal = APEX([1, 1], warmup_epochs=3)
    bs = _batches(K=2, epochs=5, drift=(0.5, 0.0))
    _run(bal, bs)
    expect = torch.stack([R.double().mean(0) for R, _ in bs[:3]]).mean(0)
    torch.testing.assert_close(bal.p3.r0, expect)
    assert bal.p3.n0.tolist() == [3.0, 3.0]
    # a target: progress counted in units of (target - r0) / delta
    t = APEX([1, 1], warmup_epochs=1, targets=[None, 10.0], delta=2.0)
    u = _run(t, bs)[-1]
    unit = (10.0 - float(t.p3.r0[1])) / 2.0
    assert u["p/r1"] == pytest.approx(float(t.p3.ema_fast[1] - t.p3.r0[1]) / unit, rel=1e-6)


def test_permutation_of_objectives_permutes_priorities():
    perm = [2, 0, 1]
    w = torch.tensor([0.5, 0.3, 0.2])
    a = APEX(w, warmup_epochs=2, lam=2.0)
    b = APEX(w[perm], warmup_epochs=2, lam=2.0)
    bs = _batches(drift=(0.3, 0.2, 0.05), epochs=15)
    ua = _run(a, bs)
    ub = _run(b, [(R[:, perm], g) for R, g in bs])
    torch.testing.assert_close(b.priorities, a.priorities[perm], atol=1e-6, rtol=0)
    assert ub[-1]["N/r0"] == pytest.approx(ua[-1]["N/r2"], abs=1e-6)


def test_invariant_to_reward_scale_and_shift():
    scale = torch.tensor([1e3, 1e-2, 7.0])
    shift = torch.tensor([-5.0, 100.0, 0.3])
    a = APEX([1, 1, 1], warmup_epochs=2)
    b = APEX([1, 1, 1], warmup_epochs=2)
    bs = _batches(drift=(0.3, 0.2, 0.05), epochs=15)
    _run(a, bs)
    _run(b, [(R * scale + shift, g) for R, g in bs])
    torch.testing.assert_close(b.priorities, a.priorities, atol=2e-4, rtol=0)


def test_degenerate_and_nan_rewards_keep_priorities_finite():
    bal = APEX([1, 1, 1], warmup_epochs=1)
    gid = torch.arange(16) // 4
    for e in range(8):
        R = torch.randn(16, 3, generator=torch.Generator().manual_seed(e))
        R[:, 1] = 0.5  # all equal, every epoch: no spread, no baseline std
        R[::3, 2] = float("nan")
        if e == 3:
            R[:, 0] = float("nan")  # a whole failed column
        A, _ = bal.advantages(R, gid)
        u = bal.update()
        assert torch.isfinite(A).all()
        pri = bal.priorities
        assert torch.isfinite(pri).all() and float(pri.sum()) == pytest.approx(1.0, abs=1e-6)
        assert float(pri.min()) >= 0.05 - 1e-6
        assert all(math.isfinite(v) for k, v in u.items() if k.split("/")[0] in ("L", "N", "p", "C"))
    assert u["N/r1"] == 0.0  # never observed with a spread: no baseline, no need


def test_p3_state_round_trip_is_exact_and_old_states_load():
    bs = _batches(epochs=10)
    a = APEX([1, 1, 1], warmup_epochs=3, lam=2.0)
    _run(a, bs[:4])  # mid-baseline window (n0 = 3 reached at epoch 3)
    state = a.state_dict()
    b = APEX([1, 1, 1], warmup_epochs=3, lam=2.0)
    b.load_state_dict({k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()})
    ua, ub = _run(a, bs[4:]), _run(b, bs[4:])
    assert ua == ub
    torch.testing.assert_close(a.priorities, b.priorities, atol=0, rtol=0)
    assert {"sb0", "nb0", "integral"} <= set(state)
    old = {k: v for k, v in state.items() if k not in ("n0", "sb0", "nb0", "integral")}  # an older checkpoint
    c = APEX([1, 1, 1], warmup_epochs=3)
    c.load_state_dict(old)
    assert c.p3.n0.tolist() == [3.0, 3.0, 3.0] and c.p3.nb0.tolist() == [3.0, 3.0, 3.0]
    torch.testing.assert_close(c.p3.sb0, a_state_sbar := torch.as_tensor(state["sbar"], dtype=torch.float64))
    assert c.p3.integral.tolist() == [0.0, 0.0, 0.0] and torch.isfinite(a_state_sbar).all()


def test_need_deadband_hand_computed():
    """N_k = clip(sign(g) max(|g| - deadband, 0), +-need_clip), g = qbar - q_k: gaps inside the deadband are 0."""
    bs = _batches(drift=(0.3, 0.28, 0.1), epochs=12)
    out = {}
    for d in (0.0, 0.05, 0.5):
        bal = APEX([1, 1, 1], warmup_epochs=2, need_deadband=d, need_clip=10.0)  # the rewards do not depend on pi
        out[d] = _run(bal, bs)[-1]
    g = np.array([out[0.0][f"N/r{k}"] for k in range(3)])  # no deadband: the raw gaps (all within the clip)
    assert np.abs(g).max() < 10 and abs(g.sum()) < 1e-9 and np.abs(g).min() > 0.05
    for d in (0.05, 0.5):
        expect = np.sign(g) * np.maximum(np.abs(g) - d, 0)
        assert [out[d][f"N/r{k}"] for k in range(3)] == pytest.approx(expect.tolist(), abs=1e-9)


def _saturating_batches(epochs=30, collapse_at=12, seed=1):
    """Three objectives with equal spread; objective 2's in-group spread falls to 5% from collapse_at on
    (a reward that went flat where the policy samples), the others keep theirs."""
    g = torch.Generator().manual_seed(seed)
    gid = torch.arange(32) // 8
    out = []
    for e in range(epochs):
        R = torch.randn(32, 3, generator=g) + 0.2 * e
        if e >= collapse_at:
            R[:, 2] = 0.2 * e + 0.05 * torch.randn(32, generator=g)
        out.append((R, gid))
    return out


def test_spread_term_hand_computed_and_withdraws_a_saturated_objective():
    """L_k = L_progress_k * clip(z_k / (spread_ratio * zbar), 0, 1), z_k = sbar_k / sbar0_k."""
    bal = APEX([1, 1, 1], warmup_epochs=2, spread_ratio=0.5, learn_ratio=0.0, rho=0.0)  # spread part alone
    u = _run(bal, _saturating_batches())[-1]
    z = (bal.p3.sbar / bal.p3.sb0).numpy()
    L = np.clip(z / (0.5 * z.mean()), 0, 1)
    assert L[2] < 0.6 and L[0] == L[1] == 1.0  # the collapsed objective (sbar is an EMA: still falling), not the others
    assert [u[f"L/r{k}"] for k in range(3)] == pytest.approx(L.tolist(), rel=1e-9)
    # it loses priority; without the spread term it would not (its progress is the same as the others')
    off = APEX([1, 1, 1], warmup_epochs=2, spread_ratio=0.0, learn_ratio=0.0, rho=0.0)
    _run(off, _saturating_batches())
    assert float(bal.priorities[2]) < float(off.priorities[2]) - 0.05
    assert float(off.priorities[2]) > 0.25


def test_integral_action_accumulates_the_need():
    bs = _batches(drift=(0.3, 0.3, 0.15), epochs=15)
    bal = APEX([1, 1, 1], warmup_epochs=2, a_i=0.05, i_clip=10.0)
    total = np.zeros(3)
    for i, (R, gid) in enumerate(bs):
        bal.advantages(R, gid)
        u = bal.update()
        if i >= 2:  # accumulated after the warm-up epochs
            total += [u[f"N/r{k}"] for k in range(3)]
    np.testing.assert_allclose(bal.p3.integral.numpy(), np.clip(total, -10, 10), atol=1e-12)
    assert total[2] > 0  # the slow objective was behind


@pytest.mark.parametrize("lead", [0.0, 0.5, 1.0])
def test_need_lead_scales_only_the_negative_need(lead):
    """s_k = a_L log(L_k + eps) + (1 - C_k)^2 a_N (max(N_k, 0) + need_lead min(N_k, 0)): pi recomputed from
    the logged L, C, N (rho 0, so pi is this epoch's pihat, floored)."""
    bs = _batches(drift=(0.3, 0.2, 0.05), epochs=14)
    bal = APEX([1, 1, 1], warmup_epochs=2, rho=0.0, need_lead=lead, a_n=3.0, pi_min=0.0)
    u = _run(bal, bs)[-1]
    L, C, N = (np.array([u[f"{x}/r{k}"] for k in range(3)]) for x in ("L", "C", "N"))
    assert N.min() < 0 < N.max()  # both a leader and a laggard: the gain on the leader matters
    s = np.log(L + EPS) + (1 - C) ** 2 * 3.0 * (np.maximum(N, 0) + lead * np.minimum(N, 0))
    pihat = np.exp(s) / np.exp(s).sum()
    assert [u[f"priority_next/r{k}"] for k in range(3)] == pytest.approx(pihat.tolist(), rel=1e-6)


@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
def test_need_learn_power_scales_the_need_by_learnability(power):
    """s_k = a_L log(L_k + eps) + (1 - C_k)^2 a_N L_k^power (max(N_k, 0) + min(N_k, 0)): a reward that cannot be
    learned (no drift: L < 1) lags forever, and with power > 0 its lag no longer buys it priority."""
    bs = _batches(drift=(0.3, 0.25, 0.0), epochs=16)
    bal = APEX([1, 1, 1], warmup_epochs=2, rho=0.0, need_learn_power=power, a_n=3.0, pi_min=0.0)
    u = _run(bal, bs)[-1]
    L, C, N = (np.array([u[f"{x}/r{k}"] for k in range(3)]) for x in ("L", "C", "N"))
    assert L[2] < 0.5 and N[2] > 0  # the flat reward is behind and read as (mostly) unlearnable
    s = np.log(L + EPS) + (1 - C) ** 2 * 3.0 * L ** power * N
    pihat = np.exp(s) / np.exp(s).sum()
    assert [u[f"priority_next/r{k}"] for k in range(3)] == pytest.approx(pihat.tolist(), rel=1e-6)
    if power > 0:
        u0 = _run(APEX([1, 1, 1], warmup_epochs=2, rho=0.0, a_n=3.0, pi_min=0.0), bs)[-1]
        assert u["priority_next/r2"] < u0["priority_next/r2"]


def test_need_lead_bad_value_names_the_field():
    with pytest.raises(ValueError, match="need_lead"):
        BalanceConfig(method="apex", need_lead=-1.0).validate()
    with pytest.raises(ValueError, match="need_learn_power"):
        BalanceConfig(method="apex", need_learn_power=-1.0).validate()


# --------------------------------------------------------------------------- FAMO


def test_famo_hand_computed_update():
    bal = FAMOBalancer([1, 1], famo_lr=0.5, famo_decay=0.1)
    gid = torch.tensor([0, 0, 1, 1])
    R0 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    bal.advantages(R0, gid)
    bal.update()  # first epoch: no previous reward, no improvement
    torch.testing.assert_close(bal.logits, torch.zeros(2, dtype=torch.float64))
    R1 = R0 + torch.tensor([1.0, 0.0])  # objective 0 improves by 1 (= 2 baseline stds of 0.5)
    A, st = bal.advantages(R1, gid)
    u = bal.update()
    d = np.array([2.0, 0.0])
    z = np.array([0.5, 0.5])
    xi = -0.5 * (z * (d - z @ d))
    assert u["famo_improvement/r0"] == pytest.approx(2.0) and u["famo_improvement/r1"] == pytest.approx(0.0)
    np.testing.assert_allclose(bal.logits.numpy(), xi, rtol=1e-12)
    c = np.exp(xi) / np.exp(xi).sum()
    assert [u["coef_next/r0"], u["coef_next/r1"]] == pytest.approx(c.tolist())
    assert c[1] > c[0]  # the objective that improved less gets more weight


def test_famo_state_round_trip_and_method_name():
    bal = make_balancer(BalanceConfig(method="famo"), [0.5, 0.3, 0.2])
    assert isinstance(bal, FAMOBalancer) and not bal.wants_gram
    bs = _batches(epochs=8)
    _run(bal, bs[:4])
    other = make_balancer(BalanceConfig(method="famo"), [0.5, 0.3, 0.2])
    other.load_state_dict(bal.state_dict())
    assert _run(bal, bs[4:]) == _run(other, bs[4:])
    with pytest.raises(ValueError, match="method 'famo'"):
        make_balancer(BalanceConfig(method="apex"), [0.5, 0.3, 0.2]).load_state_dict(bal.state_dict())


def test_spread_term_permutation_and_scale_invariant():
    """The saturation part of L keeps P^3 equivariant to the order of the objectives and invariant to
    each reward's scale and offset (z_k is a ratio of the objective's own stds)."""
    bs = _saturating_batches()
    perm = [2, 0, 1]
    scale, shift = torch.tensor([1e3, 1e-2, 7.0]), torch.tensor([-5.0, 100.0, 0.3])
    a, b, c = (APEX([1, 1, 1], warmup_epochs=2, rho=0.0) for _ in range(3))
    ua = _run(a, bs)[-1]
    _run(b, [(R[:, perm], g) for R, g in bs])
    uc = _run(c, [(R * scale + shift, g) for R, g in bs])[-1]
    assert ua["L/r2"] < 1.0  # the spread part is active here
    torch.testing.assert_close(b.priorities, a.priorities[perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(c.priorities, a.priorities, atol=2e-4, rtol=0)
    assert uc["L/r2"] == pytest.approx(ua["L/r2"], abs=1e-4)
