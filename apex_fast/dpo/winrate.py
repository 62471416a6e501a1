"""Win rates in BalancedDPO's terms (docs/SPEC.md section 6): on the same held-out prompts and seeds,
how often the trained model's image beats the base model's, per scorer and on the consensus vote."""
from __future__ import annotations

import math

import torch

from .votes import hard_vote


def win_rates(trained: torch.Tensor, base: torch.Tensor, names: list[str]) -> dict[str, float]:
    """trained, base: scores [N, M] of the two models' images of the same N (prompt, seed) items.
    Per scorer: mean over items both images scored of 1 (trained higher), 0.5 (equal), 0 (lower).
    ``consensus``: the same with the majority vote of all scorers (votes cancelling: 0.5; no scorer
    judging: the item is skipped). NaN when no item counts. 0.5 = no change."""
    out = {}
    d = trained.double() - base.double()
    for m, n in enumerate(names):
        ok = ~torch.isnan(d[:, m])
        out[n] = float(((torch.sign(d[ok, m]) + 1) / 2).mean()) if ok.any() else math.nan
    vr = hard_vote(trained, base)
    judged = ~(torch.isnan(trained) | torch.isnan(base)).all(1)
    out["consensus"] = float(((vr.label[judged].double() + 1) / 2).mean()) if judged.any() else math.nan
    return out
