"""Flow-GRPO parity (issue 19): the KL form, gradient accumulation (torch and DeepSpeed), the
exported LoRA is the EMA, lr warmup, lora.init_from, SDE windows, and console feedback."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from apex_fast.config import ConfigError, load_config
from apex_fast.models import lora_state_dict
from apex_fast.rl.loss import grpo_loss, kl_std
from apex_fast.rl.rollout import sde_window_at, trained_steps
from apex_fast.rl.sde import sde_noise_std, sde_step_with_logprob
from apex_fast.runtime.engines import lr_schedule
from apex_fast.train import Trainer

from _fast import deepspeed_one_process, quick_run

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
# tests/test_train.py's FAST: 4 samples, micro-batches of 2 (2 per epoch), 4 steps, 2 trained
FAST = quick_run(
    # the random tiny model, as the other trainer-machinery tests: on the pretrained testbed some LoRA
    # gradients are near 0 and Adam turns their rounding into lr-sized differences (3.8e-3 measured)
    "model.pretrained=tiny-random", "eval.images_per_prompt=1", "sample.num_steps=4",
    "train.micro_batch_size=2", "train.lr=1e-2", "log.plot=false",
    'rewards=[{"name":"jpeg_compressibility","weight":0.5},{"name":"colorfulness","weight":0.5}]',
)


def make_cfg(tmp_path, *extra, name="run"):
    return load_config(ROOT / "configs/tiny_cpu.yaml", FAST + [f"log.output_dir={tmp_path / name}", *extra])


def weights(trainer):
    return {k: v.clone() for k, v in lora_state_dict(trainer.transformer).items()}


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------ train.kl_form


def test_kl_forms_are_flow_grpos_and_the_exact_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    sig = torch.tensor([1.0, 0.9, 0.6, 0.0])
    t, t_prev, a = 0.9, 0.6, 0.7
    step = sde_step_with_logprob(v, x, t, t_prev, noise_level=a, sigma_max=0.9, noise=torch.zeros_like(x))
    ref = sde_step_with_logprob(v_ref, x, t, t_prev, noise_level=a, sigma_max=0.9, noise=torch.zeros_like(x))
    std_dev_t = a * math.sqrt(t / (1 - t))  # Flow-GRPO's std_dev_t
    flow_grpo = ((step.mean - ref.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)  # its train_sd3.py line
    exact = ((step.mean - ref.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2 * (t - t_prev))
    A = torch.ones(3)
    for form, want in (("flow_grpo", flow_grpo), ("exact", exact)):
        out = grpo_loss(step.log_prob, step.log_prob.detach(), A, clip_range=1e-4, mean=step.mean, ref_mean=ref.mean,
                        step_std=kl_std(step, form), kl_beta=0.04)
        torch.testing.assert_close(out.kl, want, rtol=1e-5, atol=0)
    # the exact form is 1/|dt| times stronger: 3.3x here, 3.7x-25x on the 10-step schedule
    assert float((exact / flow_grpo).mean()) == pytest.approx(1 / (t - t_prev), rel=1e-5)
    assert float(sde_noise_std(sig[:1], 0.9, a)) == pytest.approx(a * math.sqrt(1 / (1 - 0.9)))


def test_learner_uses_the_configured_kl_form(tmp_path):
    tr = Trainer(make_cfg(tmp_path, "train.kl_beta=0.04"))
    samples, *_ = tr.rollout(0)
    with torch.no_grad():  # move the LoRA away from the reference so the KL is not 0
        for p in tr.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    idx, j = torch.arange(2), 1
    kls = {}
    for form in ("flow_grpo", "exact"):
        tr.cfg.train.kl_form = form
        with torch.no_grad():
            kls[form] = tr.learner.micro_loss(samples, idx, j, torch.ones(2))[1].kl
    dt = float(tr.learner.sigmas[j] - tr.learner.sigmas[j + 1])
    assert float(kls["flow_grpo"].min()) > 0
    torch.testing.assert_close(kls["exact"] * dt, kls["flow_grpo"], rtol=1e-4, atol=0)
    assert load_config(None, ["rewards=[{name: contrast}]"]).train.kl_form == "flow_grpo"  # the default
    with pytest.raises(ConfigError, match="train.kl_form"):
        make_cfg(tmp_path, "train.kl_form=gauss")


# ------------------------------------------------------------------ gradient accumulation


def test_accumulating_two_micro_batches_equals_one_micro_batch_of_both(tmp_path):
    """Micro-batches of 2 accumulated 2 at a time take the same optimizer steps as micro-batches of 4
    (the same samples, the step's gradient a mean over them); without accumulation they do not."""
    base = ["train.epochs=2", "sample.group_size=4", "train.kl_beta=0.04"]
    acc = Trainer(make_cfg(tmp_path, *base, "train.gradient_accumulation=2", name="acc"))
    acc.fit()
    big = Trainer(make_cfg(tmp_path, *base, "train.micro_batch_size=4", name="big"))
    big.fit()
    plain = Trainer(make_cfg(tmp_path, *base, name="plain"))
    plain.fit()
    assert acc.global_step == big.global_step == 4 and plain.global_step == 8
    assert acc.learner.steps_per_epoch == 2
    # equal up to float rounding (batch composition of the GEMMs), which Adam magnifies where gradients
    # are near 0; tests/test_distributed_multiproc.py measures it and allows 2e-4
    assert max_diff(weights(acc), weights(big)) < 2e-4
    assert max_diff(weights(acc), weights(plain)) > 1e-3  # the comparison is not vacuous
    steps = Trainer(make_cfg(tmp_path, *base, "train.optimizer_steps_per_epoch=1", "train.epochs=1", name="s"))
    assert steps.learner.accumulation == 4 and steps.learner.steps_per_epoch == 1


def test_accumulation_must_divide_the_epoch(tmp_path):
    with pytest.raises(ConfigError, match=r"train.gradient_accumulation: 3 must divide the 2 micro-batches.*\[1, 2\]"):
        Trainer(make_cfg(tmp_path, "train.gradient_accumulation=3"))
    with pytest.raises(ConfigError, match="train.optimizer_steps_per_epoch"):
        make_cfg(tmp_path, "train.gradient_accumulation=2", "train.optimizer_steps_per_epoch=1")


def test_deepspeed_json_takes_the_accumulation(tmp_path):
    from apex_fast.runtime import deepspeed_config

    cfg = make_cfg(tmp_path, "sample.group_size=8", "train.optimizer_steps_per_epoch=2",
                   f"deepspeed={ROOT / 'configs/ds_zero2.json'}")
    ds = deepspeed_config(cfg, world_size=2)  # 16 samples, 8 per rank, 4 micro-batches of 2, 2 per step
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 2 * 2 * 2
    sd35 = load_config(ROOT / "configs/sd35m_lora_zero2.yaml", [f"deepspeed={ROOT / 'configs/ds_zero2.json'}"])
    assert deepspeed_config(sd35, world_size=8)["gradient_accumulation_steps"] == 9  # 18 micro-batches: 2 steps


@pytest.mark.slow
def test_deepspeed_accumulation_matches_the_torch_engine(tmp_path):
    """One process under DeepSpeed ZeRO-2 with its own accumulation (2 micro-batches per step) trains
    like the torch engine with the same accumulation, not like one step per micro-batch."""
    base = ["train.epochs=2", "sample.group_size=4", "train.gradient_accumulation=2", "train.ema=false"]
    out = tmp_path / "ds"
    deepspeed_one_process(tmp_path, out, FAST + base)
    state = json.loads((out / "checkpoints/checkpoint-000002/state.json").read_text())
    assert state["global_step"] == 4
    ds_w = load_file(str(out / "lora/pytorch_lora_weights.safetensors"))
    torch_run = Trainer(make_cfg(tmp_path, *base, name="torch"))
    torch_run.fit()
    plain = Trainer(make_cfg(tmp_path, *base[:-2], "train.ema=false", name="plain"))
    plain.fit()
    ref = load_file(str(tmp_path / "torch/lora/pytorch_lora_weights.safetensors"))
    other = load_file(str(tmp_path / "plain/lora/pytorch_lora_weights.safetensors"))
    assert max_diff(ds_w, ref) < 2e-4
    assert max_diff(ds_w, other) > 5e-3


# ------------------------------------------------------------------ EMA export


def test_exported_lora_is_the_ema_and_resume_continues_from_the_raw_weights(tmp_path):
    tr = Trainer(make_cfg(tmp_path, "train.epochs=2", "train.ema_every=1", "train.ema_decay=0.5"))
    tr.fit()
    out = tmp_path / "run"
    ema = dict(zip([n for n, p in tr.transformer.named_parameters() if p.requires_grad], tr.learner.ema.values))
    raw = weights(tr)
    exported = load_file(str(out / "lora/pytorch_lora_weights.safetensors"))
    ckpt = out / "checkpoints/checkpoint-000002"
    assert max_diff(exported, load_file(str(ckpt / "pytorch_lora_weights.safetensors"))) == 0
    for k, v in exported.items():  # diffusers key transformer.<peft key>; the EMA, not the raw weights
        peft_key = k[len("transformer."):]
        name = next(n for n in ema if n.replace(".default", "") == peft_key)
        torch.testing.assert_close(v, ema[name], rtol=0, atol=0)
    assert max(float((exported["transformer." + k] - v).abs().max()) for k, v in raw.items()) > 1e-3
    state = load_file(str(ckpt / "state.safetensors"))
    for k, v in raw.items():  # the raw weights are kept for resume
        assert any(torch.equal(v, s) for n, s in state.items() if n.startswith("trainable") and k in n), k
    assert json.loads((ckpt / "state.json").read_text())["exported_lora"] == "ema"
    resumed = Trainer(make_cfg(tmp_path, "train.epochs=2", "train.ema_every=1", "train.ema_decay=0.5",
                               "checkpoint.resume=latest"))
    resumed.resume("latest")
    assert max_diff(weights(resumed), raw) == 0


# ------------------------------------------------------------------ lr schedule


def test_lr_schedules_follow_diffusers_and_warmup_starts_at_zero(tmp_path):
    from diffusers.optimization import get_scheduler
    from types import SimpleNamespace as NS

    for name in ("constant", "constant_with_warmup", "linear", "cosine"):
        factor = lr_schedule(NS(lr_schedule=name, lr_warmup_steps=3), total_steps=10)
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([p], lr=2.0)
        kw = {} if name == "constant" else {"num_warmup_steps": 3}
        sched = get_scheduler(name, opt, **kw, **({"num_training_steps": 10} if name in ("linear", "cosine") else {}))
        for step in range(10):  # the lr of the step-th optimizer step
            assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * factor(step)), (name, step)
            opt.step()
            sched.step()
    tr = Trainer(make_cfg(tmp_path, "train.epochs=2", "train.lr_schedule=constant_with_warmup",
                          "train.lr_warmup_steps=2", "train.gradient_accumulation=2", "train.ema=false"))
    before = weights(tr)
    samples, group_ids, R, _ = tr.rollout(0)
    A, _ = tr.balancer.advantages(R, group_ids)
    stats = tr.train_epoch(samples, A[samples.global_index], 0)  # step 0: lr 0, nothing moves
    assert tr.global_step == 1 and stats["lr"] == 0.0
    assert max_diff(weights(tr), before) == 0
    assert tr.learner.lr == pytest.approx(0.5 * tr.cfg.train.lr)  # step 1 of a 2-step warmup


