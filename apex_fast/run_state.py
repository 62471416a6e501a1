"""Run state: the trained weights (every ZeRO-3 gather of them happens here), their EMA, and
save/resume of everything a run needs to continue bit for bit (checkpoint.py writes the files).

    weights = TrainableWeights(transformer, params, engine, lora=True)
    with weights.swapped(ema.values): ...          # evaluate with the EMA weights
    state = RunState(cfg, runtime, weights, engine, balancer, learner, ckpt_dir)
    state.save(epoch, eval_history); epoch, eval_history = state.resume("latest")
"""
from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint, resolve_resume, save_checkpoint
from .config import to_dict
from .models import load_lora_state_dict, lora_state_dict, save_lora_diffusers
from .runtime import DS_CHECKPOINT_DIR

log = logging.getLogger("apex_fast.run_state")


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
        inside the gather."""
        with self.swapped(values), self.gathered() if self.lora else contextlib.nullcontext():
            if is_main:
                if self.lora:
                    save_lora_diffusers(self.transformer, folder)
                if extra is not None:
                    extra(folder)


class EMA:
    """Exponential moving average of the trainable weights (fp32, full copies on every rank), updated
    every ``every`` optimizer steps: ``e += (1 - decay) (p - e)``."""

    def __init__(self, weights: TrainableWeights, decay: float, every: int):
        self.weights, self.decay, self.every = weights, decay, every
        self.values = weights.copies()

    def update(self, global_step: int) -> None:
        if global_step % self.every:
            return
        with torch.no_grad(), self.weights.gathered():
            for e, p in zip(self.values, self.weights.params):
                e.lerp_(p.detach(), 1 - self.decay)

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
        }

    def save(self, epoch: int, eval_history: dict) -> Path | None:
        """A collective: call on every rank. Rank 0 writes the folder atomically."""
        self.runtime.barrier()
        # engine-owned files (DeepSpeed: the ZeRO optimizer shards), written by every rank into a
        # staging folder that rank 0 moves into the checkpoint before its atomic rename
        engine_dir = self.engine.save_checkpoint(self.ckpt_dir / f".engine-{epoch:06d}")
        trainable = self.weights.checkpoint_tensors()  # the raw weights: what a resume continues from
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

                path = save_checkpoint(self.ckpt_dir, epoch, self._state(epoch, eval_history, trainable),
                                       write_extra=write_extra, keep=self.cfg.checkpoint.keep)
                log.info("saved checkpoint %s", path)
        self.runtime.barrier()
        return path

    def resume(self, resume: str) -> tuple[int, dict]:
        """Restore everything from ``resume`` ('latest' or a folder); returns (epoch, eval_history)."""
        path = resolve_resume(resume, self.ckpt_dir)
        st = load_checkpoint(path)
        world = self.runtime.world_size
        if st.get("world_size", world) != world:
            raise CheckpointError(
                f"checkpoint {path} was written by {st['world_size']} processes but this run has {world}; "
                f"resume with the same number of processes (the optimizer state's ZeRO shards and the global "
                f"micro-batch, train.micro_batch_size x processes, depend on it)")
        if self.engine.restores_weights:
            self.engine.load_checkpoint(path)  # DeepSpeed: trainable weights, fp32 masters, ZeRO optimizer shards
        else:
            self.weights.load(st["trainable"])
            self.engine.load_optimizer_state(st["optimizer"])
        self.learner.load_state_dict(st)
        self.balancer.load_state_dict(st["balancer"])
        torch.set_rng_state(st["rng"]["torch"])
        epoch = int(st["epoch"])
        if self.runtime.rank == 0:
            log.info("resumed from %s at epoch %d", path, epoch)
        return epoch, {int(k): v for k, v in st.get("eval_history", {}).items()}
