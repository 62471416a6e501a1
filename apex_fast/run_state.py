"""Run state: the trained weights (every ZeRO-3 gather of them happens here), their EMA, and
save/resume of everything a run needs to continue bit for bit (checkpoint.py writes the files).

    weights = TrainableWeights(transformer, params, engine, lora=True)
    with weights.swapped(ema.values): ...          # evaluate with the EMA weights
    state = RunState(cfg, runtime, weights, engine, balancer, learner, ckpt_dir)
    state.save(epoch, eval_history); epoch, eval_history = state.resume("latest")

A checkpoint records what defines its run (``run_identity``: base model, LoRA shape, reward keys with
types and weights, balancer, process count, a fingerprint of the config) and the run id. A resume
with another identity is refused with the differences listed (``checkpoint.force_resume`` forces
what can be forced); settings that may change (lr, epochs, betas, weight decay, clipping, logging,
evaluation) take effect. Resuming an older checkpoint moves the newer ones aside (rollback), so a
later ``--resume latest`` never returns to the abandoned branch. Non-finite weights are never written.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (CheckpointError, checkpoint_dirs, load_checkpoint, recover_interrupted_writes, resolve_resume,
                         save_checkpoint, write_folder_atomically)
from .config import to_dict
from .models import load_lora_state_dict, lora_state_dict, save_lora_diffusers
from .runtime import DS_CHECKPOINT_DIR

log = logging.getLogger("apex_fast.run_state")


# config fields that may differ on resume and take effect (the rest defines the run)
CHANGEABLE = ("train.lr", "train.epochs", "train.adam_betas", "train.adam_eps", "train.weight_decay",
              "train.max_grad_norm", "train.clip_range", "train.reward_max_failures", "train.max_nonfinite_steps",
              "log.", "checkpoint.", "eval.", "sample.batch_size", "deepspeed")
CHANGEABLE_REWARD_FIELDS = ("timeout_s", "allow_unscorable", "args")
# fields that no override can change: the trained weights (and optimizer shards) have their shape
NEVER = ("lora.", "world_size")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "args":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def run_identity(cfg_dict: dict, world_size: int) -> dict:
    """What defines a run, from a config dict (config.to_dict): base model, LoRA shape, rewards in
    order (key, type, weight), balancer method, process count, and a fingerprint (sha256) of every
    config field that is not free to change on resume."""
    m, lo = cfg_dict["model"], cfg_dict["lora"]
    fixed = {k: v for k, v in _flat({**cfg_dict, "rewards": None}).items() if not k.startswith(CHANGEABLE)}
    fixed["rewards"] = [{k: v for k, v in r.items() if k not in CHANGEABLE_REWARD_FIELDS} for r in cfg_dict["rewards"]]
    return {
        "model": {"pretrained": m["pretrained"], "seed": m["seed"], "revision": m.get("revision")},
        "lora": {"enabled": lo["enabled"], "rank": lo["rank"], "alpha": lo["alpha"],
                 "target_modules": sorted(lo["target_modules"])},
        "rewards": [{"name": r["name"], "type": r.get("type") or r["name"], "weight": r["weight"]}
                    for r in cfg_dict["rewards"]],
        "balance_method": cfg_dict["balance"]["method"],
        "world_size": world_size,
        "fingerprint": hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:16],
    }


def config_changes(old: dict, new: dict, old_world: int, new_world: int) -> tuple[list[str], list[str], list[str]]:
    """(changes that take effect, changes that need checkpoint.force_resume, changes that cannot be
    made) between a checkpoint's config dict and this run's, each as 'field: old -> new'."""
    free, forced, never = [], [], []

    def put(key, a, b):
        line = f"{key}: {a!r} in the checkpoint, {b!r} now"
        if key.startswith(NEVER):
            never.append(line)
        elif key.startswith(CHANGEABLE) or key.split(".")[-1] in CHANGEABLE_REWARD_FIELDS and key.startswith("rewards"):
            free.append(f"{key}: {a!r} -> {b!r}")
        else:
            forced.append(line)

    if old_world != new_world:
        put("world_size", old_world, new_world)
    fo, fn = _flat({**old, "rewards": None}), _flat({**new, "rewards": None})
    for key in sorted(set(fo) | set(fn)):
        if key != "rewards" and fo.get(key) != fn.get(key):
            put(key, fo.get(key), fn.get(key))
    ko, kn = [r["name"] for r in old.get("rewards", [])], [r["name"] for r in new["rewards"]]
    if ko != kn:
        forced.append(f"rewards (keys in order): {ko} in the checkpoint, {kn} now")
    by_key = {r["name"]: r for r in old.get("rewards", [])}
    for r in new["rewards"]:
        o = by_key.get(r["name"])
        if o is None:
            continue
        for f in sorted(set(o) | set(r)):
            a = o.get(f) if f != "type" else (o.get("type") or o["name"])
            b = r.get(f) if f != "type" else (r.get("type") or r["name"])
            if a != b:
                put(f"rewards[{r['name']}].{f}", a, b)
    return free, forced, never


class TrainableWeights:
    """The trainable parameters of the transformer (LoRA or all of it) and the engine that may
    partition them (DeepSpeed ZeRO-3). Every full view of them goes through ``gathered``."""

    def __init__(self, transformer, params: list[torch.Tensor], engine, lora: bool):
        self.transformer = transformer
        self.params = params
        self.engine = engine
        self.lora = lora

    def gathered(self, modify: bool = False):
        """Full parameters inside the block (ZeRO-3: a collective, enter it on every rank; a no-op
        otherwise). ``modify``: what rank 0 writes is kept."""
        return self.engine.gathered(self.params, modify=modify)

    def copies(self) -> list[torch.Tensor]:
        with self.gathered():
            return [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def swapped(self, values: list[torch.Tensor] | None):
        """The parameters replaced by ``values`` inside the block (e.g. the EMA for evaluation), restored
        after; ``None``: unchanged."""
        if values is None:
            yield
            return
        with self.gathered(modify=True):
            backup = [p.detach().clone() for p in self.params]
            for p, q in zip(self.params, values):
                p.data.copy_(q)
        try:
            yield
        finally:
            with self.gathered(modify=True):
                for p, q in zip(self.params, backup):
                    p.data.copy_(q)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable weights for the trainer state: the peft LoRA state dict, or (full fine-tuning)
        full copies on rank 0, gathered one weight at a time under ZeRO-3 (a collective)."""
        if self.lora:
            with self.gathered():
                return lora_state_dict(self.transformer)
        return self.engine.consolidated({n: p for n, p in self.transformer.named_parameters() if p.requires_grad})

    def load(self, trainable: dict[str, torch.Tensor]) -> None:
        if self.lora:
            load_lora_state_dict(self.transformer, trainable)
            return
        named = dict(self.transformer.named_parameters())
        with torch.no_grad():
            for n, v in trainable.items():
                named[n].copy_(v)

    def export_lora(self, folder, is_main: bool, extra=None, values: list[torch.Tensor] | None = None) -> None:
        """diffusers-format LoRA written by rank 0 (ZeRO-3: gathered, a collective) of the current
        weights, or of ``values`` (the EMA) swapped in; ``extra(folder)`` runs on rank 0 after it,
        inside the gather. The folder is replaced atomically (a stop or crash never leaves a half-written
        export, nor loses the previous one)."""
        if not self.lora and extra is None:
            return  # full fine-tuning: nothing to export here

        def write(tmp):
            if self.lora:
                save_lora_diffusers(self.transformer, tmp)
            if extra is not None:
                extra(tmp)

        with self.swapped(values), self.gathered() if self.lora else contextlib.nullcontext():
            if is_main:
                write_folder_atomically(folder, write)


