"""BalancedDPO end to end on the tiny model (CPU): online and offline runs, exact resume with the
reference adapter, bad pairs files, and one 2-process run against one process."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apex_fast.config import load_config
from apex_fast.dpo import PairsFileError
from apex_fast.models import lora_state_dict
from apex_fast.train import Trainer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
CFG = ROOT / "configs" / "tiny_dpo.yaml"
FAST = [
    "model.pretrained=tiny-random",
    "sample.num_steps=4", "sample.group_size=3", "sample.prompts_per_epoch=4", "sample.batch_size=12",
    "sample.max_sequence_length=8", "train.micro_batch_size=2", "train.lr=1e-2", "eval.num_steps=2",
    "eval.num_prompts=2", "eval.images_per_prompt=2", "eval.every=0", "checkpoint.every=1", "checkpoint.keep=5",
    "log.progress=false", "log.tensorboard=false", "log.plot=false",
]


def make_cfg(tmp_path, *extra, name="run"):
    return load_config(CFG, FAST + [f"log.output_dir={tmp_path / name}", *extra])


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def ref_weights(tr):
    return {k: v.detach().clone() for k, v in tr.learner.ref.ref_params.items()}


def test_online_run_votes_trains_and_reports_win_rates(tmp_path):
    tr = Trainer(make_cfg(tmp_path, "train.epochs=2", "dpo.ref_update_every=3"))
    before = {k: v.clone() for k, v in lora_state_dict(tr.transformer).items()}
    result = tr.fit()
    out = tmp_path / "run"
    rows = metrics(out)
    last = rows[-1]
    assert float(last["dpo/pairs"]) + float(last["dpo/dropped_ties"]) + float(last["dpo/dropped_abstained"]) == 4
    assert float(last["dpo/steps"]) >= 1 and 0 <= float(last["dpo/accuracy"]) <= 1
    for n in ("jpeg_compressibility", "colorfulness", "contrast"):
        assert 0 <= float(last[f"dpo/agree/{n}"]) <= 1
        assert 0 <= result["end"][f"winrate/{n}"] <= 1
    assert rows[0]["eval/winrate/consensus"] == "0.5"  # the base against itself at epoch 0
    after = lora_state_dict(tr.transformer)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the learner moved
    steps = tr.global_step
    assert tr.learner.ref.updates == steps // 3 and tr.learner.ref.is_base == (steps < 3)
    summary = (out / "summary.txt").read_text()
    assert "algorithm=dpo, dpo.label=balanced_vote" in summary and "| consensus |" in summary
    assert (out / "samples" / "eval_base.png").is_file() and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_rollouts_are_sampled_with_the_reference(tmp_path):
    tr = Trainer(make_cfg(tmp_path, "train.epochs=1"))
    with torch.no_grad():  # the learner moves away from the base; the reference (the base) does not
        for p in tr.learner.ref.learner_params.values():
            p.add_(0.3)
    with tr.learner.ref.active():
        ref_batch, *_ = tr.rollout(0)
    learner_batch, *_ = tr.rollout(0)
    from apex_fast.models import lora_disabled

    with lora_disabled(tr.transformer):
        base_batch, *_ = tr.rollout(0)
    assert torch.equal(ref_batch.latents, base_batch.latents)
    assert not torch.allclose(ref_batch.latents, learner_batch.latents)


def test_exact_resume_with_the_reference_adapter(tmp_path):
    extra = ["dpo.ref_update_every=3", "dpo.label=soft_vote"]  # soft vote: the running tau is state too
    full = Trainer(make_cfg(tmp_path, "train.epochs=4", *extra, name="full"))
    full.fit()
    half = Trainer(make_cfg(tmp_path, "train.epochs=2", *extra, name="split"))
    half.fit()
    assert half.learner.ref.updates >= 1 or half.global_step < 3
    resumed = Trainer(make_cfg(tmp_path, "train.epochs=4", "checkpoint.resume=latest", *extra, name="split"))
    resumed.fit()
    assert resumed.global_step == full.global_step and full.learner.ref.updates >= 2
    a, b = lora_state_dict(full.transformer), lora_state_dict(resumed.transformer)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = ref_weights(full), ref_weights(resumed)
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    assert not all(torch.equal(ra[k], a[k]) for k in ra)  # the reference lags the learner
    assert torch.equal(full.learner.labeler.scale.tau, resumed.learner.labeler.scale.tau)
    ckpt = sorted((tmp_path / "split" / "checkpoints").iterdir())[-1]
    st = load_file(str(ckpt / "state.safetensors"))
    assert any("reference" in k for k in st)


def test_ema_reference_runs(tmp_path):
    tr = Trainer(make_cfg(tmp_path, "train.epochs=1", "dpo.ref_ema=0.5", "dpo.label=normalized_sum"))
    tr.fit()
    assert tr.learner.ref.updates == tr.global_step >= 1 and not tr.learner.ref.is_base


def test_offline_run_from_the_shipped_pairs_file(tmp_path):
    tr = Trainer(make_cfg(tmp_path, "train.epochs=2", "dpo.mode=offline", "dpo.pairs_file=tiny_pairs.jsonl",
                          "dpo.pairs_per_epoch=4"))
    Sa, Sb = tr.learner.pair_scores
    assert torch.isfinite(Sa).all() and torch.isfinite(Sb).all()  # lines without scores were scored
    given = [r for r in tr.learner.records if r.scores]
    assert float(Sa[0, 1]) == pytest.approx(given[0].scores["colorfulness"][0])  # given scores are used as is
    tr.fit()
    rows = metrics(tmp_path / "run")
    assert float(rows[-1]["dpo/steps"]) == 2  # 4 pairs per epoch, micro-batch 2
    assert tr.global_step == 4


def test_bad_pairs_file_fails_before_loading_the_model(tmp_path, monkeypatch):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "images": ["nope_a.png", "nope_b.png"]}) + "\n{oops\n")
    import apex_fast.train as train_mod

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the pairs file was checked")

    monkeypatch.setattr(train_mod, "load_pipeline", no_model)
    with pytest.raises(PairsFileError, match=r"line 1: image file\(s\) not found.*line 2: not valid JSON"):
        Trainer(make_cfg(tmp_path, "dpo.mode=offline", f"dpo.pairs_file={bad}"))


# ------------------------------------------------------------------ 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """1 process x micro-batch 2 (plain torch) == 2 processes x micro-batch 1 under DeepSpeed ZeRO-2:
    the same global pairs per step, so the same LoRA up to float rounding (tests/test_distributed_multiproc.py
    explains the 2e-4 bound)."""
    common = FAST + ["train.epochs=2", "dpo.ref_update_every=2", "checkpoint.every=0", "log.csv=true",
                     "rewards=[{\"name\":\"jpeg_compressibility\",\"weight\":0.4},{\"name\":\"colorfulness\",\"weight\":0.3},"
                     "{\"name\":\"contrast\",\"weight\":0.3}]"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    outs = {}
    for nproc, mbs in ((1, 2), (2, 1)):
        out = tmp_path / f"p{nproc}"
        sets = []
        for o in common + [f"train.micro_batch_size={mbs}", f"log.output_dir={out}"]:
            sets += ["--set", o]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), str(ROOT / "apex_fast" / "train.py"), "--config", str(CFG), *sets]
        if nproc == 2:
            cmd += ["--deepspeed", str(ROOT / "configs" / "ds_zero2.json")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=420, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[nproc] = out
    a = load_file(str(outs[1] / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(outs[2] / "lora" / "pytorch_lora_weights.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float(a[k].abs().max()) for k in a if "lora_B" in k)
    assert moved > 1e-3 and diff < 2e-4, (diff, moved)
    ra, rb = metrics(outs[1])[-1], metrics(outs[2])[-1]
    assert ra["dpo/pairs"] == rb["dpo/pairs"] and float(ra["dpo/loss"]) == pytest.approx(float(rb["dpo/loss"]), abs=1e-4)
