"""Run logs: TensorBoard and CSV by default, wandb only when installed and asked for; the
per-objective start/end table and the PNG of reward curves; progress on the console (tqdm bars on a
terminal, one plain line per epoch otherwise) and the start banner."""
from __future__ import annotations

import csv
import logging
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class Tracker:
    """Logs scalar dicts per epoch. Only the main process writes (``enabled``)."""

    def __init__(self, out_dir: str | Path, *, tensorboard=True, csv_file=True, wandb=False, config: dict | None = None,
                 enabled=True, resume_epoch: int | None = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.rows: list[dict] = []
        self.csv_path = self.out_dir / "metrics.csv" if csv_file else None
        self._tb = self._wandb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.csv_path is not None and self.csv_path.exists() and resume_epoch is not None:
            with self.csv_path.open() as f:  # keep the history up to the resumed epoch
                rows = [{k: _num(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
                self.rows = [{**r, "epoch": int(r["epoch"])} for r in rows if r["epoch"] <= resume_epoch]
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as _wandb
            except ImportError:
                log.warning("log.wandb is true but wandb is not installed; logging to TensorBoard/CSV only")
            else:
                self._wandb = _wandb.init(project="apex-fast", dir=str(self.out_dir), config=config or {})

    def log(self, metrics: dict, epoch: int) -> None:
        if not self.enabled:
            return
        row = {"epoch": epoch, **{k: float(v) for k, v in metrics.items()}}
        self.rows = [r for r in self.rows if r.get("epoch") != epoch or r is row] + [row]
        if self._tb is not None:
            for k, v in metrics.items():
                if math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), epoch)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=epoch)
        if self.csv_path is not None:
            keys = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
            tmp = self.csv_path.with_suffix(".csv.tmp")
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(self.rows)
            tmp.replace(self.csv_path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _num(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def format_reward_table(names: list[str], start: dict[str, float], end: dict[str, float], title: str = "") -> str:
    """Per-objective table: start, end, change."""
    lines = [title] if title else []
    lines.append(f"{'objective':<24}{'start':>12}{'end':>12}{'change':>12}")
    lines.append("-" * 60)
    for n in names:
        s, e = start.get(n, float("nan")), end.get(n, float("nan"))
        lines.append(f"{n:<24}{s:>12.4f}{e:>12.4f}{e - s:>+12.4f}")
    return "\n".join(lines)


def plot_reward_curves(rows: list[dict], names: list[str], path: str | Path) -> Path | None:
    """One panel per objective: train batch mean per epoch and eval means (ODE sampler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows or not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, n in zip(axes[0], names):
        for key, label, style in ((f"reward/{n}/mean", "train (SDE)", "-"), (f"eval/{n}", "eval (ODE)", "o-")):
            pts = [(r["epoch"], r[key]) for r in rows if key in r and isinstance(r[key], float) and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=label, markersize=3)
        ax.set_title(n)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("reward")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# console feedback


def bars_enabled(progress: bool, rank: int, stream=None) -> bool:
    """tqdm bars only on rank 0, when ``log.progress`` and the console is a terminal: a bar redrawn
    with carriage returns would fill a log file with control characters."""
    stream = sys.stderr if stream is None else stream
    return bool(progress) and rank == 0 and getattr(stream, "isatty", lambda: False)()


def bar(total: int, desc: str, enabled: bool):
    """A tqdm bar (or a disabled one that costs nothing) for long work: sampling, evaluation, training."""
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def console(line: str, bars: bool) -> None:
    """Print a line on stdout without breaking live bars."""
    if bars:
        tqdm.write(line)
    else:
        print(line, flush=True)


def format_banner(items: dict) -> str:
    """The start banner: one ``key: value`` per line under a title line."""
    width = max(len(k) for k in items)
    return "\n".join(["apex-fast training"] + [f"  {k:<{width}}  {v}" for k, v in items.items()])


def format_epoch_line(epoch: int, epochs: int, metrics: dict, names: list[str], images: int) -> str:
    """One plain line per epoch (no control characters): rewards, loss diagnostics, timings, images/s."""
    def g(key, fmt=".4g"):
        v = metrics.get(key)
        return "nan" if v is None else format(v, fmt)

    t = metrics.get("time/epoch", 0.0) or 0.0
    parts = [f"epoch {epoch}/{epochs}"]
    parts += [f"{n}={g(f'reward/{n}/mean')}" for n in names]
    parts += [f"{n}={g(n)}" for n in ("policy_loss", "kl", "clipfrac", "grad_norm", "lr") if n in metrics]
    parts += [f"eval/{n}={g(f'eval/{n}')}" for n in names if f"eval/{n}" in metrics]
    parts.append(f"time={t:.1f}s (sample {g('time/sample', '.1f')}s, train {g('time/train', '.1f')}s)")
    if t > 0:
        parts.append(f"{images / t:.2f} img/s")
    return "  ".join(parts)
