"""Real multi-process training on CPU (gloo): the DeepSpeed launcher with ZeRO-2, torchrun, resume,
1 process vs 2 processes, ZeRO-3, plain python + DeepSpeed, and a rank that fails.

Every run is judged by what it wrote (metrics, checkpoints, LoRA weights, the reward table), not
only by its exit code. One 2-process ZeRO-2 run (module fixture) serves several tests; the slower
ones are marked ``slow``. No test triggers a DeepSpeed JIT build: the optimizer is torch's AdamW
and the trainer skips DeepSpeed's shared-memory comm op on CPU.
"""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apex_fast.checkpoint import CheckpointError
from apex_fast.config import load_config
from apex_fast.train import Trainer

from _multiproc import env, free_port
from _fast import quick_run

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "apex_fast" / "train.py")
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
# tests/test_train.py's FAST config; rewards in JSON flow style (no spaces: launchers re-split arguments)
FAST = quick_run(
    "model.pretrained=tiny-random", "data.train_prompts=ocr_train.txt", "data.eval_prompts=ocr_eval.txt",
    "sample.num_steps=4", "train.lr=1e-2", "checkpoint.keep=5",
    'rewards=[{"name":"jpeg_compressibility","weight":0.5},{"name":"colorfulness","weight":0.5}]',
)
EPOCHS = 2
TIMEOUT = 420
# 1 process with micro-batch 2 == 2 processes with micro-batch 1 each: the same global micro-batches
ONE = ["train.micro_batch_size=2", f"train.epochs={EPOCHS}"]
TWO = ["train.micro_batch_size=1", f"train.epochs={EPOCHS}"]
# LoRA weights of 1 vs 2 processes after 2 epochs (4 optimizer steps): max |difference| allowed.
# The runs differ only in float rounding: a micro-batch's gradient is one GEMM over 2 samples in
# one process but two 1-sample GEMMs summed by the reduction with 2 (and ZeRO steps AdamW on flat
# shards); Adam (eps 1e-8) divides every element by its own gradient size, which magnifies
# rounding in elements whose gradient is near 0, and later epochs sample from the rounded weights.
# Measured on this config: 1.3e-5 (1 process vs 2 under ZeRO-2), 5e-6 (1 vs 2 with the torch
# engine), 6e-6 between two single-process runs that differ only in OMP_NUM_THREADS (1 vs 2);
# training moves the weights by up to 0.22, and swapping ONE sample between the two micro-batches
# of an epoch moves the result by 0.06. 2e-4 leaves 15x headroom over the rounding and is 300x
# below that composition error.
ATOL = 2e-4
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def sets(overrides) -> list[str]:
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


def run(cmd, cwd, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env(), timeout=timeout, check=False)
    proc.output = proc.stdout + proc.stderr
    return proc


def deepspeed_launch(out, *overrides, ds="ds_zero2.json", nproc=2, extra=()):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
           str(free_port()), TRAIN, "--config", TINY, "--output-dir", str(out),
           "--deepspeed", str(ROOT / "configs" / ds), *sets(FAST + list(overrides)), *extra]
    return run(cmd, cwd=out.parent)


def torchrun(out, *overrides, ds=None, nproc=2, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), TRAIN, "--config", TINY, "--output-dir", str(out), *sets(FAST + list(overrides)),
           *extra]
    if ds:
        cmd += ["--deepspeed", str(ds)]
    return run(cmd, cwd=out.parent)


def assert_clean(proc, what):
    tail = proc.output[-4000:]
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{tail}"
    assert "Traceback" not in proc.output, f"{what} printed a traceback:\n{tail}"
    assert "terminate called" not in proc.output, f"{what} aborted at exit:\n{tail}"


def metrics(out) -> list[dict]:
    return list(csv.DictReader((Path(out) / "metrics.csv").open()))


