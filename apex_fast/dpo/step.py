"""One DPO micro-batch on real SD3 modules: clean latents of the pairs, shared noise and t per pair,
the learner's velocities with grad, the reference's without (docs/SPEC.md section 6).

Training uses the conditional velocity only (no CFG), as Diffusion-DPO and SD3 fine-tuning do; the
timestep passed to the transformer is 1000 t, as the sampler's.
"""
from __future__ import annotations

import torch

from apex_fast.runtime import seed_for
from apex_fast.rl.rollout import Conditioning, predict_velocity

from .loss import DPOOut, flow_dpo_loss, noisy_latents, velocity_error


def pair_noise(seed: int, key, pair_ids, shape, t_mean: float = 0.0, t_std: float = 1.0):
    """Shared noise eps [P, *shape] and logit-normal t [P] per pair, each from its own generator
    seeded by (seed, key, pair id): the same for a pair whatever rank or micro-batch trains it."""
    eps, ts = [], []
    for i in pair_ids:
        g = torch.Generator().manual_seed(seed_for(seed, "dpo-noise", key, int(i)))
        eps.append(torch.randn(shape, generator=g))
        ts.append(torch.sigmoid(t_mean + t_std * torch.randn((), generator=g)))
    return torch.stack(eps), torch.stack(ts)


def _velocity(model, x, t, cond: Conditioning):
    # predict_velocity takes sigma and multiplies by 1000; guidance 1: the conditional branch only
    return predict_velocity(model, x, t, Conditioning(cond.embeds, cond.pooled), 1.0, train=True)


def dpo_micro_loss(model, reference, x0_w: torch.Tensor, x0_l: torch.Tensor, cond: Conditioning, eps: torch.Tensor,
                   t: torch.Tensor, *, beta: float, p: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                   denominator: int | None = None) -> DPOOut:
    """Loss of P pairs. ``model``: what to call for the learner (the engine's module); ``reference``:
    a context manager factory (``ReferenceAdapter.active``) under which the same transformer is the
    reference. ``weight`` [P] (0/1) lets a rank run a padded pair that contributes nothing, so every
    rank calls backward on every micro-batch. ``t`` [P] in (0, 1)."""
    xw, xl = noisy_latents(x0_w, eps, t), noisy_latents(x0_l, eps, t)
    x = torch.cat([xw, xl])
    tt = torch.cat([t, t])
    c2 = Conditioning(torch.cat([cond.embeds, cond.embeds]), torch.cat([cond.pooled, cond.pooled]))
    v = _velocity(model, x, tt, c2)
    with torch.no_grad(), reference():
        v_ref = _velocity(model, x, tt, c2)
    P = x0_w.shape[0]
    x0 = torch.cat([x0_w, x0_l])
    e = velocity_error(v, x0, torch.cat([eps, eps]))
    e_ref = velocity_error(v_ref, x0, torch.cat([eps, eps]))
    return flow_dpo_loss(e[:P], e[P:], e_ref[:P], e_ref[P:], beta=beta, p=p, weight=weight, denominator=denominator)


@torch.no_grad()
def encode_images(vae, images_uint8, device, batch_size: int = 16) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> SD3 latents [N, C, h, w] float32: the posterior mean, then SD3's
    (z - shift) * scale (the inverse of rl.rollout.decode_latents)."""
    dtype = next(vae.parameters()).dtype
    x = torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = []
    for i in range(0, x.shape[0], batch_size):
        z = vae.encode(x[i:i + batch_size].to(device, dtype)).latent_dist.mean.float()
        out.append((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor)
    return torch.cat(out)
