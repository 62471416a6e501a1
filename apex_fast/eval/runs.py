"""Training runs on disk: a run folder (``log.output_dir``) holds config.yaml, metrics.csv and
checkpoints/checkpoint-<epoch>/ (the diffusers LoRA, or the full weights in state.safetensors)."""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from apex_fast.checkpoint import checkpoint_dirs

from .heldout import LORA_FILE, EvalError, FullWeights, LoraWeights, Weights

_EPOCH = re.compile(r"checkpoint-(\d+)$")


@dataclass
class Checkpoint:
    epoch: int
    path: Path
    weights: Weights


@dataclass
class Run:
    label: str
    dir: Path
    config: object  # apex_fast.config.Config
    checkpoints: list[Checkpoint]
    metrics: list[dict] = field(default_factory=list)  # metrics.csv rows (floats), by epoch


def load_run(path: str | Path, label: str | None = None, ema: bool = False) -> Run:
    from apex_fast.config import ConfigError, load_config

    d = Path(path)
    if not d.exists():
        raise EvalError(f"--run {path}: folder does not exist; pass a training run's output folder "
                        f"(its log.output_dir, e.g. outputs/tiny_cpu)")
    if not d.is_dir():
        raise EvalError(f"--run {path}: is a file, not a run folder; for a single LoRA use --lora {path}")
    if not (d / "config.yaml").is_file():
        raise EvalError(f"--run {path}: not a training run folder (no config.yaml); a run folder holds config.yaml, "
                        f"metrics.csv and checkpoints/. For a LoRA folder use --lora {path} --model <base model>")
    try:
        cfg = load_config(d / "config.yaml")
    except ConfigError as e:
        raise EvalError(f"--run {path}: its config.yaml does not load ({e})") from None
    ckpts = []
    for c in checkpoint_dirs(d / "checkpoints"):
        epoch = int(_EPOCH.search(c.name).group(1))
        if (c / LORA_FILE).is_file():
            ckpts.append(Checkpoint(epoch, c, LoraWeights(c, label=f"epoch {epoch}", ema=ema)))
        elif not cfg.lora.enabled and (c / "state.safetensors").is_file():
            ckpts.append(Checkpoint(epoch, c, FullWeights(c, label=f"epoch {epoch}")))
    if not ckpts:
        final = d / "lora"
        hint = f" Its final LoRA is in {final}: evaluate it with --lora {final}." if (final / LORA_FILE).is_file() else ""
        raise EvalError(f"--run {path}: holds no checkpoint (no complete checkpoints/checkpoint-<epoch>/ with weights); "
                        f"the run may not have reached its first checkpoint (checkpoint.every) yet.{hint}")
    return Run(label or d.resolve().name, d, cfg, ckpts, read_metrics(d / "metrics.csv"))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    with path.open() as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows


def select_checkpoints(run: Run, which: str) -> list[Checkpoint]:
    """``all`` | ``last`` | comma-separated epochs (e.g. ``10,40``)."""
    if which == "all":
        return run.checkpoints
    if which == "last":
        return run.checkpoints[-1:]
    try:
        wanted = {int(x) for x in which.split(",") if x.strip()}
    except ValueError:
        raise EvalError(f"--checkpoints {which!r}: expected all, last or comma-separated epochs like 10,40") from None
    chosen = [c for c in run.checkpoints if c.epoch in wanted]
    missing = wanted - {c.epoch for c in chosen}
    if missing:
        raise EvalError(f"--checkpoints: run {run.label} has no checkpoint at epoch(s) {sorted(missing)}; "
                        f"it has {[c.epoch for c in run.checkpoints]}")
    return chosen


def unique_labels(paths: list[Path]) -> list[str]:
    """Folder names, with the parent's name added where two runs share a name."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
