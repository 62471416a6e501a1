"""balance.gradients in the trainer: the GRPO learner's captured step (one_backward) equals the
reference (k_backward) and the plain training gradient; aggregators write the gradient of the loss
with advantages Ahat c; whole runs with one_backward train like k_backward; options and errors."""
import csv
import math
from pathlib import Path

import pytest
import torch

from apex_fast.config import ConfigError, load_config
from apex_fast.grad import KBackwardGradients
from apex_fast.models import lora_state_dict
from apex_fast.train import Trainer

from _fast import quick_run

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
FAST = quick_run(
    "model.pretrained=tiny-random", "eval.images_per_prompt=1", "data.train_prompts=ocr_train.txt",
    "data.eval_prompts=ocr_eval.txt", "sample.num_steps=4", "train.micro_batch_size=2", "train.lr=1e-2",
    "log.plot=false",
    "rewards=[{name: jpeg_compressibility, weight: 0.5}, {name: colorfulness, weight: 0.3}, {name: contrast, weight: 0.2}]",
)


def make_cfg(tmp_path, *extra, name="run"):
    return load_config(ROOT / "configs/tiny_cpu.yaml", FAST + [f"log.output_dir={tmp_path / name}", *extra])


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def grads_of(tr):
    g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in tr.params]
    for p in tr.params:
        p.grad = None
    return g


@pytest.mark.parametrize("method,extra", [("pcgrad", ()), ("apex", ()), ("upgrad", ()), ("cagrad", ()),
                                          ("apex", ("model.gradient_checkpointing=true",))])
def test_captured_step_equals_reference_and_plain_gradient(tmp_path, method, extra):
    # groups of 4: with groups of 2 every Ahat column is a +-1 pattern, Ahat c can nearly cancel and
    # the renormalised c (divided by the std of Ahat c) turns float rounding into large differences
    tr = Trainer(make_cfg(tmp_path, f"balance.method={method}", "balance.gradients=one_backward",
                          "sample.group_size=4", "train.micro_batch_size=4", *extra))
    samples, group_ids, R_local, _ = tr.rollout(0)
    R, group_ids = tr.runtime.gather_samples(R_local, group_ids[samples.global_index], samples.global_index)
    A, _ = tr.balancer.advantages(R, group_ids)
    Ahat = tr.balancer.objective_advantages
    mine = samples.global_index
    a_mine, Ahat_mine = A[mine], Ahat[mine]
    idx = tr.layout.micro_batches(0, 0)[0]
    L = tr.learner
    L.transformer.train()
    rng = tr.balancer.generator.get_state() if method == "pcgrad" else None

    def captured():
        L._epoch_J = None
        L.captured_step(samples, idx, a_mine[idx], Ahat_mine[idx], Ahat, {k: [] for k in
                                                                          ("approx_kl", "clipfrac", "kl", "policy_loss")})
        return grads_of(tr), [j.clone() for j in L.grads.jacobian()], L.coef

    g1, J1, c1 = captured()
    L.grads = KBackwardGradients(tr.transformer, tr.params, 3, collect_all=L.aggregates)
    if rng is not None:
        tr.balancer.generator.set_state(rng)
    g2, J2, c2 = captured()
    assert len(J1) == len(J2) > 0
    nonzero = 0
    for a, b in zip(J1, J2):
        if float(b.abs().max()) > 0:
            nonzero += 1
            assert rel(a, b) < 1e-5
    assert nonzero >= len(J2) // 2 - 1  # lora_B (lora_A has 0 gradient while lora_B = 0 at init)
    for a, b in zip(g1, g2):
        if float(b.abs().max()) > 0:
            assert rel(a, b) < 1e-5
    # the reference gradient: the ordinary training loss (+ KL) with the advantages actually trained on
    # (first step after sampling: ratio ~ 1, inside the clip range, so the clip masks agree)
    if method != "apex":
        assert c1 is not None and torch.allclose(c1, c2, rtol=1e-5)
        adv = Ahat_mine[idx] @ c1.float()
    else:
        assert c1 is None
        adv = a_mine[idx]
    for j in range(L.num_train_steps):
        _, out = L.micro_loss(samples, idx, j, adv)
        (out.loss / L.num_train_steps).backward()
    g_ref = grads_of(tr)
    for a, b in zip(g1, g_ref):
        if float(b.abs().max()) > 0:
            assert rel(a, b) < 1e-5


def lora_weights(tr):
    return {k: v.clone() for k, v in lora_state_dict(tr.transformer).items()}


