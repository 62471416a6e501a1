"""APEX's cone_kl (the dual cone that counts the KL term's pull): offset_cone_coefficients by hand and by
its KKT conditions, the balancer's use of update(kl_products=), its state, the config errors, the
capture of the KL term's gradient (one backward and k backward), and the trainer handing J P g_KL over."""
import pytest
import torch

from apex_fast.balance import BalanceConfig, make_balancer
from apex_fast.balance.aggregators import MAX_EXACT_K, offset_cone_coefficients, upgrad_coefficients
from apex_fast.config import ConfigError
from apex_fast.grad import kl_products
from apex_fast.grad.capture import ObjectiveGradients
from apex_fast.grad.kbackward import KBackwardGradients
from apex_fast.train import Trainer

from test_grad_estimate import _flat
from test_grad_one_backward import forward, inputs, kl_term, lora_model, per_sample_loss, rel
from test_grad_training import make_cfg

torch.set_num_threads(1)


def test_offset_by_hand():
    """G = [[1, -0.3], [-0.3, 1]], c0 = (0.65, 0.65), b = (-0.5, 0.1): objective 0 is lowered by the KL
    (G c0 + b = (-0.045, 0.555)); the smallest raise makes its product 0: c_0 - 0.3 * 0.65 - 0.5 = 0."""
    G = torch.tensor([[1.0, -0.3], [-0.3, 1.0]], dtype=torch.float64)
    c0 = torch.tensor([0.65, 0.65], dtype=torch.float64)
    c = offset_cone_coefficients(G, c0, torch.tensor([-0.5, 0.1]))
    torch.testing.assert_close(c, torch.tensor([0.695, 0.65], dtype=torch.float64))
    # s weighs the KL term: s = 2 doubles the pull, c_0 = 0.195 + 1.0
    torch.testing.assert_close(offset_cone_coefficients(G, c0, torch.tensor([-0.5, 0.1]), s=2.0)[0],
                               torch.tensor(1.195, dtype=torch.float64))
    # no pull, or a KL that helps every objective: the cone's own coefficients
    torch.testing.assert_close(offset_cone_coefficients(G, c0, torch.zeros(2)), c0)
    torch.testing.assert_close(offset_cone_coefficients(G, c0, torch.tensor([0.2, 0.3])), c0)


@pytest.mark.parametrize("K", [2, 3, 5, MAX_EXACT_K + 1])
def test_offset_kkt_on_random_cases(K):
    """Positive definite G: c >= c0, G c + s b >= 0, and = 0 wherever c was raised (exact enumeration up to
    MAX_EXACT_K, FISTA beyond); invariant to the scale of (G, b) together."""
    g = torch.Generator().manual_seed(K)
    for _ in range(5):
        J = torch.randn(K, 3 * K, generator=g, dtype=torch.float64)
        G = J @ J.T
        c0 = upgrad_coefficients(G, torch.rand(K, generator=g, dtype=torch.float64) + 0.1).double()
        b = torch.randn(K, generator=g, dtype=torch.float64) * float(G.diagonal().mean())
        s = 0.7
        c = offset_cone_coefficients(G, c0, b, s)
        tol = 1e-6 * float(G.diagonal().mean())
        assert bool((c >= c0 - 1e-9).all())
        slack = G @ c + s * b
        assert bool((slack >= -tol * 10).all())
        raised = c > c0 + 1e-7
        assert bool((slack[raised].abs() <= tol * 10).all())
        torch.testing.assert_close(offset_cone_coefficients(G * 7.0, c0, b * 7.0, s), c, rtol=1e-6, atol=1e-9)


def test_offset_rejects_bad_input():
    with pytest.raises(ValueError, match="c0 and b must be 2 finite numbers"):
        offset_cone_coefficients(torch.eye(2), torch.ones(2), torch.tensor([float("nan"), 0.0]))


def _apex(**over):
    cfg = BalanceConfig(method="apex", dual_cone=True, conflict_damping=0.0, warmup_epochs=0, **over)
    return make_balancer(cfg, [0.5, 0.5], ["a", "b"])


