"""The GRPO learner (Flow-GRPO, docs/SPEC.md section 1): balancer advantages -> for each micro-batch
and trained timestep, the clipped policy loss + KL to the LoRA-disabled reference -> optimizer step
every ``train.gradient_accumulation`` micro-batches (or ``optimizer_steps_per_epoch``; gradients
averaged over them and the trained timesteps, as Flow-GRPO's accelerate accumulation) -> EMA. See
apex_fast/learner.py for the seam it implements.

Per-objective gradients (``balance.gradients``, SPEC 5):

* ``proxy``: the Gram probed before the update (grad/probe.py), for balancers that want one.
* ``one_backward`` / ``k_backward``: on capture steps (every ``balance.gram_every_steps`` optimizer
  steps) the K objective gradients of the step itself are taken from its backward
  (grad/capture.py) or from K extra backward passes (grad/kbackward.py), with the clip mask of the
  advantages being trained on. The policy loss ``sum_i m_i max(-A_i r_i, -A_i clip(r_i)) / n`` has
  the gradient ``sum_i A_i m_i u_i d(-r_i) / n`` (u: unclipped_mask), so one backward of
  ``sum_i -r_i / (n T)`` with per-sample weights ``W[i, k] = Ahat[i, k] u_i`` gives objective k's
  gradient and weights ``A_i m_i u_i`` give the update's. The KL term has another cotangent: its own
  backward over the same forward, attributed to no objective.
  - Gram aggregators (pcgrad, mgda, cagrad, upgrad): the step's Gram (partial Grams over rank shards,
    one K x K all-reduce) -> c -> the update ``c^T J`` (grad/combine.py) replaces the advantages';
    steps between captures train on ``Ahat c`` with the last c.
  - Every method: the Gram of the epoch's summed captured gradients goes to ``balancer.update()``
    after the epoch (APEX's conflict penalty from the real update's cosines; ``balance.gram_estimate``
    cross_epoch and ``gram_metric`` adam change which Gram, grad/estimate.py).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import ConfigError
from ..grad import (EpochGram, KBackwardGradients, ObjectiveGradients, adam_step_scale, aggregated_update, kl_products,
                    aggregator_coefficients, commit_epoch, epoch_advantages, is_aggregator, probe_gram,
                    scaled_coefficients, sharded_gram)
from ..learner import Learner
from ..metrics import GRPO_STEP_STATS, SKIPPED_STEPS, advantage_metrics
from ..models import lora_disabled
from ..run_state import EMA
from ..runtime import gradient_accumulation
from ..runtime.engines import lr_schedule
from ..tracking import bars_enabled
from .loss import grpo_loss, kl_std, step_kl, unclipped_mask
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
        self.ema = EMA(weights, t.ema_decay, t.ema_every, t.ema_warmup) if t.ema else None
        self.accumulation = gradient_accumulation(cfg, runtime.world_size)  # micro-batches per optimizer step
        self.steps_per_epoch = t.inner_epochs * layout.rows // self.accumulation  # optimizer steps
        self.lr_at = lr_schedule(t, total_steps=t.epochs * self.steps_per_epoch)
        self.grads = None  # per-objective gradient capture (balance.gradients one_backward | k_backward)
        self.coef: torch.Tensor | None = None  # aggregators: the scaled c of the last capture step
        self.aggregates = False
        self._epoch_J: list[torch.Tensor] | None = None  # captured Gram blocks summed over the epoch
        self._epoch_kl: list[torch.Tensor] | None = None  # balance.cone_kl: the KL term's gradient, summed likewise
        b = cfg.balance
        if b.gradients != "proxy":
            if not cfg.lora.enabled:
                raise ConfigError(f"balance.gradients: {b.gradients} needs LoRA (lora.enabled: true); use "
                                  f"balance.gradients: proxy for full fine-tuning")
            if engine.zero_stage == 3:
                raise ConfigError(f"balance.gradients: {b.gradients} is not supported under ZeRO-3 (partitioned "
                                  f"LoRA weights); use ZeRO-2 (configs/ds_zero2.json) or balance.gradients: proxy")
            self.aggregates = is_aggregator(balancer)
            make = ObjectiveGradients if b.gradients == "one_backward" else KBackwardGradients
            self.grads = make(self.transformer, self.params, balancer.K, b.gram_layers, collect_all=self.aggregates)
        self.epoch_gram = EpochGram(b.gram_estimate, b.cross_epoch_weight)  # which Gram update() gets (batch / cross-epoch)

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
        if self.grads is not None:
            measure = None  # measured during the update itself, committed after it (lagged flow)
        adv = epoch_advantages(self.balancer, R, group_ids, measure, same_epoch=True)
        Ahat = None if self.grads is None else self.balancer.objective_advantages
        tstats = self.train_epoch(samples, adv.A[mine].to(device), epoch, Ahat=Ahat)
        M, b = self._epoch_gram()
        commit_epoch(self.balancer, adv, gram=M, kl_products=b, persistence=self.epoch_gram.persistence if M is not None else None)
        return {**adv.stats, **adv.update_stats, **tstats, **advantage_metrics(adv.A, group_ids)}

    # ------------------------------------------------------------------ losses
    def step_terms(self, samples, idx, j, train: bool = True, model=None):
        """Log-prob and mean of the stored transitions j -> j+1 under the current policy; ``j`` one step
        or a list of steps stacked into one forward (rows step-major: all of ``idx`` at j[0], then j[1],
        ...). In training the detached unconditional velocity is the rollout's while the policy is the
        one that sampled (no optimizer step since: ``samples.policy_step``), so that forward is not
        repeated."""
        js = [j] if isinstance(j, int) else list(j)
        x = self._stack(samples.latents, idx, js)
        uncond = None
        if train and samples.uncond_velocity is not None and samples.policy_step == self.global_step:
            uncond = self._stack(samples.uncond_velocity, idx, [samples.trained_steps.index(k) for k in js])
        cond = samples.cond.index(idx if len(js) == 1 else idx.repeat(len(js)))
        v = predict_velocity(self.transformer if model is None else model, x, self._sigma_rows(js, len(idx)), cond,
                             self.cfg.sample.guidance_scale, train=train, uncond=uncond)
        return self.transition(v, x, js, len(idx), self._stack(samples.latents, idx, [k + 1 for k in js]))

    @staticmethod
    def _stack(t: torch.Tensor, idx, cols: list[int]) -> torch.Tensor:
        """Rows of ``t[idx, c]`` for every c in ``cols``, step-major."""
        return t[idx, cols[0]] if len(cols) == 1 else torch.cat([t[idx, c] for c in cols])

    def _sigma_rows(self, js: list[int], n: int, shift: int = 0):
        if len(js) == 1:
            return self.sigmas[js[0] + shift]
        return torch.cat([self.sigmas[k + shift].expand(n) for k in js])

    def transition(self, v, x, js: list[int], n: int, prev_sample):
        return sde_step_with_logprob(v, x, self._sigma_rows(js, n), self._sigma_rows(js, n, 1),
                                     noise_level=self.cfg.sample.noise_level, sigma_max=float(self.sigmas[1]),
                                     prev_sample=prev_sample)

    def reference_mean(self, samples, idx, j):
        """Mean of step(s) j under the LoRA-disabled reference (None without KL): from the reference
        velocity the rollout computed in its batched forward (train.reuse_rollout), else a forward now."""
        if not (self.cfg.train.kl_beta > 0 and self.cfg.lora.enabled):
            return None
        js = [j] if isinstance(j, int) else list(j)
        if samples.ref_velocity is not None:
            v_ref = self._stack(samples.ref_velocity, idx, [samples.trained_steps.index(k) for k in js])
            return self.transition(v_ref, self._stack(samples.latents, idx, js), js, len(idx),
                                   self._stack(samples.latents, idx, [k + 1 for k in js])).mean
        with torch.no_grad(), lora_disabled(self.transformer):
            return self.step_terms(samples, idx, js, train=False).mean

    def micro_loss(self, samples, idx, j, adv: torch.Tensor, model=None):
        """The loss of micro-batch ``idx`` at step(s) j: a sum over the steps of each step's loss."""
        t = self.cfg.train
        js = [j] if isinstance(j, int) else list(j)
        step = self.step_terms(samples, idx, js, model=model)
        ref_mean = self.reference_mean(samples, idx, js)
        old = self._stack(samples.log_probs, idx, js)
        a = adv if len(js) == 1 else adv.repeat(len(js))
        return step, grpo_loss(step.log_prob, old, a, clip_range=t.clip_range,
                               adv_clip=self.cfg.balance.adv_clip, mean=step.mean, ref_mean=ref_mean,
                               step_std=kl_std(step, t.kl_form), kl_beta=t.kl_beta, denominator=len(idx))

    def probe_gram(self, samples, Ahat: torch.Tensor) -> torch.Tensor:
        """K x K Gram of the per-objective policy gradients g_k (SPEC 5), probed on the first
        micro-batch at the first trained timestep before this epoch's update (ratio = 1, so the clip
        mask is empty); see grad/probe.py."""
        idx = torch.arange(min(self.cfg.train.micro_batch_size, self.layout.local_n))
        j = self.trained_steps(samples)[0]
        return probe_gram(lambda k: self.micro_loss(samples, idx, j, Ahat[idx, k])[1].loss, Ahat.shape[1], self.params,
                          self.runtime.all_reduce_mean_)

    def trained_steps(self, samples) -> list[int]:
        """The rollout's steps to train on (its SDE window's when sample.sde_window is on)."""
        return samples.trained_steps or list(range(self.num_train_steps))

    # ------------------------------------------------------------------ the update
    def train_epoch(self, samples, adv: torch.Tensor, epoch: int, Ahat: torch.Tensor | None = None) -> dict:
        """Optimizer steps over this rank's samples; ``adv`` [n] this rank's advantages; ``Ahat`` [N, K]
        the whole batch's per-objective advantages (needed with balance.gradients one/k_backward)."""
        t = self.cfg.train
        self.transformer.train()
        self.skipped_in_epoch, self._epoch = 0, epoch
        stats = {k: [] for k in GRPO_STEP_STATS}
        bars = bars_enabled(self.cfg.log.progress, self.runtime.rank)
        self._epoch_J = None
        Ahat_mine = None if Ahat is None else Ahat[samples.global_index].to(adv.device, torch.float32)
        for inner in range(t.inner_epochs):
            # local micro-batch b of every rank together = global micro-batch b (any process count)
            mbs = self.layout.micro_batches(epoch, inner)
            for b, idx in enumerate(tqdm(mbs, desc=f"epoch {epoch} train", leave=False, disable=not bars)):
                if Ahat_mine is not None and self.global_step % self.cfg.balance.gram_every_steps == 0:
                    self.captured_step(samples, idx, adv[idx], Ahat_mine[idx], Ahat, stats)
                else:
                    a = adv[idx] if self.coef is None or Ahat_mine is None else Ahat_mine[idx] @ self.coef.to(adv)
                    self.plain_step(samples, idx, a, stats)
                if (b + 1) % self.accumulation == 0:
                    self.optimizer_step(stats)
        out = {k: float(np.mean(v)) for k, v in stats.items() if v}
        out[SKIPPED_STEPS] = float(self.skipped_in_epoch)
        # each rank averaged over equally many samples of its own: the mean over ranks is the
        # global batch's (one all-reduce), so the log does not depend on the process count
        vals = self.runtime.all_reduce_mean_([torch.tensor(list(out.values()), dtype=torch.float64)])[0]
        return {**dict(zip(out, vals.tolist())), "lr": self.cfg.train.lr * self.lr_at(max(0, self.global_step - 1))}

    def optimizer_step(self, stats: dict) -> None:
        """lr of this step from train.lr_schedule, clip + AdamW on the accumulated gradients, EMA."""
        self.engine.set_lr(self.lr)
        norm = self.engine.step(self.cfg.train.max_grad_norm)
        if not self.count_step(norm, self._epoch):
            return  # skipped (non-finite loss or gradient): no step, no EMA update
        stats["grad_norm"].append(norm)
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.global_step)

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return self.cfg.train.lr * self.lr_at(self.global_step)

    def loss_scale(self, samples) -> float:
        """Each micro-batch's loss is a mean over its samples (fixed denominator); dividing by the
        trained timesteps and the accumulated micro-batches makes the step's gradient their mean."""
        return 1.0 / (len(self.trained_steps(samples)) * self.accumulation)

    def plain_step(self, samples, idx, a: torch.Tensor, stats: dict) -> None:
        """The gradients of micro-batch ``idx`` (all its trained timesteps, advantages ``a``): one backward
        of the clipped policy loss + KL per ``train.timesteps_per_forward`` stacked timesteps."""
        steps, chunk, scale = self.trained_steps(samples), self.cfg.train.timesteps_per_forward, self.loss_scale(samples)
        for c in range(0, len(steps), chunk):
            _, out = self.micro_loss(samples, idx, steps[c:c + chunk], a, model=self.engine.module)
            self.engine.backward(out.loss * scale)
            self._record(stats, out, len(idx))

    def captured_step(self, samples, idx, a: torch.Tensor, Ahat_idx: torch.Tensor, Ahat_all: torch.Tensor,
                      stats: dict) -> None:
        """The gradients of one optimizer step (all trained timesteps of micro-batch ``idx``) with the K
        objective gradients captured: into ``.grad`` (via the engine) goes the update of the trained
        advantages ``a`` (+ KL), or for Gram aggregators ``c^T J`` (+ KL) with c from this step's Gram."""
        t, n = self.cfg.train, len(idx)
        steps = self.trained_steps(samples)
        T = 1.0 / self.loss_scale(samples)  # trained timesteps x accumulated micro-batches
        kl_on = t.kl_beta > 0 and self.cfg.lora.enabled
        A = a.float().clamp(-self.cfg.balance.adv_clip, self.cfg.balance.adv_clip)
        m = (a != 0).float()
        self.grads.zero_()
        direct = getattr(self.engine, "accepts_direct_grads", False)
        # DeepSpeed: this step's update, handed to the engine at the end
        d_step = None if direct else [torch.zeros_like(p) for p in self.params]
        for j in steps:
            # the bare model, not engine.module: DeepSpeed hooks the outputs of its own forward and would
            # run its reduction epilogue after the objective pass (which is not a training backward)
            step = self.step_terms(samples, idx, j, model=self.transformer)
            ref_mean = self.reference_mean(samples, idx, j)
            old = samples.log_probs[idx, j]
            std = kl_std(step, t.kl_form)
            out = grpo_loss(step.log_prob.detach(), old, a, clip_range=t.clip_range, adv_clip=self.cfg.balance.adv_clip,
                            mean=step.mean.detach(), ref_mean=ref_mean, step_std=std, kl_beta=t.kl_beta,
                            denominator=n)  # statistics only
            ratio = torch.exp(step.log_prob - old)
            u = unclipped_mask(ratio.detach(), A, t.clip_range)
            W = Ahat_idx * u[:, None]  # objective k's per-sample weights, the update's clip mask
            update = None if self.aggregates else A * m * u
            neg_ratio = -ratio / (n * T)  # the unweighted per-sample loss
            if direct:  # the torch engine: the update column lands in .grad from this very backward
                if isinstance(self.grads, ObjectiveGradients):
                    with self.grads.capture(W, update):
                        self.engine.backward(neg_ratio.sum(), retain_graph=kl_on)
                else:
                    self.grads.accumulate([(W[:, k] * neg_ratio).sum() for k in range(W.shape[1])])
                    if update is not None:
                        self.engine.backward((update * neg_ratio).sum(), retain_graph=kl_on)
            else:
                # DeepSpeed: torch.autograd.grad, so the objective pass does not reach .grad (ZeRO's hooks
                # would reduce a gradient the aggregators replace); the update column goes to the engine
                # with the combined update below, through its own backward
                if isinstance(self.grads, ObjectiveGradients):
                    with self.grads.capture(W, update):
                        g = torch.autograd.grad(neg_ratio.sum(), self.params, retain_graph=kl_on, allow_unused=True)
                else:
                    self.grads.accumulate([(W[:, k] * neg_ratio).sum() for k in range(W.shape[1])])
                    g = None if update is None else torch.autograd.grad(
                        (update * neg_ratio).sum(), self.params, retain_graph=kl_on, allow_unused=True)
                if update is not None:
                    torch._foreach_add_(d_step, [torch.zeros_like(p) if gi is None else gi
                                                 for p, gi in zip(self.params, g)])
            if kl_on:  # its own backward: a different cotangent, attributed to no objective
                kl = step_kl(step.mean, ref_mean, std)
                kl_loss = t.kl_beta * (m * kl).sum() / (n * T)
                if self.cfg.balance.cone_kl:  # its gradient kept too: APEX's cone counts the KL's pull
                    self.grads.backward_kl(kl_loss, self.engine.backward)
                else:
                    self.engine.backward(kl_loss)
            self._record(stats, out)
        J = self.grads.jacobian()
        gram_blocks = self.grads.jacobian(gram=True)
        if self.aggregates:
            M = sharded_gram(gram_blocks, self.runtime)
            c = aggregator_coefficients(self.balancer, M)
            self.coef = scaled_coefficients(c, Ahat_all, self.cfg.balance.aggregator_renorm, self.cfg.balance.eps)
            d = aggregated_update(J, self.coef)
            d_step = d if d_step is None else torch._foreach_add(d_step, d)
        if d_step is not None:
            self.engine.add_grads(d_step)
        self._epoch_J = _summed(self._epoch_J, gram_blocks)
        if self.cfg.balance.cone_kl and kl_on:
            self._epoch_kl = _summed(self._epoch_kl, self.grads.kl_blocks())

    def _epoch_gram(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gram of the epoch's summed captured gradients as ``balance.gram_estimate`` / ``gram_metric`` ask
        (grad/estimate.py; None: nothing captured this epoch), and with ``balance.cone_kl`` the products
        J g_KL of this epoch's gradients with the KL term's, in the same metric (else None)."""
        if self.grads is None or self._epoch_J is None:
            return None, None
        scale = None
        if self.cfg.balance.gram_metric == "adam":  # None before the first step: the parameter metric
            t = self.cfg.train  # the optimizer steps taken: global_step (a skipped step leaves AdamW untouched)
            scale = adam_step_scale(self.engine.exp_avg_sq(self.grads.gram_params()), self.global_step,
                                    t.adam_betas[1], t.adam_eps)
        b = None
        if self._epoch_kl is not None:
            b = kl_products(self._epoch_J, self._epoch_kl, self.runtime, scale)
        M = self.epoch_gram(self._epoch_J, self.runtime, scale)
        self._epoch_J = self._epoch_kl = None
        return M, b

    def gathered_state(self) -> dict:
        # the cross-epoch estimate's previous blocks, averaged over ranks: a resume's first Gram is the same
        return {"gram_prev": self.epoch_gram.checkpoint_blocks(self.runtime)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "grad_coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        coef = state.get("grad_coef")
        self.coef = None if coef is None else torch.as_tensor(coef, dtype=torch.float64).clone()
        self.epoch_gram.restore_blocks(state.get("gram_prev"), self.runtime.device)

    def _record(self, stats: dict, out, n: int | None = None) -> None:
        """Per trained timestep (rows of n samples each): approx_kl, clipfrac, kl, policy_loss."""
        with torch.no_grad():
            n = n or out.ratio.shape[0]
            steps = out.ratio.shape[0] // n
            lr = out.ratio.log().view(steps, n)
            per_step = torch.stack([0.5 * (lr**2).mean(1), ((out.ratio.view(steps, n) - 1).abs() >
                                                          self.cfg.train.clip_range).float().mean(1),
                                    out.kl.view(steps, n).mean(1), out.policy_loss.view(steps, n).mean(1)], 1)
            for row in per_step.tolist():  # one host sync per forward
                for key, v in zip(("approx_kl", "clipfrac", "kl", "policy_loss"), row):
                    stats[key].append(v)


def _summed(acc: list[torch.Tensor] | None, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The epoch's running sum of captured blocks: a copy of the first step's, then added in place."""
    if acc is None:
        return [b.clone() for b in blocks]
    torch._foreach_add_(acc, blocks)
    return acc
