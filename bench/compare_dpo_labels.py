"""Train BalancedDPO with several label modes on the same config and print one table (the paper's
comparison: majority vote vs DPO on one scorer, vanilla and normalized aggregation, random labels).

    python -m bench.compare_dpo_labels --config configs/tiny_dpo.yaml --labels balanced_vote vanilla_sum single

Each label runs the full trainer (same seed, prompts, rollout noise, eval prompts and seeds) into
<output_dir>_<label>. The table shows, per scorer and on the consensus vote, the win rate of the
trained model over the base model on the held-out prompts (0.5: no change), and each objective's
eval reward change; plus how often each scorer agreed with the training labels. Results go to
bench/results/compare_dpo_labels_<config>.json and .md.
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
    ap.add_argument("--config", default="configs/tiny_dpo.yaml")
    ap.add_argument("--labels", nargs="+", default=["balanced_vote", "vanilla_sum", "single"])
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. seed7)")
    args = ap.parse_args(argv)

    runs = {}
    for label in args.labels:
        base = load_config(args.config, args.set)
        cfg = load_config(args.config, args.set + [f"dpo.label={label}", f"log.output_dir={base.log.output_dir}_{label}"])
        t0 = time.perf_counter()
        result = Trainer(cfg).fit()
        rows = list(csv.DictReader((Path(cfg.log.output_dir) / "metrics.csv").open()))
        names = [r.name for r in cfg.rewards]
        agree = {}
        for n in names:
            vals = [float(r[f"dpo/agree/{n}"]) for r in rows if r.get(f"dpo/agree/{n}") not in (None, "", "nan")]
            agree[n] = sum(vals) / len(vals) if vals else float("nan")
        runs[label] = {**result, "agreement": agree, "seconds": time.perf_counter() - t0,
                       "output_dir": cfg.log.output_dir, "names": names}
    names = next(iter(runs.values()))["names"]
    labels = list(runs)
    lines = ["| scorer | " + " | ".join(f"win rate ({m})" for m in labels) + " | start | "
             + " | ".join(f"change ({m})" for m in labels) + " | " + " | ".join(f"agrees ({m})" for m in labels) + " |",
             "|" + "---|" * (2 + 3 * len(labels))]
    for n in [*names, "consensus"]:
        wr = " | ".join(f"{r['end'].get(f'winrate/{n}', float('nan')):.3f}" for r in runs.values())
        if n == "consensus":
            lines.append(f"| **{n}** | {wr} | | " + " | ".join("" for _ in labels) + " | " + " | ".join("" for _ in labels) + " |")
            continue
        start = next(iter(runs.values()))["start"][n]
        ch = " | ".join(f"{r['end'][n] - start:+.4f}" for r in runs.values())
        ag = " | ".join(f"{r['agreement'][n]:.2f}" for r in runs.values())
        lines.append(f"| {n} | {wr} | {start:.4f} | {ch} | {ag} |")
    table = "\n".join(lines)
    cmd = "python -m bench.compare_dpo_labels " + " ".join(sys.argv[1:] if argv is None else argv)
    print("\n" + table + "\n")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_dpo_labels_{Path(args.config).stem}" + (f"_{args.tag}" if args.tag else "")
    meta = {"command": cmd, "device": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "seconds": {m: r["seconds"] for m, r in runs.items()}}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    (out / f"{stem}.md").write_text(f"`{cmd}` ({meta['device']}, torch {meta['torch']})\n\n{table}\n")
    return runs


if __name__ == "__main__":
    main()
