"""Rollouts: the SDE sampler that stores latents and log-probs for training, and the ODE sampler
for evaluation (docs/SPEC.md section 1)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .sde import sde_step_with_logprob


@dataclass
class Conditioning:
    """Text conditioning of N samples; ``neg_*`` are the empty-prompt embeddings for CFG."""

    embeds: torch.Tensor  # [N, L, D]
    pooled: torch.Tensor  # [N, Dp]
    neg_embeds: torch.Tensor | None = None  # [N, L, D]
    neg_pooled: torch.Tensor | None = None

    def index(self, idx) -> "Conditioning":
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return Conditioning(self.embeds[idx], self.pooled[idx], pick(self.neg_embeds), pick(self.neg_pooled))


@dataclass
class Rollout:
    latents: torch.Tensor  # [N, T+1, C, H, W]: x at sigmas[0] (noise) .. sigmas[T]
    log_probs: torch.Tensor  # [N, T] log-prob of each step under the sampling policy (0 for ODE)
    sigmas: torch.Tensor  # [T+1], from 1 down to 0

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


def flow_sigmas(scheduler, num_steps: int) -> torch.Tensor:
    """The sigma schedule (T+1 values, ending at 0) the pipeline would use for ``num_steps``."""
    s = copy.deepcopy(scheduler)
    s.set_timesteps(num_steps)
    return s.sigmas.detach().float().cpu()


def predict_velocity(transformer, x, sigma, cond: Conditioning, guidance_scale: float, *, train: bool = False):
    """CFG velocity v = v_u + s (v_c - v_u), fp32 out. In training, v_u is computed without grad
    (SPEC 1: unconditional branch detached) and only v_c carries the graph."""
    dtype = next(transformer.parameters()).dtype
    n = x.shape[0]
    t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(n) * 1000.0
    use_cfg = guidance_scale > 1.0 and cond.neg_embeds is not None

    def run(xx, emb, pooled, tt):
        out = transformer(hidden_states=xx.to(dtype), encoder_hidden_states=emb.to(dtype),
                          pooled_projections=pooled.to(dtype), timestep=tt.to(dtype), return_dict=False)[0]
        return out.float()

    if not use_cfg:
        return run(x, cond.embeds, cond.pooled, t)
    if train:
        with torch.no_grad():
            v_u = run(x, cond.neg_embeds, cond.neg_pooled, t)
        v_c = run(x, cond.embeds, cond.pooled, t)
    else:  # one batched call for both branches
        v = run(torch.cat([x, x]), torch.cat([cond.neg_embeds, cond.embeds]),
                torch.cat([cond.neg_pooled, cond.pooled]), torch.cat([t, t]))
        v_u, v_c = v.chunk(2)
    return v_u + guidance_scale * (v_c - v_u)


def per_sample_randn(generators: list[torch.Generator], shape, device) -> torch.Tensor:
    """One independent draw per sample, so a sample's trajectory does not depend on its batch."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device)


@torch.no_grad()
def sample(
    transformer,
    scheduler,
    cond: Conditioning,
    *,
    latent_shape: tuple[int, int, int],
    num_steps: int,
    guidance_scale: float,
    noise_level: float,
    generators: list[torch.Generator],
    batch_size: int | None = None,
) -> Rollout:
    """SDE (noise_level > 0, training) or ODE (noise_level == 0, evaluation) sampling of N latents.

    ``generators`` holds one seeded generator per sample (initial noise, then one draw per step);
    results are identical for any ``batch_size``.
    """
    N = cond.embeds.shape[0]
    if len(generators) != N:
        raise ValueError(f"need one generator per sample: {len(generators)} generators for {N} samples")
    device = cond.embeds.device
    sigmas = flow_sigmas(scheduler, num_steps)
    sigma_max = float(sigmas[1])
    bs = batch_size or N
    all_latents, all_logps = [], []
    for start in range(0, N, bs):
        sl = slice(start, min(N, start + bs))
        gens = generators[sl]
        c = cond.index(sl)
        x = per_sample_randn(gens, latent_shape, device)
        lat, lps = [x], []
        for j in range(num_steps):
            v = predict_velocity(transformer, x, sigmas[j], c, guidance_scale)
            noise = per_sample_randn(gens, latent_shape, device) if noise_level > 0 else None
            step = sde_step_with_logprob(v, x, sigmas[j], sigmas[j + 1], noise_level=noise_level,
                                         sigma_max=sigma_max, noise=noise)
            lps.append(step.log_prob if step.log_prob is not None else torch.zeros(x.shape[0], device=device))
            x = step.prev_sample
            lat.append(x)
        all_latents.append(torch.stack(lat, 1))
        all_logps.append(torch.stack(lps, 1))
    return Rollout(torch.cat(all_latents), torch.cat(all_logps), sigmas)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, C, h, w] -> images float [N, 3, H, W] in [0, 1] (SD3's scaling and shift)."""
    dtype = next(vae.parameters()).dtype
    z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    img = vae.decode(z.to(dtype), return_dict=False)[0].float()
    return (img / 2 + 0.5).clamp(0, 1)
