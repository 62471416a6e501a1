"""Train the same config with several balancing methods and print one per-objective table.

    python -m bench.compare_methods --config configs/tiny_cpu.yaml --methods static apex [--set k=v ...]

Each method runs the full trainer (same seed, same prompts, same rollout noise) into
<output_dir>_<method>; the table shows each objective's eval reward at the start (shared base model)
and the end of every run, and its mean share of the advantage actually trained on
(``effective_share``: 1/K each would be balanced; the static sum shows variance hijacking). Results go to bench/results/compare_methods_<config>.json and .md.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import torch

from apex_fast.config import load_config
from apex_fast.train import Trainer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--methods", nargs="+", default=["static", "apex"])
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--results", default="bench/results")
    args = ap.parse_args(argv)

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


if __name__ == "__main__":
    main()
