"""Per-objective gradients of the GRPO surrogate, their Gram, and the combined update.

    sequence.py    the balancer sequence of an epoch: advantages -> Gram -> update -> advantages
    probe.py       Gram probed by K backward passes on one micro-batch (balance.gradients: proxy)
"""
from .probe import probe_gram
from .sequence import EpochAdvantages, commit_epoch, epoch_advantages

__all__ = ["EpochAdvantages", "commit_epoch", "epoch_advantages", "probe_gram"]