# ------------------------------------------------------------------ lora.init_from


def test_init_from_loads_a_diffusers_or_peft_lora(tmp_path):
    a = Trainer(make_cfg(tmp_path, "train.epochs=1", "train.ema=false", name="a"))
    a.fit()
    trained = weights(a)
    b = Trainer(make_cfg(tmp_path, "train.epochs=1", f"lora.init_from={tmp_path / 'a' / 'lora'}", name="b"))
    assert max_diff(weights(b), trained) == 0
    assert all(torch.equal(e, p) for e, p in zip(b.learner.ema.values, b.params))  # the EMA starts from it
    # a peft folder, as Flow-GRPO's checkpoints (save_pretrained): base_model.model.<key>, adapter_config.json
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in trained.items()},
              str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32, "peft_type": "LORA"}))
    c = Trainer(make_cfg(tmp_path, "train.epochs=1", f"lora.init_from={peft_dir}", name="c"))
    assert max_diff(weights(c), trained) == 0
    with pytest.raises(ConfigError, match=r"lora.init_from: .* r=16 but the run uses lora.rank=8; set lora.rank to 16"):
        Trainer(make_cfg(tmp_path, "lora.rank=8", f"lora.init_from={tmp_path / 'a' / 'lora'}", name="d"))
    with pytest.raises(ConfigError, match="lora.init_from: .*does not exist"):
        Trainer(make_cfg(tmp_path, f"lora.init_from={tmp_path / 'nope.safetensors'}", name="e"))


