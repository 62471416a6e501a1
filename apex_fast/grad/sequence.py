"""The balancer sequence of one epoch, written once (the trainer's learners and bench/algorithm.py
call it): advantages -> [per-objective gradients -> Gram -> update(gram) -> advantages] -> train ->
commit.

``Balancer.advantages()`` only caches the batch's statistics; ``Balancer.update()`` commits them
(EMAs, priorities, aggregator coefficients), once per epoch. Two flows (balance/base.py):

* same epoch (``same_epoch=True``): the Gram measured before the update gives this epoch's
  coefficients: ``update(gram=M)``, then ``advantages()`` again; nothing is left to commit.
* lagged (``same_epoch=False``, or a Gram measured during the update itself, as one_backward does):
  train on the first advantages, then ``commit(gram=M)`` after training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class EpochAdvantages:
    A: torch.Tensor  # [N] advantages to train on
    stats: dict  # the balancer's per-batch diagnostics (of the advantages trained on)
    update_stats: dict = field(default_factory=dict)  # update()'s diagnostics, once committed
    gram: torch.Tensor | None = None  # [K, K] measured before training (None: none measured)
    committed: bool = False  # update() already ran this epoch


def epoch_advantages(balancer, R: torch.Tensor, group_ids: torch.Tensor,
                     measure_gram: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     same_epoch: bool = True) -> EpochAdvantages:
    """Advantages of this epoch's rewards R [N, K] (groups [N]). ``measure_gram(Ahat [N, K]) ->
    M [K, K]``, when given, measures the per-objective gradients' Gram before training; with
    ``same_epoch`` the balancer is updated with it at once and the advantages recomputed."""
    A, stats = balancer.advantages(R, group_ids)
    if measure_gram is None:
        return EpochAdvantages(A, stats)
    M = measure_gram(balancer.objective_advantages)
    if not same_epoch:
        return EpochAdvantages(A, stats, gram=M)
    ustats = balancer.update(gram=M) or {}
    A, stats = balancer.advantages(R, group_ids)
    return EpochAdvantages(A, stats, ustats, gram=M, committed=True)


def commit_epoch(balancer, adv: EpochAdvantages, gram: torch.Tensor | None = None,
                 kl_products: torch.Tensor | None = None, persistence: torch.Tensor | None = None) -> dict:
    """After training: ``update()`` once with the Gram measured during the update (``gram``) or
    before it (``adv.gram``), ``kl_products`` (J g_KL, for APEX's cone_kl) and ``persistence`` (each
    gradient's cosine with its previous epoch's, for APEX's cone_min_persistence); a no-op when the
    same-epoch flow already committed. Returns the update diagnostics (also in ``adv.update_stats``)."""
    if not adv.committed:
        adv.update_stats = balancer.update(gram=gram if gram is not None else adv.gram, kl_products=kl_products,
                                           persistence=persistence) or {}
        adv.committed = True
    return adv.update_stats
