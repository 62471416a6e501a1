"""Preference labels from M scorers (docs/SPEC.md section 6): BalancedDPO's majority vote, its soft
variant, Copeland pair selection within a prompt's group, and the paper's baseline labels.

Shapes: scores of the two images of P pairs ``Sa, Sb [P, M]`` (column m: scorer m; NaN: the scorer
failed on that image, so it abstains on that pair). A label is +1 (a preferred), -1 (b preferred) or
0 (no decision: the pair is dropped and counted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LABEL_MODES = ("balanced_vote", "soft_vote", "single", "vanilla_sum", "normalized_sum", "random")


def vote_signs(Sa: torch.Tensor, Sb: torch.Tensor) -> torch.Tensor:
    """sign(S_m(a) - S_m(b)) [P, M]; 0 where either score is NaN (abstention) or they are equal."""
    d = Sa.double() - Sb.double()
    return torch.where(torch.isnan(d), torch.zeros_like(d), torch.sign(d))


@dataclass
class VoteResult:
    label: torch.Tensor  # [P] int64: +1 a wins, -1 b wins, 0 dropped
    V: torch.Tensor  # [P] the vote sum (int64)
    n_ties: int  # pairs with at least one vote whose votes cancel (V = 0)
    n_abstained: int  # pairs no scorer could judge (a NaN score on every scorer)


def hard_vote(Sa: torch.Tensor, Sb: torch.Tensor) -> VoteResult:
    """Majority vote ``V = sum_m sign(S_m(a) - S_m(b))``; label = sign(V). Pairs with V = 0 are
    dropped: counted as ties when some scorer expressed a preference (votes cancel, or every
    scorer saw equal scores), as abstained when every scorer had a NaN score."""
    s = vote_signs(Sa, Sb)
    V = s.sum(1).round().long()
    label = torch.sign(V)
    judged = ~(torch.isnan(Sa) | torch.isnan(Sb)).all(1)
    n_abst = int((~judged).sum())
    n_ties = int(((V == 0) & judged).sum())
    return VoteResult(label, V, n_ties, n_abst)


class RunningScale:
    """Running std of each scorer's score differences (tau_m of the soft vote), over every pair seen
    so far. Differences are counted in both orientations (d and -d), so tau does not depend on
    which image of a pair is called a: the mean is 0 and tau_m = sqrt(mean d_m^2). NaN differences
    are skipped. State: count and sum of squares per scorer (float64), for exact resume."""

    def __init__(self, M: int, eps: float = 1e-8):
        self.count = torch.zeros(M, dtype=torch.float64)
        self.sumsq = torch.zeros(M, dtype=torch.float64)
        self.eps = eps

    def update(self, d: torch.Tensor) -> None:
        d = d.double()
        ok = ~torch.isnan(d)
        self.count += ok.sum(0)
        self.sumsq += torch.where(ok, d * d, torch.zeros_like(d)).sum(0)

    @property
    def tau(self) -> torch.Tensor:
        """[M]; 1.0 for a scorer with no finite difference yet."""
        t = (self.sumsq / self.count.clamp_min(1)).sqrt()
        return torch.where(self.count > 0, t.clamp_min(self.eps), torch.ones_like(t))

    def state_dict(self) -> dict:
        return {"count": self.count.clone(), "sumsq": self.sumsq.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"].clone().double()
        self.sumsq = state["sumsq"].clone().double()


def soft_vote(Sa: torch.Tensor, Sb: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """p(a preferred) [P] = mean over the scorers that judged the pair of sigmoid(d_m / tau_m);
    0.5 where no scorer did. float64."""
    d = Sa.double() - Sb.double()
    ok = ~torch.isnan(d)
    p = torch.sigmoid(torch.where(ok, d, torch.zeros_like(d)) / tau.double())
    n = ok.sum(1)
    return torch.where(n > 0, (p * ok).sum(1) / n.clamp_min(1), torch.full_like(p[:, 0], 0.5))


def scalar_scores(S: torch.Tensor, mode: str, weights: torch.Tensor, single_index: int = 0,
                  mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> torch.Tensor:
    """One score per image [N] for the scalar baselines of the paper: ``single`` (scorer
    ``single_index``), ``vanilla_sum`` (sum_m w_m S_m, raw scales), ``normalized_sum``
    (sum_m w_m (S_m - mean_m) / std_m; mean/std default to the batch's, NaN-aware). NaN if any
    needed score is NaN."""
    S = S.double()
    w = weights.double().to(S.device)
    if mode == "single":
        return S[:, single_index]
    if mode == "vanilla_sum":
        return (S * w).sum(1)
    if mode == "normalized_sum":
        if mean is None or std is None:
            mean, std = nan_mean_std(S)
        return (((S - mean) / std.clamp_min(1e-8)) * w).sum(1)
    raise ValueError(f"dpo.label: {mode!r} is not a scalar label mode")


def nan_mean_std(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and population std over the finite entries of S [N, M]."""
    S = S.double()
    ok = ~torch.isnan(S)
    n = ok.sum(0).clamp_min(1)
    z = torch.where(ok, S, torch.zeros_like(S))
    mean = z.sum(0) / n
    var = (torch.where(ok, (S - mean) ** 2, torch.zeros_like(S))).sum(0) / n
    return mean, var.sqrt()


def pair_matrix(S: torch.Tensor) -> torch.Tensor:
    """Vote matrix of one group S [G, M]: V[i, j] = sum_m sign(S_m(i) - S_m(j)) (NaN abstains)."""
    G = S.shape[0]
    s = vote_signs(S[:, None, :].expand(G, G, -1).reshape(G * G, -1), S[None, :, :].expand(G, G, -1).reshape(G * G, -1))
    return s.sum(1).round().long().view(G, G)


def copeland_pair(S: torch.Tensor) -> tuple[int, int] | None:
    """Pick (winner, loser) among G images of one prompt by Copeland ranking of the majority vote:
    Copeland score c_i = #{j: V[i,j] > 0} - #{j: V[i,j] < 0}; the winner has the highest c (ties:
    larger total vote margin sum_j V[i,j], then lower index), the loser the lowest (ties: smaller
    total margin, then higher index). None when the winner does not beat the loser by majority
    (e.g. all images score the same)."""
    V = pair_matrix(S)
    c = (V > 0).sum(1) - (V < 0).sum(1)
    tot = V.sum(1)
    G = S.shape[0]
    idx = list(range(G))
    w = max(idx, key=lambda i: (int(c[i]), int(tot[i]), -i))
    l = min(idx, key=lambda i: (int(c[i]), int(tot[i]), -i))
    if w == l or V[w, l] <= 0:
        return None
    return w, l


def scalar_pair(x: torch.Tensor) -> tuple[int, int] | None:
    """(argmax, argmin) of one group's scalar scores [G] (NaN ignored; first index on ties);
    None when fewer than two finite scores or max == min."""
    ok = ~torch.isnan(x)
    if int(ok.sum()) < 2:
        return None
    hi = torch.where(ok, x, torch.full_like(x, -math.inf))
    lo = torch.where(ok, x, torch.full_like(x, math.inf))
    w, l = int(hi.argmax()), int(lo.argmin())
    if not x[w] > x[l]:
        return None
    return w, l


def agreement(Sa: torch.Tensor, Sb: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How often each scorer agrees with the label used for training: over the decided pairs
    (label != 0) where scorer m expressed a preference (finite, unequal scores), the count of
    agreements and of opinions per scorer, [M] each. 1 - agree/opinions is how often it is outvoted."""
    s = vote_signs(Sa, Sb)
    decided = (label != 0)[:, None]
    opin = (s != 0) & decided
    agree = opin & (s == label[:, None].to(s.dtype))
    return agree.sum(0), opin.sum(0)
