"""Moved to ``apex_fast.runtime`` (processes, sample layout, engines); this module re-exports its
names so existing imports keep working."""
from .runtime import (DS_CHECKPOINT_DIR, DS_TAG, DeepSpeedEngine, Runtime, SampleLayout, TorchEngine,  # noqa: F401
                      deepspeed_config, fail, init, make_engine, seed_for)
from .runtime.process import _free_port, _skip_deepspeed_shm_build, _timeout  # noqa: F401