# ------------------------------------------------------------------ sample.sde_window


def test_sde_window_positions():
    starts = {sde_window_at(e, size=2, lo=0, hi=5, schedule="random", shift_every=1, seed=3)[0] for e in range(60)}
    assert starts == {0, 1, 2, 3}  # uniform over [lo, hi - size]
    assert sde_window_at(7, size=2, lo=0, hi=5, schedule="random", shift_every=1, seed=3) == \
        sde_window_at(7, size=2, lo=0, hi=5, schedule="random", shift_every=1, seed=3)
    slid = [sde_window_at(e, size=2, lo=1, hi=6, schedule="sliding", shift_every=2, seed=0) for e in range(10)]
    assert slid == [(1, 3), (1, 3), (2, 4), (2, 4), (3, 5), (3, 5), (4, 6), (4, 6), (1, 3), (1, 3)]
    assert trained_steps(10, 0.99, None) == list(range(9)) and trained_steps(10, 0.99, (3, 5)) == [3, 4]


def test_sde_window_samples_ode_outside_and_trains_only_the_window(tmp_path):
    cfg = make_cfg(tmp_path, "sample.sde_window={size: 2, range: [1, 4], schedule: sliding}")
    tr = Trainer(cfg)
    samples, *_ = tr.rollout(0)
    assert samples.trained_steps == [1, 2]
    lp = samples.log_probs
    assert torch.all(lp[:, [0, 3]] == 0) and torch.all(lp[:, 1:3] != 0)
    # outside the window the steps are the deterministic ODE: the first step equals an ODE run's
    ode = Trainer(make_cfg(tmp_path, name="ode"))
    ode.cfg.sample.noise_level = 0.0  # the ODE sampler (a training config must have noise: set after validation)
    ode_samples, *_ = ode.rollout(0)
    torch.testing.assert_close(samples.latents[:, :2], ode_samples.latents[:, :2], rtol=0, atol=1e-6)
    assert not torch.allclose(samples.latents[:, 3], ode_samples.latents[:, 3])
    seen = []
    orig = tr.learner.micro_loss
    tr.learner.micro_loss = lambda s, idx, j, a, model=None: (seen.extend(j), orig(s, idx, j, a, model=model))[1]
    tr.train_epoch(samples, torch.ones(tr.local_n), 0)
    assert sorted(set(seen)) == [1, 2] and len(seen) == 2 * 2  # 2 micro-batches x 2 window steps
    with pytest.raises(ConfigError, match="sample.sde_window"):
        make_cfg(tmp_path, "sample.sde_window={size: 4, range: [0, 3]}")


