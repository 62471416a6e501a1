"""Atomic, pickle-free checkpoints."""
import json
import os
import shutil

import pytest
import torch

from apex_fast.checkpoint import (CheckpointError, checkpoint_dirs, load_checkpoint, recover_interrupted_writes,
                                  resolve_resume, save_checkpoint, write_folder_atomically)


def _state(v=1.0):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    return {"epoch": 3, "w": torch.full((2, 2), v), "opt": opt.state_dict(), "tup": (1, 2.5), "none": None,
            "nested": [{"a": torch.arange(3)}, "x"]}


def test_roundtrip_exact(tmp_path):
    st = _state()
    path = save_checkpoint(tmp_path, 3, st)
    back = load_checkpoint(path)
    assert back["epoch"] == 3 and back["tup"] == (1, 2.5) and back["none"] is None
    assert torch.equal(back["w"], st["w"]) and torch.equal(back["nested"][0]["a"], torch.arange(3))
    assert set(back["opt"]["state"]) == {0}  # integer keys restored, so torch can load it
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt.load_state_dict(back["opt"])
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], st["opt"]["state"][0]["exp_avg"])


def test_latest_rotation_and_failed_write_leaves_old_intact(tmp_path):
    for e in (1, 2, 3):
        save_checkpoint(tmp_path, e, _state(e), keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-000002", "checkpoint-000003"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-000003"

    def boom(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 3, _state(99), write_extra=boom)
    # the earlier checkpoint 3 is untouched and no temp folder is left behind
    assert float(load_checkpoint(tmp_path / "checkpoint-000003")["w"][0, 0]) == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "checkpoint-000003"]


def test_resume_errors(tmp_path):
    assert resolve_resume("latest", tmp_path) is None  # nothing to resume: the caller starts fresh
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    path = save_checkpoint(tmp_path, 1, _state())
    (path / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_no_pickle_in_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state())
    assert sorted(p.name for p in path.iterdir()) == ["checksums.json", "state.json", "state.safetensors"]
    json.loads((path / "state.json").read_text())


def test_recover_interrupted_writes(tmp_path):
    """What a write killed outright leaves: a checkpoint moved aside while being replaced comes back,
    unfinished temporary folders go; complete checkpoints are untouched."""
    for e in (1, 2):
        save_checkpoint(tmp_path, e, _state(e))
    os.replace(tmp_path / "checkpoint-000002", tmp_path / ".old-checkpoint-000002-999")  # killed between the renames
    shutil.copytree(tmp_path / "checkpoint-000001", tmp_path / ".old-checkpoint-000001-998")  # replacement arrived
    (tmp_path / ".tmp-checkpoint-000003-999").mkdir()
    (tmp_path / ".tmp-checkpoint-000003-999" / "state.safetensors").write_bytes(b"half")
    (tmp_path / ".engine-000003" / "zero").mkdir(parents=True)
    done = recover_interrupted_writes(tmp_path)
    assert len(done) == 4 and any("restored checkpoint-000002" in d for d in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001", "checkpoint-000002"]
    assert float(load_checkpoint(tmp_path / "checkpoint-000002")["w"][0, 0]) == 2.0
    assert recover_interrupted_writes(tmp_path) == [] and recover_interrupted_writes(tmp_path / "none") == []


def test_a_removed_checksums_file_is_refused(tmp_path):
    """Deleting checksums.json does not turn verification off for a checkpoint written with one;
    one without (an older apex-fast) loads with a warning."""
    path = save_checkpoint(tmp_path, 1, _state())
    (path / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match="checksums.json is missing"):
        load_checkpoint(path)
    st = json.loads((path / "state.json").read_text())
    del st["__checksummed__"]
    (path / "state.json").write_text(json.dumps(st))
    assert float(load_checkpoint(path)["w"][0, 0]) == 1.0
    assert "__checksummed__" not in load_checkpoint(save_checkpoint(tmp_path, 2, _state()))


def test_folders_replaced_atomically_and_recovered_by_name(tmp_path):
    """write_folder_atomically (the final lora/ export too): a failing write leaves the old folder
    as it was; recovery touches only the names it is given."""
    lora = tmp_path / "lora"
    write_folder_atomically(lora, lambda d: (d / "w.safetensors").write_text("v1"))

    def boom(d):
        (d / "w.safetensors").write_text("half")
        raise KeyboardInterrupt  # a stop signal while writing

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(lora, boom)
    assert (lora / "w.safetensors").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
    os.replace(lora, tmp_path / ".old-lora-77")  # killed between the two renames of a replacement
    (tmp_path / ".tmp-lora-77").mkdir()
    (tmp_path / ".tmp-notes-77").mkdir()  # not ours to touch
    assert recover_interrupted_writes(tmp_path) == []  # default: checkpoint names only
    done = recover_interrupted_writes(tmp_path, names="^lora$")
    assert len(done) == 2 and (lora / "w.safetensors").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-notes-77", "lora"]


def test_ema_warmup_follows_flow_grpo_decay_schedule():
    """train.ema_warmup (default): decay min(ema_decay, (1 + t) / (10 + t)) after optimizer step t, as
    Flow-GRPO's EMAModuleWrapper; off: ema_decay from the first update. Checked on one weight that jumps
    from 0 to 1 at the first step and stays there."""
    from apex_fast.run_state import EMA

    class Weights:  # the TrainableWeights surface EMA uses
        def __init__(self):
            self.params = [torch.zeros(3)]

        def copies(self):
            return [p.clone() for p in self.params]

        def gathered(self):
            import contextlib

            return contextlib.nullcontext()

    for warmup in (True, False):
        w = Weights()
        ema = EMA(w, decay=0.9, every=2, warmup=warmup)
        w.params[0].fill_(1.0)
        expect = 0.0
        for t in range(1, 201):
            ema.update(t)
            if t % 2 == 0:
                d = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
                expect = d * expect + (1 - d) * 1.0
        assert torch.allclose(ema.values[0], torch.full((3,), expect), atol=1e-6)
        if warmup:
            assert ema.decay_at(2) == pytest.approx(3 / 12) and ema.decay_at(80) == 0.9  # (1+80)/90 = 0.9
        # after 4 updates the warm-up has nearly forgotten the initial weights; without it 0.9^4 = 66% stays
        ema2 = EMA(Weights(), decay=0.9, every=1, warmup=warmup)
        ema2.weights.params[0].fill_(1.0)
        for t in range(1, 5):
            ema2.update(t)
        assert (float(ema2.values[0][0]) > 0.8) == warmup