def test_one_backward_trains_like_k_backward_and_feeds_the_gram(tmp_path):
    runs = {}
    for mode in ("one_backward", "k_backward"):
        # one epoch, groups of 4: with groups of 2 each Ahat column is a +-1 pattern and Ahat c can nearly
        # cancel (its renormalisation magnified rounding to 6e-3 on the testbed prompts); a second epoch
        # scores images that differ by rounding, and JPEG size is not continuous in the pixels (1e-2)
        tr = Trainer(make_cfg(tmp_path, "train.epochs=1", "balance.method=pcgrad", f"balance.gradients={mode}",
                              "sample.group_size=4", "train.micro_batch_size=4", name=mode))
        tr.fit()
        runs[mode] = lora_weights(tr)
    w1, w2 = runs["one_backward"], runs["k_backward"]
    fresh = lora_weights(Trainer(make_cfg(tmp_path, "train.epochs=0", name="fresh")))
    moved = max(float((w1[k] - fresh[k]).abs().max()) for k in w1)
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    # float rounding only, magnified by Adam where gradients are near 0 (as tests/test_distributed_multiproc.py's ATOL)
    assert moved > 1e-2 and diff < 2e-4, (moved, diff)
    rows = list(csv.DictReader((tmp_path / "one_backward" / "metrics.csv").open()))
    cos = float(rows[1]["cos/jpeg_compressibility/colorfulness"])
    assert -1 <= cos <= 1 and cos != 0 and float(rows[1]["gram_fallback"]) == 0.0


def test_apex_conflict_from_the_update_gram_with_options(tmp_path):
    cfg = make_cfg(tmp_path, "train.epochs=2", "balance.method=apex", "balance.gradients=one_backward",
                   "balance.gram_every_steps=2", "balance.gram_layers=['transformer_blocks.0.*']",
                   "balance.warmup_epochs=0")
    tr = Trainer(cfg)
    assert 0 < len(tr.learner.grads.jacobian(gram=True)) < len(tr.params)
    tr.fit()
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert float(rows[1]["conflict_from_gram"]) == 1.0
    assert all(math.isfinite(float(rows[1][f"C/{n}"])) for n in ("jpeg_compressibility", "colorfulness", "contrast"))


def test_resume_is_exact_with_apex_captured_gradient_defaults(tmp_path):
    """APEX with one_backward runs the cross-epoch Gram (CAPTURED_GRADIENT_DEFAULTS): the checkpoint keeps the
    previous epoch's blocks, so a run resumed after epoch 2 gets epoch 3's cross-epoch Gram (which sets epoch
    4's coefficients) and ends with the uninterrupted run's weights and balancer state, bit for bit."""
    extra = ["balance.method=apex", "balance.gradients=one_backward", "balance.warmup_epochs=0",
             "balance.cone_min_persistence=0.0"]  # every objective in the cone from the start: the Gram acts
    straight = Trainer(make_cfg(tmp_path, "train.epochs=4", *extra, name="a"))
    assert straight.cfg.balance.gram_estimate == "cross_epoch" and straight.cfg.balance.dual_cone
    straight.fit()
    Trainer(make_cfg(tmp_path, "train.epochs=2", *extra, name="b")).fit()
    from apex_fast.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "b" / "checkpoints" / "checkpoint-000002")["gram_prev"]
    assert saved is not None and len(saved) == len(straight.learner.epoch_gram.prev)
    resumed = Trainer(make_cfg(tmp_path, "train.epochs=4", "checkpoint.resume=latest", *extra, name="b"))
    resumed.fit()
    wa, wb = lora_weights(straight), lora_weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.equal(straight.balancer.cone_gram, resumed.balancer.cone_gram)
    assert torch.equal(straight.balancer.cone_persist, resumed.balancer.cone_persist)
    # without the blocks the resumed run's first Gram is the batch one: the balancer's state differs
    Trainer(make_cfg(tmp_path, "train.epochs=2", *extra, name="c")).fit()
    lost = Trainer(make_cfg(tmp_path, "train.epochs=4", "checkpoint.resume=latest", *extra, name="c"))
    lost.learner.epoch_gram.restore_blocks = lambda blocks, device=None: None
    lost.fit()
    assert not torch.equal(straight.balancer.cone_gram, lost.balancer.cone_gram)


def test_resume_is_exact_with_one_backward(tmp_path):
    extra = ["balance.method=pcgrad", "balance.gradients=one_backward", "balance.gram_every_steps=3"]
    straight = Trainer(make_cfg(tmp_path, "train.epochs=2", *extra, name="a"))
    straight.fit()
    Trainer(make_cfg(tmp_path, "train.epochs=1", *extra, name="b")).fit()
    resumed = Trainer(make_cfg(tmp_path, "train.epochs=2", "checkpoint.resume=latest", *extra, name="b"))
    resumed.fit()
    wa, wb = lora_weights(straight), lora_weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("override,match", [
    ("balance.gradients=two_backward", "balance.gradients must be one of proxy, one_backward, k_backward"),
    ("balance.gram_every_steps=0", "balance.gram_every_steps"),
    ("balance.gram_layers=[]", "balance.gram_layers"),
])
def test_bad_gradient_options_are_config_errors(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(tmp_path, override)


def test_one_backward_needs_lora_and_matching_layers(tmp_path):
    with pytest.raises(ConfigError, match="needs LoRA"):
        Trainer(make_cfg(tmp_path, "balance.gradients=one_backward", "lora.enabled=false"))
    with pytest.raises(ValueError, match="gram_layers"):
        Trainer(make_cfg(tmp_path, "balance.gradients=one_backward", "balance.gram_layers=['no_such_layer']"))