def lora(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    return load_file(str(path / "pytorch_lora_weights.safetensors" if path.is_dir() else path))


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    """`deepspeed --num_gpus 2 apex_fast/train.py --deepspeed configs/ds_zero2.json` on CPU: 2 epochs."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    proc = deepspeed_launch(out, *TWO)
    return proc, out


def test_deepspeed_launcher_trains_two_ranks_with_zero2(zero2):
    proc, out = zero2
    assert_clean(proc, "deepspeed --num_gpus 2")
    assert "change" in proc.stdout and "jpeg_compressibility" in proc.stdout  # the reward table of rank 0
    assert proc.stdout.count("eval reward per objective") == 1  # printed once, by rank 0
    rows = metrics(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("grad_norm", "policy_loss", "kl", "reward/colorfulness/mean", "reward/jpeg_compressibility/mean"):
            assert math.isfinite(float(r[key])), key
        assert float(r["grad_norm"]) > 0
        assert float(r["reward/colorfulness/nan_count"]) == 0
    for epoch in (1, 2):
        ck = out / "checkpoints" / f"checkpoint-{epoch:06d}"
        state = json.loads((ck / "state.json").read_text())
        assert state["world_size"] == 2 and state["epoch"] == epoch and state["global_step"] == 2 * epoch
        shards = sorted(p.name for p in (ck / "deepspeed" / "zero").iterdir() if "optim_states" in p.name)
        assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not list((out / "checkpoints").glob(".*"))  # no staging or temporary folder left behind
    w = lora(out / "lora")
    trained = [float(v.abs().max()) > 0 for k, v in w.items() if "lora_B" in k]  # B starts at 0
    assert sum(trained) >= len(trained) - 1  # all but the last block's unused context query
    assert max_diff(w, lora(out / "checkpoints" / "checkpoint-000002")) == 0
    # the diffusers-format LoRA written by rank 0 loads through diffusers' own loader
    from apex_fast.models import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    pipe.load_lora_weights(str(out / "lora"))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


def test_one_process_matches_two_processes(zero2, tmp_path):
    proc, two = zero2
    assert_clean(proc, "deepspeed --num_gpus 2")
    cfg = load_config(TINY, FAST + ONE + [f"log.output_dir={tmp_path / 'one'}"])
    Trainer(cfg).fit()
    w1, w2 = lora(tmp_path / "one" / "lora"), lora(two / "lora")
    after_epoch1 = lora(tmp_path / "one" / "checkpoints" / "checkpoint-000001")
    moved = max(float(v.abs().max()) for v in w1.values())
    assert moved > 100 * ATOL, "training barely moved the weights: the comparison would be vacuous"
    assert max_diff(w1, w2) <= ATOL, f"1 vs 2 processes: max |dLoRA| = {max_diff(w1, w2):.3g} > {ATOL}"
    assert max_diff(w1, after_epoch1) > 10 * ATOL  # epoch 2 changed the weights too
    # the logged epoch statistics are global-batch means, equal for 1 and 2 processes
    for r1, r2 in zip(metrics(tmp_path / "one"), metrics(two)):
        for key in ("grad_norm", "reward/colorfulness/mean", "reward/jpeg_compressibility/mean",
                    "eval/colorfulness", "zero_std_ratio"):
            if r1.get(key):
                assert float(r1[key]) == pytest.approx(float(r2[key]), rel=1e-3, abs=1e-6), (r1["epoch"], key)


def test_torchrun_resume_latest_continues_a_zero2_run_exactly(zero2, tmp_path):
    proc, straight = zero2
    assert_clean(proc, "deepspeed --num_gpus 2")
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-000001", out / "checkpoints" / "checkpoint-000001")
    rows = (straight / "metrics.csv").read_text().splitlines()
    (out / "metrics.csv").write_text("\n".join(rows[:3]) + "\n")  # header, epochs 0 and 1: a run stopped after epoch 1
    proc = torchrun(out, *TWO, ds=ROOT / "configs" / "ds_zero2.json", extra=["--resume", "latest"])
    assert_clean(proc, "torchrun --resume latest")
    assert max_diff(lora(out / "lora"), lora(straight / "lora")) == 0  # bit for bit
    assert [int(r["epoch"]) for r in metrics(out)] == [0, 1, 2]


def test_resume_with_another_process_count_is_a_clear_error(zero2, tmp_path):
    proc, two = zero2
    assert_clean(proc, "deepspeed --num_gpus 2")
    ck = two / "checkpoints" / "checkpoint-000001"
    cfg = load_config(TINY, FAST + ONE + [f"log.output_dir={tmp_path / 'x'}", f"checkpoint.resume={ck}"])
    with pytest.raises(CheckpointError, match="written by 2 processes but this run has 1"):
        Trainer(cfg).fit()


FULL = ["lora.enabled=false", "train.ema=false", "train.kl_beta=0", "train.lr=1e-4"]


def trainable_state(ckpt) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(Path(ckpt) / "state.safetensors")).items() if k.startswith("trainable")}


@pytest.mark.slow
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full-finetune"])
def test_zero3_saves_gathered_weights_and_resumes_exactly(zero2, tmp_path, full):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0). LoRA: the LoRA file, the
    EMA and the evaluation need the gathered weights; the result equals ZeRO-2's up to rounding.
    Full fine-tuning: the checkpoint's weights are gathered one at a time onto rank 0."""
    _, z2 = zero2
    ds = tmp_path / "z3.json"
    cfg = json.loads((ROOT / "configs" / "ds_zero3.json").read_text())
    cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    ds.write_text(json.dumps(cfg))
    extra = FULL if full else []
    out = tmp_path / "z3"
    p = torchrun(out, *TWO, *extra, ds=ds)
    assert_clean(p, "torchrun ZeRO-3")
    ck1, ck2 = (out / "checkpoints" / f"checkpoint-00000{e}" for e in (1, 2))
    if full:
        w3 = trainable_state(ck2)
        assert len(w3) > 50 and all(v.numel() > 0 for v in w3.values())  # every weight, full size
        assert not (out / "lora").exists()
        assert max_diff(w3, trainable_state(ck1)) > 0  # epoch 2 trained
    else:
        w3 = lora(out / "lora")
        assert all(v.numel() > 0 for v in w3.values())
        assert max_diff(w3, lora(z2 / "lora")) <= ATOL
    res = tmp_path / "z3r"
    (res / "checkpoints").mkdir(parents=True)
    shutil.copytree(ck1, res / "checkpoints" / "checkpoint-000001")
    p = torchrun(res, *TWO, *extra, ds=ds, extra=["--resume", "latest"])
    assert_clean(p, "torchrun ZeRO-3 --resume latest")
    resumed = trainable_state(res / "checkpoints" / "checkpoint-000002") if full else lora(res / "lora")
    assert max_diff(resumed, w3) == 0


@pytest.mark.slow
def test_plain_python_with_deepspeed_runs_one_process_zero1(tmp_path):
    out = tmp_path / "py"
    cmd = [sys.executable, TRAIN, "--config", TINY, "--output-dir", str(out), "--deepspeed",
           str(ROOT / "configs" / "ds_zero1.json"), *sets(FAST + ["train.micro_batch_size=2", "train.epochs=1"])]
    proc = run(cmd, cwd=tmp_path)
    assert_clean(proc, "python train.py --deepspeed")
    assert "mpi4py" not in proc.output
    ck = out / "checkpoints" / "checkpoint-000001"
    assert json.loads((ck / "state.json").read_text())["world_size"] == 1
    assert (ck / "deepspeed" / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert math.isfinite(float(metrics(out)[1]["grad_norm"]))


FAILING = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    from apex_fast import train
    from apex_fast.rewards import register_scorer

    @register_scorer("down_on_rank1")
    class DownOnRank1:  # passes the check before training, then rank 1's server is down
        name = "down_on_rank1"
        calls = 0
        def __call__(self, images, prompts, metadata):
            self.calls += 1
            if os.environ["RANK"] == "1" and self.calls > 1:
                raise ConnectionError("reward server unreachable from rank 1")
            return torch.linspace(0, 1, len(prompts))

    _run_epoch = train.Trainer.run_epoch
    def run_epoch(self, epoch):
        if epoch == 1 and self.rank == 1:
            raise RuntimeError("injected failure on rank 1")
        return _run_epoch(self, epoch)
    train.Trainer.run_epoch = run_epoch
    train.main(sys.argv[1:])
""")


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank(tmp_path):
    """Epoch 1: rank 1's reward fails -> NaN for its samples, masked the same way on both ranks
    (the rewards are gathered), training goes on. Epoch 2: rank 1 raises -> both processes exit
    non-zero within seconds, with rank 1's error: no launcher kills them here (plain processes)."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING.format(root=str(ROOT)))
    out = tmp_path / "fail"
    args = ["--config", TINY, "--output-dir", str(out), "--deepspeed", str(ROOT / "configs" / "ds_zero2.json"),
            *sets(FAST + TWO + ["train.epochs=3", "sample.group_size=4", "train.micro_batch_size=2",
                                'rewards=[{"name":"down_on_rank1","weight":0.5},{"name":"colorfulness","weight":0.5}]'])]
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        e = env()
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=tmp_path, env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=TIMEOUT)
            outs.append(so + se)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 1, outs[1][-3000:]
    assert "[apex_fast rank 1/2] training failed" in outs[1] and "injected failure on rank 1" in outs[1]
    assert procs[0].returncode == 1, outs[0][-3000:]
    assert "[apex_fast rank 0/2] training failed" in outs[0]
    rows = metrics(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1]  # epoch 1 finished, epoch 2 did not
    assert float(rows[1]["reward/down_on_rank1/nan_count"]) == 4  # rank 1's four samples
    assert math.isfinite(float(rows[1]["policy_loss"])) and float(rows[1]["grad_norm"]) > 0
    assert (out / "checkpoints" / "checkpoint-000001" / "state.json").is_file()
