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

import torch

from .run_state import EMA


class Learner:
    global_step: int = 0
    ema: EMA | None = None
    needs_rollout: bool = True  # False: the learner brings its own data (learn gets batch, R, group_ids = None)

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

    def learn(self, batch, R: torch.Tensor, group_ids: torch.Tensor, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def eval_weights(self) -> list[torch.Tensor] | None:
        """Weights to evaluate with (the EMA), or None for the current weights."""
        return None if self.ema is None else self.ema.values

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "ema": None if self.ema is None else self.ema.values}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load(state["ema"])
