"""How K objectives become one update. Public API: make_balancer, the Balancer classes and the
Gram-form aggregators (see README)."""
from .base import Balancer, hijack_share, make_balancer, register_balancer
from .config import METHODS, BalanceConfig
from .scalarization import NormalizeThenSumBalancer, StaticBalancer

__all__ = [
    "Balancer", "BalanceConfig", "METHODS", "StaticBalancer", "NormalizeThenSumBalancer",
    "hijack_share", "make_balancer", "register_balancer",
]
