"""Which pair trains and with which label, for every ``dpo.label`` mode (docs/SPEC.md section 6).

Online, ``select_pairs`` picks one (winner, loser) pair per prompt group from the group's scores;
offline, ``label_pairs`` orients given (a, b) pairs. Both return ``Pairs``: winner and loser indices,
``p`` the probability that the winner is preferred (1 except for the soft vote, where it smooths the
label), and the counters of dropped pairs; ``PairLabeler`` also accumulates each scorer's agreement
with the labels actually used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .votes import (
    LABEL_MODES, RunningScale, agreement, copeland_pair, hard_vote, nan_mean_std, scalar_pair, scalar_scores,
    soft_vote,
)


@dataclass
class Pairs:
    winner: torch.Tensor  # [P] int64 index of the preferred image
    loser: torch.Tensor  # [P] int64
    p: torch.Tensor  # [P] float64 in (0.5, 1]: probability the winner is preferred (label smoothing)
    n_candidates: int = 0  # groups (online) or pairs (offline) considered
    n_ties: int = 0  # dropped: votes cancel / equal scores
    n_abstained: int = 0  # dropped: no scorer could judge
    agree: torch.Tensor | None = None  # [M] pairs where scorer m agreed with the label
    opinions: torch.Tensor | None = None  # [M] pairs where scorer m had a preference

    def __len__(self) -> int:
        return int(self.winner.numel())


class PairLabeler:
    """Labels pairs with one of LABEL_MODES from scores S [N, M] of M scorers named ``names`` with
    weights ``weights`` (used by vanilla_sum / normalized_sum). ``single``: the scorer named
    ``single_scorer`` (default: the first). ``random``: pairs and labels from ``seed``, so a
    baseline run is reproducible."""

    def __init__(self, mode: str, names: list[str], weights: list[float], single_scorer: str | None = None,
                 seed: int = 0):
        if mode not in LABEL_MODES:
            raise ValueError(f"dpo.label: {mode!r} is not one of {', '.join(LABEL_MODES)}")
        self.mode, self.names = mode, list(names)
        self.weights = torch.tensor(weights, dtype=torch.float64)
        if single_scorer is None:
            single_scorer = self.names[0]
        if single_scorer not in self.names:
            raise ValueError(f"dpo.single_scorer: {single_scorer!r} is not one of the rewards {self.names}")
        self.single_index = self.names.index(single_scorer)
        self.scale = RunningScale(len(self.names))
        self.seed = seed
        self.calls = 0  # random mode: one generator per call, seeded by (seed, call)
        self.agree = torch.zeros(len(self.names), dtype=torch.long)
        self.opinions = torch.zeros(len(self.names), dtype=torch.long)

    # -------------------------------------------------------------- state (exact resume)
    def state_dict(self) -> dict:
        return {"scale": self.scale.state_dict(), "calls": self.calls, "agree": self.agree.clone(),
                "opinions": self.opinions.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.load_state_dict(state["scale"])
        self.calls = int(state["calls"])
        self.agree, self.opinions = state["agree"].clone().long(), state["opinions"].clone().long()

    def _generator(self) -> torch.Generator:
        from apex_fast.runtime import seed_for

        g = torch.Generator().manual_seed(seed_for(self.seed, "dpo-random", self.calls))
        self.calls += 1
        return g

    def _finish(self, S: torch.Tensor, w: list[int], l: list[int], p: list[float], **counts) -> Pairs:
        pairs = Pairs(torch.tensor(w, dtype=torch.long), torch.tensor(l, dtype=torch.long),
                      torch.tensor(p, dtype=torch.float64), **counts)
        if len(pairs):
            a, n = agreement(S[pairs.winner], S[pairs.loser], torch.ones(len(pairs), dtype=torch.long))
        else:
            a = n = torch.zeros(len(self.names), dtype=torch.long)
        self.agree += a
        self.opinions += n
        pairs.agree, pairs.opinions = a, n
        return pairs

    def agreement_summary(self) -> dict[str, float]:
        """Each scorer's agreement with the training labels over the whole run so far."""
        return {n: (float(self.agree[m]) / float(self.opinions[m]) if self.opinions[m] else float("nan"))
                for m, n in enumerate(self.names)}

    # -------------------------------------------------------------- online: one pair per group
    def select_pairs(self, S: torch.Tensor, groups: torch.Tensor) -> Pairs:
        """S [N, M] scores of the batch, groups [N] group id of each image (a prompt's G images).
        One (winner, loser) pair per group, indices into the batch."""
        S = S.double()
        order = sorted(set(groups.tolist()))
        members = [torch.nonzero(groups == g).flatten() for g in order]
        if self.mode == "soft_vote":  # tau from every within-group difference seen so far
            for idx in members:
                iu = torch.triu_indices(len(idx), len(idx), 1)
                self.scale.update(S[idx[iu[0]]] - S[idx[iu[1]]])
        scalar = None
        if self.mode in ("single", "vanilla_sum", "normalized_sum"):
            scalar = scalar_scores(S, self.mode, self.weights, self.single_index)
        gen = self._generator() if self.mode == "random" else None
        w, l, p = [], [], []
        ties = abst = 0
        for idx in members:
            Sg = S[idx]
            if self.mode == "random":
                perm = torch.randperm(len(idx), generator=gen)[:2]
                pick = (int(perm[0]), int(perm[1]))
            elif scalar is not None:
                pick = scalar_pair(scalar[idx])
            else:
                pick = copeland_pair(Sg)
            if pick is None:
                if ((~torch.isnan(Sg)).sum(0) < 2).all():  # no scorer scored two images of the group
                    abst += 1
                else:
                    ties += 1
                continue
            pi = 1.0
            if self.mode == "soft_vote":
                pi = float(soft_vote(Sg[pick[0]][None], Sg[pick[1]][None], self.scale.tau)[0])
            w.append(int(idx[pick[0]]))
            l.append(int(idx[pick[1]]))
            p.append(pi)
        return self._finish(S, w, l, p, n_candidates=len(members), n_ties=ties, n_abstained=abst)

    # -------------------------------------------------------------- offline: given pairs
    def label_pairs(self, Sa: torch.Tensor, Sb: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> Pairs:
        """Orient P given pairs with scores Sa, Sb [P, M]. Winner/loser are indices into the stacked
        images [a_0..a_{P-1}, b_0..b_{P-1}] (a_i = i, b_i = P + i); undecided pairs are dropped.
        ``norm`` = (mean, std) [M] for normalized_sum (default: over every image of these pairs)."""
        Sa, Sb = Sa.double(), Sb.double()
        P = Sa.shape[0]
        S = torch.cat([Sa, Sb])
        nan_pair = (torch.isnan(Sa) | torch.isnan(Sb)).all(1)
        if self.mode == "balanced_vote":
            vr = hard_vote(Sa, Sb)
            lab, prob = vr.label, torch.ones(P, dtype=torch.float64)
        elif self.mode == "soft_vote":
            self.scale.update(Sa - Sb)
            pa = soft_vote(Sa, Sb, self.scale.tau)
            lab = torch.sign(pa - 0.5).long()
            lab[nan_pair] = 0
            prob = torch.where(lab >= 0, pa, 1 - pa)
        elif self.mode == "random":
            gen = self._generator()
            lab = torch.randint(0, 2, (P,), generator=gen) * 2 - 1
            prob = torch.ones(P, dtype=torch.float64)
        else:
            mean, std = norm if norm is not None else nan_mean_std(S)
            x = scalar_scores(S, self.mode, self.weights, self.single_index, mean, std)
            d = x[:P] - x[P:]
            lab = torch.where(torch.isnan(d), torch.zeros_like(d), torch.sign(d)).long()
            nan_pair = torch.isnan(d)
            prob = torch.ones(P, dtype=torch.float64)
        keep = lab != 0
        ar = torch.arange(P)
        w = torch.where(lab > 0, ar, ar + P)[keep]
        l = torch.where(lab > 0, ar + P, ar)[keep]
        n_abst = int((nan_pair & ~keep).sum())
        return self._finish(S, w.tolist(), l.tolist(), prob[keep].tolist(), n_candidates=P,
                            n_ties=int((~keep).sum()) - n_abst, n_abstained=n_abst)
