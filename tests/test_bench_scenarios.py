"""The algorithm benchmark's scenario files (bench/scenarios/*.yaml): loader errors that name the field,
the shipped set, and the seed-batched toy's closed-form gradients against autograd of grpo_loss."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from apex_fast.rl.loss import grpo_loss
from bench import algorithm as alg
from bench.scenario import SIGMA, ScenarioError, load_scenario, parse_scenario, shipped_scenarios

torch.set_num_threads(1)

GOOD = {"name": "t", "seeds": 2, "epochs": 3, "objectives": [
    {"name": "ocr", "kind": "sparse"}, {"name": "a", "kind": "dense", "scale": 0.1},
    {"name": "b", "kind": "dense", "saturation": 0.5}, {"name": "n", "kind": "noise"}]}


def _with(**kw):
    d = {**GOOD, "objectives": [dict(o) for o in GOOD["objectives"]]}
    d.update(kw)
    return d


def _obj(i, **kw):
    d = _with()
    d["objectives"][i].update(kw)
    return d


def test_shipped_scenarios_cover_the_issue():
    scs = {p.stem: load_scenario(p) for p in shipped_scenarios()}
    assert {"paper", "paper_jitter", "k2_conflict", "k6", "saturating", "noise"} <= set(scs)
    assert scs["paper"].paper_shaped and [o.kind for o in scs["paper"].objectives] == ["sparse"] + ["dense"] * 3
    assert scs["k2_conflict"].K == 2 and float(scs["k2_conflict"].target_corr[0, 1]) < -0.5
    assert scs["k6"].K == 6
    assert any(o.saturation > 0 for o in scs["saturating"].objectives)
    assert scs["noise"].signal == [True, True, True, False]
    assert load_scenario("paper").name == "paper"  # a bare name finds the shipped file


@pytest.mark.parametrize("data,match", [
    ([1, 2], "YAML mapping"),
    (_with(objectives=[]), "objectives must be a non-empty list"),
    (_with(colour=1), "unknown field 'colour'"),
    (_obj(0, kind="dense2"), r"objectives\[0\]\.kind must be one of sparse, dense, noise"),
    (_obj(1, scale=-1), r"objectives\[1\]: scale must be a finite number in \(0"),
    (_obj(1, scale="big"), r"objectives\[1\]: scale"),
    (_obj(2, name="a"), r"objectives\[\*\]\.name must be unique, 'a'"),
    (_obj(0, saturation=0.5), r"objectives\[0\]\.saturation applies to dense objectives only"),
    (_obj(2, saturation=1.0), r"objectives\[2\]: saturation"),
    (_obj(0, levels=0), r"objectives\[0\]: levels must be an integer"),
    (_obj(0, spurious=2), r"objectives\[0\]: spurious"),
    (_obj(1, fancy=True), r"objectives\[1\]: unknown field 'fancy'"),
    (_with(K=3), "K = 3 but 4 objectives"),
    (_with(seeds=1), "seeds must be an integer in \\[2"),
    (_with(epochs=2.5), "epochs must be an integer"),
    (_with(weights=[1, 1]), "weights must be a list of 4 numbers"),
    (_with(weights=[0, 0, 0, 0]), "weights are all zero"),
    (_with(target_corr=-0.9, objectives=GOOD["objectives"] + [{"name": "c", "kind": "dense"}]),
     "target_corr is not a valid correlation"),
    (_with(target_corr=[[1, 0.2], [0.3, 1]]), "target_corr must be symmetric"),
    (_with(target_corr=[[1, 0.2, 0], [0.2, 1, 0]]), "target_corr must be a number or a 2 x 2 matrix"),
    (_with(paper_shaped="yes"), "paper_shaped must be true or false"),
])
def test_bad_scenario_names_the_field(data, match):
    with pytest.raises(ScenarioError, match=match):
        parse_scenario(data, where="bad.yaml")


def test_bad_files(tmp_path):
    with pytest.raises(ScenarioError, match="not found; shipped scenarios: .*paper"):
        load_scenario(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("objectives: [ {name: a\n")
    with pytest.raises(ScenarioError, match="broken.yaml: not valid YAML"):
        load_scenario(p)
    p.write_text(yaml.safe_dump(_obj(1, kind="loud")))
    with pytest.raises(ScenarioError, match=r"broken.yaml: objectives\[1\]\.kind"):
        load_scenario(p)


def _toy_batch(S=2, N=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    W = torch.randn(S, 8, 8, generator=g, dtype=dt) * 0.1
    b = torch.randn(S, 8, generator=g, dtype=dt) * 0.1
    e = torch.randn(S, N, 8, generator=g, dtype=dt)
    mu = torch.einsum("sde,sne->snd", W, e) + b[:, None]
    z = mu + SIGMA * torch.randn(S, N, 8, generator=g, dtype=dt)
    return W, b, e, z, g


def test_closed_form_grpo_gradient_matches_autograd():
    W, b, e, z, g = _toy_batch()
    S, N = z.shape[:2]
    old_lp = alg.log_prob(z, torch.einsum("sde,sne->snd", W, e) + b[:, None])
    A = torch.randn(S, N, generator=g, dtype=torch.float64) * 3
    A[:, 0] = 0.0  # masked sample
    A[:, 1] = 7.0  # clipped to adv_clip
    A = A.float().double()  # grpo_loss works on float32 advantages
    W1 = W + 0.05 * torch.randn(W.shape, generator=g, dtype=W.dtype)  # ratio != 1: some samples clip
    b1 = b + 0.05 * torch.randn(b.shape, generator=g, dtype=b.dtype)
    W0, b0 = W.clone(), b.clone()
    mu_ref = torch.einsum("sde,sne->snd", W0, e) + b0[:, None]
    gW, gb = alg.grpo_grad(W1, b1, e, z, old_lp, A, mu_ref)
    clipped = 0
    for s in range(S):
        Wp, bp = W1[s].clone().requires_grad_(), b1[s].clone().requires_grad_()
        mu = e[s] @ Wp.T + bp
        out = grpo_loss(alg.log_prob(z[s], mu), old_lp[s], A[s], clip_range=alg.CLIP, mean=mu,
                        ref_mean=mu_ref[s], step_std=torch.full((N,), SIGMA, dtype=torch.float64),
                        kl_beta=alg.KL_BETA)
        dW, db = torch.autograd.grad(out.loss, [Wp, bp])
        torch.testing.assert_close(gW[s], dW, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gb[s], db, rtol=1e-9, atol=1e-12)
        clipped += int(((out.ratio - 1).abs() > alg.CLIP).sum())
    assert clipped > 0  # the clip branch was exercised


def test_closed_form_gram_matches_autograd():
    W, b, e, z, g = _toy_batch(S=1, N=16)
    Ahat = torch.randn(16, 3, generator=g)
    mu = torch.einsum("sde,sne->snd", W, e) + b[:, None]
    M = alg.objective_gram(Ahat, e[0], z[0], mu[0])
    rows = []
    for k in range(3):
        Wp, bp = W[0].clone().requires_grad_(), b[0].clone().requires_grad_()
        m = e[0] @ Wp.T + bp
        lp = alg.log_prob(z[0], m)
        out = grpo_loss(lp, lp.detach(), Ahat[:, k].double(), clip_range=alg.CLIP)
        gk = torch.autograd.grad(out.loss, [Wp, bp])
        rows.append(torch.cat([x.reshape(-1) for x in gk]))
    J = torch.stack(rows)
    torch.testing.assert_close(M, J @ J.T, rtol=1e-9, atol=1e-15)
    Jc = alg.objective_jacobian(Ahat, e[0], z[0], mu[0])
    torch.testing.assert_close(Jc, J, rtol=1e-9, atol=1e-15)


def test_cross_epoch_gram_removes_the_sampling_noise_diagonal():
    """Two independent draws around one mean gradient: their product estimates mu mu^T, the batch Gram
    mu mu^T + Sigma (with a 1-column Ahat and pure-noise advantages mu = 0: the batch diagonal is all noise)."""
    W, b, e, z, g = _toy_batch(S=1, N=64)
    mu = torch.einsum("sde,sne->snd", W, e) + b[:, None]
    cross = alg.GramMeasure(cross_weight=1.0)
    batch, prod = [], []
    for t in range(200):
        Ahat = torch.randn(64, 2, generator=g, dtype=torch.float64)  # no signal: E[g_k] = 0
        batch.append(alg.objective_gram(Ahat, e[0], z[0], mu[0]))
        M = cross(Ahat, e[0], z[0], mu[0])
        if t == 0:
            torch.testing.assert_close(M, batch[0])  # no previous epoch yet: the batch Gram
        else:
            prod.append(M)
            torch.testing.assert_close(M, M.T)
    b_diag = torch.stack(batch).mean(0).diag()
    p_diag = torch.stack(prod).mean(0).diag()
    assert bool((b_diag > 0).all())
    assert bool((p_diag.abs() < 0.2 * b_diag).all())  # the cross product's diagonal averages to ~0
    assert alg.gram_measurement("apex+cone-xgram") == "cross_epoch" and alg.gram_measurement("apex") == "batch"
    assert not hasattr(alg.make_cfg("apex+cone-xgram"), alg.GRAM_KEY)
    # in a metric: J diag(P) J^T; a blend weighs the two estimates
    Ahat = torch.randn(64, 2, generator=g, dtype=torch.float64)
    J = alg.objective_jacobian(Ahat, e[0], z[0], mu[0])
    P = torch.rand(J.shape[1], generator=g, dtype=torch.float64) + 0.5
    torch.testing.assert_close(alg.GramMeasure()(Ahat, e[0], z[0], mu[0], P), (J * P) @ J.T)
    half = alg.GramMeasure(cross_weight=0.5)
    half(Ahat, e[0], z[0], mu[0])
    A2 = torch.randn(64, 2, generator=g, dtype=torch.float64)
    J2 = alg.objective_jacobian(A2, e[0], z[0], mu[0])
    torch.testing.assert_close(half(A2, e[0], z[0], mu[0]), 0.25 * (J2 @ J.T + J @ J2.T) + 0.5 * J2 @ J2.T)
    # the trainer's estimate (apex_fast.grad.EpochGram, balance.cross_epoch_weight) on the same J, in a metric
    from apex_fast.grad import EpochGram
    lib, bench = EpochGram("cross_epoch", 0.875), alg.GramMeasure(cross_weight=0.875)
    lib([J.float()], scale=[P.float()])
    bench(Ahat, e[0], z[0], mu[0], P)
    torch.testing.assert_close(lib([J2.float()], scale=[P.float()]), bench(A2, e[0], z[0], mu[0], P), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("how,expected", [("batch", (0.0, False)), ("cross_epoch", (1.0, False)),
                                          ("cross_epoch:0.75+adam", (0.75, True)), ("batch+adam", (0.0, True))])
def test_gram_measurement_specs(how, expected):
    assert alg.parse_gram_measurement(how) == expected


@pytest.mark.parametrize("bad", ["cross", "batch+sgd", "epochs"])
def test_gram_measurement_spec_errors_name_the_key(bad):
    with pytest.raises(ValueError, match="bench_gram: expected batch or cross_epoch"):
        alg.parse_gram_measurement(bad)


def test_adam_metric_is_the_step_scale_of_each_coordinate():
    """After Adam steps the metric is 1 / (sqrt(v_hat) + eps) of that seed, mean 1, in J's layout."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(2, alg.D, 8, generator=g, dtype=torch.float64)
    b = torch.randn(2, alg.D, generator=g, dtype=torch.float64)
    opt = alg.Adam([W, b], 0.01)
    assert alg.adam_metric(opt, 0) is None
    gW, gb = torch.randn(W.shape, generator=g, dtype=W.dtype), torch.randn(b.shape, generator=g, dtype=b.dtype) * 10
    opt.step([gW, gb])
    P = alg.adam_metric(opt, 1)
    assert P.shape == (alg.D * 8 + alg.D,) and abs(float(P.mean()) - 1) < 1e-12
    raw = 1 / (torch.cat([gW[1].abs().flatten(), gb[1].abs()]) + opt.eps)  # v_hat = g^2 after one step
    torch.testing.assert_close(P, raw / raw.mean(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("method", ["apex", "mgda", "famo"])
def test_run_scenario_smoke_and_deterministic(method):
    sc = parse_scenario(_with(), where="t")
    a = alg.run_scenario(sc, method, [0, 1], epochs=4, eval_every=2, trace=True)
    b = alg.run_scenario(sc, method, [0, 1], epochs=4, eval_every=2, trace=True)
    assert a["improvement"] == b["improvement"] and a["worst"] == b["worst"]
    assert len(a["improvement"]) == 2 and len(a["improvement"][0]) == 4
    assert all(math.isfinite(x) for x in a["worst"] + a["hypervolume"] + a["oscillation"])
    assert all(r[3] == 0.0 for r in a["improvement"])  # the noise objective never improves
    assert len(a["trace"]["priority"][0]) == 4


def test_acceptance_checks_hand_computed_for_any_method():
    """criteria(blob, method): a baseline the method trails by more than 1 SE (paired) is listed, one it
    ties is not; the paper-shaped win needs > 2 SE over static and gdpo; scenarios without the method
    are skipped."""
    def run(worst, hv, osc):
        return {"worst": worst, "hypervolume": hv, "oscillation": osc}

    seeds = 4
    base = [0.5, 0.6, 0.7, 0.8]
    runs = {
        "static": run([x - 0.5 for x in base], [0.1] * seeds, [0.1] * seeds),
        "gdpo": run([x - 0.2 for x in base], [x - 0.3 for x in base], [0.1] * seeds),
        "mgda": run([x + 0.1 for x in base], [x + 0.0 for x in base], [0.2] * seeds),
        "cand": run(base, [b + d for b, d in zip(base, [0.01, -0.01, 0.02, -0.02])], [0.1, 0.11, 0.09, 0.1]),
    }
    blob = {"s": {"runs": runs, "paper_shaped": True}, "other": {"runs": {"gdpo": runs["gdpo"]}, "paper_shaped": False}}
    rows = alg.criteria(blob, "cand")
    assert [r["scenario"] for r in rows] == ["s"]
    r = rows[0]
    assert r["worst_not_below"] == ["mgda"]  # -0.1 exactly every seed: below by more than 1 SE
    assert r["hypervolume_not_below"] == []  # mgda's HV equals base: a tie within 1 SE
    assert r["paper_wins"] is True  # worst +0.2 / +0.5 and HV about +0.3 / +0.55 over gdpo / static, every seed
    assert r["osc_vs_gdpo"]["verdict"] == "tie" and abs(r["osc_vs_gdpo"]["diff"]) < 1e-12


def test_merge_adds_runs_and_refuses_other_seed_counts(tmp_path):
    """--merge: new methods' runs join the saved scenario (summary recomputed, command recorded); a run
    with another seed count is refused with a message naming the scenario."""
    import json

    def run(w):
        return {"worst": w, "hypervolume": [max(x, 0) for x in w], "oscillation": [0.1] * len(w),
                "improvement": [[x] for x in w], "effective_share": [[1.0]] * len(w), "share_dev": [0.0] * len(w)}

    saved = {"meta": {"command": "first", "seconds": 1.0}, "s": {"seeds": 2, "epochs": 3, "methods": ["gdpo"],
                                                                  "runs": {"gdpo": run([0.1, 0.2])}}}
    path = tmp_path / "algorithm.json"
    path.write_text(json.dumps(saved))
    blob = {"s": {"seeds": 2, "epochs": 3, "methods": ["apex"], "runs": {"apex": run([0.3, 0.5])}}}
    data, meta = alg.merge_into(path, blob, {"command": "second", "seconds": 2.0})
    assert data["s"]["methods"] == ["gdpo", "apex"] and set(data["s"]["runs"]) == {"gdpo", "apex"}
    assert data["s"]["summary"]["_apex_vs"]["gdpo"]["worst"]["diff"] == pytest.approx(0.25)
    assert meta["command"] == "first" and meta["merged"] == ["second (2.0 s)"]
    bad = {"s": {"seeds": 3, "epochs": 3, "methods": ["apex"], "runs": {"apex": run([0.3, 0.5, 0.1])}}}
    with pytest.raises(SystemExit, match="'s' has 2 seeds"):
        alg.merge_into(path, bad, {"command": "third", "seconds": 1.0})
    fresh = {"s": {"seeds": 2, "first_seed": 16, "epochs": 3, "methods": ["apex"], "runs": {"apex": run([0.3, 0.5])}}}
    with pytest.raises(SystemExit, match="2 seeds from 0 .* this run 2 from 16"):  # other seeds: never paired
        alg.merge_into(path, fresh, {"command": "fourth", "seconds": 1.0})
