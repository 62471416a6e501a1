"""The evaluation report folder: report.md (tables and what each number means), results.json
(every number), PNG plots (per-objective curves over training, priorities and hijack share,
Pareto front, gradient cosines when logged) and labelled image grids."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from .grids import save_labelled_grid

_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or not np.isfinite(x):
        return "n/a" if x is None or np.isnan(x) else ("+inf" if x > 0 else "-inf")
    return f"{x:.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def _hv(x: float) -> str:
    return "n/a" if not np.isfinite(x) else ("0" if x == 0 else f"{x:.3g}")


def _signed(x: float, digits: int = 2) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:+.{digits}f}"


# ------------------------------------------------------------------ tables


def decimals(result) -> list[int]:
    """Decimals per objective: enough for two significant digits of the base model's std (so a
    contrast of 0.118 ± 0.006 and a colorfulness of 101.9 ± 7.4 both read well)."""
    out = []
    for iv in result.metrics["base"].mean:
        scale = iv.std if np.isfinite(iv.std) and iv.std > 0 else (abs(iv.mean) if np.isfinite(iv.mean) else 1.0)
        out.append(int(np.clip(1 - math.floor(math.log10(scale)) if scale > 0 else 3, 1, 6)))
    return out


def _iv(iv, d: int, signed: bool = False) -> str:
    if iv.n == 0:
        return "n/a"
    return f"{iv.mean:{'+' if signed else ''}.{d}f} ± {iv.half_width:.{d}f}"


def summary_tables(result) -> dict[str, str]:
    names, units = result.names, result.units
    dec = decimals(result)
    head = "| model | " + " | ".join(f"{n} ({u.label})" for n, u in zip(names, units)) + " |"
    sep = "|---|" + "---|" * len(names)
    scores = [head, sep]
    for m in result.models:
        mm = result.metrics[m.label]
        scores.append(f"| {m.label} | " + " | ".join(_iv(iv, d) for iv, d in zip(mm.mean, dec)) + " |")
    head2 = ("| model | " + " | ".join(f"Δ {n}" for n in names) + " | " + " | ".join(f"{n} (σ)" for n in names)
             + " | worst (σ) | HV | Pareto |")
    imp = [head2, "|---|" + "---|" * (2 * len(names) + 3)]
    for m in result.models[1:]:
        mm = result.metrics[m.label]
        front = ("all" if mm.on_front else "") + (", run" if mm.on_run_front and mm.on_front else
                                                  ("run" if mm.on_run_front else ""))
        imp.append(f"| {m.label} | " + " | ".join(_iv(iv, d, signed=True) for iv, d in zip(mm.delta, dec))
                   + " | " + " | ".join(_signed(x) for x in mm.std_units)
                   + f" | {_signed(mm.worst)} | {_hv(mm.hypervolume)} | {front or '-'} |")
    wins = ["| model | " + " | ".join(names) + " | consensus |", "|---|" + "---|" * (len(names) + 1)]
    for m in result.models[1:]:
        w = result.metrics[m.label].wins
        cells = []
        for key in names + ["consensus"]:
            lo, hi = w[key].interval()
            cells.append("n/a" if not w[key].n else f"{100 * w[key].rate:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]")
        wins.append(f"| {m.label} | " + " | ".join(cells) + " |")
    out = {"scores": "\n".join(scores), "improvements": "\n".join(imp), "wins": "\n".join(wins)}
    if len(result.runs) > 1:
        rows = ["| run (method) | last checkpoint | " + " | ".join(f"{n} (σ)" for n in names)
                + " | worst (σ) | best checkpoint by worst (σ) | HV of its checkpoints | on the joint front |",
                "|---|---|" + "---|" * (len(names) + 4)]
        for run in result.runs:
            mine = [m for m in result.models if m.run == run.label]
            if not mine:
                continue
            last = result.metrics[mine[-1].label]
            n_front = sum(result.metrics[m.label].on_front for m in mine)
            method = getattr(getattr(run.config, "balance", None), "method", "?")
            best = max(mine, key=lambda m: -np.inf if np.isnan(result.metrics[m.label].worst) else result.metrics[m.label].worst)
            rows.append(f"| {run.label} ({method}) | epoch {mine[-1].epoch} | " + " | ".join(_signed(x) for x in last.std_units)
                        + f" | {_signed(last.worst)} | epoch {best.epoch}: {_signed(result.metrics[best.label].worst)} | "
                        f"{_hv(result.run_hypervolume.get(run.label, float('nan')))} | "
                        f"{n_front} of {len(mine)} |")
        out["runs"] = "\n".join(rows)
    return out


def console_table(result) -> str:
    """Plain-text summary printed by the command."""
    names = result.names
    w = max(12, max(len(m.label) for m in result.models) + 1)
    col = max(16, max(len(n) for n in names) + 2)
    dec = decimals(result)
    lines = [f"{'model':<{w}}" + "".join(f"{n:>{col}}" for n in names) + f"{'worst (σ)':>11}{'HV':>10}"]
    lines.append("-" * len(lines[0]))
    for m in result.models:
        mm = result.metrics[m.label]
        cells = "".join(f"{_iv(iv, d):>{col}}" for iv, d in zip(mm.mean, dec))
        extra = "" if m is result.base else f"{_signed(mm.worst):>11}{_hv(mm.hypervolume):>10}"
        lines.append(f"{m.label:<{w}}{cells}{extra}")
    units = ", ".join(f"{n}: {u.label}" for n, u in zip(names, result.units))
    note = "".join(f"\n{names[k]} is constant for every model and item: left out of worst (σ) and HV"
                   for k in result.constant)
    return "\n".join(lines) + f"\n(mean ± 95% interval half-width; units: {units}){note}"


MEANING = """\
## What the numbers mean

