"""balance.gram_estimate / gram_metric (apex_fast/grad/estimate.py): the batch Gram, the cross-epoch Gram
sym(J_t J_{t-1}^T) by polarization, AdamW's step metric; and their wiring in the trainer."""
import csv
from pathlib import Path

import pytest
import torch

from apex_fast.config import ConfigError
from apex_fast.grad import EpochGram, adam_step_scale
from apex_fast.train import Trainer

from test_grad_training import make_cfg

torch.set_num_threads(1)


def _blocks(seed, K=3, shapes=((5, 7), (1, 3), (11,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(K, *s, generator=g) for s in shapes]


def _flat(blocks, scale=None):
    if scale is not None:
        blocks = [b * s for b, s in zip(blocks, scale)]
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], 1).double()


def test_batch_gram_is_j_jt_and_keeps_no_history():
    est = EpochGram("batch")
    J = _blocks(0)
    torch.testing.assert_close(est(J), _flat(J) @ _flat(J).T, rtol=1e-5, atol=1e-5)
    assert est.prev is None


def test_cross_epoch_gram_is_the_symmetrised_product_of_two_epochs():
    est = EpochGram("cross_epoch")
    J1, J2, J3 = _blocks(1), _blocks(2), _blocks(3)
    torch.testing.assert_close(est(J1), _flat(J1) @ _flat(J1).T, rtol=1e-5, atol=1e-5)  # no previous epoch
    a, b = _flat(J2), _flat(J1)
    torch.testing.assert_close(est(J2), 0.5 * (a @ b.T + b @ a.T), rtol=1e-5, atol=1e-5)
    a, b = _flat(J3), _flat(J2)
    torch.testing.assert_close(est(J3), 0.5 * (a @ b.T + b @ a.T), rtol=1e-5, atol=1e-5)
    # the previous blocks are a copy: zeroing the capture buffers in place does not reach them
    for t in J3:
        t.zero_()
    assert float(_flat(est.prev).abs().sum()) > 0


