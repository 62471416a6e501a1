"""Non-finite steps under the DeepSpeed engine, on real tiny runs (1 process, `python train.py
--deepspeed`, in a subprocess so DeepSpeed's process group stays out of pytest): a NaN loss, a NaN
gradient under a finite loss, and a NaN loss whose gradient is finite are each skipped and counted
(skipped_steps), the weights and the optimizer state stay finite and unchanged by them, and
train.max_nonfinite_steps skips in a row stop the run with the one-line error before a checkpoint.
Both DeepSpeed paths: ZeRO-2 (its overflow check) and no ZeRO (stage 0: DeepSpeed steps the client
optimizer as is, so runtime.engines._SkippingAdamW checks the norm). A slow 2-process run: a NaN on
one rank only skips the step on both."""
import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from apex_fast.checkpoint import checkpoint_dirs, load_checkpoint

from _fast import quick_run

ROOT = Path(__file__).resolve().parent.parent
FAST = quick_run(
    "sample.num_steps=3", "train.micro_batch_size=2", "checkpoint.keep=100", "log.plot=false", "train.epochs=6",
    "train.max_nonfinite_steps=3", 'rewards=[{"name":"jpeg_compressibility","weight":1}]',
)
# what each (1-based) epoch's losses get; 2 optimizer steps per epoch
PLAN = {2: "nan_loss", 4: "nan_grad", 5: "nan_loss_finite_grad"}
POISON = textwrap.dedent("""
    import dataclasses, json, math, os, sys, torch
    sys.path.insert(0, {root!r})
    from apex_fast import train
    import apex_fast.rl.learner as rl_learner

    plan = {{int(k): v for k, v in json.loads(os.environ["NAN_PLAN"]).items()}}
    now = {{"epoch": 0}}
    real_loss, real_epoch = rl_learner.grpo_loss, rl_learner.GRPOLearner.train_epoch

    def train_epoch(self, samples, adv, epoch, *a, **k):
        now["epoch"] = epoch + 1  # as the log counts
        return real_epoch(self, samples, adv, epoch, *a, **k)

    def grpo_loss(*a, **k):
        out = real_loss(*a, **k)
        kind = plan.get(now["epoch"])
        if os.environ.get("NAN_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
            kind = None  # poison one rank only
        if kind == "nan_loss":  # NaN loss and gradient
            return dataclasses.replace(out, loss=out.loss * math.nan)
        if kind == "nan_grad":  # finite loss, NaN gradient: d sqrt(u)/du = inf at u = 0, times du/dloss = 0
            return dataclasses.replace(out, loss=out.loss + torch.sqrt(out.loss * 0))
        if kind == "nan_loss_finite_grad":  # a NaN term without gradient: the gradient alone looks fine
            return dataclasses.replace(out, loss=out.loss + torch.tensor(math.nan))
        return out

    rl_learner.grpo_loss, rl_learner.GRPOLearner.train_epoch = grpo_loss, train_epoch
    train.main(sys.argv[1:])
""")
STAGE0 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "gradient_clipping": "auto"}


def tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from tensors(v)


