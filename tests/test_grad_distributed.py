"""Per-objective gradients over ranks (gloo, CPU): the sharded Gram (each rank's partial Gram over
the shard of the averaged J it owns after one reduce-scatter, one all-reduce of K x K values) is the
one-process Gram and identical on every rank, and so is the cross-epoch Gram built from it (also after a resume from the checkpointed mean of the previous blocks); a 2-process DeepSpeed ZeRO-2 run with
balance.gradients one_backward trains like one process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apex_fast.config import load_config
from apex_fast.grad import sharded_gram
from apex_fast.train import Trainer

from _multiproc import env, free_port
from _fast import quick_run

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
FAST = quick_run(
    "model.pretrained=tiny-random", "eval.images_per_prompt=1", "data.train_prompts=ocr_train.txt",
    "data.eval_prompts=ocr_eval.txt", "sample.num_steps=4", "train.lr=1e-2", "checkpoint.every=0",
    "log.plot=false", "train.epochs=2", "balance.method=pcgrad", "balance.gradients=one_backward",
    'rewards=[{"name":"jpeg_compressibility","weight":0.5},{"name":"colorfulness","weight":0.3},{"name":"contrast","weight":0.2}]',
)
ATOL = 2e-4  # as tests/test_distributed_multiproc.py: float rounding magnified by Adam, 1 vs 2 processes

GRAM_SCRIPT = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from apex_fast.grad import EpochGram, sharded_gram
from apex_fast.runtime import Runtime
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
def blocks(rank):  # this rank's per-objective gradients: K = 3, three parameters of odd sizes
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(3, *s, generator=g) for s in [(5, 7), (11,), (2, 3, 3)]]
M = sharded_gram(blocks(r), Runtime(rank=r, world_size=w))
out = [torch.zeros_like(M) for _ in range(w)]
dist.all_gather(out, M)
mean = [sum(b) / w for b in zip(*[blocks(q) for q in range(w)])]
flat = torch.cat([b.reshape(3, -1) for b in mean], 1).double()
# balance.gram_estimate cross_epoch: each rank keeps its own previous blocks; the polarized sharded Grams
# give sym(mean J_2 mean J_1^T)
est = EpochGram("cross_epoch")
est(blocks(r), Runtime(rank=r, world_size=w))
ck = est.checkpoint_blocks(Runtime(rank=r, world_size=w))  # a checkpoint after epoch 1: the mean over ranks
M2 = est(blocks(r + 10), Runtime(rank=r, world_size=w))
resumed = EpochGram("cross_epoch")  # a resume: every rank holds the checkpoint's mean
resumed.restore_blocks(ck)
M2r = resumed(blocks(r + 10), Runtime(rank=r, world_size=w))
mean2 = [sum(b) / w for b in zip(*[blocks(q + 10) for q in range(w)])]
a = torch.cat([b.reshape(3, -1) for b in mean2], 1).double()
cross = 0.5 * (a @ flat.T + flat @ a.T)
if r == 0:
    json.dump(dict(same=all(torch.equal(o, M) for o in out), err=float((M - flat @ flat.T).abs().max()),
                   scale=float((flat @ flat.T).abs().max()), cross_err=float((M2 - cross).abs().max()),
                   cross_scale=float(cross.abs().max()), resume_err=float((M2r - M2).abs().max()),
                   persistence_err=float((resumed.persistence - est.persistence).abs().max()),
                   ck_err=max(float((c - m).abs().max()) for c, m in zip(ck, [sum(b) / w for b in zip(*[blocks(q) for q in range(w)])]))),
              open({out!r}, "w"))
dist.destroy_process_group()
"""


def test_sharded_gram_is_the_gram_of_the_mean_and_identical_on_every_rank(tmp_path):
    script, out = tmp_path / "gram.py", tmp_path / "gram.json"
    script.write_text(GRAM_SCRIPT.format(root=str(ROOT), out=str(out)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port",
                           str(free_port()), str(script)], capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["same"] and res["err"] <= 1e-5 * res["scale"], res
    assert res["cross_err"] <= 1e-5 * res["cross_scale"], res
    # the checkpoint holds the mean of the ranks' previous blocks, and a resume from it gets the same Gram
    assert res["ck_err"] <= 1e-6 and res["resume_err"] <= 1e-5 * res["cross_scale"] and res["persistence_err"] <= 1e-5, res
    one = [torch.randn(2, 4), torch.randn(2, 3)]  # one process: the plain Gram
    flat = torch.cat(one, 1).double()
    assert torch.allclose(sharded_gram(one), flat @ flat.T, atol=1e-5)


# the dual cone on the cross-epoch Gram in AdamW's metric: every rank assembles the ZeRO-2 partitions of
# AdamW's v (a collective) and keeps its own previous blocks; the update depends on the Gram through c
# (3 epochs: the Gram after epoch 2 is a cross-epoch one, which the third epoch's cone may use)
CONE = ["balance.method=apex", "balance.dual_cone=true", "balance.conflict_damping=0", "balance.warmup_epochs=0",
        "balance.gram_estimate=cross_epoch", "balance.gram_metric=adam", "train.epochs=3"]


@pytest.mark.parametrize("extra", [[], CONE], ids=["pcgrad", "apex_cone_cross_epoch_adam"])
def test_zero2_two_processes_one_backward_equal_one_process(tmp_path, extra):
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "apex_fast" / "train.py"), "--config", TINY, "--output-dir", str(two), "--deepspeed",
           str(ROOT / "configs" / "ds_zero2.json")]
    # EMA off: lora/ then holds the trained weights themselves (with EMA it is the EMA, which moves less)
    for o in FAST + ["train.micro_batch_size=1", "train.ema=false"] + extra:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env(), timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (proc.stdout + proc.stderr)[-4000:]
    Trainer(load_config(TINY, FAST + ["train.micro_batch_size=2", "train.ema=false",
                                      f"log.output_dir={tmp_path / 'one'}"] + extra)).fit()
    w1 = load_file(str(tmp_path / "one" / "lora" / "pytorch_lora_weights.safetensors"))
    w2 = load_file(str(two / "lora" / "pytorch_lora_weights.safetensors"))
    fresh = Trainer(load_config(TINY, FAST + ["train.epochs=0", f"log.output_dir={tmp_path / 'fresh'}"]))
    from apex_fast.models import lora_state_dict

    w0 = lora_state_dict(fresh.transformer)
    keys = [k for k in w1 if "lora_B" in k]
    moved = max(float(w1[k].abs().max()) for k in keys)  # lora_B starts at 0
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert moved > 100 * ATOL and diff <= ATOL, (moved, diff)
    assert len(w0) == len(w1)


def test_one_backward_under_zero3_is_a_config_error(tmp_path):
    from types import SimpleNamespace

    from apex_fast.config import ConfigError
    from apex_fast.rl.learner import GRPOLearner

    tr = Trainer(load_config(TINY, FAST + ["train.micro_batch_size=2", f"log.output_dir={tmp_path / 'z3'}"]))
    with pytest.raises(ConfigError, match="not supported under ZeRO-3"):
        GRPOLearner(tr.cfg, tr.runtime, SimpleNamespace(zero_stage=3), tr.weights, tr.balancer, tr.layout,
                    tr.pipe.scheduler)