def _rewards(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 2, generator=g), torch.arange(8).repeat_interleave(4)


def test_apex_cone_kl_raises_the_objective_the_kl_lowers():
    G = torch.tensor([[1.0, -0.2], [-0.2, 1.0]])
    plain, kl = _apex(), _apex(cone_kl=True, gradients="one_backward")
    R, gid = _rewards(0)
    for bal in (plain, kl):
        bal.advantages(R, gid)
        bal.update(gram=G, kl_products=torch.tensor([-0.8, 0.0]))  # the KL pulls objective a down
    assert torch.isnan(plain.cone_kl).all()  # only cone_kl keeps the products
    torch.testing.assert_close(kl.cone_kl, torch.tensor([-0.8, 0.0], dtype=torch.float64))  # / mean diagonal 1
    _, sp = plain.advantages(R, gid)
    _, sk = kl.advantages(R, gid)
    assert sk["coef/a"] > sp["coef/a"] + 0.05 and sk["coef/b"] < sp["coef/b"]
    # without products (e.g. an epoch with nothing captured) the EMA stays, and without any: the plain cone
    fresh = _apex(cone_kl=True, gradients="one_backward")
    fresh.advantages(R, gid)
    fresh.update(gram=G)
    _, sf = fresh.advantages(R, gid)
    assert sf["coef/a"] == pytest.approx(sp["coef/a"])
    kl.update(gram=G)
    torch.testing.assert_close(kl.cone_kl, torch.tensor([-0.8, 0.0], dtype=torch.float64))
    # the products EMA scales like the Gram's: G * 4 with b * 4 is the same state
    k4 = _apex(cone_kl=True, gradients="one_backward")
    k4.advantages(R, gid)
    k4.update(gram=G * 4, kl_products=torch.tensor([-3.2, 0.0]))
    torch.testing.assert_close(k4.cone_kl, torch.tensor([-0.8, 0.0], dtype=torch.float64))


def test_apex_cone_kl_state_round_trip_and_bad_products():
    a = _apex(cone_kl=True, gradients="one_backward")
    R, gid = _rewards(1)
    a.advantages(R, gid)
    a.update(gram=torch.eye(2), kl_products=torch.tensor([-0.3, 0.2]))
    b = _apex(cone_kl=True, gradients="one_backward")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.cone_kl, a.cone_kl)
    assert a.advantages(R, gid)[1] == b.advantages(R, gid)[1]
    state = a.state_dict()
    state["cone_kl"] = torch.zeros(3)
    with pytest.raises(ValueError, match="'cone_kl' has 3 values, expected K = 2"):
        b.load_state_dict(state)
    with pytest.raises(ValueError, match=r"kl_products must be \[K\] = \[2\]"):
        a.update(gram=torch.eye(2), kl_products=torch.zeros(3))


@pytest.mark.parametrize("over,match", [
    ({"cone_kl": True, "gradients": "one_backward"}, "balance.cone_kl counts the KL term in the dual cone: set dual_cone: true"),
    ({"cone_kl": True, "dual_cone": True}, "balance.cone_kl needs the KL term's gradient"),
    ({"cone_kl": "yes"}, "balance.cone_kl must be true or false"),
])
def test_balance_config_errors_name_the_field(over, match):
    with pytest.raises(ValueError, match=match):
        BalanceConfig(method="apex", **over).validate()


def test_trainer_config_errors_name_the_field(tmp_path):
    base = ["balance.dual_cone=true", "balance.cone_kl=true", "balance.gradients=one_backward"]
    with pytest.raises(ConfigError, match="balance.cone_kl: counts the KL term, and this run has none"):
        make_cfg(tmp_path, "balance.method=apex", "train.kl_beta=0", *base)
    with pytest.raises(ConfigError, match="balance.cone_kl: is APEX's"):
        make_cfg(tmp_path, "balance.method=gdpo", *base)


