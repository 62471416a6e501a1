"""bench.compare_methods --seeds: the over-seeds table (mean ± SE, paired APEX differences) and --merge's
refusal of a results file from another config or seed list (both before any training)."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from bench.compare_methods import over_seeds, seeds_table


def _run(start, end, share):
    return {"start": start, "end": end, "effective_share": share, "weights": {"a": 0.5, "b": 0.5}}


def test_seeds_table_mean_se_and_paired_difference():
    ends = {"gdpo": [(1.0, 2.0), (1.2, 2.4), (0.8, 2.2)], "apex": [(1.5, 2.0), (1.3, 2.6), (1.6, 2.1)]}
    runs = {m: [_run({"a": 0.0, "b": 2.0}, {"a": a, "b": b}, {"a": 0.5, "b": 0.5}) for a, b in v]
            for m, v in ends.items()}
    tab = seeds_table(runs)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in tab.splitlines()[2:]}
    ga = np.array([1.0, 1.2, 0.8])
    aa = np.array([1.5, 1.3, 1.6])
    se = lambda x: x.std(ddof=1) / math.sqrt(3)  # noqa: E731
    assert rows["a (0.5)"][2] == f"+{ga.mean():.4f} ± {se(ga):.4f}"
    assert rows["a (0.5)"][3] == f"+{aa.mean():.4f} ± {se(aa):.4f}"
    d = aa - ga
    assert rows["a (0.5)"][4] == f"+{d.mean():.4f} ± {se(d):.4f}"  # paired, not the difference of means' SEs
    assert "apex - gdpo" in tab.splitlines()[0]


def test_merge_refuses_other_seeds_or_config(tmp_path):
    (tmp_path / "compare_methods_tiny_cpu_seeds.json").write_text(json.dumps(
        {"meta": {"seeds": [0, 1, 2], "config": "configs/tiny_cpu.yaml", "commands": []}, "runs": {}}))
    args = argparse.Namespace(config="configs/tiny_cpu.yaml", seeds=[0, 1], merge=True, results=str(tmp_path),
                              methods=["apex"], set=[], out=str(tmp_path / "runs"))
    with pytest.raises(SystemExit, match="seeds \\[0, 1, 2\\].*same --config and --seeds"):
        over_seeds(args, [])
