"""Fused multi-objective ops (functional API). Each op dispatches on the device of its inputs:
CUDA -> Triton kernel / CUDA extension, CPU -> C++ extension if built, else the torch reference.
``APEX_FAST_BACKEND=torch|cpp|triton`` forces one backend."""
from .reference import dual_stage_advantages, group_normalize, group_stats

__all__ = ["dual_stage_advantages", "group_normalize", "group_stats"]
