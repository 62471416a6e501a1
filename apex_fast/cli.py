"""``apex-fast``: one command for the whole workflow.

    apex-fast train --config configs/tiny_cpu.yaml      # Flow-GRPO (or algorithm: dpo) training (also: --print-config, --dry-run)
    apex-fast eval --run outputs/tiny_cpu               # held-out evaluation and report of a run
    apex-fast bench ops                                 # benchmarks (from a source checkout)
    apex-fast serve --scorer deqa --port 8765           # a reward model as an HTTP scoring server
"""
from __future__ import annotations

import sys
from pathlib import Path

COMMANDS = {
    "train": "train a model with multi-reward Flow-GRPO (APEX or a baseline balancer) from a YAML config",
    "eval": "evaluate a run's checkpoints, several runs side by side, or a LoRA: scores in paper units, "
            "Pareto front, report folder",
    "bench": "run a benchmark from bench/ (ops, algorithm, compare_methods, distributed, rewards, ...)",
    "serve": "serve one reward model over HTTP (for scorers whose dependencies clash with training, e.g. DeQA)",
}

USAGE = """usage: apex-fast <command> [options]      (apex-fast <command> --help for its options)

Multi-objective alignment of SD3 / SD3.5 flow-matching text-to-image models.

commands:
{commands}

first steps:
  apex-fast train --config configs/tiny_cpu.yaml --dry-run        check config, model, rewards, output folder
  apex-fast train --config configs/tiny_cpu.yaml                  train the tiny model on CPU (a few minutes)
  apex-fast train --config configs/tiny_cpu.yaml --print-config   every config field: value, default, meaning
  apex-fast eval --run outputs/tiny_cpu                           report in outputs/tiny_cpu/eval/report.md
"""


def _usage() -> str:
    return USAGE.format(commands="\n".join(f"  {name:<7}{text}" for name, text in COMMANDS.items()))


def _bench(argv: list[str]) -> int:
    """bench/ lives in the source tree, not in the installed package: find it next to the package."""
    try:
        import bench.__main__ as bench_main  # noqa: F401
    except ImportError:
        root = Path(__file__).resolve().parent.parent
        if not (root / "bench" / "__main__.py").is_file():
            print("apex-fast bench: the benchmarks are not part of the installed package; run it from a source "
                  "checkout (git clone ... && pip install -e .) or use `python -m bench <name>` there", file=sys.stderr)
            return 2
        sys.path.insert(0, str(root))
        import bench.__main__ as bench_main  # noqa: F811
    sys.argv = ["apex-fast bench", *argv]
    try:
        bench_main.main()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else (print(e.code, file=sys.stderr) or 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from apex_fast import train

        sys.argv = ["apex-fast train", *rest]  # argparse's prog in usage lines
        train.main(rest)
        return 0
    if cmd == "eval":
        from apex_fast.eval.evaluate import main as eval_main

        return eval_main(rest, prog="apex-fast eval")
    if cmd == "bench":
        return _bench(rest)
    if cmd == "serve":
        from apex_fast.rewards.server import main as serve_main

        return serve_main(rest, prog="apex-fast serve")
    print(f"apex-fast: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
