"""The rollout part, shared by every learner: an epoch's prompts -> text conditioning -> G SDE
rollouts per prompt (latents and per-step log-probs) -> decoded images -> K rewards, each decoded
batch scored on a worker thread while the next one is sampled.

    sampler = RolloutSampler(cfg, runtime, pipe, layout, scorers)
    batch = sampler.collect(epoch)   # this rank's samples, R_local [n, K], group ids [N], timings
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import sde_window_range
from .models import encode_negative, encode_prompts
from .rewards import score_all_async
from .rl.rollout import Conditioning, decode_latents, sample, sde_window_at, trained_steps
from .runtime import seed_for
from .tracking import bar, bars_enabled


def generators_for(*parts, indices) -> list[torch.Generator]:
    """One generator per sample, seeded by (parts, sample index): a sample's noise does not depend on
    its batch or on which rank draws it."""
    return [torch.Generator().manual_seed(seed_for(*parts, int(i))) for i in indices]


@dataclass
class EpochSamples:
    """One rank's share of an epoch's rollouts."""

    prompts: list[str]
    metadata: list[dict]
    cond: Conditioning
    latents: torch.Tensor  # [n, T+1, C, h, w]
    log_probs: torch.Tensor  # [n, T]
    global_index: torch.Tensor  # [n] index of each sample in the global batch
    images: torch.Tensor  # [n, 3, H, W] in [0, 1]
    trained_steps: list[int] = field(default_factory=list)  # the steps to train on (the SDE window's, if any)
    # at the trained steps (train.reuse_rollout), else None: [n, len(trained_steps), C, h, w]
    uncond_velocity: torch.Tensor | None = None  # the sampling policy's unconditional velocity
    ref_velocity: torch.Tensor | None = None  # the LoRA-disabled reference's CFG velocity (the KL's)
    policy_step: int | None = None  # the learner's optimizer step count when sampled (set by the trainer)


@dataclass
class EpochBatch:
    """What the rollout part hands to a learner (after the gather of rewards over ranks)."""

    samples: EpochSamples
    group_ids: torch.Tensor  # [N] group (prompt slot) of every global sample
    R_local: torch.Tensor  # [n, K] this rank's rewards, NaN = failed
    timings: dict = field(default_factory=dict)  # scorer name -> seconds
    errors: dict = field(default_factory=dict)  # scorer name -> message of a failed call (this rank)


class RolloutSampler:
    def __init__(self, cfg, runtime, pipe, layout, scorers, train_prompts, reward_timeouts=None):
        self.cfg = cfg
        self.runtime = runtime
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.layout = layout
        self.scorers = scorers
        self.train_prompts = train_prompts
        self.reward_timeouts = reward_timeouts or {}
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        h = cfg.model.resolution // vae_factor
        self.latent_shape = (self.transformer.config.in_channels, h, h)
        self.bars = bars_enabled(cfg.log.progress, runtime.rank)
        self._negative = None  # the empty prompt's embeddings, encoded once

    def sde_window(self, epoch: int) -> tuple[int, int] | None:
        """(start, end) of this epoch's SDE window (sample.sde_window), None when off."""
        s = self.cfg.sample
        w = s.sde_window
        if not w.size:
            return None
        lo, hi = sde_window_range(s)
        return sde_window_at(epoch, size=w.size, lo=lo, hi=hi, schedule=w.schedule, shift_every=w.shift_every,
                             seed=self.cfg.train.seed)

    @torch.no_grad()
    def condition(self, prompts: list[str]) -> Conditioning:
        """Text embeddings of ``prompts`` (each distinct prompt encoded once), with the empty-prompt
        embeddings for CFG when guidance_scale > 1."""
        s, device = self.cfg.sample, self.runtime.device
        uniq = sorted(set(prompts))
        emb, pooled = encode_prompts(self.pipe, uniq, device, max_sequence_length=s.max_sequence_length)
        pos = {p: i for i, p in enumerate(uniq)}
        idx = torch.tensor([pos[p] for p in prompts], device=device)
        emb, pooled = emb[idx].float(), pooled[idx].float()
        if s.guidance_scale > 1:
            if self._negative is None:  # frozen encoders: the same tensors every epoch
                self._negative = encode_negative(self.pipe, 1, device, max_sequence_length=s.max_sequence_length)
            ne, npool = self._negative
            return Conditioning(emb, pooled, ne.float().expand(len(prompts), -1, -1), npool.float().expand(len(prompts), -1))
        return Conditioning(emb, pooled)

    def epoch_prompts(self, epoch: int) -> tuple[list[int], torch.Tensor]:
        """Prompt indices of this epoch's groups and the group id of every global sample [N]."""
        s = self.cfg.sample
        g = torch.Generator().manual_seed(seed_for(self.cfg.train.seed, "prompts", epoch))
        n = len(self.train_prompts)
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(s.prompts_per_epoch / n))])
        chosen = order[: s.prompts_per_epoch].tolist()
        group_ids = torch.arange(s.prompts_per_epoch).repeat_interleave(s.group_size)  # keyed by slot index
        return chosen, group_ids

    @torch.no_grad()
    def collect(self, epoch: int) -> EpochBatch:
        """Sample this rank's rollouts in batches of ``sample.batch_size``; each decoded batch is
        scored on a worker thread while the next one is sampled."""
        chosen, group_ids = self.epoch_prompts(epoch)
        gidx = self.layout.rollout_indices(epoch)  # this rank's global sample indices
        prompts = [self.train_prompts[chosen[int(group_ids[i])]][0] for i in gidx]
        meta = [dict(self.train_prompts[chosen[int(group_ids[i])]][1]) for i in gidx]
        cond = self.condition(prompts)
        s = self.cfg.sample
        gens = generators_for(self.cfg.train.seed, "sample", epoch, indices=gidx.tolist())
        window = self.sde_window(epoch)
        steps = trained_steps(s.num_steps, self.cfg.train.timestep_fraction, window)
        t = self.cfg.train
        grpo = self.cfg.algorithm == "grpo"  # what the GRPO learner reuses (DPO: nothing)
        record = steps if t.reuse_rollout and grpo else None
        reference = record is not None and t.kl_beta > 0 and self.cfg.lora.enabled
        self.transformer.eval()
        parts, images, futures, timings, errors = [], [], [], {}, {}
        n = self.layout.local_n
        with bar(-(-n // s.batch_size) * s.num_steps, f"epoch {epoch} sampling", self.bars) as pbar:
            for lo in range(0, n, s.batch_size):
                sl = slice(lo, min(n, lo + s.batch_size))
                ro = sample(self.transformer, self.pipe.scheduler, cond.index(sl), latent_shape=self.latent_shape,
                            num_steps=s.num_steps, guidance_scale=s.guidance_scale, noise_level=s.noise_level,
                            generators=gens[sl], sde_window=window, progress=pbar.update, record_steps=record,
                            reference=reference)
                img = decode_latents(self.pipe.vae, ro.final)
                futures.append(score_all_async(self.scorers, img, prompts[sl], meta[sl], timings,
                                               timeout_s=self.reward_timeouts, errors=errors))
                parts.append(ro)
                images.append(img)
        R_local = torch.cat([f.result() for f in futures])  # a RewardFailureError surfaces here
        cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        samples = EpochSamples(prompts, meta, cond, torch.cat([r.latents for r in parts]),
                               torch.cat([r.log_probs for r in parts]), gidx, torch.cat(images), steps,
                               cat([r.uncond_velocity for r in parts]), cat([r.ref_velocity for r in parts]))
        return EpochBatch(samples, group_ids, R_local, timings, errors)
