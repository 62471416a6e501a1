"""Test-wide settings: one thread for tiny torch ops; hypothesis derandomized so a fresh clone
(no example database) draws the same cases as every other run."""
import os
import signal

import torch
from hypothesis import settings

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
settings.register_profile("apex-fast", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "apex-fast"))

# A suite started in the background by a non-interactive shell (`pytest &`, nohup, some CI runners)
# inherits SIGINT ignored, and the trainer (like Python) keeps an inherited ignore: the tests that send
# Ctrl-C to a run would then see it ignored. Handlers reset to the default across exec, an ignore does not.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
