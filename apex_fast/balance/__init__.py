"""How K objectives become one update. Public API: make_balancer, the Balancer classes (APEX, the
scalarization baselines, FAMO, the Gram-form gradient aggregators) and the aggregator functions (see
README and docs/SPEC.md sections 3-5)."""
from .aggregators import cagrad_coefficients, mgda_coefficients, pcgrad_coefficients, upgrad_coefficients
from .apex import APEX
from .base import Balancer, effective_share, hijack_share, make_balancer, register_balancer
from .config import METHODS, BalanceConfig
from .famo import FAMOBalancer
from .gradient import (CAGradBalancer, GramAggregatorBalancer, MGDABalancer, PCGradBalancer,
                       UPGradBalancer)
from .priorities import conflict_from_gram, conflict_proxy, gram_cosines
from .scalarization import NormalizeThenSumBalancer, StaticBalancer

__all__ = [
    "APEX", "Balancer", "BalanceConfig", "METHODS", "FAMOBalancer", "StaticBalancer", "NormalizeThenSumBalancer",
    "GramAggregatorBalancer", "PCGradBalancer", "MGDABalancer", "CAGradBalancer", "UPGradBalancer",
    "cagrad_coefficients", "mgda_coefficients", "pcgrad_coefficients", "upgrad_coefficients",
    "conflict_from_gram", "conflict_proxy", "gram_cosines", "effective_share", "hijack_share",
    "make_balancer", "register_balancer",
]
