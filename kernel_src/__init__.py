"""Triton kernel sources, installed as ``apex_fast.kernels`` (not a top-level ``kernels`` module:
that name belongs to another package that transformers probes for)."""