- **Scores** are means over the held-out items (prompts x images per prompt) sampled with the ODE
  sampler (noise level 0) from fixed per-item seeds: every model sees the same initial noise for the
  same item. Units are the papers': raw PickScore (x26), DeQA on 1..5, raw LAION aesthetic, OCR
  accuracy (0..1); other rewards in their own units. `±` is the half-width of the 95% Student-t
  interval of the mean (sample std, ddof 1). A NaN score (a sample a scorer could not score) is
  left out.
- **Δ** is the change of the mean over the base model, with the 95% interval of the *paired*
  differences (same item, same noise), tighter than comparing two unpaired intervals.
- **σ** columns: the improvement in units of the base model's std of that objective over the
  items, `(mean_model - mean_base) / std_base`, so objectives of different scales compare.
- **worst (σ)** = min over objectives of the σ improvements: the objective left furthest behind.
- **HV** (hypervolume) of one model = the volume of the box between the base (origin) and its σ
  improvement vector, i.e. the product of the positive parts (0 as soon as one objective got
  worse). HV of a run = the volume dominated by all its checkpoints together (union of boxes).
- **Pareto**: `all` = no other evaluated checkpoint is at least as good on every objective and
  better on one (in σ units); `run` = the same within its own run. Ties stay on the front together.