class EMA:
    """Exponential moving average of the trainable weights (fp32, full copies on every rank), updated
    every ``every`` optimizer steps: ``e += (1 - d_t) (p - e)``, ``d_t = min(decay, (1 + t) / (10 + t))``
    after the t-th optimizer step with ``warmup`` (Flow-GRPO's EMAModuleWrapper: the average starts near the
    current weights instead of holding the initial ones for ~1 / (1 - decay) updates), else ``decay``."""

    def __init__(self, weights: TrainableWeights, decay: float, every: int, warmup: bool = True):
        self.weights, self.decay, self.every, self.warmup = weights, decay, every, warmup
        self.values = weights.copies()

    def decay_at(self, global_step: int) -> float:
        """The decay of the update after optimizer step ``global_step`` (1-based)."""
        return min(self.decay, (1 + global_step) / (10 + global_step)) if self.warmup else self.decay

    def update(self, global_step: int) -> None:
        if global_step % self.every:
            return
        d = self.decay_at(global_step)
        with torch.no_grad(), self.weights.gathered():
            for e, p in zip(self.values, self.weights.params):
                e.lerp_(p.detach(), 1 - d)

    def load(self, values) -> None:
        for e, v in zip(self.values, values):
            e.copy_(v)


class RunState:
    """Save and resume a run: trainable weights, optimizer (ours or DeepSpeed's shards), the
    learner's state (global step, EMA, ...), the balancer, RNG, evaluation history, config.

    The checkpoint's diffusers LoRA (``pytorch_lora_weights.safetensors``, what users load) holds the
    exported weights: the EMA when the learner keeps one (as Flow-GRPO saves it, and what evaluation
    measured); the raw trained weights, which a resume continues from, are in ``state.safetensors``
    (``trainable``) and, under DeepSpeed, its ``deepspeed/`` folder."""

    def __init__(self, cfg, runtime, weights: TrainableWeights, engine, balancer, learner, ckpt_dir: Path):
        self.cfg, self.runtime, self.weights, self.engine = cfg, runtime, weights, engine
        self.balancer, self.learner, self.ckpt_dir = balancer, learner, Path(ckpt_dir)
        self.run_id: str | None = None  # set by the trainer (run_folder.RunFolder.claim)
        self.resumed_from: Path | None = None

    def _state(self, epoch: int, eval_history: dict, trainable: dict) -> dict:
        return {
            "epoch": epoch,
            **self.learner.state_dict(),  # global_step, ema, and what else the learner keeps
            "world_size": self.runtime.world_size,
            "trainable": trainable,
            "optimizer": self.engine.optimizer_state(),
            "balancer": self.balancer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].astype(np.int64).tolist(),
                    "python": repr(random.getstate())},
            "eval_history": {str(k): v for k, v in eval_history.items()},
            "exported_lora": "raw" if self.learner.eval_weights() is None else "ema",
            "config": to_dict(self.cfg),
            "run": {"run_id": self.run_id, "identity": run_identity(to_dict(self.cfg), self.runtime.world_size)},
        }

    def save(self, epoch: int, eval_history: dict) -> Path | None:
        """A collective: call on every rank. Rank 0 writes the folder atomically."""
        self.runtime.barrier()
        # engine-owned files (DeepSpeed: the ZeRO optimizer shards), written by every rank into a
        # staging folder that rank 0 moves into the checkpoint before its atomic rename
        staging = self.ckpt_dir / f".engine-{epoch:06d}"
        try:
            return self._save(epoch, eval_history, staging)
        except BaseException:  # a stop signal or an error: no staging folder of engine shards is left behind
            if self.runtime.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise

    def _save(self, epoch: int, eval_history: dict, staging: Path) -> Path | None:
        engine_dir = self.engine.save_checkpoint(staging)
        trainable = self.weights.checkpoint_tensors()  # the raw weights: what a resume continues from
        self._check_finite(epoch, trainable)
        gathered = self.learner.gathered_state()  # a collective: the learner's state held across ranks
        path = None
        # the diffusers LoRA holds the exported weights (the EMA when there is one); a collective
        with self.weights.swapped(self.learner.eval_weights()), \
                self.weights.gathered() if self.weights.lora else contextlib.nullcontext():
            if self.runtime.rank == 0:
                def write_extra(tmp):
                    if self.weights.lora:
                        save_lora_diffusers(self.weights.transformer, tmp)
                    if engine_dir is not None:
                        Path(engine_dir).rename(Path(tmp) / DS_CHECKPOINT_DIR)

                path = save_checkpoint(self.ckpt_dir, epoch, {**self._state(epoch, eval_history, trainable), **gathered},
                                       write_extra=write_extra, keep=self.cfg.checkpoint.keep)
                log.info("saved checkpoint %s", path)
        self.runtime.barrier()
        return path

    def _check_finite(self, epoch: int, trainable: dict) -> None:
        """Never write a checkpoint with non-finite weights (it would replace good ones)."""
        ema = self.learner.eval_weights() or []
        bad = [n for n, t in trainable.items() if not torch.isfinite(t).all()]
        bad += [f"ema[{i}]" for i, t in enumerate(ema) if not torch.isfinite(t).all()]
        if bad:
            last = checkpoint_dirs(self.ckpt_dir)
            raise CheckpointError(
                f"epoch {epoch}: the trained weights are not finite ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                f"no checkpoint written, the last good one is {last[-1] if last else 'none'}. Lower train.lr or "
                f"train.max_grad_norm and resume from it (checkpoint.resume=<folder>)")

    def recover(self, export: Path | None = None) -> None:
        """Before anything reads the checkpoints (a collective): rank 0, which holds the folder lock,
        puts back a checkpoint (or the ``export`` folder, the final LoRA) whose replacement was killed
        and removes unfinished temporary folders."""
        if self.runtime.rank == 0:
            recover_interrupted_writes(self.ckpt_dir)
            if export is not None:
                recover_interrupted_writes(export.parent, names=f"^{re.escape(export.name)}$")
        self.runtime.barrier()

    def find(self, resume: str) -> Path | None:
        """The checkpoint folder ``resume`` ('latest' or a folder) names; None: 'latest' and none yet."""
        return resolve_resume(resume, self.ckpt_dir)

    def resume(self, resume: str) -> tuple[int, dict]:
        """Restore everything from ``resume`` ('latest' or a folder); returns (epoch, eval_history).
        'latest' without a checkpoint starts fresh: (0, {})."""
        path = self.find(resume)
        if path is None:
            if self.runtime.rank == 0:
                log.info("checkpoint.resume=latest: no checkpoint under %s yet; starting a fresh run", self.ckpt_dir)
            return 0, {}
        st = load_checkpoint(path)
        world = self.runtime.world_size
        self._check_identity(path, st)
        if self.engine.restores_weights:
            self.engine.load_checkpoint(path)  # DeepSpeed: trainable weights, fp32 masters, ZeRO optimizer shards
        else:
            self.weights.load(st["trainable"])
            self.engine.load_optimizer_state(st["optimizer"])
        self.engine.set_hyperparameters(self.cfg.train)  # the config's lr, betas, ... not the checkpoint's
        self.learner.load_state_dict(st)
        self._load_balancer(st["balancer"])
        torch.set_rng_state(st["rng"]["torch"])
        epoch = int(st["epoch"])
        self.run_id = st.get("run", {}).get("run_id")
        self.resumed_from = path
        if self.runtime.rank == 0:
            log.info("resumed from %s at epoch %d", path, epoch)
            self._abandon_newer(path)
        return epoch, {int(k): v for k, v in st.get("eval_history", {}).items()}

    def _check_identity(self, path: Path, st: dict) -> None:
        old = st.get("config")
        world = self.runtime.world_size
        if st.get("world_size", world) != world:
            raise CheckpointError(
                f"checkpoint {path} was written by {st['world_size']} processes but this run has {world}; "
                f"resume with the same number of processes (the optimizer state's ZeRO shards and the global "
                f"micro-batch, train.micro_batch_size x processes, depend on it)")
        if old is None:
            return
        free, forced, never = config_changes(old, to_dict(self.cfg), st.get("world_size", world), world)
        if never:
            raise CheckpointError(f"checkpoint {path} cannot be resumed with this config: " + "; ".join(never) +
                                  ". These cannot change within a run (the trained weights have that shape); start a "
                                  "new run (--new-run or another --output-dir)")
        if forced and not self.cfg.checkpoint.force_resume:
            raise CheckpointError(f"checkpoint {path} is from a different run setup: " + "; ".join(forced) +
                                  ". Resume with the checkpoint's settings, start a new run (--new-run or another "
                                  "--output-dir), or force it with --set checkpoint.force_resume=true")
        if self.runtime.rank == 0:
            for line in forced:
                log.warning("resume forced (checkpoint.force_resume) despite %s", line)
            for line in free:
                log.info("resume: %s (takes effect now)", line)

    def _load_balancer(self, state: dict) -> None:
        try:
            self.balancer.load_state_dict(state)
        except ValueError as e:
            if not self.cfg.checkpoint.force_resume:
                raise CheckpointError(f"checkpoint: balancer state does not fit this run ({e})") from None
            log.warning("resume forced: balancer state not restored (%s); the balancer starts fresh", e)

    def _abandon_newer(self, path: Path) -> None:
        """Rolled back to an older checkpoint of this folder: move the newer ones aside, so a later
        --resume latest continues this branch, not the abandoned one (nothing is deleted)."""
        try:
            mine = path.resolve().parent == self.ckpt_dir.resolve()
        except OSError:
            return
        found = checkpoint_dirs(self.ckpt_dir)
        newer = [p for p in found if mine and p.name > path.name]
        if not newer:
            return
        dest = self.ckpt_dir / "abandoned" / f"after-{path.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        dest.mkdir(parents=True, exist_ok=True)
        for p in newer:
            shutil.move(str(p), str(dest / p.name))
        log.warning("rolled back to %s: the newer checkpoints %s moved to %s", path.name,
                    ", ".join(p.name for p in newer), dest)
