"""bench/demo_sweep.py: the spec is checked field by field, the job order keeps whole seeds, and the
summary is read back from the finished runs' bench_run.json (no training here: the trainer runs are
tiny_demo's, tested in test_tiny_testbed)."""
import json

import pytest

from bench import demo_sweep


def _spec(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


GOOD = """config: configs/tiny_cpu_apex.yaml
seeds: [0, 1]
common: [checkpoint.every=0]
variants:
  a: {set: [sample.noise_level=0.35]}
  b.2: {methods: [static, apex]}
"""


def test_spec_loads_with_defaults(tmp_path):
    s = demo_sweep.load_spec(_spec(tmp_path, GOOD))
    assert s["variants"]["a"] == {"methods": ["apex"], "set": ["sample.noise_level=0.35"]}
    assert demo_sweep.sets_of(s, "a") == ["checkpoint.every=0", "sample.noise_level=0.35"]
    # seed-major: a sweep cut off by its budget has whole seeds of every variant
    assert demo_sweep.jobs_of(s) == [("a", "apex", 0), ("b.2", "static", 0), ("b.2", "apex", 0),
                                     ("a", "apex", 1), ("b.2", "static", 1), ("b.2", "apex", 1)]


@pytest.mark.parametrize("text, field", [
    ("config: nope.yaml\nvariants: {a: {}}\n", "config"),
    ("config: configs/tiny_cpu_apex.yaml\nseeds: [0, x]\nvariants: {a: {}}\n", "seeds"),
    ("config: configs/tiny_cpu_apex.yaml\ncommon: [epochs]\nvariants: {a: {}}\n", "common"),
    ("config: configs/tiny_cpu_apex.yaml\nvariants: {}\n", "variants"),
    ("config: configs/tiny_cpu_apex.yaml\nvariants: {a: {set: [x]}}\n", "variants.a.set"),
    ("config: configs/tiny_cpu_apex.yaml\nvariants: {a/b: {}}\n", "variants.a/b"),
    ("config: configs/tiny_cpu_apex.yaml\nvariants: {a: {methods: []}}\n", "variants.a.methods"),
])
def test_bad_spec_names_the_field(tmp_path, text, field):
    with pytest.raises(ValueError, match=f": {field}: "):
        demo_sweep.load_spec(_spec(tmp_path, text))


def _run(folder, sets, start, end):
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("epoch,effective_share/ocr\n1,0.7\n2,0.2\n")
    res = {"start": {"ocr": start}, "end": {"ocr": end}, "seconds": 10.0, "hijack_share": {"ocr": 0.5},
           "effective_share": {"ocr": 0.45}, "eval_curves": {}, "output_dir": str(folder), "weights": {"ocr": 0.3}}
    (folder / "bench_run.json").write_text(json.dumps({"config": "configs/tiny_cpu_apex.yaml", "sets": sets,
                                                       "result": res}))


def test_collect_reads_finished_runs_with_the_same_settings(tmp_path):
    s = demo_sweep.load_spec(_spec(tmp_path, GOOD))
    sets = demo_sweep.sets_of(s, "a")
    _run(tmp_path / "runs/a/apex_seed0", sets, 0.2, 0.3)
    _run(tmp_path / "runs/a/apex_seed1", sets, 0.2, 0.32)
    _run(tmp_path / "runs/b.2/apex_seed0", ["other=1"], 0.2, 0.9)  # other settings: not this variant's run
    res = demo_sweep.collect(s, tmp_path / "runs")
    o = res["a"]["apex"]["objectives"]["ocr"]
    assert res["a"]["apex"]["seeds_finished"] == 2
    assert o["changes"] == pytest.approx([0.1, 0.12])
    assert o["change_mean"] == pytest.approx(0.11)
    # n = 2: t(1) = 12.706 times sd / sqrt 2, sd of (0.10, 0.12) = 0.02 / sqrt 2, so sd / sqrt 2 = 0.01
    assert o["change_ci95"] == pytest.approx(12.706 * 0.01, rel=1e-6)
    assert o["raised_beyond_ci"] is False and res["a"]["apex"]["raised_beyond_ci"] == 0
    assert "apex" not in res["b.2"] and "static" not in res["b.2"]
    tab = demo_sweep.table(res)
    assert "| a | apex | 2 | +0.1100" in tab and "0/1" in tab
    assert o["batch_trend"] != o["batch_trend"]  # no reward columns in this metrics.csv: NaN
