"""One training epoch, apex-fast now vs an older commit (default dde0c09), side by side on the same
work: Flow-GRPO's one-GPU OCR recipe scaled to the tiny SD3 with T5 (bench/flowgrpo_parity.yaml:
64 images per epoch, 10 SDE steps, 9 trained, CFG 4.5 in sampling and training, KL 0.04, EMA,
LoRA r=32), 1 thread.

    git worktree add /tmp/old_dde0c09 dde0c09   # plus its apex_fast/_C*.so and apex_fast/kernels link
    OMP_NUM_THREADS=1 python bench/epoch.py --old /tmp/old_dde0c09 --epochs 10 \
        --new-set train.timesteps_per_forward=9 --new-set model.compile=true

One warm-up epoch per trainer is run first and left out of the medians (its time is in the JSON as
warmup_epoch_seconds: with model.compile it includes compiling).

Each trainer lives in its own worker process (both packages are called apex_fast); the parent
alternates them epoch by epoch (old, new, new, old, ...) so load on a shared machine hits both
alike, and reports medians of the per-epoch images/s and of every phase: sampling (transformer
steps of the rollout), decoding, scoring wait, advantages (gather + balancer), training forward
(with grad), unconditional forward (no grad), KL reference forward (LoRA off), backward, optimizer
(+ EMA), other (loss math, logging, host syncs). Results: bench/results/epoch_cpu.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).resolve().parent / "flowgrpo_parity.yaml"
PHASES = ("sampling", "decoding", "scoring_wait", "advantages", "train_forward", "uncond_forward",
          "kl_reference_forward", "backward", "optimizer", "other")


# ------------------------------------------------------------------ the worker (one trainer)


class Clock:
    """Exclusive times per phase: a phase entered inside another pauses the outer one."""

    def __init__(self):
        self.t = dict.fromkeys(PHASES, 0.0)
        self.stack: list[list] = []

    @contextlib.contextmanager
    def phase(self, name):
        now = time.perf_counter()
        if self.stack:
            outer = self.stack[-1]
            self.t[outer[0]] += now - outer[1]
        self.stack.append([name, now])
        try:
            yield
        finally:
            end = time.perf_counter()
            n, start = self.stack.pop()
            self.t[n] += end - start
            if self.stack:
                self.stack[-1][1] = end

    def wrap(self, obj, attr, name_fn):
        orig = getattr(obj, attr)

        def wrapped(*a, **k):
            name = name_fn(*a, **k) if callable(name_fn) else name_fn
            if name is None:
                return orig(*a, **k)
            with self.phase(name):
                return orig(*a, **k)

        setattr(obj, attr, wrapped)


def worker(src: str, model_dir: str, overrides: list[str]) -> None:
    sys.path.insert(0, src)
    import torch

    torch.set_num_threads(1)
    import apex_fast.train as train_mod
    from apex_fast.config import load_config
    from peft.tuners.lora import LoraLayer

    cfg = load_config(CONFIG, [f"model.pretrained={model_dir}", *overrides])
    tr = train_mod.Trainer(cfg)
    clock = Clock()
    state = {"training": False}
    lora_mod = next(m for m in tr.transformer.modules() if isinstance(m, LoraLayer))
    base_weight = lora_mod.base_layer.weight  # swapped for the merged one under model.compile

    def forward_phase(*a, **k):
        if not state["training"]:
            return None  # sampling's forwards are the sampling phase
        if torch.is_grad_enabled():
            return "train_forward"
        reference = lora_mod.disable_adapters and lora_mod.base_layer.weight is base_weight
        return "kl_reference_forward" if reference else "uncond_forward"

    # a compiled transformer (model.compile) is timed around the compiled call, not inside it
    compiled = getattr(tr.transformer, "_compiled_call_impl", None) is not None
    clock.wrap(tr.transformer, "_compiled_call_impl" if compiled else "forward", forward_phase)
    new = hasattr(tr, "learner")
    sampling_mod = sys.modules["apex_fast.sampling"] if new else train_mod
    clock.wrap(sampling_mod, "decode_latents", "decoding")
    orig_async = sampling_mod.score_all_async

    def score_async(*a, **k):
        fut = orig_async(*a, **k)
        res = fut.result

        def timed_result(*ra, **rk):
            with clock.phase("scoring_wait"):
                return res(*ra, **rk)

        fut.result = timed_result
        return fut

    sampling_mod.score_all_async = score_async
    clock.wrap(tr.engine, "backward", "backward")
    clock.wrap(tr.engine, "step", "optimizer")
    owner = tr.learner if new else tr
    if hasattr(getattr(owner, "ema", None), "update"):  # the old trainer updates its EMA inline ("other")
        clock.wrap(owner.ema, "update", "optimizer")
    orig_train = owner.train_epoch

    def train_epoch(*a, **k):
        state["training"] = True
        try:
            with clock.phase("other"):
                return orig_train(*a, **k)
        finally:
            state["training"] = False

    owner.train_epoch = train_epoch
    clock.wrap(tr, "rollout", "sampling")
    orig_run = tr.run_epoch
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        epoch = int(line)
        clock.t = dict.fromkeys(PHASES, 0.0)
        t0 = time.perf_counter()
        with clock.phase("advantages"):  # what is not inside another phase: gather, balancer, metrics
            orig_run(epoch)
        total = time.perf_counter() - t0
        n = cfg.sample.prompts_per_epoch * cfg.sample.group_size
        print(json.dumps({"epoch": epoch, "seconds": total, "images_per_s": n / total, "phases": clock.t}), flush=True)


# ------------------------------------------------------------------ the parent


def build_model(path: Path) -> None:
    """The tiny SD3 with a tiny T5 as a diffusers folder (as ../shared/bench/build_tiny_sd3_t5.py)."""
    if (path / "model_index.json").is_file():
        return
    sys.path.insert(0, str(ROOT))
    from apex_fast.models.tiny import build_tiny_pipeline

    build_tiny_pipeline(seed=0, with_t5=True).save_pretrained(path)


def start(src: str, model_dir: Path, overrides: list[str], out_dir: Path, name: str):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=src)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", src, "--model", str(model_dir),
           "--set", f"log.output_dir={out_dir / name}", *sum((["--set", o] for o in overrides), [])]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=env, cwd=str(out_dir))
    msg = _read(p)
    assert msg.get("ready"), msg
    return p


def _read(p) -> dict:
    for line in p.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"worker exited (rc {p.wait()})")


def run_epoch(p, epoch: int) -> dict:
    p.stdin.write(f"{epoch}\n")
    p.stdin.flush()
    return _read(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="/tmp/old_dde0c09", help="worktree of the old commit")
    ap.add_argument("--old-label", default="dde0c09")
    ap.add_argument("--epochs", type=int, default=8, help="measured epochs per trainer (after 1 warm-up each)")
    ap.add_argument("--model", default="/tmp/parity/tiny_sd3_t5")
    ap.add_argument("--out", default="/tmp/bench_epoch")
    ap.add_argument("--new-set", action="append", default=[],
                    help="extra overrides for the new trainer only (e.g. train.reuse_rollout=false)")
    ap.add_argument("--result", default=str(ROOT / "bench" / "results" / "epoch_cpu.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.set)
    model_dir, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_model(model_dir)
    # the new trainer with Flow-GRPO's accumulation (the recipe's 2 optimizer steps per epoch); the
    # old commit has none and steps after every micro-batch
    new_set = ["train.optimizer_steps_per_epoch=2", *args.new_set]
    procs = {"old": start(args.old, model_dir, [], out, "old"), "new": start(str(ROOT), model_dir, new_set, out, "new")}
    runs = {"old": [], "new": []}
    warmup = {}
    load = [os.getloadavg()[0]]
    for i in range(args.epochs + 1):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        for name in order:
            r = run_epoch(procs[name], i)
            print(f"epoch {i} {name}: {r['seconds']:.2f} s, {r['images_per_s']:.2f} img/s", flush=True)
            if i > 0:  # epoch 0 warms up (first calls, allocator, oneDNN primitives, model.compile's compiling)
                runs[name].append(r)
            else:
                warmup[name] = r["seconds"]
        load.append(os.getloadavg()[0])
    for p in procs.values():
        p.stdin.close()
        p.wait(timeout=60)

    def med(name, key):
        return statistics.median(r[key] for r in runs[name])

    result = {
        "images_per_s": {"new": med("new", "images_per_s"), "old": med("old", "images_per_s")},
        "ratio": med("new", "images_per_s") / med("old", "images_per_s"),
        # the same epoch index of both ran back to back: their ratio is less exposed to load drift
        "ratio_per_epoch_pair_median": statistics.median(
            n["images_per_s"] / o["images_per_s"] for n, o in zip(runs["new"], runs["old"])),
        "seconds_per_epoch": {"new": med("new", "seconds"), "old": med("old", "seconds")},
        "phases": {name: {ph: statistics.median(r["phases"][ph] for r in runs[name]) for ph in PHASES}
                   for name in runs},
        "epochs": args.epochs,
        "warmup_epoch_seconds": warmup,  # not in the medians; with model.compile it includes compiling
        "per_epoch_images_per_s": {name: [round(r["images_per_s"], 3) for r in runs[name]] for name in runs},
        "old_commit": args.old_label,
        "new_overrides": new_set,
        "load_average_1min": {"median": statistics.median(load), "min": min(load), "max": max(load)},
        "device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, 1 thread, shared machine",
        "command": "OMP_NUM_THREADS=1 python bench/epoch.py " + " ".join(sys.argv[1:]),
        "config": "bench/flowgrpo_parity.yaml",
        "notes": "sampling: the rollout's transformer steps (new: including the KL reference, computed in the "
                 "same batched forward); phases are medians over epochs, so they need not sum to the median total",
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("images_per_s", "ratio", "phases", "load_average_1min")}, indent=1))


if __name__ == "__main__":
    main()