# ------------------------------------------------------------------ console feedback


def test_banner_and_one_plain_line_per_epoch_without_control_characters(tmp_path, capfd):
    Trainer(make_cfg(tmp_path, "train.epochs=2", "log.progress=true", "train.gradient_accumulation=2")).fit()
    out, err = capfd.readouterr()
    text = out + err
    assert "\r" not in text and "\x1b" not in text  # not a terminal: no bars
    assert "samples per epoch" in out and "4 (2 prompts x 2 images)" in out
    assert "optimizer steps per epoch  1 (micro-batch 2 x 1 processes x accumulation 2)" in out
    assert str((tmp_path / "run").resolve()) in out
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1/2", "2/2"]
    assert "jpeg_compressibility=" in lines[0] and "img/s" in lines[0]


# ------------------------------------------------------------------ speed options keep the numbers


def test_reused_rollout_forwards_and_stacked_timesteps_give_the_same_loss_and_gradient(tmp_path):
    """train.reuse_rollout (KL reference from the rollout's per-sample-LoRA forward, unconditional
    velocity reused before the first optimizer step) and train.timesteps_per_forward (timesteps
    stacked into one forward) compute the same loss and gradient as one forward per term."""
    tr = Trainer(make_cfg(tmp_path, "train.kl_beta=0.04", "sample.num_steps=6", "train.timestep_fraction=0.5"))
    samples, *_ = tr.rollout(0)
    assert samples.ref_velocity is not None and samples.uncond_velocity.shape[1] == 3
    with torch.no_grad():  # a LoRA away from the reference, so the KL and its gradient are not 0
        for p in tr.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    # the rollout sampled with the unperturbed weights: make the stored velocities those of the new
    # ones by sampling again (same seeds), as the trainer does every epoch
    samples, *_ = tr.rollout(0)
    idx, a = torch.arange(2), torch.tensor([1.0, -0.5])
    tr.transformer.train()

    def loss_and_grad(s, js):
        for p in tr.params:
            p.grad = None
        loss = sum(tr.learner.micro_loss(s, idx, c, a)[1].loss for c in js)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in tr.params])

    from dataclasses import replace

    plain = replace(samples, uncond_velocity=None, ref_velocity=None)
    l0, g0 = loss_and_grad(plain, [0, 1, 2])
    l1, g1 = loss_and_grad(samples, [0, 1, 2])
    l2, g2 = loss_and_grad(samples, [[0, 1, 2]])
    l3, g3 = loss_and_grad(plain, [[0, 1], [2]])
    for l, g in ((l1, g1), (l2, g2), (l3, g3)):
        assert l == pytest.approx(l0, rel=1e-4, abs=1e-7)
        torch.testing.assert_close(g, g0, rtol=1e-3, atol=1e-6)
    assert float(g0.abs().max()) > 1e-4
    samples.policy_step = -1  # after an optimizer step the stored unconditional velocity is not used
    assert tr.learner.step_terms(samples, idx, 0).mean.requires_grad


