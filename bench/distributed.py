"""Training throughput of 1 vs 2 processes at the tiny config (samples/s; recorded, not asserted).

    OMP_NUM_THREADS=1 python -m bench distributed [--epochs 4] [--config configs/tiny_cpu.yaml]

Runs apex_fast/train.py on the same global batch and the same global micro-batches:
  * 1 process (torch engine), micro-batch B, 1 thread and 2 threads;
  * 2 processes (torchrun, torch engine) and 2 processes (deepspeed launcher, ZeRO-2), micro-batch
    B/2 each, 1 thread per process.
samples/s of an epoch = images per epoch / (rollout incl. scoring + train seconds of that epoch, as
rank 0 logs them: rank 0 waits for the other rank in the collectives, so this is the job's time); the
median over the epochs after the first (warm-up). The wall time of the whole command (start-up,
evaluation at start and end, checkpoint) is reported too. Writes bench/results/distributed_cpu.json.
On a shared machine the numbers move with its load: the load average is recorded with them.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "apex_fast" / "train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_case(name, launcher, nproc, mbs, threads, args, out, ds=None) -> dict:
    overrides = [f"train.micro_batch_size={mbs}", f"train.epochs={args.epochs}", "eval.every=0", "eval.num_prompts=2",
                 "eval.num_steps=2", "checkpoint.every=0", "log.progress=false", "log.tensorboard=false",
                 "log.plot=false"]
    cmd_tail = [TRAIN, "--config", args.config, "--output-dir", str(out)]
    for o in overrides:
        cmd_tail += ["--set", o]
    if ds:
        cmd_tail += ["--deepspeed", str(ROOT / "configs" / ds)]
    if launcher == "python":
        cmd = [sys.executable, *cmd_tail]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *cmd_tail]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", str(free_port()), *cmd_tail]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r.get("time/train")]
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    n = cfg["sample"]["prompts_per_epoch"] * cfg["sample"]["group_size"]
    # time/sample includes the scoring (overlapped with sampling, then the wait for the last batch)
    per_epoch = [float(r["time/sample"]) + float(r["time/train"]) for r in rows]
    steady = per_epoch[1:] or per_epoch
    sec = statistics.median(steady)
    return {
        "name": name, "launcher": launcher, "processes": nproc, "threads_per_process": threads,
        "micro_batch_per_process": mbs, "engine": ds or "torch", "images_per_epoch": n,
        "epoch_seconds": [round(x, 3) for x in per_epoch],
        "median_epoch_seconds": round(sec, 3), "samples_per_s": round(n / sec, 3),
        "median_sample_seconds": round(statistics.median(float(r["time/sample"]) for r in rows[1:] or rows), 3),
        "median_train_seconds": round(statistics.median(float(r["time/train"]) for r in rows[1:] or rows), 3),
        "wall_seconds": round(wall, 1), "load_average_before": round(load0, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=16, help="global micro-batch (per process: / processes)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed_cpu.json"))
    args = ap.parse_args(argv)
    import deepspeed
    import torch

    B = args.micro_batch
    cases = [
        ("1 process, 1 thread", "python", 1, B, 1, None),
        ("1 process, 2 threads", "python", 1, B, 2, None),
        ("2 processes (torchrun, torch engine)", "torchrun", 2, B // 2, 1, None),
        ("2 processes (deepspeed, ZeRO-2)", "deepspeed", 2, B // 2, 1, "ds_zero2.json"),
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, launcher, nproc, mbs, threads, ds) in enumerate(cases):
            print(f"running: {name} ...", flush=True)
            results.append(run_case(name, launcher, nproc, mbs, threads, args, Path(tmp) / f"run{i}", ds))
    base = results[0]["samples_per_s"]
    print(f"\ntraining throughput, {Path(args.config).name}, {args.epochs} epochs "
          f"({results[0]['images_per_epoch']} images/epoch), {cpu_name()}, {os.cpu_count()} cores")
    print(f"{'case':40s} {'samples/s':>10s} {'x 1 proc':>9s} {'epoch s':>8s} {'sample s':>9s} {'train s':>8s} {'wall s':>7s} {'load':>5s}")
    for r in results:
        print(f"{r['name']:40s} {r['samples_per_s']:10.2f} {r['samples_per_s'] / base:9.2f} {r['median_epoch_seconds']:8.2f} "
              f"{r['median_sample_seconds']:9.2f} {r['median_train_seconds']:8.2f} {r['wall_seconds']:7.1f} "
              f"{r['load_average_before']:5.1f}")
    record = {
        "bench": "distributed", "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT)
        else args.config, "epochs": args.epochs, "global_micro_batch": B,
        "device": {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": None, "backend": "gloo"},
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()},
        "note": "samples/s = images per epoch / median epoch seconds after the first epoch (rank 0's rollout with "
                "scoring + train time); recorded, not asserted. The machine may be shared: see load averages.",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
