"""Reliability of runs: resume identity and settings that really change, rollback, --resume latest on
an empty folder, verified checkpoints, non-finite steps and weights, one run per output folder with
a lock. Small real runs of the tiny model; one 3-epoch run (module fixture) is copied per test."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apex_fast.checkpoint import CheckpointError, checkpoint_dirs, load_checkpoint
from apex_fast.config import load_config
from apex_fast.learner import NonFiniteTrainingError
from apex_fast.run_folder import RunFolderError
from apex_fast.train import Trainer

from _fast import quick_run

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
FAST = quick_run(
    "sample.num_steps=3", "train.micro_batch_size=2", "checkpoint.keep=5", "train.lr=1e-2", "log.plot=false",
    "rewards=[{name: jpeg_compressibility, weight: 0.5}, {name: colorfulness, weight: 0.5}]",
)


def cfg_at(out, *extra):
    return load_config(ROOT / "configs/tiny_cpu.yaml", FAST + [f"log.output_dir={out}", *extra])


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished 3-epoch run (checkpoints 1, 2, 3)."""
    out = tmp_path_factory.mktemp("base") / "run"
    Trainer(cfg_at(out, "train.epochs=3")).fit()
    return out


@pytest.fixture
def run(done, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(done, out)
    (out / ".lock").unlink(missing_ok=True)
    return out


def ckpt(out, epoch):
    return out / "checkpoints" / f"checkpoint-{epoch:06d}"


# ------------------------------------------------------------------ resume


def test_changed_lr_really_changes_on_resume(run):
    assert load_checkpoint(ckpt(run, 3))["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-2)
    tr = Trainer(cfg_at(run, "train.epochs=4", "checkpoint.resume=latest", "train.lr=1e-3", "train.weight_decay=0.5"))
    tr.fit()
    groups = load_checkpoint(ckpt(run, 4))["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(1e-3) and groups[0]["weight_decay"] == pytest.approx(0.5)
    assert tr.engine.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("override,words", [
    ("model.seed=7", "model.seed: 0 in the checkpoint, 7 now"),
    ("rewards=[{name: jpeg_compressibility, weight: 0.9}, {name: colorfulness, weight: 0.1}]",
     "rewards[jpeg_compressibility].weight"),
    ("rewards=[{name: colorfulness, weight: 0.5}, {name: jpeg_compressibility, weight: 0.5}]", "keys in order"),
    ("balance.method=gdpo", "balance.method"),
])
def test_resume_with_another_identity_is_refused_and_can_be_forced(run, override, words):
    with pytest.raises(CheckpointError, match="different run setup") as e:
        Trainer(cfg_at(run, "train.epochs=4", "checkpoint.resume=latest", override)).fit()
    assert words in str(e.value) and "checkpoint.force_resume=true" in str(e.value)
    tr = Trainer(cfg_at(run, "train.epochs=4", "checkpoint.resume=latest", override, "checkpoint.force_resume=true"))
    tr.resume("latest")
    assert tr.epoch == 3
    if "keys in order" in words:  # balancer state follows the keys, not the positions
        saved = load_checkpoint(ckpt(run, 3))["balancer"]
        assert saved["names"] == ["jpeg_compressibility", "colorfulness"]
        assert torch.equal(tr.balancer.p3.sbar, saved["sbar"].flip(0).double())
    tr.folder.release()


def test_lora_shape_cannot_change_even_forced(run):
    with pytest.raises(CheckpointError, match="lora.rank: 16 in the checkpoint, 8 now.*cannot change"):
        Trainer(cfg_at(run, "checkpoint.resume=latest", "lora.rank=8", "checkpoint.force_resume=true")).fit()


def test_checkpoint_at_or_past_epochs_says_so(run, caplog):
    with pytest.raises(CheckpointError, match="epoch 3, past train.epochs=2"):
        Trainer(cfg_at(run, "train.epochs=2", "checkpoint.resume=latest")).fit()
    caplog.set_level("INFO")
    Trainer(cfg_at(run, "train.epochs=3", "checkpoint.resume=latest")).fit()
    assert "already at train.epochs=3: nothing to train" in caplog.text


def test_rollback_never_returns_to_the_abandoned_branch(run):
    tr = Trainer(cfg_at(run, "train.epochs=2", f"checkpoint.resume={ckpt(run, 1)}"))
    tr.fit()
    assert [p.name for p in checkpoint_dirs(run / "checkpoints")] == ["checkpoint-000001", "checkpoint-000002"]
    moved = list((run / "checkpoints" / "abandoned").glob("*/checkpoint-*"))
    assert sorted(p.name for p in moved) == ["checkpoint-000002", "checkpoint-000003"]
    # latest is now the new branch's epoch 2: resuming it continues from there, not from the old epoch 3
    again = Trainer(cfg_at(run, "train.epochs=3", "checkpoint.resume=latest"))
    again.resume("latest")
    assert again.epoch == 2 and again.run_state.resumed_from == ckpt(run, 2)
    again.folder.release()


def test_resume_latest_on_an_empty_folder_starts_fresh(tmp_path, caplog):
    caplog.set_level("INFO")
    Trainer(cfg_at(tmp_path / "new", "train.epochs=1", "checkpoint.resume=latest")).fit()
    assert "no checkpoint under" in caplog.text and "starting a fresh run" in caplog.text
    assert ckpt(tmp_path / "new", 1).is_dir() and json.loads((tmp_path / "new" / "run.json").read_text())["run_id"]


# ------------------------------------------------------------------ verified checkpoints, non-finite


def test_corrupted_or_edited_checkpoint_is_refused_with_the_file_named(run):
    f = ckpt(run, 3) / "pytorch_lora_weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="pytorch_lora_weights.safetensors does not match its checksum"):
        Trainer(cfg_at(run, "train.epochs=4", "checkpoint.resume=latest")).fit()
    st = json.loads((ckpt(run, 2) / "state.json").read_text())
    st["epoch"] = 5  # an edited JSON field
    (ckpt(run, 2) / "state.json").write_text(json.dumps(st))
    with pytest.raises(CheckpointError, match="state.json does not match"):
        load_checkpoint(ckpt(run, 2))


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(run, monkeypatch):
    import apex_fast.rl.learner as rl_learner

    real = rl_learner.grpo_loss
    calls = {"n": 0}

    def poisoned(*a, **k):  # the first trained timestep of the run gives a NaN loss
        out = real(*a, **k)
        calls["n"] += 1
        return dataclasses.replace(out, loss=out.loss * float("nan")) if calls["n"] == 1 else out

    monkeypatch.setattr(rl_learner, "grpo_loss", poisoned)
    tr = Trainer(cfg_at(run, "train.epochs=4", "checkpoint.resume=latest"))
    tr.fit()
    import csv
    row = [r for r in csv.DictReader((run / "metrics.csv").open()) if r["epoch"] == "4"][0]
    assert float(row["skipped_steps"]) == 1 and tr.learner.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in tr.params)

    monkeypatch.setattr(rl_learner, "grpo_loss", lambda *a, **k: (lambda o: dataclasses.replace(o, loss=o.loss * float("nan")))(
        real(*a, **k)))
    before = {k: v.clone() for k, v in load_checkpoint(ckpt(run, 4))["trainable"].items()}
    with pytest.raises(NonFiniteTrainingError, match="3 optimizer steps in a row.*train.max_nonfinite_steps=3"):
        Trainer(cfg_at(run, "train.epochs=6", "checkpoint.resume=latest", "train.max_nonfinite_steps=3")).fit()
    # epoch 5 skipped both of its steps (a finite checkpoint of unchanged weights); the third skip in a
    # row, in epoch 6, stopped the run before its checkpoint
    assert ckpt(run, 5).is_dir() and not ckpt(run, 6).exists()
    after = load_checkpoint(ckpt(run, 5))["trainable"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_weights_are_never_written(run):
    tr = Trainer(cfg_at(run, "train.epochs=4", "checkpoint.resume=latest"))
    tr.resume("latest")
    with torch.no_grad():
        tr.params[0].view(-1)[0] = float("nan")
    tr.epoch = 4
    with pytest.raises(CheckpointError, match="not finite.*last good one is .*checkpoint-000003"):
        tr.save()
    assert [p.name for p in checkpoint_dirs(run / "checkpoints")][-1] == "checkpoint-000003"
    tr.folder.release()


def test_a_killed_checkpoint_write_is_tidied_on_the_next_start(run, caplog):
    """kill -9 between moving checkpoint 3 (and lora/) aside and renaming their replacements, with
    half-written temporary folders: the next start puts them back (resume latest continues from
    checkpoint 3) and removes the leftovers."""
    ck = run / "checkpoints"
    os.replace(ckpt(run, 3), ck / ".old-checkpoint-000003-12345")
    (ck / ".tmp-checkpoint-000003-12345").mkdir()
    (ck / ".engine-000004").mkdir()
    os.replace(run / "lora", run / ".old-lora-12345")  # the final export was being replaced
    (run / ".tmp-lora-12345").mkdir()
    caplog.set_level("WARNING")
    tr = Trainer(cfg_at(run, "train.epochs=4", "checkpoint.resume=latest"))
    tr.fit()
    assert tr.run_state.resumed_from == ckpt(run, 3) and "restored checkpoint-000003" in caplog.text
    assert "restored lora" in caplog.text
    assert sorted(p.name for p in ck.iterdir()) == [f"checkpoint-{e:06d}" for e in (1, 2, 3, 4)]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()


# ------------------------------------------------------------------ output folders


def test_new_run_into_a_folder_with_a_run_refuses_or_archives(run, caplog):
    old_id = json.loads((run / "run.json").read_text())["run_id"]
    with pytest.raises(RunFolderError, match=f"holds run {old_id}.*--resume latest.*--new-run"):
        Trainer(cfg_at(run, "train.epochs=1"))
    caplog.set_level("WARNING")
    Trainer(cfg_at(run, "train.epochs=1", "checkpoint.new_run=true")).fit()
    archived = run / "previous-runs" / old_id
    assert (archived / "checkpoints" / "checkpoint-000003").is_dir() and (archived / "metrics.csv").is_file()
    assert "moved to" in caplog.text
    assert json.loads((run / "run.json").read_text())["run_id"] != old_id
    assert [p.name for p in checkpoint_dirs(run / "checkpoints")] == ["checkpoint-000001"]


LOCKER = """
import sys, time
from apex_fast.run_folder import RunFolder
f = RunFolder(sys.argv[1]); f.check_writable(); f.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_two_trainers_on_one_folder_cannot_both_write(tmp_path, monkeypatch):
    out = tmp_path / "shared"
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        import apex_fast.train as train_mod

        monkeypatch.setattr(train_mod, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
        with pytest.raises(RunFolderError, match=f"in use by another trainer \\(pid {proc.pid} on "):
            Trainer(cfg_at(out, "train.epochs=1", "checkpoint.resume=latest"))
    finally:
        proc.kill()
        proc.wait()
    monkeypatch.undo()
    # the holder died (even kill -9): the kernel dropped its lock
    Trainer(cfg_at(out, "train.epochs=1", "checkpoint.resume=latest")).fit()
    assert ckpt(out, 1).is_dir()


def test_output_folder_that_is_a_file_fails_before_the_model_loads(tmp_path, monkeypatch):
    import apex_fast.train as train_mod

    monkeypatch.setattr(train_mod, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFolderError, match="log.output_dir: .* is a file, not a folder"):
        Trainer(cfg_at(tmp_path / "f"))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(RunFolderError, match="cannot write into"):
            Trainer(cfg_at(ro / "run"))
