"""The overrides that shrink a training run to seconds for the tests of the trainer's machinery: 2
prompts x 2 images per epoch, short prompts, half the steps trained, no eval, a checkpoint every
epoch, no progress bar or TensorBoard. Each test file adds what it needs; a later override wins."""

QUICK_RUN = [
    "sample.group_size=2", "sample.prompts_per_epoch=2", "sample.batch_size=4", "sample.max_sequence_length=8",
    "train.timestep_fraction=0.5", "eval.num_steps=2", "eval.num_prompts=2", "eval.every=0", "checkpoint.every=1",
    "log.progress=false", "log.tensorboard=false",
]


def quick_run(*extra: str) -> list[str]:
    """QUICK_RUN followed by `extra` (which may replace any of its values)."""
    return QUICK_RUN + list(extra)


def deepspeed_one_process(tmp_path, out, overrides: list[str], timeout: int = 420):
    """Train configs/tiny_cpu.yaml with ``overrides`` as ONE process under DeepSpeed ZeRO-2
    (configs/ds_zero2.json) into ``out``, the way a user launches it (apex_fast/train.py in a subprocess,
    no inherited launcher variables); asserts it exits 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    args = [sys.executable, str(root / "apex_fast/train.py"), "--config", str(root / "configs/tiny_cpu.yaml"),
            "--output-dir", str(out), "--deepspeed", str(root / "configs/ds_zero2.json")]
    for o in overrides:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"},
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
