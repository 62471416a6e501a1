"""Per-objective gradients of the GRPO surrogate, their Gram, and the combined update.

    sequence.py    the balancer sequence of an epoch: advantages -> Gram -> update -> advantages
    probe.py       Gram probed by K backward passes on one micro-batch (balance.gradients: proxy)
    capture.py     all K gradients of the whole update from its own backward (balance.gradients: one_backward)
    kbackward.py   the same by K separate backward passes (balance.gradients: k_backward, the reference)
    reduce.py      the Gram of the rank-averaged gradients: partial Grams over shards + one K x K all-reduce
    estimate.py    which Gram the balancer gets after the epoch: batch or cross-epoch, parameter or Adam metric
    combine.py     the aggregators' update c^T J, scaled as the balancer's advantages are
"""
from .capture import ObjectiveGradients, lora_linears, weighted_products
from .combine import aggregated_update, aggregator_coefficients, is_aggregator, scaled_coefficients
from .estimate import EpochGram, adam_step_scale, gram_persistence, kl_products
from .kbackward import KBackwardGradients
from .probe import probe_gram
from .reduce import sharded_gram
from .sequence import EpochAdvantages, commit_epoch, epoch_advantages

__all__ = ["EpochAdvantages", "EpochGram", "adam_step_scale", "gram_persistence", "kl_products", "KBackwardGradients", "ObjectiveGradients", "aggregated_update",
           "aggregator_coefficients", "commit_epoch", "scaled_coefficients", "epoch_advantages", "is_aggregator", "lora_linears", "probe_gram",
           "sharded_gram", "weighted_products"]
