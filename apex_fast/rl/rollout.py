"""Rollouts: the SDE sampler that stores latents and log-probs for training, and the ODE sampler
for evaluation (docs/SPEC.md section 1)."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from ..models.lora import lora_merged
from ..runtime import seed_for
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
    # at the ``record_steps`` of ``sample`` (S of them), else None:
    uncond_velocity: torch.Tensor | None = None  # [N, S, C, H, W] the policy's unconditional velocity
    ref_velocity: torch.Tensor | None = None  # [N, S, C, H, W] the LoRA-disabled reference's CFG velocity

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


def flow_sigmas(scheduler, num_steps: int) -> torch.Tensor:
    """The sigma schedule (T+1 values, ending at 0) the pipeline would use for ``num_steps``."""
    s = copy.deepcopy(scheduler)
    s.set_timesteps(num_steps)
    return s.sigmas.detach().float().cpu()


def predict_velocity(transformer, x, sigma, cond: Conditioning, guidance_scale: float, *, train: bool = False,
                     uncond: torch.Tensor | None = None, parts: bool = False, reference: bool = False):
    """CFG velocity v = v_u + s (v_c - v_u), fp32 out. In training, v_u is computed without grad
    (SPEC 1: unconditional branch detached) and only v_c carries the graph; ``uncond`` gives that v_u
    when it is already known (the rollout's, while the policy has not changed since).

    ``parts`` (no grad, CFG on): returns (v, v_u, v_ref) with ``reference`` also the LoRA-disabled
    reference's CFG velocity v_ref from the SAME batched forward (per-sample LoRA on/off, 4N rows),
    else v_ref None."""
    dtype = next(transformer.parameters()).dtype
    n = x.shape[0]
    t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(n) * 1000.0
    use_cfg = guidance_scale > 1.0 and cond.neg_embeds is not None
    has_lora = getattr(transformer, "peft_config", None) is not None

    def run(xx, emb, pooled, tt, lora_rows=None):
        # without grad: LoRA merged into the weights for this call (the same function, no LoRA cost)
        with contextlib.ExitStack() as stack:
            if not torch.is_grad_enabled() and has_lora:
                stack.enter_context(lora_merged(transformer, lora_rows))
            out = transformer(hidden_states=xx.to(dtype), encoder_hidden_states=emb.to(dtype),
                              pooled_projections=pooled.to(dtype), timestep=tt.to(dtype), return_dict=False)[0]
        return out.float()

    if not use_cfg:
        v = run(x, cond.embeds, cond.pooled, t)
        return (v, None, None) if parts else v
    if parts and reference:
        rows = [cond.neg_embeds, cond.embeds] * 2  # policy (LoRA on) rows first, then the reference's
        out = run(torch.cat([x] * 4), torch.cat(rows), torch.cat([cond.neg_pooled, cond.pooled] * 2),
                  torch.cat([t] * 4), lora_rows=2 * n)
        v_u, v_c, r_u, r_c = out.chunk(4)
        return v_u + guidance_scale * (v_c - v_u), v_u, r_u + guidance_scale * (r_c - r_u)
    if train:
        if uncond is not None:
            v_u = uncond
        else:
            with torch.no_grad():
                v_u = run(x, cond.neg_embeds, cond.neg_pooled, t)
        v_c = run(x, cond.embeds, cond.pooled, t)
    else:  # one batched call for both branches
        v = run(torch.cat([x, x]), torch.cat([cond.neg_embeds, cond.embeds]),
                torch.cat([cond.neg_pooled, cond.pooled]), torch.cat([t, t]))
        v_u, v_c = v.chunk(2)
        if parts:
            return v_u + guidance_scale * (v_c - v_u), v_u, None
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
    sde_window: tuple[int, int] | None = None,
    progress=None,
    record_steps: list[int] | None = None,
    reference: bool = False,
) -> Rollout:
    """SDE (noise_level > 0, training) or ODE (noise_level == 0, evaluation) sampling of N latents.

    ``generators`` holds one seeded generator per sample (initial noise, then one draw per SDE step);
    results are identical for any ``batch_size``. ``sde_window`` (start, end): only steps
    start <= j < end are stochastic, the others deterministic ODE steps with log-prob 0
    (Flow-GRPO-Fast). ``progress``: a callable called once per transformer step (a progress bar).
    ``record_steps``: steps whose unconditional policy velocity is kept (training reuses it while the
    policy is unchanged) and, with ``reference``, whose LoRA-disabled reference CFG velocity is
    computed in the same batched forward (the KL term's reference, which never changes).
    """
    N = cond.embeds.shape[0]
    if len(generators) != N:
        raise ValueError(f"need one generator per sample: {len(generators)} generators for {N} samples")
    device = cond.embeds.device
    sigmas = flow_sigmas(scheduler, num_steps)
    sigma_max = float(sigmas[1])
    bs = batch_size or N
    record = {j: k for k, j in enumerate(record_steps or [])}
    use_cfg = guidance_scale > 1.0 and cond.neg_embeds is not None
    all_latents, all_logps, all_unc, all_ref = [], [], [], []
    for start in range(0, N, bs):
        sl = slice(start, min(N, start + bs))
        gens = generators[sl]
        c = cond.index(sl)
        x = per_sample_randn(gens, latent_shape, device)
        lat, lps, unc, ref = [x], [], [], []
        for j in range(num_steps):
            if j in record and use_cfg:
                v, v_u, v_ref = predict_velocity(transformer, x, sigmas[j], c, guidance_scale, parts=True,
                                                 reference=reference)
                unc.append(v_u)
                if v_ref is not None:
                    ref.append(v_ref)
            else:
                v = predict_velocity(transformer, x, sigmas[j], c, guidance_scale)
            level = noise_level if sde_window is None or sde_window[0] <= j < sde_window[1] else 0.0
            noise = per_sample_randn(gens, latent_shape, device) if level > 0 else None
            step = sde_step_with_logprob(v, x, sigmas[j], sigmas[j + 1], noise_level=level,
                                         sigma_max=sigma_max, noise=noise)
            if progress is not None:
                progress()
            lps.append(step.log_prob if step.log_prob is not None else torch.zeros(x.shape[0], device=device))
            x = step.prev_sample
            lat.append(x)
        all_latents.append(torch.stack(lat, 1))
        all_logps.append(torch.stack(lps, 1))
        if unc:
            all_unc.append(torch.stack(unc, 1))
        if ref:
            all_ref.append(torch.stack(ref, 1))
    return Rollout(torch.cat(all_latents), torch.cat(all_logps), sigmas,
                   torch.cat(all_unc) if all_unc else None, torch.cat(all_ref) if all_ref else None)


def sde_window_at(epoch: int, *, size: int, lo: int, hi: int, schedule: str, shift_every: int,
                  seed: int) -> tuple[int, int]:
    """The SDE window (start, start + size) of ``epoch`` inside [lo, hi): ``random`` draws the start
    uniformly from [lo, hi - size] per epoch (Flow-GRPO-Fast draws it per sampling batch), seeded by
    (seed, epoch) so every rank and a resumed run agree; ``sliding`` moves it by one step every
    ``shift_every`` epochs and wraps around (MixGRPO)."""
    positions = hi - size - lo + 1
    if schedule == "sliding":
        start = lo + (epoch // shift_every) % positions
    else:
        g = torch.Generator().manual_seed(seed_for(seed, "sde_window", epoch))
        start = lo + int(torch.randint(positions, (1,), generator=g))
    return start, start + size


def trained_steps(num_steps: int, timestep_fraction: float, sde_window: tuple[int, int] | None) -> list[int]:
    """The steps trained on: the SDE window's, or the first ``timestep_fraction`` of all (SPEC 1)."""
    if sde_window is not None:
        return list(range(*sde_window))
    return list(range(max(1, int(num_steps * timestep_fraction))))


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, C, h, w] -> images float [N, 3, H, W] in [0, 1] (SD3's scaling and shift)."""
    dtype = next(vae.parameters()).dtype
    z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    img = vae.decode(z.to(dtype), return_dict=False)[0].float()
    return (img / 2 + 0.5).clamp(0, 1)
