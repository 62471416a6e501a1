"""`python -m apex_fast.eval`: the same as `apex-fast eval`."""
import sys

from .evaluate import main

sys.exit(main(prog="python -m apex_fast.eval"))