@pytest.mark.parametrize("make", [ObjectiveGradients, KBackwardGradients])
def test_backward_kl_keeps_the_kl_gradient_and_leaves_grad_as_a_plain_backward(make):
    """The KL term's gradient on the Gram layers equals autograd's; .grad gets the same as an ordinary
    backward of policy + KL; the objectives' rows are not touched by the KL."""
    model, params = lora_model(torch.float64)
    batch = inputs(3, torch.float64, 5)
    W = torch.randn(3, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    cap = make(model, params, 2, gram_layers=["transformer_blocks.1.*"])
    out = forward(model, batch)
    u = per_sample_loss(model, batch, out)
    if make is ObjectiveGradients:
        with cap.capture(W, update=W[:, 0]):
            u.sum().backward(retain_graph=True)
    else:
        cap.accumulate([(W[:, k] * u).sum() for k in range(2)])
        (W[:, 0] * u).sum().backward(retain_graph=True)
    J_before = [j.clone() for j in cap.jacobian(gram=True)]
    cap.backward_kl(kl_term(out), lambda loss: loss.backward())
    gram_params = cap.gram_params()
    want = torch.autograd.grad(kl_term(forward(model, batch)), gram_params)
    got = cap.kl_blocks()
    assert len(got) == len(gram_params) < len(params)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-10
    for a, b in zip(cap.jacobian(gram=True), J_before):
        torch.testing.assert_close(a, b)
    ref_model, ref_params = lora_model(torch.float64)
    out2 = forward(ref_model, batch)
    ((W[:, 0] * per_sample_loss(ref_model, batch, out2)).sum() + kl_term(out2)).backward()
    for p, q in zip(params, ref_params):
        assert rel(p.grad, q.grad) < 1e-10
    cap.zero_()
    assert all(float(b.abs().sum()) == 0 for b in cap.kl_blocks())


def test_kl_products_are_j_p_g_from_one_gram():
    g = torch.Generator().manual_seed(3)
    J = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 7, generator=g)]
    kl = [torch.randn(4, 5, generator=g), torch.randn(7, generator=g)]
    P = [torch.rand(4, 5, generator=g) + 0.1, torch.rand(7, generator=g) + 0.1]
    want = _flat(J, P) @ torch.cat([k.flatten() for k in kl]).double()
    torch.testing.assert_close(kl_products(J, kl, scale=P), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_products(J, kl), _flat(J) @ torch.cat([k.flatten() for k in kl]).double(),
                               rtol=1e-5, atol=1e-6)