- **Win rate** of a model over the base per scorer: share of items where the model's image scores
  higher (ties count half), with the 95% Wilson interval; **consensus** is the majority vote of the
  scorers per item (BalancedDPO's label). The paper's metric for DPO runs.
"""


# ------------------------------------------------------------------ plots


def plot_objectives(result, path: Path) -> Path | None:
    plt = _plt()
    K = len(result.names)
    cols = 2 if K == 4 else min(K, 3)
    rows = math.ceil(K / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.4 * rows + 0.8), squeeze=False)
    span = max([c.epoch for r in result.runs for c in r.checkpoints] + [1])
    dodge = 0.012 * span  # runs' markers side by side at the same epoch
    base = result.metrics["base"]
    for k, name in enumerate(result.names):
        ax = axes[k // cols][k % cols]
        b = base.mean[k]
        ax.axhline(b.mean, color="0.3", ls="--", lw=1, label="base")
        if b.n > 1:
            ax.axhspan(b.lo, b.hi, color="0.5", alpha=0.15)
        if result.runs:
            for i, run in enumerate(result.runs):
                mine = [m for m in result.models if m.run == run.label]
                shift = (i - (len(result.runs) - 1) / 2) * dodge
                xs = [0 + shift] + [m.epoch + shift for m in mine]
                ivs = [b] + [result.metrics[m.label].mean[k] for m in mine]
                ys = np.array([iv.mean for iv in ivs])
                err = np.array([iv.half_width for iv in ivs])
                ax.errorbar(xs, ys, yerr=err, fmt="o-", ms=4, capsize=3, color=_COLORS[i % len(_COLORS)],
                            label=run.label)
                key = f"reward/{_raw_name(run, k)}/mean"
                pts = [(r["epoch"], r[key] * result.units[k].factor) for r in run.metrics
                       if key in r and np.isfinite(r[key])]
                if pts:
                    px, py = zip(*pts)
                    ax.plot(px, py, "-", lw=0.8, alpha=0.3, color=_COLORS[i % len(_COLORS)],
                            label=f"{run.label}: training batch mean (SDE)")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(_integer_ticks())
        else:
            models = result.models[1:]
            for i, m in enumerate(models):
                iv = result.metrics[m.label].mean[k]
                ax.errorbar([i], [iv.mean], yerr=[iv.half_width], fmt="o", capsize=4, color=_COLORS[i % len(_COLORS)])
            ax.set_xticks(range(len(models)), [m.label for m in models], rotation=20, ha="right", fontsize=8)
            ax.set_xlim(-0.7, len(models) - 0.3)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(result.units[k].label, fontsize=8)
        ax.grid(alpha=0.3)
    for k in range(K, rows * cols):
        axes[k // cols][k % cols].set_axis_off()
    handles, labels = axes[0][0].get_legend_handles_labels()
    sub = "eval on held-out prompts (ODE sampler; bars: 95% interval; base: dashed line, band: its 95% interval)"
    head = "per-objective score over training" if result.runs else "per-objective score of each model"
    fig.suptitle(f"{head}\n{sub}", fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    n_leg = math.ceil(len(labels) / 4)
    fig.tight_layout(rect=(0, (0.1 + 0.2 * n_leg) / (3.4 * rows + 0.8), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _raw_name(run, k: int) -> str:
    """The reward's name as the run logged it (its k-th reward)."""
    rw = run.config.rewards
    return rw[k].name if k < len(rw) else ""


def plot_training_diagnostics(result, path: Path) -> Path | None:
    """Per run: priorities pi_k, hijack share rho_k and effective share over training epochs."""
    panels = [("priority", "priority π_k (weight in the advantage)"), ("hijack_share", "hijack share ρ_k (SPEC 3)"),
              ("effective_share", "effective share of the advantage")]
    runs = [r for r in result.runs if r.metrics]
    if not runs:
        return None
    present = [(p, t) for p, t in panels if any(k.startswith(p + "/") for r in runs for row in r.metrics for k in row)]
    if not present:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(runs), len(present), figsize=(4.4 * len(present), 3.0 * len(runs) + 0.6),
                             squeeze=False)
    names = [rw.name for rw in runs[0].config.rewards]
    for i, run in enumerate(runs):
        method = getattr(run.config.balance, "method", "?")
        for j, (prefix, title) in enumerate(present):
            ax = axes[i][j]
            for k, rw in enumerate(run.config.rewards):
                key = f"{prefix}/{rw.name}"
                pts = [(r["epoch"], r[key]) for r in run.metrics if key in r and np.isfinite(r[key])]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, "-", lw=1.3, color=_COLORS[k % len(_COLORS)], label=rw.name)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{run.label} ({method}): {title}" if len(runs) > 1 else title, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_major_locator(_integer_ticks())
            ax.grid(alpha=0.3)
            if not ax.lines:
                ax.text(0.5, 0.5, "not logged by this method", ha="center", va="center", transform=ax.transAxes,
                        fontsize=8, color="0.4")
    fig.suptitle("balancing over training (from metrics.csv)", fontsize=10)
    handles = [plt.Line2D([], [], color=_COLORS[k % len(_COLORS)], lw=1.5) for k in range(len(names))]
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / (3.0 * len(runs) + 0.6), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(result, path: Path) -> Path | None:
    K = len(result.names)
    trained = result.models[1:]
    if K < 2 or not trained:
        return None
    plt = _plt()
    use = [k for k in range(K) if k not in result.constant]
    if len(use) < 2:
        return None
    pairs = list(itertools.combinations(use, 2))
    cols = min(len(pairs), 3)
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    groups = [(r.label, [m for m in trained if m.run == r.label]) for r in result.runs]
    others = [m for m in trained if m.run is None]
    if others:
        groups.append(("LoRA", others))
    for p, (a, b) in enumerate(pairs):
        ax = axes[p // cols][p % cols]
        ax.axhline(0, color="0.5", lw=0.8)
        ax.axvline(0, color="0.5", lw=0.8)
        ax.plot([0], [0], "k*", ms=10, label="base")
        for g, (label, ms) in enumerate(groups):
            su = np.array([result.metrics[m.label].std_units for m in ms])
            front = np.array([result.metrics[m.label].on_front for m in ms])
            color = _COLORS[g % len(_COLORS)]
            ax.plot(su[:, a], su[:, b], "-", color=color, lw=0.7, alpha=0.5)
            ax.scatter(su[~front, a], su[~front, b], s=22, color=color, alpha=0.6, label=f"{label}")
            ax.scatter(su[front, a], su[front, b], s=60, color=color, edgecolors="black", linewidths=1.2,
                       label=f"{label}: on Pareto front" if front.any() else None)
            for m, x, y, f in zip(ms, su[:, a], su[:, b], front):
                if f and np.isfinite(x) and np.isfinite(y):
                    txt = f"{m.epoch}" if m.epoch is not None else m.label
                    ax.annotate(txt, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel(f"{result.names[a]} improvement (base σ)", fontsize=8)
        ax.set_ylabel(f"{result.names[b]} improvement (base σ)", fontsize=8)
        ax.grid(alpha=0.3)
    for p in range(len(pairs), rows * cols):
        axes[p // cols][p % cols].set_axis_off()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle("Pareto front of checkpoints (improvement over the base in base-std units; front computed over "
                 f"all {len(use)} informative objectives,\nfront points outlined and labelled with their epoch)",
                 fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.09 if rows == 1 else 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cosines(result, path: Path) -> Path | None:
    """Mean cosine of the per-objective gradients over training (``cos/<a>/<b>`` in metrics.csv)."""
    runs = []
    for run in result.runs:
        names = [rw.name for rw in run.config.rewards]
        C = np.eye(len(names))
        seen = False
        for i, j in itertools.combinations(range(len(names)), 2):
            key = f"cos/{names[i]}/{names[j]}"
            vals = [r[key] for r in run.metrics if key in r and np.isfinite(r[key])]
            C[i, j] = C[j, i] = np.mean(vals) if vals else np.nan
            seen |= bool(vals)
        if seen:
            runs.append((run, names, C))
    if not runs:
        return None
    plt = _plt()
    K = len(runs[0][1])
    side = 1.1 * K + 2.2
    fig, axes = plt.subplots(1, len(runs), figsize=(side * len(runs) + 1.2, side), squeeze=False)
    for ax, (run, names, C) in zip(axes[0], runs):
        im = ax.imshow(C, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(C[i, j]):
                    ax.text(j, i, f"{C[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if abs(C[i, j]) > 0.6 else "black")
        ax.set_title(f"{run.label} ({run.config.balance.method})", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8,
                 label="cosine of per-objective policy gradients\n(mean over the training epochs that logged it)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------ image grids


def _notes(result, m, idx) -> str:
    width = max(len(n[:12]) for n in result.names)
    return "\n".join(f"{n[:12]:<{width}} {_fmt(m.scores[idx, k])}" for k, n in enumerate(result.names))


def _pick(models: list, most: int) -> list:
    if len(models) <= most:
        return models
    idx = np.unique(np.linspace(0, len(models) - 1, most).round().astype(int))
    return [models[i] for i in idx]


def image_grid(result, models: list, path: Path, title: str, n_prompts: int) -> Path | None:
    s = result.settings
    ipp = s.images_per_prompt
    n_prompts = min(n_prompts, len(s.prompts))
    if n_prompts == 0:
        return None
    items = [p * ipp for p in range(n_prompts)]  # the first image of each prompt
    imgs = {m.label: m.entry.load_images(items) for m in models}
    cells = [[imgs[m.label][r] for m in models] for r in range(n_prompts)]
    notes = [[_notes(result, m, i) for m in models] for i in items]
    cols = [m.label if m.label != "base" else "base model" for m in models]
    rows = [s.prompts[p][0] for p in range(n_prompts)]
    return save_labelled_grid(cells, path, row_labels=rows, col_labels=cols, notes=notes, title=title)


# ------------------------------------------------------------------ the folder


def write_report(result, out_dir: str | Path, grid_prompts: int = 4) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = result.settings
    tables = summary_tables(result)
    figs = {}
    figs["Per-objective scores over training"] = plot_objectives(result, out / "objectives.png")
    figs["Priorities, hijack share and effective share over training"] = plot_training_diagnostics(
        result, out / "balancing.png")
    figs["Pareto front of the checkpoints"] = plot_pareto(result, out / "pareto.png")
    figs["Cosines of the per-objective gradients"] = plot_cosines(result, out / "gradient_cosines.png")
    grids = {}
    if grid_prompts > 0:
        for run in result.runs:
            mine = [m for m in result.models if m.run == run.label]
            slug = run.label.replace("/", "-")
            grids[f"Images: base model vs the checkpoints of {run.label}"] = image_grid(
                result, [result.base] + _pick(mine, 6), out / f"grid_{slug}.png",
                f"{run.label}: base model vs checkpoints (same prompt, same seed; scores in paper units)", grid_prompts)
        finals = [[m for m in result.models if m.run == r.label][-1] for r in result.runs]
        finals += [m for m in result.models[1:] if m.run is None]
        if len(finals) > 1 or not result.runs:
            caption = "Images: base model vs " + ("each run's last checkpoint" if result.runs else "the LoRA")
            title = ("base model vs " + ("the last checkpoint of each run" if result.runs else "LoRA")
                     + " (same prompt, same seed; scores in paper units)")
            grids[caption] = image_grid(result, [result.base] + finals, out / "grid_methods.png", title, grid_prompts)
    what = (", ".join(f"`{r.dir}` ({r.config.balance.method}, {len([m for m in result.models if m.run == r.label])} "
                      f"checkpoints)" for r in result.runs)
            or ", ".join(f"`{m.weights.file}`" for m in result.models[1:]))
    md = [f"# Evaluation: {', '.join(r.label for r in result.runs) or ', '.join(m.label for m in result.models[1:])}", "",
          f"Evaluated: {what}. Base model `{s.model}`"
          + (f" (seed {s.model_seed})" if s.model == "tiny" else "") + f", {s.resolution} px.", "",
          f"Held-out set: {len(s.prompts)} prompts from `{s.prompt_source}` x {s.images_per_prompt} image(s) = "
          f"{len(s.items())} items; ODE sampler, {s.num_steps} steps, guidance {s.guidance_scale}, seed {s.seed} "
          f"(item i's noise: seed_for({s.seed}, 'eval', i)). Rewards: "
          + ", ".join(f"{n} ({u.label})" for n, u in zip(result.names, result.units)) + ".", ""]
    if "runs" in tables:
        md += ["## Methods side by side", "", "Last checkpoint of each run, improvement over the shared base "
               "in base-std units (σ); HV over all of the run's checkpoints.", "", tables["runs"], ""]
    if result.constant:
        md += ["**Left out of worst / HV / Pareto**: " + ", ".join(
            f"{result.names[k]} (the same score, {_fmt(float(result.base.scores[0, k]))}, for every model and item: "
            f"no information)" for k in result.constant) + ".", ""]
    md += ["## Scores (mean ± 95% interval, paper units)", "", tables["scores"], "",
           "## Improvement over the base model", "", tables["improvements"], "",
           "## Win rate over the base model, per scorer", "", tables["wins"], ""]
    pics = [(k, v) for k, v in figs.items() if v] + [(k, v) for k, v in grids.items() if v]
    if pics:
        md += ["## Figures", ""]
        for k, v in pics:
            md += [f"### {k}", "", f"![{Path(v).stem}]({Path(v).name})", ""]
    md += [MEANING]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(results_dict(result), indent=1, default=float), encoding="utf-8")
    return {"report": out / "report.md", "table": console_table(result), "figures": figs, "grids": grids}


def results_dict(result) -> dict:
    def iv(x):
        return {"mean": x.mean, "lo": x.lo, "hi": x.hi, "std": x.std, "n": x.n}

    models = []
    for m in result.models:
        mm = result.metrics[m.label]
        models.append({
            "label": m.label, "run": m.run, "epoch": m.epoch, "weights": m.weights.identity(),
            "cache": str(m.entry.dir) if m.entry is not None else None,
            "mean": {n: iv(x) for n, x in zip(result.names, mm.mean)},
            "delta": {n: iv(x) for n, x in zip(result.names, mm.delta)},
            "improvement_std_units": dict(zip(result.names, map(float, mm.std_units))),
            "worst_improvement": mm.worst, "hypervolume": mm.hypervolume, "on_pareto_front": mm.on_front,
            "on_run_pareto_front": mm.on_run_front,
            "win_rate": {k: {"rate": w.rate, "wins": w.wins, "ties": w.ties, "losses": w.losses,
                             "interval": list(w.interval())} for k, w in mm.wins.items()},
        })
    s = result.settings
    return {"objectives": result.names, "units": [u.label for u in result.units],
            "settings": {"model": s.model, "prompts": s.prompt_source, "num_prompts": len(s.prompts),
                         "images_per_prompt": s.images_per_prompt, "seed": s.seed, "num_steps": s.num_steps,
                         "guidance_scale": s.guidance_scale, "resolution": s.resolution},
            "models": models, "run_hypervolume": result.run_hypervolume,
            "runs": [{"label": r.label, "dir": str(r.dir), "method": r.config.balance.method} for r in result.runs]}
