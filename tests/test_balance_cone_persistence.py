"""APEX's cone_min_persistence: objectives whose gradient persistence (EMA of the cosine of each epoch's
gradient with the previous one, grad.EpochGram with cross_epoch) is below it stay outside the dual cone.
The EMA, the members, the state, the errors, and the trainer handing the persistence over."""
import csv
from pathlib import Path

import pytest
import torch

from apex_fast.balance import BalanceConfig, make_balancer
from apex_fast.train import Trainer

from test_grad_training import make_cfg

torch.set_num_threads(1)

G = torch.tensor([[1.0, -0.9], [-0.9, 4.0]])  # b's gradient twice as long, strongly opposed: the cone acts


def _apex(**over):
    cfg = BalanceConfig(method="apex", dual_cone=True, conflict_damping=0.0, warmup_epochs=0,
                        gradients="one_backward", gram_estimate="cross_epoch", beta_cone=0.5, **over)
    return make_balancer(cfg, [0.5, 0.5], ["a", "b"])


def _rewards(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 2, generator=g), torch.arange(8).repeat_interleave(4)


def test_persistence_ema_starts_at_zero_and_gates_the_members():
    """EMA from 0 with beta_cone: (0.5, 0.1) then (0.5, 0.1) -> (0.25, 0.05) -> (0.375, 0.075). With 0.3,
    a joins on the second epoch and b never; b keeps its priority (two objectives: the cone over a alone
    is c = pi), where the plain cone moves both coefficients."""
    R, gid = _rewards(0)
    gated, plain = _apex(cone_min_persistence=0.3), _apex()
    p = torch.tensor([0.5, 0.1])
    gated.advantages(R, gid)
    stats = gated.update(gram=G, persistence=p)
    torch.testing.assert_close(gated.cone_persist, torch.tensor([0.25, 0.05], dtype=torch.float64))
    assert stats["persistence/a"] == pytest.approx(0.25)
    assert gated.cone_members.tolist() == [False, False]  # nothing measured well enough yet: no cone
    _, s1 = gated.advantages(R, gid)
    assert s1["cone_member/a"] == 0.0 and s1["coef/a"] == pytest.approx(float(gated.priorities[0] / gated.priorities.sum()), rel=1e-6)
    gated.update(gram=G, persistence=p)
    torch.testing.assert_close(gated.cone_persist, torch.tensor([0.375, 0.075], dtype=torch.float64))
    assert gated.cone_members.tolist() == [True, False]
    for _ in range(2):
        plain.advantages(R, gid)
        plain.update(gram=G, persistence=p)  # off: the persistence is kept for the log, the members are all
    assert plain.cone_members.tolist() == [True, True]
    _, sg = gated.advantages(R, gid)
    _, sp = plain.advantages(R, gid)
    pi = gated.priorities
    assert sg["coef/a"] == pytest.approx(float(pi[0] / pi.sum()), rel=1e-6)
    assert sp["coef/a"] != pytest.approx(sg["coef/a"], rel=1e-3)
    # both persistent: the plain cone exactly
    gated.cone_persist = torch.tensor([0.9, 0.9], dtype=torch.float64)
    assert gated.advantages(R, gid)[1]["coef/a"] == pytest.approx(sp["coef/a"], rel=1e-12)


def test_persistence_needs_a_gram_and_is_kept_without_one():
    """An epoch without a Gram (nothing captured) or with non-finite persistence leaves the EMA as it was."""
    R, gid = _rewards(1)
    a = _apex(cone_min_persistence=0.1)
    a.advantages(R, gid)
    a.update(gram=G, persistence=torch.tensor([0.4, 0.2]))
    before = a.cone_persist.clone()
    a.advantages(R, gid)
    a.update(gram=None, persistence=torch.tensor([0.9, 0.9]))
    a.advantages(R, gid)
    a.update(gram=G, persistence=torch.tensor([float("nan"), 0.9]))
    torch.testing.assert_close(a.cone_persist, before)


def test_persistence_state_round_trip_and_bad_input():
    R, gid = _rewards(2)
    a = _apex(cone_min_persistence=0.1)
    a.advantages(R, gid)
    a.update(gram=G, persistence=torch.tensor([0.6, -0.2]))
    b = _apex(cone_min_persistence=0.1)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.cone_persist, a.cone_persist)
    assert a.advantages(R, gid)[1] == b.advantages(R, gid)[1]
    state = a.state_dict()
    state["cone_persist"] = torch.zeros(3)
    with pytest.raises(ValueError, match="'cone_persist' has 3 values, expected K = 2"):
        b.load_state_dict(state)
    del state["cone_persist"]  # a checkpoint from before the option: the EMA starts again from 0
    c = _apex(cone_min_persistence=0.1)
    c.load_state_dict(state)
    assert torch.equal(c.cone_persist, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"persistence must be \[K\] = \[2\]"):
        a.update(gram=G, persistence=torch.zeros(3))


@pytest.mark.parametrize("over,match", [
    ({"dual_cone": True, "gradients": "one_backward", "gram_estimate": "cross_epoch", "cone_min_persistence": 1.0},
     r"balance.cone_min_persistence must be in \[0, 1\)"),
    ({"cone_min_persistence": 0.1}, "balance.cone_min_persistence applies to the dual cone: set dual_cone: true"),
    ({"dual_cone": True, "cone_min_persistence": 0.1},
     "balance.cone_min_persistence needs each gradient next to the previous epoch's: set gram_estimate: cross_epoch"),
    ({"dual_cone": True, "cone_min_persistence": "high"}, "balance.cone_min_persistence must be a finite number"),
])
def test_cone_min_persistence_errors_name_the_field(over, match):
    with pytest.raises(ValueError, match=match):
        BalanceConfig(method="apex", **over).validate()


def test_the_trainer_hands_the_persistence_to_apex(tmp_path):
    """Three epochs of APEX's cone with one_backward and cross_epoch: update() gets EpochGram's persistence
    (None after the first epoch, [K] cosines after the others) and the log has the EMA and the members."""
    cfg = make_cfg(tmp_path, "train.epochs=3", "balance.method=apex", "balance.gradients=one_backward",
                   "balance.dual_cone=true", "balance.conflict_damping=0", "balance.gram_estimate=cross_epoch",
                   "balance.cone_min_persistence=0.05", "balance.warmup_epochs=0")
    tr = Trainer(cfg)
    got, real_update = [], tr.balancer.update

    def spy(gram=None, kl_products=None, persistence=None):
        got.append((persistence, tr.learner.epoch_gram.persistence))
        return real_update(gram, kl_products, persistence)

    tr.balancer.update = spy
    tr.fit()
    assert len(got) == 3 and got[0][0] is None
    for p, est in got[1:]:
        assert p is not None and p.shape == (3,) and bool(((p >= -1) & (p <= 1)).all())
        torch.testing.assert_close(p, est)
    b = cfg.balance.beta_cone  # EMA from 0
    ema = (1 - b) * got[1][0] * b + (1 - b) * got[2][0]
    torch.testing.assert_close(tr.balancer.cone_persist, ema.double())
    rows = list(csv.DictReader((Path(cfg.log.output_dir) / "metrics.csv").open()))
    names = ("jpeg_compressibility", "colorfulness", "contrast")
    assert float(rows[-1][f"persistence/{names[0]}"]) == pytest.approx(float(ema[0]), rel=1e-5)
    assert all(rows[-1][f"cone_member/{n}"] in ("0.0", "1.0") for n in names)
