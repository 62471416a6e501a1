#!/usr/bin/env bash
# bench/gpu_suite.sh: the prepared GPU check. Every CUDA path and every GPU number of the README in
# one command, within 8 minutes of wall time on one H100/H200 (parts, bounds, results: bench/gpu.py).
#
# The GPU machine has PyTorch+CUDA, Triton, transformers, peft, accelerate, pytest(-xdist); it lacks
# these, which travel as wheels (CPython 3.12, x86-64; bench/gpu.py's WHEELS, a test keeps the two equal):
# wheels: diffusers==0.42.1 rapidocr-onnxruntime==1.4.4 pyclipper==1.4.0 shapely==2.2.0 rapidfuzz==3.14.6 torchjd==0.18.0
# (deepspeed is not carried: the suite runs one process.)
#
# 1. HERE, where the network is, once per checkout (about 27 MB into the git-ignored .gpu_wheels/):
#      bash bench/gpu_suite.sh --download-wheels
#    which runs
#      python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#        -d .gpu_wheels diffusers==0.42.1 rapidocr-onnxruntime==1.4.4 pyclipper==1.4.0 shapely==2.2.0 \
#        rapidfuzz==3.14.6 torchjd==0.18.0
#    If the machine's python3 is not 3.12 the setup part says so: set DEVICE_PYTHON in bench/gpu.py.
# 2. The device call (the device tool's `run`, from the checkout that holds this script and .gpu_wheels/):
#      command:   bash bench/gpu_suite.sh --archive $OUT/gpu_suite.tgz
#      carry:     [".gpu_wheels"]
#      timeout_s: 560
#    It installs the wheels with pip --no-index into /tmp/apex_fast_site, builds apex_fast._C against
#    the machine's torch (python setup.py build_ext --inplace), runs the parts and prints the summary
#    last; $OUT/gpu_suite.tgz holds results/*_<dev>.json|.md|.png and logs/.
# 3. HERE: mkdir -p /tmp/gs && tar xzf <files_at>/gpu_suite.tgz -C /tmp/gs && cp /tmp/gs/results/* bench/results/
#    then commit, fix what failed, and put the numbers in the README next to the CPU ones.
#
# CPU dry run (what CI runs, tests/test_gpu_suite.py): the same script at tiny sizes, Triton interpreted,
# results in outputs/gpu_suite_dry_run/:
#      bash bench/gpu_suite.sh --cpu-dry-run
# Other options: python -m bench gpu --help.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" -m bench gpu "$@"
