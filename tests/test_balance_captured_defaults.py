"""APEX's defaults when the trainer captures the per-objective gradients (balance.gradients one_backward /
k_backward): the dual cone of CAPTURED_GRADIENT_DEFAULTS for every field the user did not set, nothing
else changed; and the algorithm benchmark's apex-1bw is exactly that configuration."""
import dataclasses

import pytest

from apex_fast.balance import BalanceConfig
from apex_fast.balance.config import CAPTURED_GRADIENT_DEFAULTS
from apex_fast.config import load_config

TINY = "configs/tiny_cpu.yaml"


def _balance(*sets):
    return load_config(TINY, list(sets)).balance


def test_apex_with_captured_gradients_gets_the_cone_defaults():
    for mode in ("one_backward", "k_backward"):
        b = _balance("balance.method=apex", f"balance.gradients={mode}")
        assert {k: getattr(b, k) for k in CAPTURED_GRADIENT_DEFAULTS} == CAPTURED_GRADIENT_DEFAULTS
    plain = BalanceConfig()
    # every other field keeps its default
    b = _balance("balance.method=apex", "balance.gradients=one_backward")
    others = {f.name for f in dataclasses.fields(BalanceConfig)} - set(CAPTURED_GRADIENT_DEFAULTS) - {"method", "gradients"}
    assert {k: getattr(b, k) for k in others} == {k: getattr(plain, k) for k in others}


@pytest.mark.parametrize("sets,want", [
    (["balance.method=apex"], {"dual_cone": False, "gram_estimate": "batch", "conflict_damping": 1.0}),  # the proxy
    (["balance.method=mgda", "balance.gradients=one_backward"], {"dual_cone": False, "gram_estimate": "batch"}),
    (["balance.method=apex", "balance.gradients=one_backward", "balance.dual_cone=false"],
     {"dual_cone": False, "cone_kl": False, "gram_metric": "parameters", "conflict_damping": 1.0}),
    (["balance.method=apex", "balance.gradients=one_backward", "balance.min_norm_base=true"],
     {"dual_cone": False, "min_norm_base": True}),
    # a field the user sets is kept, the others still default
    (["balance.method=apex", "balance.gradients=one_backward", "balance.beta_cone=0.5"],
     {"dual_cone": True, "beta_cone": 0.5, "cone_min_learn": 0.25}),
    # no KL term: no cone_kl; the batch estimate: no persistence gate (it needs the previous epoch)
    (["balance.method=apex", "balance.gradients=one_backward", "train.kl_beta=0"], {"dual_cone": True, "cone_kl": False}),
    (["balance.method=apex", "balance.gradients=one_backward", "balance.gram_estimate=batch"],
     {"dual_cone": True, "gram_estimate": "batch", "cone_min_persistence": 0.0, "gram_metric": "adam"}),
])
def test_what_the_user_sets_or_turns_off_wins(sets, want):
    b = _balance(*sets)
    assert {k: getattr(b, k) for k in want} == want


def test_the_defaults_pass_validation_and_save_as_set(tmp_path):
    """The run folder's config.yaml holds the resolved values, so a resume or a re-run reads the same."""
    from apex_fast.config import save_config

    cfg = load_config(TINY, ["balance.method=apex", "balance.gradients=one_backward"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.balance == cfg.balance


def test_bench_apex_1bw_is_the_trainers_configuration():
    import bench.algorithm as A

    want = BalanceConfig(method="apex", gradients="one_backward").with_captured_gradient_defaults()
    assert A.make_cfg("apex-1bw") == want
    assert A.gram_measurement("apex-1bw") == "cross_epoch+adam"
    assert A.parse_gram_measurement(A.gram_measurement("apex-1bw")) == (1.0, True)


def test_the_run_banner_says_what_apex_runs(tmp_path):
    """A user who sets only gradients: one_backward is told at the start that APEX runs the dual cone."""
    from apex_fast.train import Trainer

    from test_grad_training import make_cfg

    banner = Trainer(make_cfg(tmp_path, "balance.method=apex", "balance.gradients=one_backward")).banner()
    assert "per-objective gradients" in banner and "one_backward (Gram: cross_epoch, adam metric)" in banner
    assert "APEX dual cone, beta_cone 0.9, KL term counted" in banner
    plain = Trainer(make_cfg(tmp_path, "balance.method=apex", name="proxy")).banner()
    assert "per-objective gradients" not in plain
