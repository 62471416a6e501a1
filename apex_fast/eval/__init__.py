"""Evaluation: held-out sampling and scoring (evaluator.py)."""