def test_lora_merged_forward_equals_peft_and_is_off_with_grad():
    from apex_fast.models import add_lora, build_tiny_pipeline, lora_merged, lora_per_sample

    tr = add_lora(build_tiny_pipeline(0).transformer, rank=8, alpha=16)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(4, 16, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(4, 10, tr.config.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(4, tr.config.pooled_projection_dim, generator=g),
              timestep=torch.full((4,), 500.0), return_dict=False)
    with torch.no_grad():
        peft_out = tr(**kw)[0]
        with lora_per_sample(tr, None, lora_rows=2):
            peft_mixed = tr(**kw)[0]
        with lora_merged(tr) as merged:
            out = tr(**kw)[0]
        with lora_merged(tr, lora_rows=2):
            mixed = tr(**kw)[0]
        from apex_fast.models import lora_disabled

        with lora_disabled(tr):
            base = tr(**kw)[0]
    assert merged
    torch.testing.assert_close(out, peft_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[:2], peft_out[:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[2:], base[2:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(peft_mixed, mixed, rtol=1e-4, atol=1e-5)
    assert float((peft_out - base).abs().max()) > 1e-3  # the LoRA matters
    with lora_merged(tr) as merged:  # grad enabled: peft's own forward, untouched
        assert not merged and tr(**kw)[0].requires_grad
