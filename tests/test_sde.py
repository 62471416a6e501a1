"""SPEC 1: the SDE step, its log-prob, the ODE limit, and the GRPO loss."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from apex_fast.rl.loss import grpo_loss
from apex_fast.rl.rollout import flow_sigmas
from apex_fast.rl.sde import sde_noise_std, sde_step_with_logprob

torch.set_num_threads(1)


def _sched_sigmas(n=10):
    return flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), n)


@pytest.mark.parametrize("j", [0, 3, 9])
def test_logprob_matches_torch_normal(j):
    sig = _sched_sigmas()
    g = torch.Generator().manual_seed(j)
    x, v = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    step = sde_step_with_logprob(v, x, sig[j], sig[j + 1], noise_level=0.7, sigma_max=float(sig[1]), generator=g)
    # independent formula: mean and std written from SPEC 1, log-prob from torch.distributions
    t, tp = float(sig[j]), float(sig[j + 1])
    dt = tp - t
    st = 0.7 * math.sqrt(t / (1 - (float(sig[1]) if t == 1 else t)))
    mu = x + (v + st**2 / (2 * t) * (x + (1 - t) * v)) * dt
    ref = torch.distributions.Normal(mu, st * math.sqrt(-dt)).log_prob(step.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(step.mean, mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.log_prob, ref, rtol=1e-5, atol=1e-5)
    # the sample really is drawn with that std: the standardised residual has unit variance
    z = (step.prev_sample - mu) / (st * math.sqrt(-dt))
    assert 0.7 < float(z.std()) < 1.3


def test_noise_std_uses_next_sigma_at_t_equal_one():
    s = torch.tensor([1.0, 0.5])
    out = sde_noise_std(s, 0.96, 0.7)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([0.7 * math.sqrt(1 / 0.04), 0.7]))


def test_noise_level_zero_equals_diffusers_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    sig = sched.sigmas
    for j, t in enumerate(sched.timesteps):
        v = torch.randn(2, 16, 8, 8, generator=g)
        ours = sde_step_with_logprob(v, x, sig[j], sig[j + 1], noise_level=0.0, sigma_max=float(sig[1])).prev_sample
        theirs = sched.step(v, t, x, return_dict=False)[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        x = theirs


def test_given_prev_sample_gives_its_logprob_and_gradient():
    sig = _sched_sigmas()
    x = torch.randn(2, 3, 4, 4)
    v = torch.randn(2, 3, 4, 4, requires_grad=True)
    prev = torch.randn(2, 3, 4, 4)
    step = sde_step_with_logprob(v, x, sig[2], sig[3], noise_level=0.7, sigma_max=float(sig[1]), prev_sample=prev)
    assert torch.equal(step.prev_sample, prev)
    step.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_grpo_loss_clip_and_mask():
    lp_old = torch.zeros(4)
    lp = torch.tensor([0.0, 0.5, -0.5, 0.5])
    A = torch.tensor([1.0, 1.0, -1.0, 0.0])  # the last sample is masked (advantage exactly 0)
    out = grpo_loss(lp, lp_old, A, clip_range=0.1)
    r = lp.exp()
    per = torch.maximum(-A * r, -A * r.clamp(0.9, 1.1))
    assert torch.allclose(out.loss, per[:3].sum() / 4)
    # ratio > 1 + eps with A > 0: pessimistic term is the clipped one -> zero gradient
    lp2 = lp.clone().requires_grad_(True)
    grpo_loss(lp2, lp_old, A, clip_range=0.1).loss.backward()
    assert lp2.grad[1] == 0 and lp2.grad[0] != 0 and lp2.grad[3] == 0


def test_grpo_loss_advantage_clip_and_kl():
    A = torch.tensor([100.0, -100.0])
    out = grpo_loss(torch.zeros(2), torch.zeros(2), A, clip_range=1e-4, adv_clip=5.0)
    assert torch.allclose(out.policy_loss, torch.tensor([-5.0, 5.0]))
    mu, mu_ref = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    std = torch.full((2, 1, 1, 1), 0.5)
    out = grpo_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), clip_range=1e-4, mean=mu, ref_mean=mu_ref,
                    step_std=std, kl_beta=0.1)
    assert torch.allclose(out.kl, torch.full((2,), 1 / (2 * 0.25)))
    assert torch.allclose(out.loss, torch.tensor(-1.0 + 0.1 * 2.0))
