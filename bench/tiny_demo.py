"""The demo on the pretrained tiny SD3, over seeds: does training raise every objective beyond noise,
and which objective drives the advantage with each balancer? Results: bench/results/tiny_demo.{json,md,png}
and tiny_demo_samples.png (labelled eval samples, start vs end, same prompts and seeds).

    OMP_NUM_THREADS=1 python -m bench.tiny_demo [--config configs/tiny_cpu.yaml] [--methods static apex] [--seeds 0 1 2]

Each (method, seed) is one full run of the trainer with ``train.seed`` = seed (LoRA init, rollout
noise, prompt order); the eval prompts and eval seeds are the same for every run, so "start" is the
same base model measurement. Reported per method and objective: the eval change end - start, mean
over seeds with a 95% t-interval (n = 3: mean +- 4.30 sd / sqrt 3), and the mean hijack share
(SPEC 3's rho_k, from the in-group reward stds) and effective share (the objective's share of the
advantage actually trained on) over epochs, and the fraction of epochs in which each holds more than half
of either (a sparse objective hijacks episodically).

Methods can run in parallel processes (``--methods static --results /tmp/a`` and ``--methods apex
--results /tmp/b``), then ``--methods static apex --reuse`` summarises the finished runs under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from apex_fast.config import load_config
from apex_fast.train import Trainer

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _mean_col(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "") and math.isfinite(float(r[key]))]
    return float(np.mean(vals)) if vals else float("nan")


def interval(x: list[float]) -> tuple[float, float]:
    """mean and 95% t half-width"""
    a = np.asarray(x, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(T95.get(len(a) - 1, 1.96) * a.std(ddof=1) / math.sqrt(len(a)))


def run_one(config: str, sets: list[str], method: str, seed: int, out_root: Path, reuse: bool = False) -> dict:
    out = out_root / f"{method}_seed{seed}"
    done = out / "bench_run.json"
    if reuse and done.is_file():  # finished by an earlier (or a parallel) invocation with the same settings
        prev = json.loads(done.read_text())
        if prev.get("sets") == list(sets) and prev.get("config") == str(config):
            print(f"reusing {out}", flush=True)
            return prev["result"]
    cfg = load_config(config, sets + [f"balance.method={method}", f"train.seed={seed}", f"log.output_dir={out}",
                                      "log.progress=false", "log.tensorboard=false"])
    t0 = time.perf_counter()
    result = Trainer(cfg).fit()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    names = list(result["start"])
    curves = {n: [(int(r["epoch"]), float(r[f"eval/{n}"])) for r in rows if r.get(f"eval/{n}") not in (None, "")]
              for n in names}
    res = {"start": result["start"], "end": result["end"], "seconds": round(time.perf_counter() - t0, 1),
           "hijack_share": {n: _mean_col(rows, f"hijack_share/{n}") for n in names},
           "effective_share": {n: _mean_col(rows, f"effective_share/{n}") for n in names},
           "eval_curves": curves, "output_dir": str(out),
           "weights": {r.name: r.weight for r in cfg.rewards}, "epochs": cfg.train.epochs}
    done.write_text(json.dumps({"config": str(config), "sets": list(sets), "result": res}, indent=1) + "\n")
    return res


def over_half(output_dir: str, key: str) -> float:
    """Fraction of a run's epochs in which `key` (e.g. hijack_share/ocr) is above 0.5: a sparse
    objective's hijacking is episodic (only epochs where some rollouts score), so its mean understates it."""
    rows = list(csv.DictReader((Path(output_dir) / "metrics.csv").open()))
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "") and math.isfinite(float(r[key]))]
    return float(np.mean([v > 0.5 for v in vals])) if vals else float("nan")


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for method, rs in runs.items():
        names = list(rs[0]["start"])
        out[method] = {}
        for n in names:
            ch = [r["end"][n] - r["start"][n] for r in rs]
            m, h = interval(ch)
            out[method][n] = {"weight": rs[0]["weights"].get(n), "start": float(np.mean([r["start"][n] for r in rs])),
                              "change_mean": m, "change_ci95": h, "changes": ch,
                              "raised_beyond_ci": bool(m - h > 0) if math.isfinite(h) else None,
                              "hijack_share": float(np.mean([r["hijack_share"][n] for r in rs])),
                              "effective_share": float(np.mean([r["effective_share"][n] for r in rs])),
                              "epochs_hijack_over_half": float(np.mean([over_half(r["output_dir"], f"hijack_share/{n}") for r in rs])),
                              "epochs_effective_over_half": float(np.mean([over_half(r["output_dir"], f"effective_share/{n}") for r in rs]))}
    return out


