"""Clear one-line errors for bad input: overrides, config fields, prompt files, model folders,
resolution, and the ops / balancer API (eps, weights, group ids as lists, names, state dicts,
large rewards)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apex_fast import ops
from apex_fast.balance import make_balancer
from apex_fast.balance.config import BalanceConfig
from apex_fast.config import ConfigError, load_config
from apex_fast.models import ModelLoadError, load_pipeline
from apex_fast.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs/tiny_cpu.yaml"


@pytest.mark.parametrize("override,words", [
    ("rewards.7.weight=1", "--set rewards.7.weight=1: index 7 is out of range for rewards, a list of 4"),
    ("rewards.first.weight=1", "--set rewards.first.weight=1: rewards is a list; 'first' is not an index"),
    ("rewards[7].weight=1", "--set rewards[7].weight=1: index 7 is out of range for rewards, a list of 4"),
    ("train.lr=[1e-4", "--set train.lr=[1e-4: the value '[1e-4' is not valid YAML"),
    ("train.lr.x=1", "--set train.lr.x=1: train.lr is a value"),
    ("sample.noise_level=0", "sample.noise_level: must be > 0 for training"),
    ("eval.images_per_prompt=0", "eval.images_per_prompt: must be >= 1"),
    ("rewards.0.timeout_s=0", "rewards[0].timeout_s: must be a finite number of seconds > 0"),
    ("rewards.0.timeout_s=null", "rewards[0].timeout_s: expected a number"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
])
def test_config_errors_name_the_override_or_field(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert words in str(e.value)


def test_list_items_by_bracket_index_as_errors_name_them():
    cfg = load_config(TINY, ["rewards[1].weight=0.7", "rewards[-1].timeout_s=5"])
    assert cfg.rewards[1].weight == 0.7 and cfg.rewards[-1].timeout_s == 5


def test_cli_prints_one_line_without_traceback(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    proc = subprocess.run([sys.executable, str(ROOT / "apex_fast/train.py"), "--config", str(TINY), "--output-dir",
                           str(tmp_path / "o"), "--set", f"data.train_prompts={tmp_path / 'latin1.txt'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: data.train_prompts:" in proc.stderr and "is not UTF-8 text" in proc.stderr


def test_non_sd3_model_folder_and_too_large_resolution(tmp_path, monkeypatch):
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelLoadError, match="holds a StableDiffusionXLPipeline .*not an SD3/SD3.5 pipeline"):
        load_pipeline(str(tmp_path / "sdxl"))
    cfg = load_config(TINY, ["model.resolution=512", f"log.output_dir={tmp_path / 'r'}", "sample.max_sequence_length=8",
                             "rewards=[{name: contrast}]"])
    with pytest.raises(ConfigError, match=r"model.resolution: 512 px is more than 'tiny' supports \(\d+ px: its position embedding\); use at most"):
        Trainer(cfg)


def test_ops_validate_eps_and_take_group_ids_as_lists():
    R = torch.tensor([[1.0, 2.0], [3.0, 5.0], [2.0, 2.0], [4.0, 0.0]])
    as_list = ops.group_normalize(R, [0, 0, 1, 1])
    assert torch.equal(as_list, ops.group_normalize(R, torch.tensor([0, 0, 1, 1])))
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            ops.group_normalize(R, [0, 0, 1, 1], eps=eps)
        with pytest.raises(ValueError, match="eps"):
            ops.dual_stage_advantages(R, [0, 0, 1, 1], torch.tensor([0.5, 0.5]), eps=eps)
    with pytest.raises(TypeError, match="list of ints"):
        ops.group_normalize(R, "0011")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_statistics_do_not_overflow_for_huge_rewards(backend, monkeypatch):
    monkeypatch.setenv("APEX_FAST_BACKEND", backend)
    R = torch.tensor([[1e30], [-1e30], [3e29], [1e29]])
    A = ops.group_normalize(R, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(A).all()
    assert torch.allclose(A.flatten(), torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-3)


def test_balancer_api_validation():
    with pytest.raises(ValueError, match="finite and >= 0"):
        make_balancer(BalanceConfig(method="static"), [1.0, float("nan")])
    with pytest.raises(ValueError, match="finite and >= 0"):
        make_balancer(BalanceConfig(method="apex"), [1.0, -0.5])
    with pytest.raises(ValueError, match="names must be unique"):
        make_balancer(BalanceConfig(method="apex"), [1, 1], ["ocr", "ocr"])
    a = make_balancer(BalanceConfig(method="apex"), [1, 1, 1], ["a", "b", "c"])
    with pytest.raises(ValueError, match="K = 3 objectives, this run has 2"):
        make_balancer(BalanceConfig(method="apex"), [1, 1], ["a", "b"]).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="for rewards \\['a', 'b', 'c'\\]"):
        make_balancer(BalanceConfig(method="apex"), [1, 1, 1], ["a", "b", "x"]).load_state_dict(a.state_dict())
    # same keys in another order: the state follows the keys
    R = torch.randn(12, 3)
    a.advantages(R, torch.arange(12) // 4)
    a.update()
    b = make_balancer(BalanceConfig(method="apex"), [1, 1, 1], ["c", "a", "b"])
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.pi, a.pi[[2, 0, 1]]) and math.isclose(float(b.pi.sum()), float(a.pi.sum()), rel_tol=1e-6)
