"""The one entry point: multi-reward Flow-GRPO training of an SD3 transformer (LoRA) with a balancer.

    python -m apex_fast.train --config configs/tiny_cpu.yaml [--set train.lr=1e-4 ...] [--resume latest]
    deepspeed apex_fast/train.py --config configs/X.yaml --deepspeed configs/ds_zero2.json

One epoch (docs/DESIGN.md "Data flow"): prompts -> G SDE rollouts per prompt (latents, log-probs)
-> K rewards R [N, K] (NaN on failure) -> gather across ranks -> balancer advantages [N] -> for each
trained timestep: clipped policy loss + KL, backward -> optimizer step -> log, eval, checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python apex_fast/train.py` and `deepspeed apex_fast/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "apex_fast"

import numpy as np
import torch
from tqdm.auto import tqdm

from apex_fast import distributed as dist_utils
from apex_fast.distributed import seed_for
from apex_fast.balance import make_balancer
from apex_fast.checkpoint import CheckpointError, load_checkpoint, resolve_resume, save_checkpoint
from apex_fast.config import Config, ConfigError, load_config, save_config, to_dict
from apex_fast.data import load_prompts
from apex_fast.models import (
    add_lora, encode_negative, encode_prompts, load_lora_state_dict, load_pipeline, lora_disabled,
    lora_state_dict, save_lora_diffusers,
)
from apex_fast.ops import group_stats
from apex_fast.rewards import RewardFailureTracker, make_scorer, score_all, score_all_async
from apex_fast.rl.loss import grpo_loss
from apex_fast.rl.rollout import Conditioning, decode_latents, flow_sigmas, predict_velocity, sample
from apex_fast.rl.sde import sde_step_with_logprob
from apex_fast.tracking import Tracker, format_reward_table, plot_reward_curves

log = logging.getLogger("apex_fast.train")


def generators_for(*parts, indices) -> list[torch.Generator]:
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


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.runtime = dist_utils.init(cfg)
        self.rank, self.world = self.runtime.rank, self.runtime.world_size
        self.is_main = self.rank == 0
        self.device = self.runtime.device
        self.out_dir = Path(cfg.log.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"

        s = cfg.sample
        # which global samples this rank rolls out and trains on, micro-batch by micro-batch; the
        # same global micro-batches for any number of processes (docs: dist_utils.SampleLayout)
        self.layout = dist_utils.SampleLayout(s.prompts_per_epoch * s.group_size, cfg.train.micro_batch_size,
                                              self.world, self.rank, seed=cfg.train.seed)
        self.local_n = self.layout.local_n

        self.train_prompts = load_prompts(cfg.data.train_prompts, "data.train_prompts")
        self.eval_prompts = load_prompts(cfg.data.eval_prompts, "data.eval_prompts")[: cfg.eval.num_prompts]
        self.scorers = [make_scorer(r.name, **r.args) for r in cfg.rewards]
        self.names = [r.name for r in cfg.rewards]
        self.reward_tracker = RewardFailureTracker(cfg.train.reward_max_failures)
        self.reward_timeouts = {r.name: r.timeout_s for r in cfg.rewards}
        self.balancer = make_balancer(cfg.balance, [r.weight for r in cfg.rewards], self.names)

        m = cfg.model
        self.pipe = load_pipeline(m.pretrained, dtype=m.dtype, device=self.device, seed=m.seed, revision=m.revision,
                                  variant=m.variant, gradient_checkpointing=m.gradient_checkpointing,
                                  attention_backend=m.attention_backend)
        self.transformer = self.pipe.transformer
        if cfg.lora.enabled:
            add_lora(self.transformer, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                     target_modules=cfg.lora.target_modules, seed=seed_for(cfg.train.seed, "lora"))
        else:
            self.transformer.requires_grad_(True)
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        for p in self.params:  # trainable weights and their optimizer state stay fp32
            p.data = p.data.float()
        if not self.params:
            raise ConfigError("lora: the model has no trainable parameter; check lora.target_modules")
        self.engine = dist_utils.make_engine(cfg, self.transformer, self.params, self.runtime)
        with self.engine.gathered(self.params):  # ZeRO-3: full weights on every rank inside
            self.ema = [p.detach().clone() for p in self.params] if cfg.train.ema else None

        vae_factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        h = m.resolution // vae_factor
        self.latent_shape = (self.transformer.config.in_channels, h, h)
        self.sigmas = flow_sigmas(self.pipe.scheduler, s.num_steps)
        self.num_train_steps = max(1, int(s.num_steps * cfg.train.timestep_fraction))
        self.epoch = 0
        self.global_step = 0
        self.eval_history: dict[int, dict[str, float]] = {}
        self.tracker: Tracker | None = None

    # ------------------------------------------------------------------ text conditioning
    @torch.no_grad()
    def _condition(self, prompts: list[str]) -> Conditioning:
        uniq = sorted(set(prompts))
        emb, pooled = encode_prompts(self.pipe, uniq, self.device, max_sequence_length=self.cfg.sample.max_sequence_length)
        pos = {p: i for i, p in enumerate(uniq)}
        idx = torch.tensor([pos[p] for p in prompts], device=self.device)
        emb, pooled = emb[idx].float(), pooled[idx].float()
        if self.cfg.sample.guidance_scale > 1:
            ne, npool = encode_negative(self.pipe, 1, self.device, max_sequence_length=self.cfg.sample.max_sequence_length)
            return Conditioning(emb, pooled, ne.float().expand(len(prompts), -1, -1), npool.float().expand(len(prompts), -1))
        return Conditioning(emb, pooled)

    # ------------------------------------------------------------------ sampling
    def _epoch_prompts(self, epoch: int) -> tuple[list[int], torch.Tensor]:
        """Prompt indices of this epoch's groups and the group id of every global sample [N]."""
        s = self.cfg.sample
        g = torch.Generator().manual_seed(seed_for(self.cfg.train.seed, "prompts", epoch))
        n = len(self.train_prompts)
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(s.prompts_per_epoch / n))])
        chosen = order[: s.prompts_per_epoch].tolist()
        group_ids = torch.arange(s.prompts_per_epoch).repeat_interleave(s.group_size)  # keyed by slot index
        return chosen, group_ids

    @torch.no_grad()
    def rollout(self, epoch: int) -> tuple[EpochSamples, torch.Tensor, torch.Tensor, dict]:
        """Sample this rank's rollouts in batches; each decoded batch is scored on a worker thread
        while the next one is sampled. Returns (samples, group ids [N_global], R_local [n, K], timings)."""
        chosen, group_ids = self._epoch_prompts(epoch)
        gidx = self.layout.rollout_indices(epoch)  # this rank's global sample indices
        prompts = [self.train_prompts[chosen[int(group_ids[i])]][0] for i in gidx]
        meta = [dict(self.train_prompts[chosen[int(group_ids[i])]][1]) for i in gidx]
        cond = self._condition(prompts)
        s = self.cfg.sample
        gens = generators_for(self.cfg.train.seed, "sample", epoch, indices=gidx.tolist())
        self.transformer.eval()
        parts, images, futures, timings, errors = [], [], [], {}, {}
        for lo in range(0, self.local_n, s.batch_size):
            sl = slice(lo, min(self.local_n, lo + s.batch_size))
            ro = sample(self.transformer, self.pipe.scheduler, cond.index(sl), latent_shape=self.latent_shape,
                        num_steps=s.num_steps, guidance_scale=s.guidance_scale, noise_level=s.noise_level,
                        generators=gens[sl])
            img = decode_latents(self.pipe.vae, ro.final)
            futures.append(score_all_async(self.scorers, img, prompts[sl], meta[sl], timings,
                                           timeout_s=self.reward_timeouts, errors=errors))
            parts.append(ro)
            images.append(img)
        R_local = torch.cat([f.result() for f in futures])  # a RewardFailureError surfaces here
        batch = EpochSamples(prompts, meta, cond, torch.cat([r.latents for r in parts]),
                             torch.cat([r.log_probs for r in parts]), gidx, torch.cat(images))
        self._reward_errors = errors  # this rank's messages of failed scorer calls
        return batch, group_ids, R_local, timings

    # ------------------------------------------------------------------ training
    def _step_terms(self, batch: EpochSamples, idx, j: int, train: bool = True, model=None):
        """Log-prob and mean of the stored transition j -> j+1 under the current policy."""
        x = batch.latents[idx, j]
        v = predict_velocity(self.transformer if model is None else model, x, self.sigmas[j], batch.cond.index(idx),
                             self.cfg.sample.guidance_scale, train=train)
        return sde_step_with_logprob(v, x, self.sigmas[j], self.sigmas[j + 1], noise_level=self.cfg.sample.noise_level,
                                     sigma_max=float(self.sigmas[1]), prev_sample=batch.latents[idx, j + 1])

    def _micro_loss(self, batch: EpochSamples, idx, j: int, adv: torch.Tensor, model=None):
        t = self.cfg.train
        step = self._step_terms(batch, idx, j, model=model)
        ref_mean = None
        if t.kl_beta > 0 and self.cfg.lora.enabled:
            with torch.no_grad(), lora_disabled(self.transformer):
                ref_mean = self._step_terms(batch, idx, j, train=False).mean
        return step, grpo_loss(step.log_prob, batch.log_probs[idx, j], adv, clip_range=t.clip_range,
                               adv_clip=self.cfg.balance.adv_clip, mean=step.mean, ref_mean=ref_mean,
                               step_std=step.std, kl_beta=t.kl_beta, denominator=len(idx))

    def train_epoch(self, batch: EpochSamples, adv: torch.Tensor, epoch: int) -> dict:
        t = self.cfg.train
        self.transformer.train()
        stats = {"clipfrac": [], "approx_kl": [], "kl": [], "policy_loss": [], "grad_norm": []}
        for inner in range(t.inner_epochs):
            # local micro-batch b of every rank together = global micro-batch b (any process count)
            mbs = self.layout.micro_batches(epoch, inner)
            bar = tqdm(mbs, desc=f"epoch {epoch} train", leave=False, disable=not (self.is_main and self.cfg.log.progress))
            for idx in bar:
                a = adv[idx]
                for j in range(self.num_train_steps):
                    step, out = self._micro_loss(batch, idx, j, a, model=self.engine.module)
                    self.engine.backward(out.loss / self.num_train_steps)
                    with torch.no_grad():
                        lr = out.ratio.log()
                        stats["approx_kl"].append(float(0.5 * (lr**2).mean()))
                        stats["clipfrac"].append(float(((out.ratio - 1).abs() > t.clip_range).float().mean()))
                        stats["kl"].append(float(out.kl.mean()))
                        stats["policy_loss"].append(float(out.policy_loss.mean()))
                stats["grad_norm"].append(self.engine.step(t.max_grad_norm))
                self.global_step += 1
                if self.ema is not None and self.global_step % t.ema_every == 0:
                    with torch.no_grad(), self.engine.gathered(self.params):
                        for e, p in zip(self.ema, self.params):
                            e.lerp_(p.detach(), 1 - t.ema_decay)
        out = {k: float(np.mean(v)) for k, v in stats.items() if v}
        # each rank averaged over equally many samples of its own: the mean over ranks is the
        # global batch's (one all-reduce), so the log does not depend on the process count
        vals = self.runtime.all_reduce_mean_([torch.tensor(list(out.values()), dtype=torch.float64)])[0]
        return dict(zip(out, vals.tolist()))

    def objective_gram(self, batch: EpochSamples, Ahat: torch.Tensor) -> torch.Tensor:
        """K x K Gram of the per-objective policy gradients g_k (SPEC 5), measured on the first
        micro-batch at the first trained timestep before this epoch's update (ratio = 1, so the clip
        mask is empty). The per-objective gradients are averaged over ranks first (one all-reduce of
        a flat buffer), so the Gram is that of the global micro-batch's gradients, as in one process
        (an average of per-rank Grams would not be)."""
        from apex_fast.ops import gram as gram_op

        t = self.cfg.train
        idx = torch.arange(min(t.micro_batch_size, self.local_n))
        rows = []
        for k in range(Ahat.shape[1]):
            _, out = self._micro_loss(batch, idx, 0, Ahat[idx, k])
            grads = torch.autograd.grad(out.loss, self.params, allow_unused=True)
            rows.append([torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, self.params)])
        J = [torch.stack([rows[k][i] for k in range(len(rows))]) for i in range(len(self.params))]
        return gram_op(self.runtime.all_reduce_mean_(J))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        """Mean reward per objective on the eval prompts with the ODE sampler and the EMA weights."""
        e = self.cfg.eval
        items = [(p, m) for p, m in self.eval_prompts for _ in range(e.images_per_prompt)]
        n_items, per = len(items), -(-len(items) // self.world)
        # every rank takes `per` items (indices >= n_items repeat items and are dropped after the
        # gather): equal counts for the all-gather and for ZeRO-3, whose forwards are collectives
        mine = list(range(self.rank, per * self.world, self.world))
        prompts = [items[i % n_items][0] for i in mine]
        meta = [dict(items[i % n_items][1]) for i in mine]
        backup = None
        if self.ema is not None:
            with self.engine.gathered(self.params, modify=True):
                backup = [p.detach().clone() for p in self.params]
                for p, q in zip(self.params, self.ema):
                    p.data.copy_(q)
        self.transformer.eval()
        try:
            R = torch.zeros(0, len(self.scorers))
            if prompts:
                ro = sample(self.transformer, self.pipe.scheduler, self._condition(prompts), latent_shape=self.latent_shape,
                            num_steps=e.num_steps, guidance_scale=self.cfg.sample.guidance_scale, noise_level=0.0,
                            generators=generators_for(e.seed, "eval", indices=mine), batch_size=self.cfg.sample.batch_size)
                images = decode_latents(self.pipe.vae, ro.final)
                R = score_all(self.scorers, images, prompts, meta)
                if self.is_main:
                    save_image_grid(images, self.out_dir / "samples" / f"eval_epoch{epoch:05d}.png")
        finally:
            if backup is not None:
                with self.engine.gathered(self.params, modify=True):
                    for p, q in zip(self.params, backup):
                        p.data.copy_(q)
        R = self.runtime.all_gather_rows(R)  # rank-major; item r + k*world is row r*per + k
        R = R.view(self.world, per, -1).transpose(0, 1).reshape(per * self.world, -1)[:n_items]
        means = {n: float(torch.nanmean(R[:, k])) if R.numel() else float("nan") for k, n in enumerate(self.names)}
        self.eval_history[epoch] = means
        return means

    # ------------------------------------------------------------------ checkpoints
    def state(self, trainable: dict | None = None) -> dict:
        if trainable is None:
            trainable = lora_state_dict(self.transformer) if self.cfg.lora.enabled else \
                {n: p.detach() for n, p in self.transformer.named_parameters() if p.requires_grad}
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "world_size": self.world,
            "trainable": trainable,
            "optimizer": self.engine.optimizer_state(),
            "ema": self.ema,
            "balancer": self.balancer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].astype(np.int64).tolist(),
                    "python": repr(random.getstate())},
            "eval_history": {str(k): v for k, v in self.eval_history.items()},
            "config": to_dict(self.cfg),
        }

    def save(self) -> Path | None:
        self.runtime.barrier()
        # engine-owned files (DeepSpeed: the ZeRO optimizer shards), written by every rank into a
        # staging folder that rank 0 moves into the checkpoint before its atomic rename
        engine_dir = self.engine.save_checkpoint(self.ckpt_dir / f".engine-{self.epoch:06d}")
        # full fine-tuning under ZeRO-3: one weight at a time onto rank 0's CPU, never all at once
        full = None if self.cfg.lora.enabled else self.engine.consolidated(
            {n: p for n, p in self.transformer.named_parameters() if p.requires_grad})
        path = None
        with self.engine.gathered(self.params if self.cfg.lora.enabled else []):  # ZeRO-3: the LoRA, gathered
            if self.is_main:
                def write_lora(tmp):
                    if self.cfg.lora.enabled:
                        save_lora_diffusers(self.transformer, tmp)
                    if engine_dir is not None:
                        Path(engine_dir).rename(Path(tmp) / dist_utils.DS_CHECKPOINT_DIR)

                path = save_checkpoint(self.ckpt_dir, self.epoch, self.state(full), write_extra=write_lora,
                                       keep=self.cfg.checkpoint.keep)
                log.info("saved checkpoint %s", path)
        self.runtime.barrier()
        return path

    def resume(self, resume: str) -> None:
        path = resolve_resume(resume, self.ckpt_dir)
        st = load_checkpoint(path)
        if st.get("world_size", self.world) != self.world:
            raise CheckpointError(
                f"checkpoint {path} was written by {st['world_size']} processes but this run has {self.world}; "
                f"resume with the same number of processes (the optimizer state's ZeRO shards and the global "
                f"micro-batch, train.micro_batch_size x processes, depend on it)")
        if self.engine.restores_weights:
            self.engine.load_checkpoint(path)  # DeepSpeed: trainable weights, fp32 masters, ZeRO optimizer shards
        else:
            if self.cfg.lora.enabled:
                load_lora_state_dict(self.transformer, st["trainable"])
            else:
                named = dict(self.transformer.named_parameters())
                with torch.no_grad():
                    for n, v in st["trainable"].items():
                        named[n].copy_(v)
            self.engine.load_optimizer_state(st["optimizer"])
        if self.ema is not None and st.get("ema") is not None:
            for e, v in zip(self.ema, st["ema"]):
                e.copy_(v)
        self.balancer.load_state_dict(st["balancer"])
        torch.set_rng_state(st["rng"]["torch"])
        self.epoch, self.global_step = int(st["epoch"]), int(st["global_step"])
        self.eval_history = {int(k): v for k, v in st.get("eval_history", {}).items()}
        if self.is_main:
            log.info("resumed from %s at epoch %d", path, self.epoch)

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict:
        cfg = self.cfg
        if cfg.checkpoint.resume:
            self.resume(cfg.checkpoint.resume)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        self.tracker = Tracker(self.out_dir, tensorboard=cfg.log.tensorboard, csv_file=cfg.log.csv, wandb=cfg.log.wandb,
                               config=to_dict(cfg), enabled=self.is_main,
                               resume_epoch=self.epoch if cfg.checkpoint.resume else None)
        if 0 not in self.eval_history:
            start = self.evaluate(0)
            self.tracker.log({f"eval/{n}": v for n, v in start.items()}, 0)
        bar = tqdm(range(self.epoch, cfg.train.epochs), desc="epochs", disable=not (self.is_main and cfg.log.progress))
        for epoch in bar:
            metrics = self.run_epoch(epoch)
            self.epoch = epoch + 1
            if cfg.eval.every and self.epoch % cfg.eval.every == 0 and self.epoch != cfg.train.epochs:
                metrics.update({f"eval/{n}": v for n, v in self.evaluate(self.epoch).items()})
            if self.epoch == cfg.train.epochs:
                metrics.update({f"eval/{n}": v for n, v in self.evaluate(self.epoch).items()})
            self.tracker.log(metrics, self.epoch)
            bar.set_postfix({n[:10]: f"{metrics.get(f'reward/{n}/mean', float('nan')):.3g}" for n in self.names})
            if (cfg.checkpoint.every and self.epoch % cfg.checkpoint.every == 0) or self.epoch == cfg.train.epochs:
                self.save()
        return self.finish()

    def run_epoch(self, epoch: int) -> dict:
        t0 = time.perf_counter()
        batch, group_ids, R_local, timings = self.rollout(epoch)  # scoring overlaps sampling
        t1 = time.perf_counter()
        # R [N, K] and the group ids in global sample order: one all-gather over ranks
        R, group_ids = self.runtime.gather_samples(R_local, group_ids[batch.global_index], batch.global_index)
        # judged on the gathered rewards, so every rank reaches the same verdict (no rank stops alone)
        all_nan = {n for k, n in enumerate(self.names) if torch.isnan(R[:, k]).all()}
        self.reward_tracker.update(self.names, R, {n: e for n, e in self._reward_errors.items() if n in all_nan})
        A, bstats = self.balancer.advantages(R, group_ids)
        mine = batch.global_index  # this rank trains on its samples' rows of the global advantages
        ustats = {}
        if getattr(self.balancer, "wants_gram", False) and self.cfg.train.gram_every and \
                epoch % self.cfg.train.gram_every == 0:
            # SPEC 5: the Gram of this epoch's per-objective gradients, measured before the update,
            # gives this epoch's coefficients: update(gram), then the advantages again (advantages()
            # only stores statistics; update() commits them, once per epoch)
            self.transformer.train()
            Ahat = self.balancer.objective_advantages[mine].to(self.device)
            ustats = self.balancer.update(gram=self.objective_gram(batch, Ahat)) or {}
            A, bstats = self.balancer.advantages(R, group_ids)
            tstats = self.train_epoch(batch, A[mine].to(self.device), epoch)
        else:
            tstats = self.train_epoch(batch, A[mine].to(self.device), epoch)
            ustats = self.balancer.update() or {}
        t3 = time.perf_counter()

        metrics = dict(bstats)
        metrics.update(ustats)
        metrics.update(tstats)
        _, count, mean, std = group_stats(R, group_ids)
        for k, n in enumerate(self.names):
            col = R[:, k]
            ok = torch.isfinite(col)
            metrics[f"reward/{n}/mean"] = float(col[ok].mean()) if ok.any() else float("nan")
            metrics[f"reward/{n}/std"] = float(col[ok].std(unbiased=False)) if ok.any() else float("nan")
            metrics[f"reward/{n}/nan_count"] = float((~ok).sum())
            metrics[f"zero_std_ratio/{n}"] = float(((std[:, k] == 0) & (count[:, k] > 0)).float().mean())
            metrics[f"time/reward/{n}"] = timings.get(n, 0.0)
        adv_groups = torch.zeros(int(group_ids.max()) + 1).index_add_(0, group_ids, (A != 0).float())
        metrics["zero_std_ratio"] = float((adv_groups == 0).float().mean())
        metrics["time/sample"] = t1 - t0  # sampling + decoding, and the wait for the last scoring batch
        metrics["time/reward"] = sum(timings.values())  # scorer time, overlapped with sampling
        metrics["time/train"] = t3 - t1
        metrics["lr"] = self.cfg.train.lr
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def finish(self) -> dict:
        result = {"start": self.eval_history.get(0, {}), "end": self.eval_history.get(self.cfg.train.epochs, {})}
        with self.engine.gathered(self.params if self.cfg.lora.enabled else []):  # ZeRO-3: a collective
            if self.is_main and self.cfg.lora.enabled:
                save_lora_diffusers(self.transformer, self.out_dir / "lora")
        if self.is_main:
            table = format_reward_table(self.names, result["start"], result["end"],
                                        title=f"eval reward per objective (ODE, {self.cfg.eval.num_steps} steps, "
                                              f"{len(self.eval_prompts)} prompts), balance.method={self.cfg.balance.method}")
            print("\n" + table + "\n", flush=True)
            (self.out_dir / "summary.txt").write_text(table + "\n")
            if self.cfg.log.plot:
                p = plot_reward_curves(self.tracker.rows, self.names, self.out_dir / "reward_curves.png")
                if p:
                    print(f"reward curves: {p}", flush=True)
        if self.tracker is not None:
            self.tracker.close()
        return result


def save_image_grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    n, h, w, _ = arr.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="YAML config (e.g. configs/tiny_cpu.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    ap.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    ap.add_argument("--output-dir", default=None, help="shortcut for --set log.output_dir=...")
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (ZeRO stage etc.)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"log.output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.deepspeed:
        overrides.append(f"deepspeed={args.deepspeed}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    try:
        trainer = Trainer(cfg)
        result = trainer.fit()
    except BaseException as e:
        dist_utils.fail(e)  # several processes: this rank's error, exit 1 now (no barrier: it would deadlock)
        raise
    trainer.runtime.shutdown()  # barrier, engine, destroy_process_group: a clean exit on every rank
    return result


if __name__ == "__main__":
    main()
