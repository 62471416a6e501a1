# The two README commands: `make demo` (main job on the embedded tiny model) and `make test`.
# Both create .venv if missing and install the project into it (torch first, from the local CPU
# build, so nothing pulls another torch; --no-build-isolation so the C++ extension builds against it).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.apex-fast-installed
export OMP_NUM_THREADS ?= 1

.PHONY: demo demo-apex demo-dpo test install bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "torch==2.13.0" ninja
	$(PIP) install -q -e ".[dev,distributed]" --no-build-isolation
	touch $(STAMP)

install: $(STAMP)

# APEX on the embedded pretrained tiny SD3 (~9.5 min on 2 idle cores), into outputs/tiny_cpu_apex
demo: $(STAMP)
	$(PY) -m apex_fast.train --config configs/tiny_cpu_apex.yaml --new-run

# the same config with the static weighted sum and with APEX, one table
demo-apex: $(STAMP)
	$(PY) -m bench.compare_methods --config configs/tiny_cpu_apex.yaml --methods static apex

demo-dpo: $(STAMP)
	$(PY) -m bench.compare_dpo_labels --config configs/tiny_dpo.yaml --labels balanced_vote vanilla_sum single

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15

clean:
	rm -rf outputs build *.egg-info
