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
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python apex_fast/train.py` and `deepspeed apex_fast/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "apex_fast"

import torch
from tqdm.auto import tqdm

from apex_fast import runtime as rt
from apex_fast.balance import make_balancer
from apex_fast.config import Config, ConfigError, load_config, save_config, to_dict
from apex_fast.data import load_prompts
from apex_fast.dpo import ReferenceAdapter, read_pairs
from apex_fast.dpo.learner import DPOLearner
from apex_fast.eval.evaluator import Evaluator, save_image_grid  # noqa: F401  (save_image_grid: re-export)
from apex_fast.metrics import eval_metrics, reward_metrics, scalars, timing_metrics
from apex_fast.models import ModelLoadError, add_lora, load_lora_init, load_pipeline, max_resolution
from apex_fast.models.compile import compile_transformer
from apex_fast.checkpoint import CheckpointError
from apex_fast.rewards import (RewardFailureError, RewardFailureTracker, RewardSetupError, build_scorers,
                               check_scorers)
from apex_fast.rl.learner import GRPOLearner
from apex_fast.learner import NonFiniteTrainingError
from apex_fast.run_folder import RunFolder, RunFolderError
from apex_fast.run_state import RunState, TrainableWeights
from apex_fast.sampling import EpochBatch, EpochSamples, RolloutSampler, generators_for  # noqa: F401  (re-exports)
from apex_fast.tracking import (Tracker, bars_enabled, console, format_banner, format_epoch_line, format_reward_table,
                                plot_reward_curves)

log = logging.getLogger("apex_fast.train")


