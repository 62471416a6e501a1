"""The learner seam: what differs between algorithms (GRPO in rl/learner.py, DPO in dpo/).

The trainer (train.py) runs, per epoch: rollout part (sampling.py) -> gather of rewards over ranks
-> ``learner.learn(batch, R, group_ids, epoch)`` -> evaluation with ``learner.eval_weights()`` ->
run state (run_state.py). A learner:

* gets the epoch's samples (``batch: sampling.EpochBatch``: this rank's latents, log-probs, images,
  conditioning, prompts, global indices) and the rewards of the whole batch, ``R [N, K]`` (NaN =
  failed) with ``group_ids [N]``, in global sample order (``batch.samples.global_index`` picks this
  rank's rows);
* computes its losses and steps the engine (``engine.backward`` / ``engine.add_grads`` /
  ``engine.step``), counting optimizer steps in ``global_step``;
* owns the EMA of the trained weights (``run_state.EMA``) and says which weights evaluation uses;
* runs the balancer through ``grad.sequence`` when it balances K objectives;
* returns a flat dict of scalar metrics (names: metrics.py and the balancer's);
* may sample the epoch's rollouts with another model (``rollout_model()``, a context; DPO: the
  reference) or need no rollout at all (``needs_rollout`` False: ``learn(None, None, None, epoch)``,
  DPO from a pairs file);
* may add evaluation metrics from the per-item eval scores (``eval_metrics``, DPO: win rates over the
  base model) and a block to the run summary (``summary``);
* checkpoints its own state: ``state_dict()`` (tensors and JSON scalars, merged into the trainer
  state, so keys must not collide with epoch/world_size/trainable/optimizer/balancer/rng/
  eval_history/config) and ``load_state_dict(full_state)``.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch

from .run_state import EMA

log = logging.getLogger("apex_fast.learner")


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class Learner:
    global_step: int = 0
    ema: EMA | None = None
    needs_rollout: bool = True  # False: the learner brings its own data (learn gets batch, R, group_ids = None)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss/gradient, whole run
    skipped_in_epoch: int = 0
    _nonfinite_streak: int = 0

    def rollout_model(self):
        """Context under which the trainer samples the epoch's rollouts (default: the current weights)."""
        return contextlib.nullcontext()

    def eval_metrics(self, scores: torch.Tensor, evaluate) -> dict[str, float]:
        """Extra evaluation results from the per-item eval scores [n_items, K]; ``evaluate()`` runs the
        evaluator again with the current model and returns its scores."""
        return {}

    def summary(self, end: dict) -> str:
        """Extra text for the run summary from the final evaluation results."""
        return ""

    def count_step(self, grad_norm: float, epoch: int) -> bool:
        """After ``engine.step``: True if the step was taken; False if it was skipped because the
        loss or gradient was not finite (the engines skip it on every rank alike), counted, and a
        NonFiniteTrainingError after ``train.max_nonfinite_steps`` skipped steps in a row. ``epoch``:
        the 0-based index the learner trains; messages name it as the log does (epoch + 1)."""
        epoch += 1
        if math.isfinite(grad_norm):
            self._nonfinite_streak = 0
            return True
        self.skipped_steps += 1
        self.skipped_in_epoch += 1
        self._nonfinite_streak += 1
        limit = self.cfg.train.max_nonfinite_steps
        log.warning("epoch %d: optimizer step skipped, non-finite loss or gradient (norm %s; %d in a row, %d in the "
                    "run)", epoch, grad_norm, self._nonfinite_streak, self.skipped_steps)
        if self._nonfinite_streak >= limit:
            raise NonFiniteTrainingError(
                f"epoch {epoch}: {self._nonfinite_streak} optimizer steps in a row had a non-finite loss or gradient "
                f"(limit train.max_nonfinite_steps={limit}); the weights were not updated by them and no bad checkpoint "
                f"was written. Lower train.lr, check the rewards (reward/<k>/mean) or raise the limit")
        return False

    def learn(self, batch, R: torch.Tensor, group_ids: torch.Tensor, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def eval_weights(self) -> list[torch.Tensor] | None:
        """Weights to evaluate with (the EMA), or None for the current weights."""
        return None if self.ema is None else self.ema.values

    def gathered_state(self) -> dict:
        """A collective, on every rank before rank 0 writes a checkpoint: the part of the state gathered from
        every rank, which the checkpoint adds to ``state_dict()`` (nothing here)."""
        return {}

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "ema": None if self.ema is None else self.ema.values,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load(state["ema"])
