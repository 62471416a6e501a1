"""balance.* config: SPEC defaults, validation errors that name the field, make_balancer wiring."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from apex_fast.balance import APEX, METHODS, BalanceConfig, make_balancer


def test_spec_defaults():
    c = BalanceConfig()
    assert (c.kappa, c.beta_s, c.eps, c.adv_clip) == (0.1, 0.9, 1e-4, 5.0)
    assert (c.beta_fast, c.beta_slow, c.delta) == (0.9, 0.95, 3.0)
    assert (c.need_lookahead, c.conflict_damping, c.damping_power, c.need_clip) == (1.0, 1.0, 2.0, 1.0)
    assert (c.learn_ratio, c.learn_after, c.spread_ratio, c.need_deadband) == (0.25, 0.2, 0.5, 0.05)
    assert (c.a_l, c.a_n, c.a_i, c.i_clip, c.lam, c.pi_min, c.rho, c.warmup_epochs) == (1.0, 3.0, 0.0, 10.0, 0.0, 0.05, 0.99, 5)
    assert (c.famo_lr, c.famo_decay) == (0.025, 0.001)
    assert c.cagrad_alpha == 0.5 and c.conflict_source == "auto" and c.targets is None
    c.validate()


@pytest.mark.parametrize("field,value", [
    ("method", "nash"), ("eps", 0.0), ("adv_clip", -1.0), ("kappa", -0.1), ("beta_s", 1.0),
    ("beta_fast", -0.1), ("beta_slow", 1.5), ("beta_conflict", 1.0), ("delta", float("nan")), ("delta", 0.0),
    ("need_clip", 0.0), ("need_lookahead", -1.0), ("damping_power", -1.0), ("conflict_damping", 1.5), ("learn_ratio", -0.1),
    ("learn_after", float("inf")), ("spread_ratio", -0.5), ("need_deadband", -0.1), ("a_i", -1.0),
    ("i_clip", float("nan")), ("famo_lr", -1.0), ("famo_decay", "x"),
    ("a_l", -1.0), ("a_n", -1.0), ("lam", -2.0), ("temperature", 0.0), ("pi_min", 1.0), ("rho", 1.1),
    ("warmup_epochs", -1), ("warmup_epochs", 2.5), ("warmup_priority", "random"), ("conflict_source", "both"),
    ("cagrad_alpha", -0.5), ("pcgrad_seed", 1.5), ("aggregator_renorm", "yes"), ("targets", 3.0),
    ("targets", [1.0, "high"]), ("kappa", "0.1"),
])
def test_validation_names_the_field(field, value):
    cfg = dataclasses.replace(BalanceConfig(), **{field: value})
    name = field if field != "targets" or not isinstance(value, list) else "targets[1]"
    with pytest.raises(ValueError, match=rf"balance\.{name.replace('[', '.').replace(']', '.')}"):
        cfg.validate()


def test_validation_that_depends_on_K():
    with pytest.raises(ValueError, match=r"balance\.pi_min"):
        make_balancer(BalanceConfig(method="apex", pi_min=0.3), [1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"balance\.targets"):
        make_balancer(BalanceConfig(method="apex", targets=[1.0, None]), [1, 1, 1])
    with pytest.raises(ValueError, match=r"balance\.kappa"):
        APEX([1, 1], kappa=-1)  # keyword overrides are validated too
    with pytest.raises(ValueError, match="weight"):
        APEX([1, -1])
    with pytest.raises(ValueError, match="names"):
        APEX([1, 1], names=["a"])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_registered_and_logs_diagnostics(method):
    bal = make_balancer(BalanceConfig(method=method), [2, 1], ["ocr", "pick"])
    assert bal.name == method
    R = torch.tensor([[0.0, 0.1], [1.0, 0.2], [0.0, 0.3], [1.0, 0.1]])
    A, s = bal.advantages(R, torch.tensor([0, 0, 1, 1]))
    for key in ("hijack_share", "effective_share", "priority", "usable", "std_floor"):
        assert f"{key}/ocr" in s and f"{key}/pick" in s
    u = bal.update(gram=torch.eye(2) if bal.wants_gram else None)
    for key in ("L", "C", "N"):
        assert f"{key}/ocr" in u
    assert all(isinstance(v, float) for v in {**s, **u}.values())