class Trainer:
    """A short orchestrator over the parts (docs/DESIGN.md): rollout (sampling.RolloutSampler) ->
    gather -> learner (rl.learner.GRPOLearner) -> evaluator (eval.evaluator.Evaluator) -> run state
    (run_state.RunState) -> logs (tracking.Tracker, names in metrics.py)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.runtime = rt.init(cfg)
        self.rank, self.world = self.runtime.rank, self.runtime.world_size
        self.is_main = self.rank == 0
        self.device = self.runtime.device
        self.out_dir = Path(cfg.log.output_dir)
        # one run per folder, one trainer at a time: checked and locked before anything expensive
        self.folder = RunFolder(self.out_dir)
        if self.is_main:
            self.folder.check_writable()
            self.folder.acquire()
        try:
            if self.is_main:  # a new run into a folder with another run's files: refused here (claimed in fit)
                self.folder.claim(new_run=cfg.checkpoint.new_run, resuming=bool(cfg.checkpoint.resume), dry=True)
            self.runtime.barrier()
            self._build(cfg)
        except BaseException:
            self.folder.release()
            raise

    def _build(self, cfg: Config) -> None:
        s = cfg.sample
        # which global samples this rank rolls out and trains on, micro-batch by micro-batch; the
        # same global micro-batches for any number of processes (runtime/layout.py)
        self.layout = rt.SampleLayout(s.prompts_per_epoch * s.group_size, cfg.train.micro_batch_size,
                                      self.world, self.rank, seed=cfg.train.seed)

        try:
            train_prompts = load_prompts(cfg.data.train_prompts, "data.train_prompts")
            eval_prompts = load_prompts(cfg.data.eval_prompts, "data.eval_prompts")[: cfg.eval.num_prompts]
        except (ValueError, FileNotFoundError) as e:  # the message names the field and the fix
            raise ConfigError(str(e)) from None
        self.names = [r.name for r in cfg.rewards]  # reward keys
        try:
            self.scorers = build_scorers(cfg.rewards)
        except RewardSetupError as e:
            raise ConfigError(str(e)) from None
        self.check_rewards(train_prompts)  # before the model loads: a broken scorer fails in seconds
        self.reward_tracker = RewardFailureTracker(cfg.train.reward_max_failures,
                                                   unscorable_ok=[r.name for r in cfg.rewards if r.allow_unscorable])
        self.balancer = make_balancer(cfg.balance, [r.weight for r in cfg.rewards], self.names)

        pairs = None
        if cfg.algorithm == "dpo" and cfg.dpo.mode == "offline":  # a malformed file fails before any model loads
            pairs = read_pairs(cfg.dpo.pairs_file, skip_bad=cfg.dpo.skip_bad_pairs)
        m = cfg.model
        self.pipe = load_pipeline(m.pretrained, dtype=m.dtype, device=self.device, seed=m.seed, revision=m.revision,
                                  variant=m.variant, gradient_checkpointing=m.gradient_checkpointing,
                                  attention_backend=m.attention_backend)
        self.transformer = self.pipe.transformer
        top = max_resolution(self.pipe)
        if top is not None and cfg.model.resolution > top:
            raise ConfigError(f"model.resolution: {cfg.model.resolution} px is more than {m.pretrained!r} supports "
                              f"({top} px: its position embedding); use at most {top}")
        if cfg.lora.enabled:
            add_lora(self.transformer, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                     target_modules=cfg.lora.target_modules, seed=rt.seed_for(cfg.train.seed, "lora"))
            if cfg.lora.init_from:  # before the engine and the EMA copy them (a resume overrides it)
                try:
                    load_lora_init(self.transformer, cfg.lora.init_from)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        else:
            self.transformer.requires_grad_(True)
        # DPO's reference model: a second, frozen LoRA adapter, added before the engine sees the model
        ref = ReferenceAdapter(self.transformer, cfg.dpo.ref_update_every, cfg.dpo.ref_ema) \
            if cfg.algorithm == "dpo" else None
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        for p in self.params:  # trainable weights and their optimizer state stay fp32
            p.data = p.data.float()
        if not self.params:
            raise ConfigError("lora: the model has no trainable parameter; check lora.target_modules")
        if m.compile:  # in place: the engine, checkpoints and exports see the same module
            compile_transformer(self.transformer)
        self.engine = rt.make_engine(cfg, self.transformer, self.params, self.runtime)
        if ref is not None and getattr(self.engine, "zero3", False):
            raise ConfigError("deepspeed: algorithm: dpo does not support ZeRO stage 3 (the reference adapter is "
                              "copied from the learner's full weights); use configs/ds_zero2.json")
        self.weights = TrainableWeights(self.transformer, self.params, self.engine, cfg.lora.enabled)

        self.sampler = RolloutSampler(cfg, self.runtime, self.pipe, self.layout, self.scorers, train_prompts,
                                      {r.name: r.timeout_s for r in cfg.rewards})
        if ref is None:
            self.learner = GRPOLearner(cfg, self.runtime, self.engine, self.weights, self.balancer, self.layout,
                                       self.pipe.scheduler)
        else:
            self.learner = DPOLearner(cfg, self.runtime, self.engine, self.weights, self.sampler, self.scorers,
                                      self.names, ref, records=pairs)
        self.evaluator = Evaluator(cfg, self.runtime, self.pipe, self.sampler, self.scorers, self.names, eval_prompts,
                                   self.out_dir)
        self.run_state = RunState(cfg, self.runtime, self.weights, self.engine, self.balancer, self.learner,
                                  self.out_dir / "checkpoints")
        self.epoch = 0
        self.eval_history: dict[int, dict[str, float]] = {}
        self.tracker: Tracker | None = None
        self.bars = bars_enabled(cfg.log.progress, self.rank)

    def banner(self) -> str:
        """What the run will do, printed once at the start (rank 0)."""
        cfg, s, t = self.cfg, self.cfg.sample, self.cfg.train
        n = s.prompts_per_epoch * s.group_size
        w = s.sde_window
        steps = (f"{s.num_steps} ({'SDE window of ' + str(w.size) + ', ' + w.schedule if w.size else 'SDE'}), "
                 f"{w.size or getattr(self.learner, 'num_train_steps', '-')} trained")
        items = {
            "samples per epoch": f"{n} ({s.prompts_per_epoch} prompts x {s.group_size} images)",
            "sampling steps": steps,
            "optimizer steps per epoch": f"{getattr(self.learner, 'steps_per_epoch', '-')} (micro-batch "
                                         f"{self.layout.m} x {self.world} processes x accumulation "
                                         f"{getattr(self.learner, 'accumulation', 1)})",
            "epochs": f"{self.epoch} -> {t.epochs}",
            "processes": f"{self.world} ({self.device}, {'DeepSpeed ZeRO-' + str(self.engine.zero_stage) if cfg.deepspeed else 'torch'})",
            "trainable parameters": f"{sum(p.numel() for p in self.params):,} "
                                    f"({'LoRA r=' + str(cfg.lora.rank) if cfg.lora.enabled else 'full'})",
            "lr": f"{t.lr:g} ({t.lr_schedule}, warmup {t.lr_warmup_steps})",
            "kl": f"beta {t.kl_beta:g}, {t.kl_form}",
            **({"transformer": "torch.compile (model.compile): the first call of each shape compiles, so the first "
                               "epoch and the first evaluation are slower"} if cfg.model.compile else {}),
            "rewards": ", ".join(f"{r.name} ({r.weight:g})" for r in cfg.rewards) + f"; balance {cfg.balance.method}",
            **({"per-objective gradients": self._gradients_line()} if cfg.balance.gradients != "proxy" else {}),
            "output folder": str(self.out_dir.resolve()),
        }
        return format_banner(items)

    def _gradients_line(self) -> str:
        """balance.gradients and, for APEX's dual cone (its default with captured gradients), what it runs."""
        b = self.cfg.balance
        line = f"{b.gradients} (Gram: {b.gram_estimate}, {b.gram_metric} metric)"
        if b.method == "apex" and b.dual_cone:
            parts = ["dual cone", f"beta_cone {b.beta_cone:g}"] + (["KL term counted"] if b.cone_kl else []) + \
                    [f"cone_min_learn {b.cone_min_learn:g}", f"cone_min_persistence {b.cone_min_persistence:g}"]
            line += "; APEX " + ", ".join(parts) + " (README: APEX with captured gradients)"
        return line

    def check_rewards(self, prompts) -> None:
        """Every scorer once on a probe batch (rewards/preflight.py), on every rank; a failure on any
        rank stops every rank with the same error."""
        errors = check_scorers(self.scorers, self.cfg.rewards, prompts, self.cfg.model.resolution)
        failed = self.runtime.all_gather_rows(torch.tensor([[float(n in errors) for n in self.names]]))  # [world, K]
        bad = [(k, n) for k, n in enumerate(self.names) if failed[:, k].any()]
        if bad:
            lines = [errors.get(n) or f"reward {n!r} failed its check on rank(s) "
                     f"{failed[:, k].nonzero().flatten().tolist()} (see that rank's log)" for k, n in bad]
            raise RewardSetupError("\n".join(lines))

    # parts' views kept on the trainer (scripts and tests use them)
    @property
    def local_n(self) -> int:
        return self.layout.local_n

    @property
    def num_train_steps(self) -> int:
        return self.learner.num_train_steps

    @property
    def global_step(self) -> int:
        return self.learner.global_step

    @property
    def ema(self):
        return self.learner.eval_weights()

    def rollout(self, epoch: int):
        """(this rank's samples, group ids [N], R_local [n, K], timings) of ``epoch``."""
        b = self.sampler.collect(epoch)
        b.samples.policy_step = self.learner.global_step  # the weights it was sampled with
        self._reward_errors = b.errors
        return b.samples, b.group_ids, b.R_local, b.timings

    def _step_terms(self, samples, idx, j: int, train: bool = True, model=None):
        return self.learner.step_terms(samples, idx, j, train=train, model=model)

    def train_epoch(self, samples, adv: torch.Tensor, epoch: int) -> dict:
        return self.learner.train_epoch(samples, adv, epoch)

    # ------------------------------------------------------------------ the loop
    def evaluate(self, epoch: int) -> dict[str, float]:
        """Mean reward per objective on the eval prompts (ODE sampler) with the learner's eval weights (EMA)."""
        with self.weights.swapped(self.learner.eval_weights()):
            means = self.evaluator.evaluate(epoch)

        def again():  # the evaluator once more with the model the learner sets up (DPO: the base model)
            self.evaluator.evaluate(epoch, grid_name="eval_base.png",
                                    grid_title=f"base model (LoRA disabled): held-out prompts, ODE "
                                               f"{self.cfg.eval.num_steps} steps, seed {self.cfg.eval.seed}")
            return self.evaluator.last_scores

        means.update(self.learner.eval_metrics(self.evaluator.last_scores, again))
        self.eval_history[epoch] = means
        return means

    def save(self) -> Path | None:
        return self.run_state.save(self.epoch, self.eval_history)

    def resume(self, resume: str) -> None:
        self.epoch, self.eval_history = self.run_state.resume(resume)

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.folder.release()

    def _fit(self) -> dict:
        cfg = self.cfg
        self.run_state.recover(export=self.out_dir / "lora")  # what a killed checkpoint/LoRA write left behind
        if cfg.checkpoint.resume:
            self.resume(cfg.checkpoint.resume)
            if self.epoch > cfg.train.epochs:
                raise CheckpointError(f"checkpoint {self.run_state.resumed_from} is at epoch {self.epoch}, past "
                                      f"train.epochs={cfg.train.epochs}; raise train.epochs to train on, or resume an "
                                      f"earlier checkpoint (checkpoint.resume=<folder>)")
            if self.epoch == cfg.train.epochs and self.is_main:
                log.info("checkpoint %s is already at train.epochs=%d: nothing to train (raise train.epochs to "
                         "continue); writing the final outputs", self.run_state.resumed_from, cfg.train.epochs)
        if self.is_main:  # this run owns the folder from now on (run.json; --new-run archives the old one)
            self.run_state.run_id = self.folder.claim(new_run=cfg.checkpoint.new_run, resuming=bool(cfg.checkpoint.resume),
                                                      run_id=self.run_state.run_id)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        self.tracker = Tracker(self.out_dir, tensorboard=cfg.log.tensorboard, csv_file=cfg.log.csv, wandb=cfg.log.wandb,
                               config=to_dict(cfg), enabled=self.is_main,
                               resume_epoch=self.epoch if cfg.checkpoint.resume else None)
        if self.is_main:
            console(self.banner(), self.bars)
        if 0 not in self.eval_history:
            self.tracker.log(eval_metrics(self.evaluate(0)), 0)
        bar = tqdm(range(self.epoch, cfg.train.epochs), desc="epochs", disable=not self.bars, dynamic_ncols=True)
        n_images = cfg.sample.prompts_per_epoch * cfg.sample.group_size
        for epoch in bar:
            t0 = time.perf_counter()
            metrics = self.run_epoch(epoch)
            self.epoch = epoch + 1
            last = self.epoch == cfg.train.epochs
            if last or (cfg.eval.every and self.epoch % cfg.eval.every == 0):
                metrics.update(eval_metrics(self.evaluate(self.epoch)))
            metrics["time/epoch"] = time.perf_counter() - t0
            self.tracker.log(metrics, self.epoch)
            if self.is_main:  # one plain line per epoch (above the bars on a terminal; alone in a log file)
                console(format_epoch_line(self.epoch, cfg.train.epochs, metrics, self.names, n_images), self.bars)
            if (cfg.checkpoint.every and self.epoch % cfg.checkpoint.every == 0) or last:
                self.save()
        return self.finish()

    def run_epoch(self, epoch: int) -> dict:
        """rollout (scoring overlaps sampling) -> one all-gather of R [N, K] and group ids -> learner."""
        t0 = time.perf_counter()
        if not self.learner.needs_rollout:  # offline data (DPO from a pairs file)
            metrics = self.learner.learn(None, None, None, epoch)
            metrics.update(timing_metrics(0.0, 0.0, time.perf_counter() - t0))
            metrics["lr"] = self.cfg.train.lr
            return scalars(metrics)
        with self.learner.rollout_model():  # DPO: the reference samples the candidates
            samples, group_ids, R_local, timings = self.rollout(epoch)
        t1 = time.perf_counter()
        R, group_ids = self.runtime.gather_samples(R_local, group_ids[samples.global_index], samples.global_index)
        # judged on the gathered rewards, so every rank reaches the same verdict (no rank stops alone)
        all_nan = {n for k, n in enumerate(self.names) if torch.isnan(R[:, k]).all()}
        self.reward_tracker.update(self.names, R, {n: e for n, e in self._reward_errors.items() if n in all_nan})
        batch = EpochBatch(samples, group_ids, R_local, timings, self._reward_errors)
        metrics = self.learner.learn(batch, R, group_ids, epoch)
        t3 = time.perf_counter()
        metrics.update(reward_metrics(R, group_ids, self.names, timings))
        metrics.update(timing_metrics(t1 - t0, sum(timings.values()), t3 - t1))
        metrics.setdefault("lr", self.cfg.train.lr)
        return scalars(metrics)

    def finish(self) -> dict:
        result = {"start": self.eval_history.get(0, {}), "end": self.eval_history.get(self.cfg.train.epochs, {})}
        # the EMA when there is one (Flow-GRPO exports it; evaluation measured it); ZeRO-3: a collective
        self.weights.export_lora(self.out_dir / "lora", self.is_main, values=self.learner.eval_weights())
        if self.is_main:
            table = format_reward_table(self.names, result["start"], result["end"],
                                        title=f"eval reward per objective (ODE, {self.cfg.eval.num_steps} steps, "
                                              f"{len(self.evaluator.prompts)} prompts), " + (
                                                  f"algorithm=dpo, dpo.label={self.cfg.dpo.label}"
                                                  if self.cfg.algorithm == "dpo" else
                                                  f"balance.method={self.cfg.balance.method}"))
            extra = self.learner.summary(result["end"])
            if extra:
                table += "\n\n" + extra
            print("\n" + table + "\n", flush=True)
            (self.out_dir / "summary.txt").write_text(table + "\n")
            if self.cfg.log.plot:
                p = plot_reward_curves(self.tracker.rows, self.names, self.out_dir / "reward_curves.png")
                if p:
                    print(f"reward curves: {p}", flush=True)
        if self.tracker is not None:
            self.tracker.close()
        return result