def test_a_metric_weighs_every_coordinate():
    est = EpochGram("cross_epoch")
    J1, J2 = _blocks(4), _blocks(5)
    g = torch.Generator().manual_seed(6)
    P = [torch.rand(b.shape[1:], generator=g) + 0.1 for b in J1]
    est(J1, scale=P)
    a, b = _flat(J2, P), _flat(J1)
    torch.testing.assert_close(est(J2, scale=P), 0.5 * (a @ b.T + b @ a.T), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(EpochGram()(J2, scale=P), _flat(J2, P) @ _flat(J2).T, rtol=1e-5, atol=1e-5)


def test_cross_epoch_weight_blends_in_the_batch_gram():
    """w sym(J_t P J_{t-1}^T) + (1 - w) J_t P J_t^T; the first epoch is the batch Gram whatever w."""
    J1, J2 = _blocks(8), _blocks(9)
    g = torch.Generator().manual_seed(10)
    P = [torch.rand(b.shape[1:], generator=g) + 0.1 for b in J1]
    est = EpochGram("cross_epoch", 0.875)
    torch.testing.assert_close(est(J1, scale=P), _flat(J1, P) @ _flat(J1).T, rtol=1e-5, atol=1e-5)
    a, b = _flat(J2, P), _flat(J1)
    want = 0.875 * 0.5 * (a @ b.T + b @ a.T) + 0.125 * (a @ _flat(J2).T)
    torch.testing.assert_close(est(J2, scale=P), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="balance.cross_epoch_weight must be in"):
        EpochGram("cross_epoch", 1.5)


def test_persistence_is_each_gradients_cosine_with_its_previous_one():
    """cos(J_t,k, J_{t-1},k) in the metric P (both norms in this epoch's P), per objective; None for the
    batch estimate and the first cross epoch; unchanged by the blend weight."""
    J1, J2 = _blocks(11), _blocks(12)
    J2[1] = J2[1] * 0  # one block set to zero changes nothing but the norms
    g = torch.Generator().manual_seed(13)
    P = [torch.rand(b.shape[1:], generator=g) + 0.1 for b in J1]
    for w in (1.0, 0.5):
        est = EpochGram("cross_epoch", w)
        est(J1, scale=P)
        assert est.persistence is None
        est(J2, scale=P)
        a, b = _flat(J2, [s.sqrt() for s in P]), _flat(J1, [s.sqrt() for s in P])
        want = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        torch.testing.assert_close(est.persistence, want, rtol=1e-5, atol=1e-6)
    # the same gradient twice: 1; its negative: -1; a vanishing one: 0
    est = EpochGram("cross_epoch")
    est(J1)
    J1b = [b.clone() for b in J1]
    for b in J1b:
        b[1] = -b[1]
        b[2] = 0
    est(J1b)
    torch.testing.assert_close(est.persistence, torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    batch = EpochGram("batch")
    batch(J1)
    batch(J2)
    assert batch.persistence is None


def test_bad_estimate_names_the_field():
    with pytest.raises(ValueError, match="balance.gram_estimate must be batch or cross_epoch"):
        EpochGram("ema")


def test_adam_step_scale_is_adamw_per_coordinate_step_scale():
    """From a real torch AdamW after 3 steps: 1 / (sqrt(v_hat) + eps), v_hat = v / (1 - beta2^3), mean 1."""
    from apex_fast.runtime.engines import TorchEngine

    g = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    engine = object.__new__(TorchEngine)
    engine.optimizer = opt
    assert engine.exp_avg_sq(params) is None and adam_step_scale(None, 0, 0.99, 1e-6) is None
    grads = []
    for _ in range(3):
        step = [torch.randn(p.shape, generator=g) * (i + 1) for i, p in enumerate(params)]
        grads.append(step)
        for p, s in zip(params, step):
            p.grad = s.clone()
        opt.step()
    P = adam_step_scale(engine.exp_avg_sq(params), 3, 0.99, 1e-6)
    raw = []
    for i in range(2):
        v = sum(0.99 ** (2 - t) * 0.01 * grads[t][i] ** 2 for t in range(3))
        raw.append(1 / ((v / (1 - 0.99**3)).sqrt() + 1e-6))
    n = sum(r.numel() for r in raw)
    mean = sum(float(r.sum()) for r in raw) / n
    for got, want in zip(P, raw):
        torch.testing.assert_close(got, want / mean, rtol=1e-5, atol=0)
    assert abs(sum(float(p.sum()) for p in P) / n - 1) < 1e-5


@pytest.mark.parametrize("override,match", [
    ("balance.gram_estimate=ema", "balance.gram_estimate must be one of batch, cross_epoch"),
    ("balance.gram_metric=fisher", "balance.gram_metric must be one of parameters, adam"),
    ("balance.gram_estimate=cross_epoch", "balance.gram_estimate cross_epoch needs the epoch's per-objective gradients"),
    ("balance.gram_metric=adam", "balance.gram_metric adam needs the epoch's per-objective gradients"),
    ("balance.cross_epoch_weight=0.5", "balance.cross_epoch_weight only applies to gram_estimate: cross_epoch"),
    ("balance.cross_epoch_weight=2", r"balance.cross_epoch_weight must be in \[0, 1\], got 2"),
])
def test_gram_options_errors_name_the_field_and_fix(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(tmp_path, override)


def test_the_trainer_hands_the_cross_epoch_adam_gram_to_the_balancer(tmp_path):
    """Two epochs of APEX's dual cone with one_backward: after epoch 2 update() gets
    sym(J_2 P J_1^T), J_t the epoch's captured blocks and P AdamW's step scale after that epoch."""
    cfg = make_cfg(tmp_path, "train.epochs=2", "balance.method=apex", "balance.gradients=one_backward",
                   "balance.dual_cone=true", "balance.conflict_damping=0", "balance.gram_estimate=cross_epoch",
                   "balance.gram_metric=adam", "balance.warmup_epochs=0")
    tr = Trainer(cfg)
    est, seen = tr.learner.epoch_gram, []
    real_call = est.__call__

    def spy(blocks, runtime=None, scale=None):
        seen.append(([b.clone() for b in blocks], None if scale is None else [s.clone() for s in scale]))
        M = real_call(blocks, runtime, scale)
        seen[-1] += (M.clone(),)
        return M

    # the learner calls it and reads the rest (persistence, checkpoint_blocks, ...) from the estimator
    tr.learner.epoch_gram = type("Spy", (), {"__call__": lambda self, *a, **k: spy(*a, **k),
                                             "__getattr__": lambda self, name: getattr(est, name)})()
    got = []
    real_update = tr.balancer.update
    tr.balancer.update = lambda gram=None, **kw: (got.append(gram.clone()), real_update(gram=gram, **kw))[1]
    tr.fit()
    assert len(seen) == 2 and len(got) == 2
    (J1, P1, M1), (J2, P2, M2) = seen
    assert P1 is not None and P2 is not None  # Adam has state after each epoch's steps
    a, b = _flat(J2, P2), _flat(J1)
    torch.testing.assert_close(M2, 0.5 * (a @ b.T + b @ a.T), rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(M1, _flat(J1, P1) @ _flat(J1).T, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(got[1], M2)
    rows = list(csv.DictReader((Path(cfg.log.output_dir) / "metrics.csv").open()))
    assert all(float(rows[-1][f"coef/{n}"]) > 0 for n in ("jpeg_compressibility", "colorfulness", "contrast"))


def test_deepspeed_zero2_gives_the_same_adam_metric_gram_as_the_torch_engine(tmp_path):
    """ZeRO-2 keeps AdamW's v in fp32 partitions (assembled by DeepSpeed's safe_get_full_optimizer_state):
    one process under DeepSpeed logs the same Gram cosines as the torch engine, and those differ from the
    parameter metric's (so the metric was applied, not skipped)."""
    import json

    from _fast import deepspeed_one_process
    from test_grad_training import FAST

    # the batch estimate: its logged cosines are those of the metric's Gram (the cross-epoch one can have a
    # negative diagonal on this random model, whose cosines then read 0)
    base = ["train.epochs=2", "balance.method=apex", "balance.gradients=one_backward", "balance.dual_cone=true",
            "balance.conflict_damping=0", "balance.gram_estimate=batch", "train.ema=false"]
    out = tmp_path / "ds"
    deepspeed_one_process(tmp_path, out, FAST + base + ["balance.gram_metric=adam"])
    for metric in ("adam", "parameters"):
        Trainer(make_cfg(tmp_path, *base, f"balance.gram_metric={metric}", name=metric)).fit()

    def cosines(folder):
        rows = list(csv.DictReader((folder / "metrics.csv").open()))
        return {k: float(v) for k, v in rows[-1].items() if k.startswith("cos/") and v}

    ds, adam, plain = cosines(out), cosines(tmp_path / "adam"), cosines(tmp_path / "parameters")
    assert ds and set(ds) == set(adam) == set(plain)
    assert max(abs(ds[k] - adam[k]) for k in ds) < 1e-3, (ds, adam)
    assert max(abs(adam[k] - plain[k]) for k in adam) > 1e-2, (adam, plain)
    assert json.loads((out / "checkpoints/checkpoint-000002/state.json").read_text())["global_step"] > 0