@pytest.mark.parametrize("zero", ["ds_zero2.json", "stage0"], ids=["zero2", "no_zero"])
def test_deepspeed_skips_counts_and_stops_on_non_finite_steps(tmp_path, zero):
    ds = ROOT / "configs" / zero
    if zero == "stage0":
        ds = tmp_path / "ds_stage0.json"
        ds.write_text(json.dumps(STAGE0))
    script = tmp_path / "poison.py"
    script.write_text(POISON.format(root=str(ROOT)))
    out = tmp_path / "run"
    cmd = [sys.executable, str(script), "--config", str(ROOT / "configs/tiny_cpu.yaml"), "--output-dir", str(out),
           "--deepspeed", str(ds)]
    for o in FAST:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "NAN_PLAN": json.dumps(PLAN)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    output = proc.stdout + proc.stderr
    # epoch 5's first step is the third skip in a row (epoch 4 skipped both): the run stops there,
    # with the one-line error and no checkpoint of epoch 5
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "error: epoch 5: 3 optimizer steps in a row had a non-finite loss or gradient" in output
    assert "train.max_nonfinite_steps=3" in output

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [float(r["skipped_steps"]) for r in rows[1:]] == [0, 2, 0, 2]
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == [f"checkpoint-{e:06d}" for e in (1, 2, 3, 4)]
    ck = {e: load_checkpoint(out / "checkpoints" / f"checkpoint-{e:06d}") for e in (1, 2, 3, 4)}  # checksums verified
    w = {e: s["trainable"] for e, s in ck.items()}
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(w[1], w[2]) and same(w[3], w[4]), "a skipped step changed the weights"
    assert not same(w[2], w[3]), "the finite epoch between the skips did not train"
    assert [ck[e]["skipped_steps"] for e in (1, 2, 3, 4)] == [0, 2, 2, 4]
    assert ck[4]["global_step"] == ck[3]["global_step"] == ck[2]["global_step"] + 2 == ck[1]["global_step"] + 2
    for e, s in ck.items():
        assert all(torch.isfinite(t).all() for t in tensors(s["trainable"])), f"checkpoint {e}: non-finite weights"
        engine_files = list((out / "checkpoints" / f"checkpoint-{e:06d}" / "deepspeed").rglob("*.pt"))
        assert engine_files
        for f in engine_files:  # DeepSpeed's module and optimizer state (Adam moments, fp32 masters)
            state = torch.load(f, map_location="cpu", weights_only=False)
            bad = [t for t in tensors(state) if t.is_floating_point() and not torch.isfinite(t).all()]
            assert not bad, f"{f.relative_to(out)}: non-finite tensors"
    # DeepSpeed's state after the skipped epoch 4 is epoch 3's: weights, fp32 masters, Adam moments
    def engine_state(e):
        files = sorted((out / "checkpoints" / f"checkpoint-{e:06d}" / "deepspeed").rglob("*.pt"))
        return [t for f in files for t in tensors(torch.load(f, map_location="cpu", weights_only=False))
                if t.is_floating_point()]

    s3, s4 = engine_state(3), engine_state(4)
    assert len(s3) == len(s4) and all(torch.equal(a, b) for a, b in zip(s3, s4))


@pytest.mark.slow
def test_a_non_finite_step_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """2 processes under the deepspeed launcher, ZeRO-2: epoch 2's losses are NaN on rank 1 only. Both
    ranks skip the same steps (ZeRO's overflow check is all-reduced; a rank skipping alone would hang
    or split the run), the run finishes, and both ranks' optimizer shards stay finite."""
    script = tmp_path / "poison.py"
    script.write_text(POISON.format(root=str(ROOT)))
    out = tmp_path / "run"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(script), "--config", str(ROOT / "configs/tiny_cpu.yaml"), "--output-dir", str(out),
           "--deepspeed", str(ROOT / "configs" / "ds_zero2.json")]
    for o in FAST + ["train.epochs=3", "train.micro_batch_size=1"]:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "NAN_PLAN": json.dumps({2: "nan_loss"}),
           "NAN_RANK": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [float(r["skipped_steps"]) for r in rows[1:]] == [0, 2, 0]
    ck = {e: load_checkpoint(out / "checkpoints" / f"checkpoint-{e:06d}") for e in (1, 2, 3)}
    assert all(torch.equal(ck[1]["trainable"][k], ck[2]["trainable"][k]) for k in ck[1]["trainable"])
    assert ck[2]["global_step"] == ck[1]["global_step"] and ck[3]["global_step"] == ck[2]["global_step"] + 2
    shards = sorted((out / "checkpoints" / "checkpoint-000002" / "deepspeed").rglob("*optim_states.pt"))
    assert len(shards) == 2  # one per rank
    for f in shards:
        state = torch.load(f, map_location="cpu", weights_only=False)
        assert all(torch.isfinite(t).all() for t in tensors(state) if t.is_floating_point()), f.name