# errors whose message names the field or file and the fix (the CLI prints them without a traceback)
USER_ERRORS = (ConfigError, CheckpointError, RewardSetupError, RewardFailureError, RunFolderError,
               NonFiniteTrainingError, ModelLoadError)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  apex-fast train --config configs/tiny_cpu.yaml --dry-run       # check everything, train nothing\n"
               "  apex-fast train --config configs/tiny_cpu.yaml --print-config  # every field: value, default, meaning\n"
               "  apex-fast train --config configs/tiny_cpu.yaml --set balance.method=apex --output-dir outputs/apex\n"
               "  apex-fast train --config configs/tiny_cpu.yaml --resume latest # continue a run exactly\n"
               "  deepspeed --num_gpus 8 apex_fast/train.py --config configs/sd35m_lora_zero2.yaml "
               "--deepspeed configs/ds_zero2.json\n"
               "then evaluate the run: apex-fast eval --run <log.output_dir>")
    ap.add_argument("--config", default=None, help="YAML config (e.g. configs/tiny_cpu.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    ap.add_argument("--resume", default=None, help="'latest' (none yet: start fresh) or a checkpoint folder")
    ap.add_argument("--new-run", action="store_true",
                    help="start a new run in an output folder that holds one (its files move to previous-runs/)")
    ap.add_argument("--output-dir", default=None, help="shortcut for --set log.output_dir=...")
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (ZeRO stage etc.)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the effective config (every field: value, default, meaning) and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="check config, prompts, model, LoRA, scorers and output folder, then exit without training")
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
    if args.new_run:
        overrides.append("checkpoint.new_run=true")
    if args.deepspeed:
        overrides.append(f"deepspeed={args.deepspeed}")
    if args.print_config:
        from apex_fast.config_doc import print_config

        return print_config(args.config, overrides)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    if args.dry_run:
        from apex_fast.preflight import dry_run

        if not dry_run(cfg):
            raise SystemExit(1)
        return {}
    rt.install_stop_handlers()  # SIGTERM/SIGHUP stop like Ctrl-C: nothing half-written, last checkpoint intact
    rt.watch_parent()  # under torchrun/deepspeed: stop if the launcher dies
    try:
        trainer = Trainer(cfg)
        result = trainer.fit()
    except USER_ERRORS as e:  # says what to fix: one line, no traceback
        rt.fail(e, brief=True)  # several processes: this rank's error, exit 2 now
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt as e:  # Ctrl-C or a stop signal (rt.Stopped)
        code = 128 + getattr(e, "signum", 2)
        msg = f"{str(e) or 'stopped by SIGINT'}; checkpoints written so far are intact, continue with --resume latest"
        rt.fail(RuntimeError(msg), brief=True, code=code)
        print(f"apex_fast: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None
    except BaseException as e:
        rt.fail(e)  # several processes: this rank's error, exit 1 now (no barrier: it would deadlock)
        raise
    trainer.runtime.shutdown()  # barrier, engine, destroy_process_group: a clean exit on every rank
    return result


if __name__ == "__main__":
    main()
