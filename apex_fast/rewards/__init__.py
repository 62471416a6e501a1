"""Scorers behind one protocol + registry. Importing this package registers the built-in scorers."""
from .base import Scorer, available_scorers, make_scorer, register_scorer, score_all, to_uint8_hwc

__all__ = ["Scorer", "available_scorers", "make_scorer", "register_scorer", "score_all", "to_uint8_hwc"]
