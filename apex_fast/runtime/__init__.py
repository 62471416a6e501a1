"""Runtime: processes and collectives (process.py), the sample layout over ranks (layout.py), and
the optimizer engines, torch or DeepSpeed, behind one interface (engines.py), stop signals and
the launcher watch (signals.py)."""
from .engines import DS_CHECKPOINT_DIR, DS_TAG, DeepSpeedEngine, TorchEngine, deepspeed_config, make_engine
from .layout import SampleLayout, gradient_accumulation, micro_batches_per_epoch
from .process import Runtime, fail, init, seed_for
from .signals import Stopped, install_stop_handlers, watch_parent

__all__ = ["DS_CHECKPOINT_DIR", "DS_TAG", "DeepSpeedEngine", "TorchEngine", "deepspeed_config", "make_engine",
           "SampleLayout", "Runtime", "fail", "init", "seed_for", "Stopped", "install_stop_handlers", "watch_parent"]
