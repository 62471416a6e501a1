"""Hyperparameters of every balancing method (docs/SPEC.md sections 3-5), with SPEC's defaults.
The top-level run config embeds this dataclass as ``balance``."""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("static", "gdpo", "apex", "pcgrad", "mgda", "cagrad", "upgrad")


@dataclass
class BalanceConfig:
    method: str = "static"  # one of METHODS
    global_std: bool = False  # static: normalise by the whole-batch std (all SD3.5 configs do)
    eps: float = 1e-4  # added to every std denominator
    adv_clip: float = 5.0  # advantages are clipped to [-adv_clip, adv_clip]

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"balance.method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.eps > 0:
            raise ValueError(f"balance.eps must be > 0, got {self.eps}")
        if not self.adv_clip > 0:
            raise ValueError(f"balance.adv_clip must be > 0, got {self.adv_clip}")
