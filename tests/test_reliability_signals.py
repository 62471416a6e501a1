"""Signals on real tiny runs: SIGTERM stops promptly and leaves every checkpoint intact, a rank
whose launcher dies stops, SIGTERM to torchrun stops both ranks (slow)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from apex_fast.checkpoint import checkpoint_dirs, load_checkpoint
from apex_fast.run_folder import RunFolder

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "apex_fast" / "train.py")
FAST = [
    "sample.num_steps=3", "sample.group_size=2", "sample.prompts_per_epoch=2", "sample.batch_size=4",
    "sample.max_sequence_length=8", "train.micro_batch_size=2", "train.timestep_fraction=0.5",
    "eval.num_steps=2", "eval.num_prompts=2", "eval.every=0", "checkpoint.every=1", "checkpoint.keep=100",
    "log.progress=false", "log.tensorboard=false", "log.plot=false", "train.epochs=100000",
    'rewards=[{"name":"jpeg_compressibility","weight":1}]',
]


def args(out):
    a = ["--config", str(ROOT / "configs/tiny_cpu.yaml"), "--output-dir", str(out)]
    for o in FAST:
        a += ["--set", o]
    return a


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def wait_for_checkpoint(out, proc, n=2, timeout=300):
    deadline = time.monotonic() + timeout
    while len(checkpoint_dirs(out / "checkpoints")) < n:
        assert proc.poll() is None, f"trainer exited early (rc {proc.returncode})"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)


def assert_intact(out):
    found = checkpoint_dirs(out / "checkpoints")
    assert found
    for ck in found:
        load_checkpoint(ck)  # verifies every file's checksum
    assert not list((out / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left behind"
    lock = RunFolder(out)
    lock.acquire()  # nobody holds the folder any more
    lock.release()


def test_sigterm_stops_promptly_and_leaves_checkpoints_intact(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, TRAIN, *args(out)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_checkpoint(out, proc)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
        assert time.monotonic() - t0 < 30
        assert proc.returncode == 143 and "stopped by SIGTERM" in output and "--resume latest" in output
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_intact(out)


LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable] + sys.argv[1:])
    print(child.pid, flush=True)
    time.sleep(600)
""")


def test_a_rank_stops_when_its_launcher_dies(tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, TRAIN, *args(out)], stdout=subprocess.PIPE, text=True,
                                env=env(LOCAL_RANK="0"))
    child = int(launcher.stdout.readline())
    try:
        wait_for_checkpoint(out, launcher, n=1)
        launcher.kill()  # SIGKILL: the launcher cannot forward anything
        launcher.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the rank kept training after its launcher died")
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert_intact(out)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), TRAIN, *args(out)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for_checkpoint(out, proc, timeout=400)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 60 and proc.returncode != 0
        time.sleep(1)
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert not left, f"orphan ranks still running: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_intact(out)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
