"""APEX's opt-in dual_cone combination (SPEC 4): UPGrad with the priorities as its preference vector.
Hand-computed cases, the no-conflict identity, permutation and Gram-scale invariance, degenerate input,
exact state round trip, config errors naming the field."""
from __future__ import annotations

import pytest
import torch

from apex_fast.balance import APEX, BalanceConfig
from apex_fast.balance.aggregators import upgrad_coefficients
from apex_fast.ops import dual_stage_advantages

torch.set_num_threads(1)

G2 = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)  # cos -0.5


def _batch(K, seed=0, n=32, group=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g), torch.arange(n) // group


def test_weighted_upgrad_hand_computed():
    """pref (0.8, 0.2), cos -0.5: row 1 min over v >= (0.8, 0) of v^T G v -> (0.8, 0.4); row 2 -> (0.1, 0.2);
    c = (0.9, 0.6), and G c = (0.6, 0.15) >= 0: no conflict left."""
    c = upgrad_coefficients(G2, torch.tensor([0.8, 0.2])).double()
    torch.testing.assert_close(c, torch.tensor([0.9, 0.6], dtype=torch.float64))
    assert bool((G2 @ c >= -1e-12).all())
    # the default preference is TorchJD's 1/K
    torch.testing.assert_close(upgrad_coefficients(G2).double(), upgrad_coefficients(G2, torch.full((2,), 0.5)).double())
    with pytest.raises(ValueError, match="pref"):
        upgrad_coefficients(G2, torch.tensor([0.5, -0.1]))


def test_apex_dual_cone_uses_the_gram_from_update():
    bal = APEX([0.8, 0.2], warmup_epochs=100, warmup_priority="weights", dual_cone=True, kappa=0.0)
    assert bal.wants_gram
    R, gid = _batch(2)
    A0, st0 = bal.advantages(R, gid)  # no Gram yet: c = pi
    assert [st0["coef/r0"], st0["coef/r1"]] == pytest.approx([0.8, 0.2])
    bal.update(gram=G2)
    A, st = bal.advantages(R, gid)
    c = torch.tensor([0.6, 0.4])
    assert [st["coef/r0"], st["coef/r1"]] == pytest.approx(c.tolist(), rel=1e-6)
    assert [st["priority/r0"], st["priority/r1"]] == pytest.approx([0.8, 0.2])  # pi itself is untouched
    assert not any(k.startswith("min_norm/") for k in st)  # the min-norm base is not in use
    ref, _, _ = dual_stage_advantages(R, gid, c, std_floor=torch.zeros(2), eps=1e-4, clip=5.0)
    torch.testing.assert_close(A, ref)
    torch.testing.assert_close(bal.cone_gram, G2)  # the first Gram, scaled to mean diagonal 1
    # an epoch without gradient signal keeps the last Gram
    bal.update(gram=torch.zeros(2, 2))
    _, st = bal.advantages(R, gid)
    assert [st["coef/r0"], st["coef/r1"]] == pytest.approx(c.tolist(), rel=1e-6)


def test_apex_dual_cone_gram_is_an_ema_of_the_normalised_grams():
    """G = EMA_beta_cone(G_t / mean diag G_t): a Gram ten times larger weighs the same; beta_cone 0 is the last."""
    Ga = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
    Gb = torch.tensor([[20.0, 4.0], [4.0, 20.0]], dtype=torch.float64)  # no conflict, 20x the scale
    R, gid = _batch(2)
    for beta in (0.0, 0.7):
        bal = APEX([0.8, 0.2], warmup_epochs=100, warmup_priority="weights", dual_cone=True, beta_cone=beta)
        for G in (Ga, Gb):
            bal.advantages(R, gid)
            bal.update(gram=G)
        ema = beta * Ga + (1 - beta) * Gb / 20.0
        torch.testing.assert_close(bal.cone_gram, ema)
        _, st = bal.advantages(R, gid)
        ref = upgrad_coefficients(ema, torch.tensor([0.8, 0.2])).double()
        assert [st["coef/r0"], st["coef/r1"]] == pytest.approx((ref / ref.sum()).tolist(), rel=1e-6)


