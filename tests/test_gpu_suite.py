"""bench/gpu_suite.sh (bench/gpu.py), the prepared GPU check: its CPU dry run end to end, and the
pieces a GPU run depends on that the dry run does not reach (time bounds, the carried-wheel list,
reading bench grad's options, the goals)."""
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from apex_fast.config import load_config
from bench import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_list_in_script_header_matches_the_suite():
    head = (ROOT / "bench" / "gpu_suite.sh").read_text()
    listed = re.search(r"^# wheels: (.*)$", head, re.M).group(1).split()
    assert listed == [w for w, _ in gpu.WHEELS]
    for spec, _ in gpu.WHEELS:  # the download command written out in the header names each one
        assert head.count(spec) >= 2, spec
    assert "carry:     [\".gpu_wheels\"]" in head and "timeout_s: 560" in head
    assert ".gpu_wheels/" in (ROOT / ".gitignore").read_text().split()


def test_wheel_download_command_targets_the_gpu_python():
    cmd = gpu.wheel_download_command("/tmp/w")
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == gpu.DEVICE_PYTHON
    assert all(p.endswith("x86_64") for p in (cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"))
    assert cmd[-len(gpu.WHEELS):] == [w for w, _ in gpu.WHEELS]


def test_wheel_file_lookup(tmp_path):
    (tmp_path / "rapidocr_onnxruntime-1.4.4-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "diffusers-0.41.0-py3-none-any.whl").write_bytes(b"")
    assert gpu._wheel_file("rapidocr-onnxruntime==1.4.4", tmp_path).name.startswith("rapidocr_onnxruntime-1.4.4")
    assert gpu._wheel_file("diffusers==0.42.1", tmp_path) is None  # another version does not count


def test_run_cmd_kills_the_whole_process_group_at_its_bound(tmp_path):
    marker = tmp_path / "grandchild_survived"
    (tmp_path / "grandchild.py").write_text(f"import time\ntime.sleep(2)\nopen({str(marker)!r}, 'w')\n")
    (tmp_path / "child.py").write_text(f"import subprocess, sys, time\n"
                                       f"subprocess.Popen([sys.executable, {str(tmp_path / 'grandchild.py')!r}])\n"
                                       f"time.sleep(60)\n")
    t0 = time.monotonic()
    r = gpu.run_cmd([sys.executable, tmp_path / "child.py"], env=dict(os.environ), timeout_s=1.5, log=tmp_path / "x.log")
    assert r["timed_out"] and time.monotonic() - t0 < 15
    assert "KILLED: over its time bound" in (tmp_path / "x.log").read_text()
    time.sleep(2.5)
    assert not marker.exists()
    r = gpu.run_cmd([sys.executable, "-c", "raise SystemExit(3)"], env=dict(os.environ), timeout_s=30,
                    log=tmp_path / "y.log")
    assert r["rc"] == 3 and not r["timed_out"] and gpu._status(r) == "failed"


def test_clock_keeps_the_later_parts_reserves():
    c = gpu.Clock(470, gpu.PARTS, dry=False)
    later = sum(p.reserve_s for p in gpu.PARTS[1:])
    assert c.bound("setup") == pytest.approx(min(gpu.PARTS[0].cap_s, 470 - later), abs=1)
    c.t0 -= 400  # 400 s gone: the last part gets what is left, the others less than their caps
    assert c.bound("train") == pytest.approx(70, abs=1)
    assert c.bound("ops_bench") < 0
    assert sum(p.reserve_s for p in gpu.PARTS) <= gpu.DEFAULT_BUDGET_S


FAKE_GRAD = '''
import argparse
ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cpu")
ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
ap.add_argument("--model", choices=["tiny", "sd35-medium"], default="tiny")
ap.add_argument("--K", type=int, default=4)
ap.add_argument("--repeats", type=int, default=None)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--no-memory", action="store_true")
ap.add_argument("--out", default=None)
ap.parse_args()
'''


@pytest.mark.parametrize("dry", [False, True], ids=["cuda", "dry_run"])
def test_grad_command_is_read_off_bench_grads_help(tmp_path, dry, monkeypatch):
    monkeypatch.delenv("APEX_FAST_GPU_GRAD_ARGS", raising=False)
    script = tmp_path / "grad.py"
    script.write_text(FAKE_GRAD)
    s = gpu.Suite(gpu.build_parser().parse_args(["--cpu-dry-run"] if dry else []))
    cmd, err = s.grad_command(tmp_path / "g.json", base=[sys.executable, str(script)])
    assert err is None
    args = cmd[2:]
    want = (["--device", "cpu", "--dtype", "fp32", "--model", "tiny", "--K", "4", "--repeats", "1", "--warmup", "1",
             "--no-memory"] if dry
            else ["--device", "cuda", "--dtype", "bf16", "--model", "sd35-medium", "--K", "4", "--repeats", "3",
                  "--warmup", "1"])
    assert args == want + ["--out", str(tmp_path / "g.json")]
    monkeypatch.setenv("APEX_FAST_GPU_GRAD_ARGS", "--model sd35-medium --repeats 1")
    assert s.grad_command(tmp_path / "g.json", base=["x"])[0] == ["x", "--model", "sd35-medium", "--repeats", "1"]


def test_goals_met_missed_not_measured():
    rep = {"ops_bench": {"summary": {
        "groupnorm": [{"N": 1152, "ours_s": 1e-5, "beats_eager_and_compile": True},
                      {"N": 9216, "ours_s": 2e-5, "beats_eager_and_compile": False}],
        "gram": [{"layout": "a", "P": 1, "ours_s": 1.0, "frac_of_copy_bw": 0.9, "beats_eager_and_compile": True},
                 {"layout": "b", "P": 2, "ours_s": 1.0, "frac_of_copy_bw": 0.84, "beats_eager_and_compile": True}]}},
        "grad": {"summary": {"ratio_one_backward": 1.1, "ratio_k_backward": 3.9}}}
    g = gpu.goals(rep)
    # group norm slower at one size; Gram + combine under 85% at one size but faster everywhere; 1.1 <= 1.15
    assert [v["status"] for v in g.values()] == ["missed", "missed", "met", "met"]
    assert g["Gram + combine >= 85% of copy bandwidth at every size"]["by_size"] == {"a": 0.9, "b": 0.84}
    assert [v["status"] for v in gpu.goals({}).values()] == ["not measured"] * 4


@pytest.mark.slow
def test_cpu_dry_run_of_the_whole_suite(tmp_path):
    """bash bench/gpu_suite.sh --cpu-dry-run: every part runs (grad: when bench/grad.py exists) and
    writes its result with device, versions and command; the summary is printed and archived."""
    res, work, arch = tmp_path / "results", tmp_path / "work", tmp_path / "suite.tgz"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--cpu-dry-run", "--results-dir", str(res),
                        "--work-dir", str(work), "--archive", str(arch)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "# GPU suite on" in r.stdout and "| goal | status |" in r.stdout
    sm = json.loads((res / "gpu_suite_cpu.json").read_text())
    st = {k: v["status"] for k, v in sm["parts"].items()}
    has_grad = (ROOT / "bench" / "grad.py").exists()
    assert st == {"setup": "ok", "ops_tests": "ok", "ops_bench": "ok", "train": "ok",
                  "grad": "ok" if has_grad else "not available"}, st
    if not has_grad:
        assert "not available (bench grad missing)" in sm["parts"]["grad"]["note"]
    c = sm["parts"]["ops_tests"]["counts"]
    assert c["passed"] >= 10 and c["failures"] == c["errors"] == 0
    ops_s = sm["parts"]["ops_bench"]["summary"]
    assert len(ops_s["groupnorm"]) == 2 and len(ops_s["gram"]) == 3 and ops_s["copy_GBps"] > 0
    assert all(row["ours_s"] > 0 and row["eager_s"] > 0 and row["compile_s"] > 0 for row in ops_s["groupnorm"] + ops_s["gram"])
    assert "SD3.5-Medium LoRA r=32" in ops_s["gram"][0]["layout"]
    for name in ["ops_tests", "ops", "train_tiny"] + (["grad"] if has_grad else []):
        d = json.loads((res / f"{name}_cpu.json").read_text())
        head = d if name == "ops_tests" else d["suite"]
        assert head["device"] and head["versions"]["torch"] and "bench gpu --cpu-dry-run" in head["suite_command"], name
    t = json.loads((res / "train_tiny_cpu.json").read_text())
    assert t["ran_on"] == "cpu" and t["epoch"] == 1 and "error" not in t
    rewards = {f"reward/{r.name}/mean" for r in load_config(ROOT / "configs/tiny_cpu.yaml").rewards}  # the epoch's config
    assert set(t) >= rewards | {"time/train", "summary"}
    names = tarfile.open(arch).getnames()
    assert {"results/gpu_suite_cpu.json", "results/gpu_suite_cpu.md", "results/ops_cpu.json", "logs/train.log"} <= set(names)
