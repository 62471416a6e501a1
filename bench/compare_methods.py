"""Train the same config with several balancing methods and print one per-objective table.

    python -m bench.compare_methods --config configs/tiny_cpu.yaml --methods static apex [--set k=v ...]

Each method runs the full trainer (same seed, same prompts, same rollout noise) into
<output_dir>_<method>; the table shows each objective's eval reward at the start (shared base model)
and the end of every run, and its mean share of the advantage actually trained on
(``effective_share``: 1/K each would be balanced; the static sum shows variance hijacking). Results go to bench/results/compare_methods_<config>.json and .md.

    python -m bench.compare_methods --config configs/tiny_cpu.yaml --methods static gdpo mgda apex --seeds 0 1 2

With ``--seeds`` each (method, seed) is one run with ``train.seed`` = seed (bench/tiny_demo.py's runner:
LoRA init, rollout noise and prompt order change, eval prompts and eval seeds do not), and the table shows
each objective's change mean +- SE over seeds and the paired difference to APEX (same seed); results go to
compare_methods_<config>_seeds.json/.md. ``--merge`` adds the methods to that file's earlier runs (same
config and seeds; e.g. baselines first, APEX after a change of P^3).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from apex_fast.config import load_config
from apex_fast.train import Trainer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--methods", nargs="+", default=["static", "apex"])
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="one run per seed (train.seed), mean +- SE")
    ap.add_argument("--merge", action="store_true", help="with --seeds: keep the other methods of the results file")
    ap.add_argument("--out", default="outputs/compare_methods", help="with --seeds: run folders <out>/<method>_seed<s>")
    args = ap.parse_args(argv)
    if args.seeds is not None:
        return over_seeds(args, argv)

    runs = {}
    for method in args.methods:
        base = load_config(args.config, args.set)
        cfg = load_config(args.config, args.set + [f"balance.method={method}",
                                                   f"log.output_dir={base.log.output_dir}_{method}",
                                                   "checkpoint.new_run=true"])  # a rerun replaces the last
        t0 = time.perf_counter()
        result = Trainer(cfg).fit()
        rows = list(csv.DictReader((Path(cfg.log.output_dir) / "metrics.csv").open()))
        share = {n: sum(float(r[f"effective_share/{n}"]) for r in rows if r.get(f"effective_share/{n}")) /
                 max(1, sum(1 for r in rows if r.get(f"effective_share/{n}"))) for n in result["start"]}
        runs[method] = {**result, "effective_share": share, "seconds": time.perf_counter() - t0,
                        "output_dir": cfg.log.output_dir}
    names = list(next(iter(runs.values()))["start"])
    header = ("| objective | start | " + " | ".join(f"end ({m})" for m in runs) + " | "
              + " | ".join(f"trained share ({m})" for m in runs) + " |")
    lines = [header, "|" + "---|" * (2 + 2 * len(runs))]
    for n in names:
        start = next(iter(runs.values()))["start"][n]
        ends = " | ".join(f"{r['end'][n]:.4f} ({r['end'][n] - start:+.4f})" for r in runs.values())
        shares = " | ".join(f"{r['effective_share'][n]:.2f}" for r in runs.values())
        lines.append(f"| {n} | {start:.4f} | {ends} | {shares} |")
    table = "\n".join(lines)
    cmd = "python -m bench.compare_methods " + " ".join(sys.argv[1:] if argv is None else argv)
    print("\n" + table + "\n")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_methods_{Path(args.config).stem}"
    meta = {"command": cmd, "device": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    (out / f"{stem}.md").write_text(f"`{cmd}` ({meta['device']}, torch {meta['torch']})\n\n{table}\n")
    return runs


def _se(x) -> float:
    a = np.asarray(x, dtype=float)
    return float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")


def seeds_table(runs: dict[str, list[dict]]) -> str:
    """Per objective: start, change mean +- SE per method, paired APEX - method difference +- SE, trained share."""
    methods = list(runs)
    names = list(runs[methods[0]][0]["start"])
    others = [m for m in methods if m != "apex"] if "apex" in runs else []
    head = ("| objective (weight) | start | " + " | ".join(f"change ({m})" for m in methods)
            + "".join(f" | apex - {m}" for m in others) + " | " + " | ".join(f"trained share ({m})" for m in methods) + " |")
    lines = [head, "|" + "---|" * (2 + 2 * len(methods) + len(others))]
    for n in names:
        w = runs[methods[0]][0]["weights"].get(n)
        start = float(np.mean([r["start"][n] for r in runs[methods[0]]]))
        ch = {m: [r["end"][n] - r["start"][n] for r in runs[m]] for m in methods}
        cells = [f"{np.mean(ch[m]):+.4f} ± {_se(ch[m]):.4f}" for m in methods]
        for m in others:
            d = np.asarray(ch["apex"]) - np.asarray(ch[m])
            cells.append(f"{d.mean():+.4f} ± {_se(d):.4f}")
        cells += [f"{np.mean([r['effective_share'][n] for r in runs[m]]):.2f}" for m in methods]
        lines.append(f"| {n} ({w}) | {start:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def over_seeds(args, argv) -> dict:
    from bench.tiny_demo import run_one

    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compare_methods_{Path(args.config).stem}_seeds.json"
    runs, commands = {}, []
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        if old["meta"]["seeds"] != args.seeds or old["meta"]["config"] != args.config:
            raise SystemExit(f"--merge: {path} has config {old['meta']['config']} seeds {old['meta']['seeds']}, "
                             f"not {args.config} seeds {args.seeds}; use the same --config and --seeds or drop --merge")
        runs, commands = old["runs"], old["meta"]["commands"]
    for method in args.methods:
        runs[method] = [run_one(args.config, args.set, method, s, Path(args.out)) for s in args.seeds]
    cmd = "python -m bench.compare_methods " + " ".join(sys.argv[1:] if argv is None else argv)
    commands = commands + [cmd]
    table = seeds_table(runs)
    print("\n" + table + "\n")
    meta = {"commands": commands, "config": args.config, "seeds": args.seeds,
            "device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "seconds": {m: [r["seconds"] for r in rs] for m, rs in runs.items()}}
    path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    path.with_suffix(".md").write_text(
        "; ".join(f"`{c}`" for c in commands) + f" ({meta['device']}, torch {meta['torch']}, {meta['threads']} thread, "
        f"seeds {args.seeds}). Change = eval reward end - start (ODE, fixed eval prompts and seeds), mean ± SE over "
        f"seeds; apex - m: paired difference over seeds ± SE; trained share: mean share of the advantage.\n\n{table}\n")
    return runs


if __name__ == "__main__":
    main()
