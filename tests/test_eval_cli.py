"""End to end: tiny training runs, then `apex-fast eval` on them (cache, comparison, errors), the
labelled training grids, and the `apex-fast` command's train helpers (--print-config, --dry-run)."""
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from apex_fast.cli import main as cli_main
from apex_fast.config import load_config
from apex_fast.eval import EvalCache, EvalError, EvalSettings, HeldOutSampler, evaluate, load_run
from apex_fast.eval.grids import save_labelled_grid
from apex_fast.train import Trainer
from apex_fast.train import main as train_main

from _fast import quick_run

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
FAST = quick_run(
    "model.pretrained=tiny-random", "eval.images_per_prompt=1", "sample.num_steps=3",
    "train.micro_batch_size=2", "train.lr=1e-2", "train.epochs=2", "train.ema=false", "eval.num_prompts=3",
    "rewards=[{name: jpeg_compressibility, weight: 0.5}, {name: colorfulness, weight: 0.3}, {name: contrast, weight: 0.2}]",
)
NAMES = ["jpeg_compressibility", "colorfulness", "contrast"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_runs")
    out = {}
    for method in ("static", "apex"):
        cfg = load_config(ROOT / "configs/tiny_cpu.yaml", FAST + [f"balance.method={method}",
                                                                  f"log.output_dir={root / method}"])
        out[method] = Trainer(cfg).fit()
    return root, out


def run_eval(*args):
    return cli_main(["eval", *map(str, args), "--no-progress"])


def test_training_saves_labelled_grids_with_prompts(runs):
    root, _ = runs
    samples = root / "static" / "samples"
    png, txt = samples / "eval_epoch00000.png", samples / "eval_epoch00000.txt"
    assert png.stat().st_size > 5000
    lines = [ln for ln in txt.read_text().splitlines() if not ln.startswith("#")]
    cfg = load_config(root / "static" / "config.yaml")
    from apex_fast.data import load_prompts

    expected = [p for p, _ in load_prompts(cfg.data.eval_prompts)[:3]]
    assert lines == [f"{i + 1}\t{p}" for i, p in enumerate(expected)]


def test_eval_run_reproduces_training_eval_then_is_cached(runs, tmp_path, capsys):
    root, result = runs
    cache = tmp_path / "cache"
    assert run_eval("--run", root / "static", "--cache-dir", cache) == 0
    out_dir = root / "static" / "eval"
    res = json.loads((out_dir / "results.json").read_text())
    models = {m["label"]: m for m in res["models"]}
    assert list(models) == ["base", "epoch 1", "epoch 2"]
    for n in NAMES:  # same items, same noise, same weights as the run's own eval (EMA off)
        assert models["base"]["mean"][n]["mean"] == pytest.approx(result["static"]["start"][n], rel=1e-4, abs=1e-6)
        assert models["epoch 2"]["mean"][n]["mean"] == pytest.approx(result["static"]["end"][n], rel=1e-4, abs=1e-6)
        assert models["base"]["mean"][n]["n"] == 3
    report = (out_dir / "report.md").read_text()
    for section in ("## Scores", "## Improvement over the base model", "## Win rate", "## What the numbers mean"):
        assert section in report
    for png in ("objectives.png", "pareto.png", "balancing.png", "grid_static.png"):
        assert (out_dir / png).stat().st_size > 5000, png
    assert "9 images sampled" in capsys.readouterr().out  # 3 models x 3 items

    # the second run is instant: no pipeline, no sampling
    run = load_run(root / "static")
    settings = EvalSettings.from_config(run.config)

    class NoSampling(HeldOutSampler):
        def sample(self, *a, **k):
            raise AssertionError("sampled although everything is cached")

    sampler = NoSampling(settings)
    again = evaluate([run], settings=settings, cache=EvalCache(cache), progress=False, sampler=sampler)
    assert again.sampled == 0 and sampler._pipe is None
    assert np.allclose(again.models[2].scores.mean(0), [models["epoch 2"]["mean"][n]["mean"] for n in NAMES])
    assert run_eval("--run", root / "static", "--cache-dir", cache) == 0
    assert "all from the cache" in capsys.readouterr().out

    # a new checkpoint costs only itself: drop one checkpoint's entry
    import shutil

    shutil.rmtree(again.models[1].entry.dir)
    counter = HeldOutSampler(settings)
    evaluate([run], settings=settings, cache=EvalCache(cache), progress=False, sampler=counter)
    assert counter.samples_drawn == 3


def test_compare_two_runs(runs, tmp_path, capsys):
    root, _ = runs
    out = tmp_path / "compare"
    assert run_eval("--run", root / "static", "--run", root / "apex", "--cache-dir", tmp_path / "c", "--out", out) == 0
    res = json.loads((out / "results.json").read_text())
    labels = [m["label"] for m in res["models"]]
    assert labels == ["base", "static @1", "static @2", "apex @1", "apex @2"]  # one base for both methods
    assert "15 images sampled" in capsys.readouterr().out
    assert set(res["run_hypervolume"]) == {"static", "apex"}
    assert any(m["on_pareto_front"] for m in res["models"][1:])
    report = (out / "report.md").read_text()
    assert "## Methods side by side" in report and "| static (static) |" in report and "| apex (apex) |" in report
    assert (out / "grid_methods.png").stat().st_size > 5000


def test_lora_with_the_runs_config_hits_the_same_cache(runs, tmp_path, capsys):
    root, _ = runs
    cache = tmp_path / "cache"
    assert run_eval("--run", root / "static", "--checkpoints", "last", "--cache-dir", cache, "--out", tmp_path / "a") == 0
    capsys.readouterr()
    # lora/ holds the same weights as the last checkpoint: keyed by content, nothing is sampled
    assert run_eval("--lora", root / "static" / "lora", "--config", root / "static" / "config.yaml",
                    "--cache-dir", cache, "--out", tmp_path / "b") == 0
    assert "all from the cache" in capsys.readouterr().out


def test_clear_errors(runs, tmp_path, capsys):
    root, _ = runs
    assert run_eval("--run", tmp_path / "nope") == 2
    assert "folder does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_eval("--run", tmp_path / "empty") == 2
    assert "not a training run folder (no config.yaml)" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((root / "static" / "config.yaml").read_text())
    assert run_eval("--run", bare) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert run_eval("--lora", root / "static" / "lora") == 2
    assert "--lora needs --model" in capsys.readouterr().err
    assert run_eval("--run", root / "static", "--checkpoints", "7") == 2
    assert "no checkpoint at epoch(s) [7]" in capsys.readouterr().err


def test_lora_that_does_not_fit_the_model_fails_before_sampling(runs, tmp_path, capsys):
    root, _ = runs
    run = load_run(root / "static")
    settings = EvalSettings.from_config(run.config)
    d = 64  # wrong width for the tiny transformer's attention projections
    for name, key, shape in (("other_model", "transformer.transformer_blocks.9.attn.to_q.lora_A.weight", (4, d)),
                             ("wrong_shape", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight", (4, 7))):
        folder = tmp_path / name
        folder.mkdir()
        save_file({key: torch.zeros(shape)}, str(folder / "pytorch_lora_weights.safetensors"))
        sampler = HeldOutSampler(settings)
        with pytest.raises(EvalError, match="does not fit the model"):
            evaluate(None, [(name, folder)], settings=settings, cache=EvalCache(tmp_path / "c"), progress=False,
                     sampler=sampler)
        assert sampler.samples_drawn == 0
        assert run_eval("--lora", folder, "--model", "tiny", "--rewards", "contrast", "--cache-dir", tmp_path / "c",
                        "--out", tmp_path / "o") == 2
        err = capsys.readouterr().err
        assert "does not fit the model" in err and ("transformer_blocks.9" in err or "-> " in err)


def test_labelled_grid_handles_ragged_rows(tmp_path):
    im = np.full((16, 16, 3), 128, np.uint8)
    p = save_labelled_grid([[im, im], [im, None]], tmp_path / "g.png", row_labels=["a long prompt " * 8, "b"],
                           col_labels=["base", "epoch 10"], notes=[["x 1", "x 2"], ["x 3", ""]], title="t")
    assert p.stat().st_size > 2000
    with pytest.raises(ValueError, match="labels"):
        save_labelled_grid([[im]], tmp_path / "h.png", row_labels=[], col_labels=["a"])


def test_cli_help_print_config_and_dry_run(tmp_path, capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["apex-fast"] == "apex_fast.cli:main" and "apex-fast-train" in scripts
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {c} " in out for c in ("train", "eval", "bench", "serve"))
    for cmd in ("train", "eval", "serve"):
        with pytest.raises(SystemExit) as e:
            cli_main([cmd, "--help"])
        assert e.value.code == 0 and f"apex-fast {cmd}" in capsys.readouterr().out
    assert cli_main(["nope"]) == 2
    cfg = ROOT / "configs/tiny_cpu.yaml"
    train_main(["--config", str(cfg), "--set", "train.lr=2e-3", "--print-config"])
    out = capsys.readouterr().out
    assert "lr: 0.002  # (default 0.0003) AdamW learning rate" in out
    assert "group_size: 8  # (default 24) images per prompt (G)" in out
    assert "method: static  # static | gdpo | apex" in out
    body = "\n".join(ln.split("  #")[0] for ln in out.splitlines() if not ln.startswith("#") and not ln.startswith("  - "))
    assert "rewards:" in body  # the printed YAML is the config (value part)
    ok_dir = tmp_path / "dry"
    train_main(["--config", str(cfg), "--set", "rewards=[{name: contrast, weight: 1}]", "--output-dir", str(ok_dir),
                "--dry-run"])
    out = capsys.readouterr().out
    assert "FAIL" not in out and "ok    model.pretrained: 'tiny'" in out and "everything checks out" in out
    assert not (ok_dir / "checkpoints").exists()
    with pytest.raises(SystemExit) as e:
        train_main(["--config", str(cfg), "--set", "data.eval_prompts=missing.txt", "--set",
                    "rewards=[{name: contrast, weight: 1}]", "--output-dir", str(ok_dir), "--dry-run"])
    assert e.value.code == 1 and "FAIL  data.eval_prompts" in capsys.readouterr().out


@pytest.mark.skipif(sys.platform != "linux", reason="console script check uses the venv layout")
def test_bench_subcommand_lists_benchmarks(capsys):
    assert cli_main(["bench", "--help"]) == 0
    assert "apex-fast bench <name>" in capsys.readouterr().out


def test_ema_flag_and_the_exported_lora_reproduce_the_runs_own_eval(tmp_path):
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", FAST + ["train.ema=true", "train.ema_every=1", "train.ema_decay=0.5",
                                                              "checkpoint.every=0", f"log.output_dir={tmp_path / 'run'}"])
    result = Trainer(cfg).fit()
    cache = EvalCache(tmp_path / "cache")
    ema_run = load_run(tmp_path / "run", ema=True)
    settings = EvalSettings.from_config(ema_run.config)
    with_ema = evaluate([ema_run], settings=settings, cache=cache, progress=False)
    saved = evaluate([load_run(tmp_path / "run")], settings=settings, cache=cache, progress=False)
    end = np.array([result["end"][n] for n in NAMES])
    assert np.allclose(with_ema.models[-1].scores.mean(0), end, rtol=1e-4, atol=1e-6)
    # the exported LoRA is the EMA (as Flow-GRPO saves it): the same scores as --ema
    assert np.allclose(saved.models[-1].scores, with_ema.models[-1].scores, rtol=1e-5, atol=1e-6)