def table(summary: dict) -> str:
    methods = list(summary)
    names = list(summary[methods[0]])
    head = "| objective (weight) | start | " + " | ".join(f"change ({m}), 95% CI" for m in methods) + " | " + \
        " | ".join(f"hijack share ({m})" for m in methods) + " | " + " | ".join(f"trained share ({m})" for m in methods) + \
        " | " + " | ".join(f"epochs trained share > 0.5 ({m})" for m in methods) + " |"
    lines = [head, "|" + "---|" * (2 + 4 * len(methods))]
    for n in names:
        s = summary[methods[0]][n]
        cells = [f"{summary[m][n]['change_mean']:+.4f} +- {summary[m][n]['change_ci95']:.4f}" for m in methods]
        cells += [f"{summary[m][n]['hijack_share']:.2f}" for m in methods]
        cells += [f"{summary[m][n]['effective_share']:.2f}" for m in methods]
        cells += [f"{summary[m][n]['epochs_effective_over_half']:.2f}" for m in methods]
        lines.append(f"| {n} ({s['weight']}) | {s['start']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(runs.values()))[0]["start"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
    for ax, n in zip(axes[0], names):
        for method, rs in runs.items():
            for i, r in enumerate(rs):
                xs, ys = zip(*r["eval_curves"][n])
                ax.plot(xs, ys, "o-", color="C0" if method == "static" else ("C1" if method == "apex" else None),
                        alpha=0.8, markersize=3, label=method if i == 0 else None)
        ax.set_title(f"{n} (w={runs[next(iter(runs))][0]['weights'].get(n)})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("eval reward (ODE)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("tiny SD3 demo: eval reward per objective, one line per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def eval_tiles(png: Path, per_prompt: int, n_prompts: int, size: int = 64) -> list[np.ndarray]:
    """The first `n_prompts` x `per_prompt` images of a trainer eval grid (apex_fast.eval.grids: one
    framed square per image, one row per prompt), cut back out of the PNG along the axes frames and
    resized to `size` (they are drawn enlarged with nearest interpolation)."""
    from PIL import Image

    im = np.asarray(Image.open(png).convert("RGB"))
    dark = im.astype(int).sum(2) < 150
    cols = np.flatnonzero(dark.sum(0) > 0.4 * im.shape[0])  # frame columns run the whole grid's height
    left, box = int(cols[0]), int(cols[1] - cols[0])  # first frame's left edge and the box's side
    pitch = int(cols[2] - cols[0]) if per_prompt > 1 else None
    top = int(np.flatnonzero(dark[:, left + 2:left + box - 2].all(1))[0])  # first frame's top edge
    row_pitch = None
    for r in range(top + box + 1, im.shape[0]):  # the next frame's top edge
        if dark[r, left + 2:left + box - 2].all() and dark[r + box, left + 2:left + box - 2].all():
            row_pitch = r - top
            break
    tiles = []
    for i in range(n_prompts):
        for c in range(per_prompt):
            y, x = top + i * row_pitch + 1, left + (c * pitch if c else 0) + 1
            tile = Image.fromarray(im[y:y + box - 1, x:x + box - 1]).resize((size, size), Image.NEAREST)
            tiles.append(np.asarray(tile))
    return tiles


def samples_figure(runs: dict[str, dict], prompts: list[str], per_prompt: int, path: Path, n_prompts: int = 6) -> None:
    """Eval samples, start (epoch 0, the base model) vs the end of one run per method, same prompts
    and seeds, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n_prompts = min(n_prompts, len(prompts))  # an eval with fewer prompts shows them all
    rows = []
    for i, (method, run) in enumerate(runs.items()):
        grids = sorted((Path(run["output_dir"]) / "samples").glob("eval_epoch*.png"))
        if i == 0:
            rows.append((eval_tiles(grids[0], per_prompt, n_prompts), "start"))
        rows.append((eval_tiles(grids[-1], per_prompt, n_prompts), f"end ({method})"))

    def tile(tiles, i):
        return tiles[i]

    fig, axes = plt.subplots(len(rows), n_prompts, figsize=(1.9 * n_prompts, 0.4 + 2.1 * len(rows)), squeeze=False)
    for j in range(n_prompts):
        i = j * per_prompt
        for row, (grid, label) in enumerate(rows):
            ax = axes[row, j]
            ax.imshow(tile(grid, i), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label)
        words = prompts[j].replace(" background", " background,").replace(" with the word", "")
        axes[0, j].set_title(textwrap.fill(words, 24), fontsize=7)
    names = ", ".join(Path(r["output_dir"]).name for r in runs.values())
    fig.suptitle(f"eval samples (ODE, same prompts and seeds): the base model vs the end of {names}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--methods", nargs="+", default=["static", "apex"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default="outputs/tiny_demo")
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--name", default="tiny_demo")
    ap.add_argument("--reuse", action="store_true",
                    help="take (method, seed) runs already finished under --out with the same config and --set "
                         "(e.g. run methods in parallel processes, then once more with --reuse for the summary)")
    args = ap.parse_args(argv)
    runs = {m: [run_one(args.config, args.set, m, s, Path(args.out), args.reuse) for s in args.seeds]
            for m in args.methods}
    summary = summarize(runs)
    tab = table(summary)
    print("\n" + tab + "\n")
    cmd = "python -m bench.tiny_demo " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": cmd, "device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "seeds": args.seeds}
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / f"{args.name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1) + "\n")
    (res / f"{args.name}.md").write_text(f"`{cmd}` ({meta['device']}, torch {meta['torch']}, seeds {args.seeds})\n\n{tab}\n")
    plot_curves(runs, res / f"{args.name}.png")
    cfg = load_config(args.config, args.set)
    from apex_fast.data import load_prompts

    prompts = [p for p, _ in load_prompts(cfg.data.eval_prompts)][: cfg.eval.num_prompts]
    samples_figure({m: runs[m][0] for m in args.methods}, prompts, cfg.eval.images_per_prompt,
                   res / f"{args.name}_samples.png")
    return summary


if __name__ == "__main__":
    main()
