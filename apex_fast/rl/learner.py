"""The GRPO learner (Flow-GRPO, docs/SPEC.md section 1): balancer advantages -> for each micro-batch
and trained timestep, the clipped policy loss + KL to the LoRA-disabled reference -> optimizer step
per micro-batch -> EMA. See apex_fast/learner.py for the seam it implements."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..grad import commit_epoch, epoch_advantages, probe_gram
from ..learner import Learner
from ..metrics import GRPO_STEP_STATS, advantage_metrics
from ..models import lora_disabled
from ..run_state import EMA
from .loss import grpo_loss
from .rollout import flow_sigmas, predict_velocity
from .sde import sde_step_with_logprob


class GRPOLearner(Learner):
    def __init__(self, cfg, runtime, engine, weights, balancer, layout, scheduler):
        self.cfg, self.runtime, self.engine, self.weights = cfg, runtime, engine, weights
        self.balancer, self.layout = balancer, layout
        self.transformer, self.params = weights.transformer, weights.params
        self.sigmas = flow_sigmas(scheduler, cfg.sample.num_steps)
        self.num_train_steps = max(1, int(cfg.sample.num_steps * cfg.train.timestep_fraction))
        self.global_step = 0
        t = cfg.train
        self.ema = EMA(weights, t.ema_decay, t.ema_every) if t.ema else None

    # ------------------------------------------------------------------ one epoch
    def learn(self, batch, R, group_ids, epoch):
        samples = batch.samples
        mine = samples.global_index  # this rank trains on its samples' rows of the global advantages
        device = self.runtime.device
        measure = None
        if getattr(self.balancer, "wants_gram", False) and self.cfg.train.gram_every and \
                epoch % self.cfg.train.gram_every == 0:
            # SPEC 5: the Gram of this epoch's per-objective gradients, measured before the update,
            # gives this epoch's coefficients (same-epoch flow of grad.sequence)
            def measure(Ahat):
                self.transformer.train()
                return self.probe_gram(samples, Ahat[mine].to(device))
        adv = epoch_advantages(self.balancer, R, group_ids, measure, same_epoch=True)
        tstats = self.train_epoch(samples, adv.A[mine].to(device), epoch)
        commit_epoch(self.balancer, adv)
        return {**adv.stats, **adv.update_stats, **tstats, **advantage_metrics(adv.A, group_ids)}

    # ------------------------------------------------------------------ losses
    def step_terms(self, samples, idx, j: int, train: bool = True, model=None):
        """Log-prob and mean of the stored transition j -> j+1 under the current policy."""
        x = samples.latents[idx, j]
        v = predict_velocity(self.transformer if model is None else model, x, self.sigmas[j], samples.cond.index(idx),
                             self.cfg.sample.guidance_scale, train=train)
        return sde_step_with_logprob(v, x, self.sigmas[j], self.sigmas[j + 1], noise_level=self.cfg.sample.noise_level,
                                     sigma_max=float(self.sigmas[1]), prev_sample=samples.latents[idx, j + 1])

    def reference_mean(self, samples, idx, j: int):
        """Mean of step j under the LoRA-disabled reference (None without KL)."""
        if not (self.cfg.train.kl_beta > 0 and self.cfg.lora.enabled):
            return None
        with torch.no_grad(), lora_disabled(self.transformer):
            return self.step_terms(samples, idx, j, train=False).mean

    def micro_loss(self, samples, idx, j: int, adv: torch.Tensor, model=None):
        t = self.cfg.train
        step = self.step_terms(samples, idx, j, model=model)
        ref_mean = self.reference_mean(samples, idx, j)
        return step, grpo_loss(step.log_prob, samples.log_probs[idx, j], adv, clip_range=t.clip_range,
                               adv_clip=self.cfg.balance.adv_clip, mean=step.mean, ref_mean=ref_mean,
                               step_std=step.std, kl_beta=t.kl_beta, denominator=len(idx))

    def probe_gram(self, samples, Ahat: torch.Tensor) -> torch.Tensor:
        """K x K Gram of the per-objective policy gradients g_k (SPEC 5), probed on the first
        micro-batch at the first trained timestep before this epoch's update (ratio = 1, so the clip
        mask is empty); see grad/probe.py."""
        idx = torch.arange(min(self.cfg.train.micro_batch_size, self.layout.local_n))
        return probe_gram(lambda k: self.micro_loss(samples, idx, 0, Ahat[idx, k])[1].loss, Ahat.shape[1], self.params,
                          self.runtime.all_reduce_mean_)

    # ------------------------------------------------------------------ the update
    def train_epoch(self, samples, adv: torch.Tensor, epoch: int) -> dict:
        t = self.cfg.train
        self.transformer.train()
        stats = {k: [] for k in GRPO_STEP_STATS}
        main = self.runtime.rank == 0 and self.cfg.log.progress
        for inner in range(t.inner_epochs):
            # local micro-batch b of every rank together = global micro-batch b (any process count)
            mbs = self.layout.micro_batches(epoch, inner)
            for idx in tqdm(mbs, desc=f"epoch {epoch} train", leave=False, disable=not main):
                a = adv[idx]
                for j in range(self.num_train_steps):
                    _, out = self.micro_loss(samples, idx, j, a, model=self.engine.module)
                    self.engine.backward(out.loss / self.num_train_steps)
                    self._record(stats, out)
                stats["grad_norm"].append(self.engine.step(t.max_grad_norm))
                self.global_step += 1
                if self.ema is not None:
                    self.ema.update(self.global_step)
        out = {k: float(np.mean(v)) for k, v in stats.items() if v}
        # each rank averaged over equally many samples of its own: the mean over ranks is the
        # global batch's (one all-reduce), so the log does not depend on the process count
        vals = self.runtime.all_reduce_mean_([torch.tensor(list(out.values()), dtype=torch.float64)])[0]
        return dict(zip(out, vals.tolist()))

    def _record(self, stats: dict, out) -> None:
        with torch.no_grad():
            lr = out.ratio.log()
            stats["approx_kl"].append(float(0.5 * (lr**2).mean()))
            stats["clipfrac"].append(float(((out.ratio - 1).abs() > self.cfg.train.clip_range).float().mean()))
            stats["kl"].append(float(out.kl.mean()))
            stats["policy_loss"].append(float(out.policy_loss.mean()))
