"""BalancedDPO (docs/SPEC.md section 6): votes of several scorers, pair selection, the
flow-matching Diffusion-DPO loss, the dynamic reference adapter, offline pairs files."""
from .labels import PairLabeler, Pairs
from .loss import DPOOut, flow_dpo_loss, flow_dpo_loss_reference, logit_normal_t, noisy_latents, velocity_error
from .pairs import PairRecord, PairsFileError, TINY_PAIRS, read_pairs
from .reference import REF_ADAPTER, ReferenceAdapter
from .votes import (
    LABEL_MODES, RunningScale, VoteResult, agreement, copeland_pair, hard_vote, pair_matrix, scalar_pair,
    scalar_scores, soft_vote, vote_signs,
)

__all__ = [
    "LABEL_MODES", "PairLabeler", "Pairs", "DPOOut", "flow_dpo_loss", "flow_dpo_loss_reference", "logit_normal_t",
    "noisy_latents", "velocity_error", "PairRecord", "PairsFileError", "TINY_PAIRS", "read_pairs", "REF_ADAPTER",
    "ReferenceAdapter", "RunningScale", "VoteResult", "agreement", "copeland_pair", "hard_vote", "pair_matrix",
    "scalar_pair", "scalar_scores", "soft_vote", "vote_signs",
]
