"""Hyperparameters of BalancedDPO (docs/SPEC.md section 6). The run config embeds this dataclass as
``dpo`` (used when ``algorithm: dpo``); every error names the field as ``dpo.<field>``."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .votes import LABEL_MODES

MODES = ("online", "offline")


@dataclass
class DPOConfig:
    label: str = "balanced_vote"  # balanced_vote | soft_vote | single | vanilla_sum | normalized_sum | random
    beta: float = 100.0  # Diffusion-DPO's beta in the flow-matching (velocity) form (the epsilon form uses 5000)
    ref_update_every: int = 40  # copy the learner into the reference every N optimizer steps (huge N: plain DPO)
    ref_ema: float = 0.0  # > 0: EMA reference, theta_ref = ref_ema * theta_ref + (1 - ref_ema) theta, every step
    mode: str = "online"  # online: sample G images per prompt with the reference | offline: pairs_file
    pairs_file: str | None = None  # offline: jsonl of pairs (dpo/pairs.py); a bare name resolves to the shipped ones
    pairs_per_epoch: int = 0  # offline: pairs trained per epoch (0: the whole file)
    skip_bad_pairs: bool = False  # offline: train on the good lines of a file with malformed ones (else: an error)
    single_scorer: str | None = None  # label single: the reward whose score decides (default: the first reward)
    t_mean: float = 0.0  # logit-normal t: t = sigmoid(t_mean + t_std * N(0, 1)) (SD3's training distribution)
    t_std: float = 1.0  # std of the logit-normal t

    def validate(self, reward_names: list[str]) -> None:
        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"dpo.{field}: {msg}")

        need(self.label in LABEL_MODES, "label", f"{self.label!r} is not one of {', '.join(LABEL_MODES)}")
        need(self.mode in MODES, "mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        need(isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0, "beta",
             f"must be a finite number > 0, got {self.beta!r}")
        need(self.ref_update_every >= 1, "ref_update_every", f"must be >= 1, got {self.ref_update_every}")
        need(0 <= self.ref_ema < 1, "ref_ema", f"must be in [0, 1) (0: copy every ref_update_every steps), got {self.ref_ema}")
        need(self.pairs_per_epoch >= 0, "pairs_per_epoch", f"must be >= 0 (0: the whole file), got {self.pairs_per_epoch}")
        need(self.t_std > 0, "t_std", f"must be > 0, got {self.t_std}")
        if self.mode == "offline":
            need(bool(self.pairs_file), "pairs_file", "offline DPO needs a pairs file, e.g. dpo.pairs_file=tiny_pairs.jsonl")
        if self.single_scorer is not None:
            need(self.single_scorer in reward_names, "single_scorer",
                 f"{self.single_scorer!r} is not one of the rewards {reward_names}")
