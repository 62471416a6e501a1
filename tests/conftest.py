"""Test-wide settings: one thread for tiny torch ops; hypothesis derandomized so a fresh clone
(no example database) draws the same cases as every other run."""
import os

import torch
from hypothesis import settings

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
settings.register_profile("apex-fast", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "apex-fast"))
