"""apex_fast.dpo: votes, labels, pair selection, the flow-matching DPO loss, the reference adapter,
the offline pairs file (docs/SPEC.md section 6). CPU, 1 thread, no training runs (those are in
tests/test_dpo_train.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from apex_fast.dpo import (
    PairLabeler, PairsFileError, ReferenceAdapter, RunningScale, TINY_PAIRS, copeland_pair, flow_dpo_loss,
    flow_dpo_loss_reference, hard_vote, logit_normal_t, noisy_latents, pair_matrix, read_pairs, soft_vote,
    velocity_error,
)
from apex_fast.dpo.pairs import load_pair_images
from apex_fast.metrics import dpo_pair_metrics

torch.set_num_threads(1)
nan = math.nan
T = torch.tensor


# ------------------------------------------------------------------ hard vote truth tables


@pytest.mark.parametrize("a,b,label,V", [
    ([3, 3, 3], [1, 1, 1], 1, 3),            # unanimity for a
    ([1, 1, 1], [3, 3, 3], -1, -3),          # unanimity for b
    ([3, 3, 1], [1, 1, 3], 1, 1),            # 2 of 3: majority, not the score scale
    ([100, 0, 0], [0, 1, 1], -1, -1),        # one huge margin is still one vote
    ([3, 1], [1, 3], 0, 0),                  # 1 - 1: tie, dropped
    ([2, 2, 2], [2, 2, 2], 0, 0),            # all equal: tie
    ([3, 2, 1], [1, 2, 3], 0, 0),            # +1, 0, -1
    ([3, nan, 1], [1, 5, 3], 0, 0),          # NaN abstains: +1 - 1 = 0
    ([3, nan, nan], [1, 5, 3], 1, 1),        # only one scorer could judge
    ([nan, 1, 1], [0, 0, 0], 1, 2),
])
def test_hard_vote_truth_table(a, b, label, V):
    r = hard_vote(T([a], dtype=torch.float64), T([b], dtype=torch.float64))
    assert r.label.tolist() == [label] and r.V.tolist() == [V]


def test_hard_vote_counts_ties_and_abstentions_and_m1():
    Sa = T([[1.0, 2.0], [1.0, 1.0], [nan, nan], [nan, 2.0], [5.0, 0.0]])
    Sb = T([[0.0, 3.0], [1.0, 1.0], [1.0, 1.0], [1.0, nan], [0.0, 0.0]])
    r = hard_vote(Sa, Sb)
    assert r.label.tolist() == [0, 0, 0, 0, 1]
    assert r.n_ties == 2 and r.n_abstained == 2  # (1,-1) and all-equal are ties; all-NaN pairs abstain
    # M = 1: the label is just the sign of the one scorer; equal scores drop the pair
    r1 = hard_vote(T([[2.0], [1.0], [1.0], [nan]]), T([[1.0], [2.0], [1.0], [0.0]]))
    assert r1.label.tolist() == [1, -1, 0, 0] and r1.n_ties == 1 and r1.n_abstained == 1


# ------------------------------------------------------------------ soft vote


def test_soft_vote_hand_case():
    # two scorers, tau = (2, 0.5): p = mean(sigmoid(1 / 2), sigmoid(-1 / 0.5))
    p = soft_vote(T([[3.0, 1.0]]), T([[2.0, 2.0]]), T([2.0, 0.5]))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert float(p[0]) == pytest.approx((sig(0.5) + sig(-2.0)) / 2, abs=1e-12)
    # a NaN scorer abstains; nobody judging gives 0.5
    p = soft_vote(T([[3.0, nan], [nan, nan]]), T([[2.0, 2.0], [1.0, 1.0]]), T([2.0, 0.5]))
    assert p.tolist() == pytest.approx([sig(0.5), 0.5])


def test_running_scale_is_rms_over_both_orientations():
    rs = RunningScale(2)
    assert rs.tau.tolist() == [1.0, 1.0]  # nothing seen yet
    rs.update(T([[1.0, nan], [-3.0, 2.0]]))
    rs.update(T([[2.0, 4.0]]))
    assert rs.tau.tolist() == pytest.approx([math.sqrt((1 + 9 + 4) / 3), math.sqrt((4 + 16) / 2)])
    rs2 = RunningScale(2)
    rs2.load_state_dict(rs.state_dict())
    assert torch.equal(rs2.tau, rs.tau)


# ------------------------------------------------------------------ Copeland selection


def test_copeland_pair_picks_most_wins_vs_fewest():
    # 4 images x 3 scorers. Pairwise majorities: 0 beats 1, 2, 3; 3 loses to everyone -> (0, 3)
    S = T([[5.0, 5.0, 0.0], [4.0, 4.0, 9.0], [3.0, 3.0, 8.0], [0.0, 0.0, 10.0]])
    V = pair_matrix(S)
    assert torch.equal(V, -V.T) and V[0, 3] == 1 and V[1, 3] == 1
    assert copeland_pair(S) == (0, 3)
    # the raw sum (scorer c's larger scale dominates) would pick 1 as the winner: the vote does not
    assert int(S.sum(1).argmax()) == 1


def test_copeland_tie_breaks_and_no_pair():
    assert copeland_pair(T([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])) is None  # all equal
    assert copeland_pair(T([[nan], [nan]])) is None
    # a Condorcet cycle (0 > 1 > 2 > 0): equal Copeland scores, so the winner is 0 and the loser 2
    # by index, but 2 beats 0 by majority: no consistent pair, the group is dropped
    cyc = T([[3.0, 2.0, 1.0], [2.0, 1.0, 3.0], [1.0, 3.0, 2.0]])
    assert (pair_matrix(cyc) > 0).sum(1).tolist() == [1, 1, 1]
    assert copeland_pair(cyc) is None


def test_labeler_online_modes_pick_expected_pairs():
    S = T([[5.0, 5.0, 0.0], [4.0, 4.0, 9.0], [3.0, 3.0, 8.0], [0.0, 0.0, 10.0],   # group 0
           [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # group 1: all equal
    g = torch.arange(2).repeat_interleave(4)
    names = ["a", "b", "c"]
    pv = PairLabeler("balanced_vote", names, [1, 1, 1]).select_pairs(S, g)
    assert (pv.winner.tolist(), pv.loser.tolist(), pv.p.tolist()) == ([0], [3], [1.0])
    st = dpo_pair_metrics(pv, names)
    assert pv.n_ties == 1 and st["dpo/pairs"] == 1 and st["dpo/dropped_ties"] == 1
    assert st["dpo/agree/a"] == 1.0 and st["dpo/agree/c"] == 0.0  # scorer c was outvoted
    vs = PairLabeler("vanilla_sum", names, [1, 1, 1]).select_pairs(S, g)
    assert (vs.winner.tolist(), vs.loser.tolist()) == ([1], [0])  # sums 10, 17, 14, 10 -> first max, first min
    single = PairLabeler("single", names, [1, 1, 1], single_scorer="c").select_pairs(S, g)
    assert (single.winner.tolist(), single.loser.tolist()) == ([3], [0])
    ns = PairLabeler("normalized_sum", names, [1, 1, 1]).select_pairs(S, g)
    assert ns.winner.tolist() == [0] or ns.winner.tolist() == [1]
    soft = PairLabeler("soft_vote", names, [1, 1, 1]).select_pairs(S, g)
    assert soft.winner.tolist() == [0] and 0.5 < float(soft.p[0]) < 1.0
    r1 = PairLabeler("random", names, [1, 1, 1], seed=3)
    r2 = PairLabeler("random", names, [1, 1, 1], seed=3)
    a, b = r1.select_pairs(S, g), r2.select_pairs(S, g)
    assert len(a) == 2 and torch.equal(a.winner, b.winner) and (a.winner != a.loser).all()
    with pytest.raises(ValueError, match="dpo.single_scorer"):
        PairLabeler("single", names, [1, 1, 1], single_scorer="zzz")
    with pytest.raises(ValueError, match="dpo.label"):
        PairLabeler("majority", names, [1, 1, 1])


def test_labeler_offline_orients_and_drops():
    Sa = T([[3.0, 3.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 9.0], [nan, nan, nan]])
    Sb = T([[1.0, 1.0, 3.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    pv = PairLabeler("balanced_vote", ["a", "b", "c"], [1, 1, 1]).label_pairs(Sa, Sb)
    P = 4
    assert pv.winner.tolist() == [0, P + 2] and pv.loser.tolist() == [P + 0, 2]
    assert pv.n_ties == 1 and pv.n_abstained == 1
    # vanilla sum with raw scales: pair 2's scorer c (+8) outweighs a, b (-1, -1)
    vs = PairLabeler("vanilla_sum", ["a", "b", "c"], [1, 1, 1]).label_pairs(Sa, Sb)
    assert vs.winner.tolist() == [0, 2]
    lab = PairLabeler("soft_vote", ["a", "b", "c"], [1, 1, 1])
    sv = lab.label_pairs(Sa, Sb)
    assert sv.winner.tolist() == [0, P + 2] and (sv.p > 0.5).all() and (sv.p < 1).all()


# ------------------------------------------------------------------ loss


def test_loss_value_by_hand():
    # 1 pair, C = H = W = 1: eps = 1, x0_w = 0, x0_l = 0.5 -> u_w = 1, u_l = 0.5
    eps, x0w, x0l = T([[[[1.0]]]]), T([[[[0.0]]]]), T([[[[0.5]]]])
    v_w, v_l, r_w, r_l = T([[[[0.8]]]]), T([[[[1.0]]]]), T([[[[0.5]]]]), T([[[[0.4]]]])
    ew, el = velocity_error(v_w, x0w, eps), velocity_error(v_l, x0l, eps)
    rw, rl = velocity_error(r_w, x0w, eps), velocity_error(r_l, x0l, eps)
    assert (float(ew), float(el), float(rw), float(rl)) == pytest.approx((0.04, 0.25, 0.25, 0.01))
    # z = -beta/2 ((0.04 - 0.25) - (0.25 - 0.01)) = -1 * (-0.45) = 0.45 with beta = 2
    out = flow_dpo_loss(ew, el, rw, rl, beta=2.0)
    assert float(out.logits[0]) == pytest.approx(0.45)
    assert float(out.loss) == pytest.approx(math.log1p(math.exp(-0.45)), rel=1e-6)
    assert out.accuracy.tolist() == [1.0]
    # label smoothing p = 0.8: -(0.8 log s(0.45) + 0.2 log s(-0.45))
    ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    sm = flow_dpo_loss(ew, el, rw, rl, beta=2.0, p=T([0.8]))
    assert float(sm.loss) == pytest.approx(-(0.8 * ls(0.45) + 0.2 * ls(-0.45)), rel=1e-6)
    # a fixed denominator: 1 pair over a micro-batch of 4
    assert float(flow_dpo_loss(ew, el, rw, rl, beta=2.0, denominator=4).loss) == pytest.approx(float(out.loss) / 4)


def test_loss_matches_plain_reference_and_gradient_direction():
    g = torch.Generator().manual_seed(0)
    P, shape = 5, (4, 3, 3)
    x0w, x0l, eps = (torch.randn(P, *shape, generator=g) for _ in range(3))
    v = [torch.randn(P, *shape, generator=g) for _ in range(4)]
    p = torch.rand(P, generator=g) * 0.5 + 0.5
    for prob in (None, p):
        ref = flow_dpo_loss_reference(*v, x0w, x0l, eps, beta=7.0, p=prob)
        out = flow_dpo_loss(velocity_error(v[0], x0w, eps), velocity_error(v[1], x0l, eps),
                            velocity_error(v[2], x0w, eps), velocity_error(v[3], x0l, eps), beta=7.0, p=prob)
        assert out.per_pair.tolist() == pytest.approx(ref, rel=1e-5)
    # descending the loss lowers the winner's error relative to the loser's
    vw = v[0].clone().requires_grad_(True)
    vl = v[1].clone().requires_grad_(True)
    out = flow_dpo_loss(velocity_error(vw, x0w, eps), velocity_error(vl, x0l, eps),
                        velocity_error(v[2], x0w, eps), velocity_error(v[3], x0l, eps), beta=7.0)
    out.loss.backward()
    with torch.no_grad():
        after = flow_dpo_loss(velocity_error(vw - 0.05 * vw.grad, x0w, eps), velocity_error(vl - 0.05 * vl.grad, x0l, eps),
                              velocity_error(v[2], x0w, eps), velocity_error(v[3], x0l, eps), beta=7.0)
    assert float(after.loss) < float(out.loss.detach()) and float(after.logits.mean()) > float(out.logits.mean())


def test_noising_and_logit_normal_t():
    x0, eps = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    xt = noisy_latents(x0, eps, T([0.25, 1.0]))
    assert xt[0].unique().tolist() == [0.75] and xt[1].unique().tolist() == [0.0]
    t = logit_normal_t(20000, torch.Generator().manual_seed(0))
    assert 0 < float(t.min()) and float(t.max()) < 1 and float(t.median()) == pytest.approx(0.5, abs=0.02)
    # logit(t) ~ N(0, 1)
    assert float(torch.logit(t).std()) == pytest.approx(1.0, abs=0.03)


# ------------------------------------------------------------------ reference adapter


@pytest.fixture()
def lora_transformer():
    from diffusers import SD3Transformer2DModel

    from apex_fast.models import add_lora

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                               pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)
    add_lora(tr, rank=2, alpha=4, seed=0)
    return tr


def _forward(tr, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        return tr(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                  timestep=T([500.0, 100.0]), return_dict=False)[0]


def _nudge_learner(tr, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if ".default." in n and "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_reference_starts_as_base_then_copies_every_n(lora_transformer):
    from apex_fast.models import lora_disabled

    tr = lora_transformer
    trainable = [n for n, p in tr.named_parameters() if p.requires_grad]
    ref = ReferenceAdapter(tr, update_every=2)
    assert [n for n, p in tr.named_parameters() if p.requires_grad] == trainable  # ref adds nothing trainable
    _nudge_learner(tr, 1)
    with lora_disabled(tr):
        base = _forward(tr)
    theta1 = _forward(tr)
    assert not torch.allclose(theta1, base)
    with ref.active():
        assert torch.equal(_forward(tr), base)  # step 0: the LoRA-disabled base
    assert torch.equal(_forward(tr), theta1)  # learner restored after the block
    assert not ref.step() and ref.is_base  # step 1 of 2: no copy
    assert ref.step()  # step 2: copy
    with ref.active():
        assert torch.allclose(_forward(tr), theta1, atol=1e-6)
    _nudge_learner(tr, 2)
    theta2 = _forward(tr)
    with ref.active():
        assert torch.allclose(_forward(tr), theta1, atol=1e-6)  # the reference keeps the old learner
    assert [n for n, p in tr.named_parameters() if p.requires_grad] == trainable
    ref.step()
    ref.step()
    with ref.active():
        assert torch.allclose(_forward(tr), theta2, atol=1e-6)
    assert ref.updates == 2 and ref.steps == 4


def test_reference_ema_and_exact_state_roundtrip(lora_transformer):
    tr = lora_transformer
    ref = ReferenceAdapter(tr, ema=0.75)
    start = {n: p.detach().clone() for n, p in ref.ref_params.items()}
    _nudge_learner(tr, 1)
    ref.step()
    for n, q in ref.ref_params.items():
        want = 0.75 * start[n] + 0.25 * ref.learner_params[n].detach()
        torch.testing.assert_close(q.detach(), want, rtol=0, atol=1e-6)
    assert not ref.is_base
    state = ref.state_dict()
    _nudge_learner(tr, 2)
    ref.step()
    with ref.active():
        moved = _forward(tr)
    ref.load_state_dict(state)
    assert ref.steps == 1
    for n, q in ref.ref_params.items():
        assert torch.equal(q, state["weights"][n])
    with ref.active():
        assert not torch.equal(_forward(tr), moved)
    with pytest.raises(ValueError, match="dpo.ref_ema"):
        ReferenceAdapter(tr, ema=1.0, name="ref2")


# ------------------------------------------------------------------ pairs file


def test_shipped_tiny_pairs_file_reads():
    recs = read_pairs(TINY_PAIRS)
    assert len(recs) >= 8
    with_scores = [r for r in recs if r.scores]
    assert with_scores and len(with_scores) < len(recs)  # both paths: given scores and scored at run time
    a, b = load_pair_images(recs[:3], 32)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8 and not np.array_equal(a, b)
    assert read_pairs("tiny_pairs.jsonl")[0].prompt == recs[0].prompt  # bare shipped name


def _write(tmp_path, lines):
    from PIL import Image

    for n in ("x.png", "y.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / n)
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_pairs_file_errors_name_every_bad_line(tmp_path):
    good = json.dumps({"prompt": "a cat", "images": ["x.png", "y.png"], "scores": {"contrast": [0.1, None]}})
    p = _write(tmp_path, [
        good,
        "{not json",                                                                  # line 2
        json.dumps({"prompt": "", "images": ["x.png", "y.png"]}),                     # line 3
        "",
        json.dumps({"prompt": "a", "images": ["x.png"]}),                             # line 5
        json.dumps({"prompt": "a", "images": ["x.png", "missing.png"]}),              # line 6
        json.dumps({"prompt": "a", "images": ["x.png", "y.png"], "scores": {"c": [1, "hi"]}}),  # line 7
        json.dumps({"prompt": "a", "image": ["x.png", "y.png"]}),                     # line 8
        good,
    ])
    with pytest.raises(PairsFileError) as ei:
        read_pairs(p)
    msg = str(ei.value)
    for i in (2, 3, 5, 6, 7, 8):
        assert f"line {i}:" in msg
    assert "line 1:" not in msg and "line 9:" not in msg and "missing.png" in msg and "dpo.skip_bad_pairs" in msg
    recs = read_pairs(p, skip_bad=True)  # the good lines are kept
    assert [r.line for r in recs] == [1, 9]
    assert math.isnan(recs[0].scores["contrast"][1]) and recs[0].scores["contrast"][0] == 0.1
    (tmp_path / "bad.jsonl").write_text("\n# only a comment\n")
    with pytest.raises(PairsFileError, match="no valid pair"):
        read_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="dpo.pairs_file.*tiny_pairs.jsonl"):
        read_pairs(tmp_path / "nope.jsonl")


def test_unreadable_image_names_its_line(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "a", "images": ["x.png", "y.png"]}),
                          json.dumps({"prompt": "b", "images": ["x.png", "broken.png"]})])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    recs = read_pairs(p)
    with pytest.raises(PairsFileError, match="line 2: cannot read image .*broken.png"):
        load_pair_images(recs, 8)


# ------------------------------------------------------------------ win rates and config


def test_win_rates_per_scorer_and_consensus():
    from apex_fast.eval.metrics import win_rates  # the one win-rate definition, used by the DPO learner

    base = T([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [nan, 1.0, 1.0]])
    trained = T([[2.0, 2.0, 0.0], [0.0, 0.0, 2.0], [1.0, 2.0, 0.0], [5.0, nan, 0.0]])
    w = {k: v.rate for k, v in win_rates(trained.numpy(), base.numpy(), ["a", "b", "c"]).items()}
    assert w["a"] == pytest.approx((1 + 0 + 0.5) / 3)  # item 3: NaN, skipped
    assert w["b"] == pytest.approx((1 + 0 + 1) / 3)
    assert w["c"] == pytest.approx(1 / 4)
    # votes: +1 (2 of 3), -1, 0 (tie: 0.5), -1 (only c judges)
    assert w["consensus"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    same = {k: v.rate for k, v in win_rates(base.numpy(), base.numpy(), ["a", "b", "c"]).items()}
    assert same["b"] == 0.5 and same["consensus"] == 0.5


def test_dpo_config_errors_name_the_field():
    from apex_fast.dpo.config import DPOConfig

    DPOConfig().validate(["a"])
    for kw, field in [({"label": "vote"}, "dpo.label"), ({"beta": 0}, "dpo.beta"), ({"ref_ema": 1.0}, "dpo.ref_ema"),
                      ({"ref_update_every": 0}, "dpo.ref_update_every"), ({"mode": "offline"}, "dpo.pairs_file"),
                      ({"single_scorer": "zz"}, "dpo.single_scorer"), ({"mode": "batch"}, "dpo.mode")]:
        with pytest.raises(ValueError, match=field):
            DPOConfig(**kw).validate(["a"])


# ------------------------------------------------------------------ one micro-batch on real SD3 modules


def test_dpo_micro_loss_on_sd3_transformer(lora_transformer):
    from apex_fast.dpo.step import dpo_micro_loss, pair_noise
    from apex_fast.rl.rollout import Conditioning

    tr = lora_transformer
    ref = ReferenceAdapter(tr, update_every=1)
    g = torch.Generator().manual_seed(5)
    P = 3
    x0w, x0l = torch.randn(P, 4, 8, 8, generator=g), torch.randn(P, 4, 8, 8, generator=g)
    cond = Conditioning(torch.randn(P, 5, 16, generator=g), torch.randn(P, 8, generator=g))
    eps, t = pair_noise(0, 7, [0, 1, 2], (4, 8, 8))
    eps2, t2 = pair_noise(0, 7, [2, 0], (4, 8, 8))
    assert torch.equal(eps2[0], eps[2]) and torch.equal(t2[1], t[0])  # per-pair, not per-batch
    out = dpo_micro_loss(tr, ref.active, x0w, x0l, cond, eps, t, beta=50.0)
    # step 0: learner (lora_B = 0) == reference (the base): z = 0, loss = log 2
    assert out.logits.abs().max() < 1e-6 and float(out.loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    # the plain reference from the transformer's own outputs
    _nudge_learner(tr, 4)
    out = dpo_micro_loss(tr, ref.active, x0w, x0l, cond, eps, t, beta=50.0)
    vel = lambda x: tr(hidden_states=x, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,  # noqa: E731
                       timestep=t * 1000, return_dict=False)[0]
    with torch.no_grad():
        xw, xl = noisy_latents(x0w, eps, t), noisy_latents(x0l, eps, t)
        vw, vl = vel(xw), vel(xl)
        with ref.active():
            rw, rl = vel(xw), vel(xl)
    want = flow_dpo_loss_reference(vw, vl, rw, rl, x0w, x0l, eps, beta=50.0)
    assert out.per_pair.tolist() == pytest.approx(want, rel=1e-4, abs=1e-6)
    # gradients reach only the learner's LoRA, and a step along them lowers the loss
    out.loss.backward()
    learner = list(ref.learner_params.values())
    assert all(p.grad is not None for p in learner) and all(q.grad is None for q in ref.ref_params.values())
    with torch.no_grad():
        for p in learner:
            p -= 0.5 * p.grad / (p.grad.norm() + 1e-12) * 0.05
    after = dpo_micro_loss(tr, ref.active, x0w, x0l, cond, eps, t, beta=50.0)
    assert float(after.loss.detach()) < float(out.loss.detach())
    # a zero weight removes a pair from the loss, not from the forward
    w = dpo_micro_loss(tr, ref.active, x0w, x0l, cond, eps, t, beta=50.0, weight=T([1.0, 0.0, 1.0]), denominator=3)
    assert float(w.loss.detach()) == pytest.approx(float(after.per_pair[[0, 2]].sum()) / 3, rel=1e-5)


def test_encode_images_inverts_decode_scaling():
    from apex_fast.dpo.step import encode_images
    from apex_fast.models import load_pipeline
    from apex_fast.rl.rollout import decode_latents

    pipe = load_pipeline("tiny")
    imgs, _ = load_pair_images(read_pairs(TINY_PAIRS)[:2], 64)
    z = encode_images(pipe.vae, imgs, "cpu")
    assert z.shape[1] == pipe.vae.config.latent_channels
    # SD3's scaling: the latents the transformer sees have roughly unit scale
    assert 0.3 < float(z.std()) < 3.0
    with torch.no_grad():
        direct = pipe.vae.decode(pipe.vae.encode(torch.as_tensor(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1)
                                 .latent_dist.mean, return_dict=False)[0]
    torch.testing.assert_close(decode_latents(pipe.vae, z), (direct / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)