def test_apex_dual_cone_is_pi_where_nothing_conflicts():
    G = torch.tensor([[1.0, 0.3, 0.1], [0.3, 2.0, 0.0], [0.1, 0.0, 0.5]], dtype=torch.float64)
    bal = APEX([0.5, 0.3, 0.2], warmup_epochs=100, warmup_priority="weights", dual_cone=True)
    R, gid = _batch(3)
    bal.advantages(R, gid)
    bal.update(gram=G)
    _, st = bal.advantages(R, gid)
    assert [st[f"coef/r{k}"] for k in range(3)] == pytest.approx([0.5, 0.3, 0.2], rel=1e-6)


def test_apex_dual_cone_permutation_and_gram_scale():
    G = torch.tensor([[2.0, -0.9, 0.3], [-0.9, 1.0, -0.2], [0.3, -0.2, 0.7]], dtype=torch.float64)
    perm = [2, 0, 1]
    w = torch.tensor([0.5, 0.3, 0.2])
    kw = dict(warmup_epochs=100, warmup_priority="weights", dual_cone=True)
    a, b, s = APEX(w, **kw), APEX(w[perm], **kw), APEX(w, **kw)
    R, gid = _batch(3, seed=3)
    for bal, RR, GG in ((a, R, G), (b, R[:, perm], G[perm][:, perm]), (s, R, G * 1e4)):
        bal.advantages(RR, gid)
        bal.update(gram=GG)
    (Aa, sa), (Ab, sb), (As, ss) = a.advantages(R, gid), b.advantages(R[:, perm], gid), s.advantages(R, gid)
    ca = torch.tensor([sa[f"coef/r{k}"] for k in range(3)])
    cb = torch.tensor([sb[f"coef/r{k}"] for k in range(3)])
    cs = torch.tensor([ss[f"coef/r{k}"] for k in range(3)])
    torch.testing.assert_close(cb, ca[perm])
    torch.testing.assert_close(cs, ca)
    torch.testing.assert_close(Ab, Aa)
    assert float((ca - w).abs().max()) > 0.01  # the conflicts did move the coefficients
    assert bool((G @ ca.double() >= -1e-9).all())  # and the direction conflicts with none of them


def test_apex_dual_cone_state_round_trip_is_exact_and_reorders():
    G = torch.tensor([[2.0, -0.9, 0.3], [-0.9, 1.0, -0.2], [0.3, -0.2, 0.7]], dtype=torch.float64)
    kw = dict(warmup_epochs=2, dual_cone=True)
    a = APEX([1, 1, 1], names=["x", "y", "z"], **kw)
    batches = [_batch(3, seed=s) for s in range(8)]
    for R, gid in batches[:4]:
        a.advantages(R, gid)
        a.update(gram=G)
    state = a.state_dict()
    b = APEX([1, 1, 1], names=["x", "y", "z"], **kw)
    b.load_state_dict({k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()})
    for R, gid in batches[4:]:
        (Aa, sa), (Ab, sb) = a.advantages(R, gid), b.advantages(R, gid)
        torch.testing.assert_close(Aa, Ab, atol=0, rtol=0)
        assert sa == sb
        assert a.update(gram=G * 1.1) == b.update(gram=G * 1.1)
    c = APEX([1, 1, 1], names=["z", "x", "y"], **kw)
    c.load_state_dict(state)
    order = [2, 0, 1]
    torch.testing.assert_close(c.cone_gram, torch.as_tensor(state["cone_gram"])[order][:, order])
    old = {k: v for k, v in state.items() if k != "cone_gram"}  # a state from before dual_cone loads
    d = APEX([1, 1, 1], names=["x", "y", "z"], **kw)
    d.load_state_dict(old)
    assert torch.isnan(d.cone_gram).all()


@pytest.mark.parametrize("kw,field", [(dict(dual_cone="yes"), "dual_cone"), (dict(dual_cone=True, min_norm_base=True), "dual_cone"),
                                      (dict(dual_cone=True, beta_cone=1.0), "beta_cone"),
                                      (dict(dual_cone=True, beta_cone=-0.1), "beta_cone")])
def test_dual_cone_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        BalanceConfig(method="apex", **kw).validate()
