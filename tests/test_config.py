"""Config: YAML, dotted overrides, validation that names the field; prompt files."""
import json

import pytest

from apex_fast.config import ConfigError, load_config, save_config, to_dict
from apex_fast.data import load_prompts

BASE = """
rewards:
  - {name: jpeg_compressibility, weight: 1.0}
  - {name: colorfulness, weight: 0.5}
train: {epochs: 2, lr: 1e-4}
"""


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["train.lr=3e-4", "balance.method=gdpo", "rewards.1.weight=2",
                                              "sample.group_size=4"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # "1e-4" YAML strings become floats
    assert cfg.balance.method == "gdpo"
    assert cfg.rewards[1].weight == 2.0
    assert cfg.sample.group_size == 4
    assert cfg.train.epochs == 2


def test_roundtrip_saved_config(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("override,field", [
    ("train.lr=-1", "train.lr"),
    ("train.lrr=1", "train.lrr"),
    ("sample.group_size=1", "sample.group_size"),
    ("model.dtype=fp8", "model.dtype"),
    ("balance.method=nope", "balance.method"),
    ("rewards.0.weight=0", "rewards[*].weight"),
    ("rewards.0.weight=abc", "rewards[0].weight"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.ema=maybe", "train.ema"),
])
def test_errors_name_the_field(tmp_path, override, field):
    text = BASE.replace("weight: 0.5", "weight: 0.0") if "rewards.0.weight=0" == override else BASE
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text), [override])
    assert field in str(e.value)


def test_no_rewards_and_duplicates(tmp_path):
    with pytest.raises(ConfigError, match="rewards"):
        load_config(_write(tmp_path, "train: {epochs: 1}"))
    with pytest.raises(ConfigError, match="unique"):
        load_config(_write(tmp_path, BASE), ["rewards.1.name=jpeg_compressibility"])


def test_missing_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1, 2"))
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(_write(tmp_path, BASE), ["train.lr"])


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na cat\n\n a dog \n")
    assert load_prompts(tmp_path / "p.txt") == [("a cat", {}), ("a dog", {})]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": 'a sign "OPEN"', "ocr_target": "OPEN"}) + "\n")
    assert load_prompts(tmp_path / "p.jsonl") == [('a sign "OPEN"', {"ocr_target": "OPEN"})]
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="data.train_prompts.*no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="data.eval_prompts"):
        load_prompts(tmp_path / "missing.txt", "data.eval_prompts")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompts(tmp_path / "bad.jsonl")


def test_shipped_prompt_sets_resolve_by_name():
    for name in ("tiny_train.txt", "tiny_eval.txt", "ocr_train.txt", "ocr_eval.txt"):
        assert len(load_prompts(name)) >= 10