def test_the_trainer_hands_the_kl_products_to_apex(tmp_path):
    """Two epochs of APEX's cone with cone_kl and one_backward: update() gets kl_products = J g_KL of the
    epoch's captured blocks (this epoch's J, whatever the Gram estimate), the KL term has a gradient."""
    cfg = make_cfg(tmp_path, "train.epochs=2", "balance.method=apex", "balance.gradients=one_backward",
                   "balance.dual_cone=true", "balance.conflict_damping=0", "balance.cone_kl=true",
                   "balance.gram_estimate=cross_epoch", "balance.gram_metric=parameters", "balance.warmup_epochs=0")
    tr = Trainer(cfg)
    seen, got = [], []
    real = tr.learner._epoch_gram

    def spy():
        J = [b.clone() for b in tr.learner._epoch_J]
        kl = [b.clone() for b in tr.learner._epoch_kl]
        M, b = real()
        seen.append((J, kl, b))
        return M, b

    tr.learner._epoch_gram = spy
    real_update = tr.balancer.update
    tr.balancer.update = lambda gram=None, kl_products=None, **kw: (got.append(kl_products), real_update(gram, kl_products, **kw))[1]
    tr.fit()
    assert len(seen) == 2 and all(b is not None for b in got)
    for (J, kl, b), g in zip(seen, got):
        assert float(torch.cat([k.flatten() for k in kl]).abs().sum()) > 0  # the KL term has a gradient
        assert b.shape == (3,) and bool(torch.isfinite(b).all())
        torch.testing.assert_close(b, _flat(J) @ torch.cat([k.flatten() for k in kl]).double(), rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(g, b)
    assert bool(torch.isfinite(tr.balancer.cone_kl).all())


def test_deepspeed_zero2_counts_the_kl_like_the_torch_engine(tmp_path):
    """Under DeepSpeed the KL term's backward goes through the engine and still reaches backward_kl: one
    ZeRO-2 process logs the torch engine's coefficients (epoch 2 uses epoch 1's J g_KL)."""
    import csv
    from pathlib import Path

    from _fast import deepspeed_one_process
    from test_grad_training import FAST

    base = ["train.epochs=2", "balance.method=apex", "balance.gradients=one_backward", "balance.dual_cone=true",
            "balance.conflict_damping=0", "balance.cone_kl=true", "balance.warmup_epochs=0", "train.ema=false"]
    out = tmp_path / "ds"
    deepspeed_one_process(tmp_path, out, FAST + base)
    tr = Trainer(make_cfg(tmp_path, *base, name="torch"))
    tr.fit()
    assert bool(torch.isfinite(tr.balancer.cone_kl).all())

    def coefs(folder):
        rows = list(csv.DictReader((Path(folder) / "metrics.csv").open()))
        return {k: float(v) for k, v in rows[-1].items() if k.startswith("coef/") and v}

    ds, ref = coefs(out), coefs(tmp_path / "torch")
    assert ds and set(ds) == set(ref)
    assert max(abs(ds[k] - ref[k]) for k in ds) < 1e-3, (ds, ref)
    # the products themselves (the balancer state of the last checkpoint): the same as the torch engine's
    from apex_fast.checkpoint import load_checkpoint
    b = torch.as_tensor(load_checkpoint(out / "checkpoints/checkpoint-000002")["balancer"]["cone_kl"], dtype=torch.float64)
    assert bool(torch.isfinite(b).all()) and float(b.abs().max()) > 0
    assert rel(b, tr.balancer.cone_kl) < 1e-2, (b, tr.balancer.cone_kl)


def test_cone_min_learn_leaves_unlearnable_objectives_outside_the_cone():
    """cone_min_learn: an objective whose last learnability L is below it keeps its priority and constrains
    nothing (with two objectives: the cone over the other alone, c = pi); L comes from update()."""
    G = torch.tensor([[1.0, -0.9], [-0.9, 4.0]])  # b's gradient twice as long, strongly opposed
    R, gid = _rewards(2)
    gated, plain = _apex(cone_min_learn=0.5), _apex()
    for bal in (gated, plain):
        bal.advantages(R, gid)
        stats = bal.update(gram=G)
    torch.testing.assert_close(gated.cone_learn, torch.tensor([stats["L/a"], stats["L/b"]], dtype=torch.float64))
    assert torch.equal(plain.cone_learn, torch.ones(2, dtype=torch.float64))  # off: never read
    gated.cone_learn = torch.tensor([1.0, 0.1], dtype=torch.float64)
    assert gated.cone_members.tolist() == [True, False]
    _, sg = gated.advantages(R, gid)
    _, sp = plain.advantages(R, gid)
    pi = gated.priorities
    assert sg["coef/a"] == pytest.approx(float(pi[0] / pi.sum()), rel=1e-6)
    assert sp["coef/a"] != pytest.approx(sg["coef/a"], rel=1e-3)  # the full cone moves the coefficients
    # every objective learnable: the plain cone exactly
    gated.cone_learn = torch.ones(2, dtype=torch.float64)
    assert gated.advantages(R, gid)[1]["coef/a"] == pytest.approx(sp["coef/a"], rel=1e-12)
    # state round trip
    other = _apex(cone_min_learn=0.5)
    gated.cone_learn = torch.tensor([1.0, 0.1], dtype=torch.float64)
    other.load_state_dict(gated.state_dict())
    assert torch.equal(other.cone_learn, gated.cone_learn)


@pytest.mark.parametrize("over,match", [
    ({"dual_cone": True, "cone_min_learn": 1.5}, r"balance.cone_min_learn must be in \[0, 1\)"),
    ({"cone_min_learn": 0.25}, "balance.cone_min_learn applies to the dual cone: set dual_cone: true"),
])
def test_cone_min_learn_errors_name_the_field(over, match):
    with pytest.raises(ValueError, match=match):
        BalanceConfig(method="apex", **over).validate()
