"""``apex-fast eval``: held-out evaluation of a run's checkpoints, of several runs side by side, or
of one LoRA, in the paper's units, with the cross-objective metrics and a report folder.

    apex-fast eval --run outputs/tiny_cpu                       # base + every checkpoint of the run
    apex-fast eval --run outputs/static --run outputs/apex      # methods side by side (same noise)
    apex-fast eval --lora path/to/lora --model tiny --rewards colorfulness,contrast
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics as M
from .cache import EvalCache, default_cache_dir
from .runs import Run, load_run, select_checkpoints, unique_labels
from .heldout import BaseWeights, EvalError, EvalSettings, HeldOutSampler, LoraWeights, Weights, reward_key
from .units import paper_unit

log = logging.getLogger(__name__)


@dataclass
class ModelScores:
    """One evaluated model: the base, a run's checkpoint, or a LoRA."""

    label: str
    run: str | None
    epoch: int | None
    weights: Weights
    scores: np.ndarray | None = None  # [N, K] in paper units
    entry: object = None  # its cache entry (images for the grids)


@dataclass
class ModelMetrics:
    mean: list  # [K] Interval of the mean, paper units
    delta: list  # [K] Interval of mean(model - base) over paired samples
    std_units: np.ndarray  # [K] improvement in base-std units
    worst: float
    hypervolume: float  # of this model's improvement vector alone (box volume)
    wins: dict  # scorer (and "consensus") -> WinRate vs the base
    on_front: bool = False  # Pareto front over every evaluated checkpoint
    on_run_front: bool = False  # Pareto front within its own run


@dataclass
class EvalResult:
    settings: EvalSettings
    names: list[str]
    units: list
    models: list[ModelScores]  # base first
    runs: list[Run] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # label -> ModelMetrics (the base too)
    run_hypervolume: dict = field(default_factory=dict)  # run label -> hypervolume of its checkpoints
    sampled: int = 0  # images sampled in this call (0: everything came from the cache)
    constant: list = field(default_factory=list)  # objectives left out of worst / HV / Pareto (constant scores)
    seconds: float = 0.0

    @property
    def base(self) -> ModelScores:
        return self.models[0]


def _unit(spec):
    """Paper unit of a config reward: by its scorer type; a remote reward by the scorer it serves,
    named by ``args.name`` or else by the reward's key (``{name: deqa, type: remote}``)."""
    t = getattr(spec, "type", None) or spec.name
    if t == "remote" and "name" not in spec.args:
        return paper_unit(spec.name, spec.args)
    return paper_unit(t, spec.args)


def collect_scores(models: list[ModelScores], settings: EvalSettings, cache: EvalCache, progress: bool = True,
                   sampler: HeldOutSampler | None = None) -> int:
    """Fill ``m.scores`` [N, K] (paper units) for every model, from the cache where possible; the
    pipeline and the scorers are built only if something is missing. Returns images sampled."""
    from tqdm.auto import tqdm

    from apex_fast.rewards import make_scorer, score_all

    n = len(settings.items())
    prompts = [p for p, _ in settings.items()]
    meta = [dict(m) for _, m in settings.items()]
    keys = [reward_key(r) for r in settings.rewards]
    factors = np.array([_unit(r).factor for r in settings.rewards])
    sampler = sampler or HeldOutSampler(settings)
    scorers: dict[int, object] = {}
    for m in models:
        m.entry = cache.entry({**settings.sample_key(), "weights": m.weights.identity()})
    todo = [m for m in models if not m.entry.has_images(n)]
    for m in todo:  # e.g. a LoRA that does not fit the model: fail before sampling anything
        m.weights.check(sampler.pipe)
    bar = tqdm(total=n * len(todo), desc="eval sampling", unit="img", disable=not progress or not todo)
    try:
        for m in models:
            images = None
            if m in todo:
                bar.set_postfix_str(m.label)
                images = sampler.sample(m.weights, progress=bar)
                m.entry.save_images(images)
            cols = []
            for k, (spec, key) in enumerate(zip(settings.rewards, keys)):
                col = m.entry.scores(key)
                if col is None or len(col) != n:
                    if images is None:
                        images = m.entry.load_images()
                    if k not in scorers:
                        scorers[k] = make_scorer(getattr(spec, "type", None) or spec.name, **spec.args)
                        scorers[k].name = spec.name  # the reward's key
                    col = score_all([scorers[k]], images, prompts, meta,
                                    timeout_s=getattr(spec, "timeout_s", None))[:, 0].double().numpy()
                    m.entry.save_scores(key, col)
                cols.append(col)
            m.scores = np.stack(cols, 1) * factors
    finally:
        bar.close()
    return sampler.samples_drawn


def constant_objectives(models: list[ModelScores]) -> list[int]:
    """Objectives whose score is one and the same value for every model and item (e.g. OCR on a model
    that renders no text): they carry no information and would pin the worst improvement to 0 and
    every hypervolume to 0, so the cross-objective metrics leave them out (and say so)."""
    allv = np.concatenate([m.scores for m in models])
    out = []
    for k in range(allv.shape[1]):
        col = allv[:, k][np.isfinite(allv[:, k])]
        if col.size and np.all(col == col[0]):
            out.append(k)
    return out


def compute_metrics(result: EvalResult) -> None:
    base = result.base.scores
    K = base.shape[1]
    result.constant = constant_objectives(result.models)
    use = [k for k in range(K) if k not in result.constant] or list(range(K))
    for m in result.models:
        su = M.improvement_in_base_std(m.scores, base)
        finite = np.isfinite(su[use])
        result.metrics[m.label] = ModelMetrics(
            mean=[M.mean_interval(m.scores[:, k]) for k in range(K)],
            delta=[M.paired_difference_interval(m.scores[:, k], base[:, k]) for k in range(K)],
            std_units=su, worst=M.worst_improvement(su[use]),
            hypervolume=M.hypervolume(su[use][None]) if finite.all() else float("nan"),
            wins=M.win_rates(m.scores, base, result.names))
    trained = [m for m in result.models[1:]]
    if trained:
        pts = np.stack([result.metrics[m.label].std_units[use] for m in trained])
        for m, on in zip(trained, M.pareto_front(pts)):
            result.metrics[m.label].on_front = bool(on)
    for run in result.runs:
        mine = [m for m in trained if m.run == run.label]
        if not mine:
            continue
        pts = np.stack([result.metrics[m.label].std_units[use] for m in mine])
        for m, on in zip(mine, M.pareto_front(pts)):
            result.metrics[m.label].on_run_front = bool(on)
        ok = np.isfinite(pts).all(1)
        result.run_hypervolume[run.label] = M.hypervolume(pts[ok]) if ok.any() else float("nan")


def evaluate(runs: list[Run] | None = None, loras: list[tuple[str, str]] | None = None, *,
             settings: EvalSettings, cache: EvalCache | None = None, checkpoints: str = "all",
             progress: bool = True, sampler: HeldOutSampler | None = None) -> EvalResult:
    """Score the base model and every selected checkpoint (or LoRA) on ``settings``' held-out items."""
    t0 = time.perf_counter()
    runs = runs or []
    models = [ModelScores("base", None, 0, BaseWeights())]
    for run in runs:
        for c in select_checkpoints(run, checkpoints):
            models.append(ModelScores(f"{run.label} @{c.epoch}" if len(runs) > 1 else f"epoch {c.epoch}",
                                      run.label, c.epoch, c.weights))
    for label, path in loras or []:
        models.append(ModelScores(label, None, None, LoraWeights(path, label=label)))
    if not settings.rewards:
        raise EvalError("--rewards: no reward to score with; give e.g. --rewards colorfulness,contrast")
    cache = cache or EvalCache()
    sampled = collect_scores(models, settings, cache, progress=progress, sampler=sampler)
    names = [r.name if r.name != "remote" else str(r.args.get("name", "remote")) for r in settings.rewards]
    result = EvalResult(settings, names, [_unit(r) for r in settings.rewards], models, runs,
                        sampled=sampled)
    compute_metrics(result)
    result.seconds = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------ command line


def parse_rewards(text: str):
    """``colorfulness,contrast`` or a YAML list as in a config: ``[{name: ocr, args: {...}}]``."""
    import yaml

    from apex_fast.config import ConfigError, RewardSpec, from_dict

    text = text.strip()
    if text.startswith("["):
        try:
            items = yaml.safe_load(text)
            return [from_dict(RewardSpec, it, f"--rewards[{i}]") for i, it in enumerate(items)]
        except (yaml.YAMLError, ConfigError, AttributeError, TypeError) as e:
            raise EvalError(f"--rewards: not a valid YAML list of rewards ({e}); e.g. "
                            f"--rewards '[{{name: ocr, args: {{engine: rapidocr}}}}]' or --rewards ocr,contrast") from None
    from apex_fast.rewards import available_scorers

    specs = [RewardSpec(name=n.strip()) for n in text.split(",") if n.strip()]
    for s in specs:
        if s.name not in available_scorers():
            raise EvalError(f"--rewards: unknown reward {s.name!r}; available: {', '.join(available_scorers())}")
    return specs


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, 100)


def build_parser(prog: str = "apex-fast eval") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("Evaluate a training run's checkpoints, several runs side by side, or a LoRA on held-out "
                    "prompts with the ODE sampler (the same seeds, so the same initial noise, for the base model, "
                    "every checkpoint and every method). Reports each objective in the paper's units with a 95% "
                    "interval, the improvement over the base (also in base-std units), the worst-objective "
                    "improvement, the hypervolume and the Pareto front, per-scorer win rates over the base, and "
                    "writes a report folder (report.md, PNG plots, labelled image grids). Results are cached per "
                    "(weights, prompt set, seed): a re-run is instant and a new checkpoint costs only itself."),
        epilog="examples:\n"
               "  apex-fast eval --run outputs/tiny_cpu_apex\n"
               "  apex-fast eval --run outputs/tiny_cpu_apex_static --run outputs/tiny_cpu_apex_apex --out outputs/compare\n"
               "  apex-fast eval --lora outputs/tiny_cpu_apex/lora --model tiny --rewards colorfulness,contrast\n"
               "  apex-fast eval --run outputs/sd35m --rewards pickscore,aesthetic --num-prompts 64 --device cuda\n\n"
               + _wrap("Settings not given come from the (first) run's config.yaml: model, eval prompts "
                       "(data.eval_prompts, eval.num_prompts), eval.images_per_prompt, eval.seed, eval.num_steps, "
                       "sample.guidance_scale, and its rewards. The base model's scores equal the run's own "
                       "start-of-training eval (same items, same noise)."))
    src = ap.add_argument_group("what to evaluate")
    src.add_argument("--run", action="append", default=[], metavar="DIR",
                     help="training run folder (its log.output_dir); repeat to compare runs (methods) side by side")
    src.add_argument("--lora", action="append", default=[], metavar="PATH",
                     help="a diffusers-format LoRA (folder with pytorch_lora_weights.safetensors, or the file); repeatable")
    src.add_argument("--model", default=None, help="base model for --lora: 'tiny', a hub id or a local diffusers folder "
                                                   "(default: the run's model.pretrained)")
    src.add_argument("--config", default=None, help="YAML config to take eval settings and rewards from (with --lora)")
    src.add_argument("--checkpoints", default="all", help="all (default), last, or epochs like 10,40")
    src.add_argument("--ema", action="store_true",
                     help="evaluate each checkpoint's EMA weights from its state.safetensors (what the run's own "
                          "eval used, train.ema); the exported LoRA file holds the same EMA in checkpoints written "
                          "since the exported LoRA became the EMA, the raw weights in older ones")
    how = ap.add_argument_group("how to evaluate (default: the run's config)")
    how.add_argument("--rewards", default=None, help="rewards to score with: names (pickscore,aesthetic,deqa,ocr) or a "
                                                     "YAML list like the config's rewards: section")
    how.add_argument("--prompts", default=None, help="held-out prompt file (.txt or .jsonl; shipped names like ocr_eval.txt)")
    how.add_argument("--num-prompts", type=int, default=None, help="first N prompts of the prompt file")
    how.add_argument("--images-per-prompt", type=int, default=None)
    how.add_argument("--seed", type=int, default=None, help="noise seed of the eval items")
    how.add_argument("--steps", type=int, default=None, help="ODE sampling steps")
    how.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    how.add_argument("--batch-size", type=int, default=None, help="images per transformer call")
    how.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    out = ap.add_argument_group("output")
    out.add_argument("--out", default=None, help="report folder (default: <run>/eval for one run, "
                                                 "outputs/eval/<a>_vs_<b> otherwise)")
    out.add_argument("--cache-dir", default=None,
                     help=f"evaluation cache (default: $APEX_FAST_EVAL_CACHE or {default_cache_dir()})")
    out.add_argument("--grid-prompts", type=int, default=4, help="prompts shown in the image grids (default 4)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def settings_from_args(args, runs: list[Run]) -> EvalSettings:
    import torch

    from apex_fast.config import ConfigError, load_config

    if runs:
        cfg = runs[0].config
        for r in runs[1:]:
            a, b = cfg.model, r.config.model
            if (a.pretrained, a.seed, a.resolution) != (b.pretrained, b.seed, b.resolution):
                raise EvalError(f"--run {r.dir}: trained from model {b.pretrained!r} (seed {b.seed}, {b.resolution} px) "
                                f"but --run {runs[0].dir} from {a.pretrained!r} (seed {a.seed}, {a.resolution} px); "
                                f"compare runs of the same base model")
        if args.model and args.model != cfg.model.pretrained:
            raise EvalError(f"--model {args.model}: the run was trained from {cfg.model.pretrained!r}; drop --model")
    else:
        if not args.model and not args.config:
            raise EvalError("--lora needs --model (tiny, a hub id or a local folder: the base the LoRA was trained on) "
                            "or --config")
        if not args.config and not args.rewards:
            raise EvalError("--lora without a run needs --rewards (e.g. --rewards pickscore,aesthetic) or --config")
        overrides = [f"model.pretrained={args.model}"] if args.model else []
        try:
            if args.config:
                cfg = load_config(args.config, overrides)
            else:  # the defaults name no reward, so they do not validate: --rewards supplies them
                from apex_fast.config_doc import load_unvalidated

                cfg = load_unvalidated(None, overrides)
        except ConfigError as e:
            raise EvalError(f"--config: {e}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        s = EvalSettings.from_config(cfg, prompt_source=args.prompts, num_prompts=args.num_prompts,
                                     images_per_prompt=args.images_per_prompt, seed=args.seed, num_steps=args.steps,
                                     guidance_scale=args.guidance, batch_size=args.batch_size, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None
    if args.rewards:
        s.rewards = parse_rewards(args.rewards)
    elif runs:
        for r in runs[1:]:
            if [x.name for x in r.config.rewards] != [x.name for x in s.rewards]:
                log.warning("run %s was trained with rewards %s; all runs are scored with %s (the first run's; "
                            "choose with --rewards)", r.label, [x.name for x in r.config.rewards],
                            [x.name for x in s.rewards])
    for name, v, lo in (("--num-prompts", args.num_prompts, 1), ("--images-per-prompt", args.images_per_prompt, 1),
                        ("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                        ("--grid-prompts", args.grid_prompts, 0)):
        if v is not None and v < lo:
            raise EvalError(f"{name}: must be >= {lo}, got {v}")
    return s


def lora_label(path: str | Path) -> str:
    """A readable name: the folder, with its run for a run's lora/ or checkpoint-N/."""
    p = Path(path).resolve()
    p = p.parent if p.is_file() else p
    if p.name == "lora":
        return f"{p.parent.name}/lora"
    if p.name.startswith("checkpoint-") and p.name[11:].isdigit():
        return f"{p.parent.parent.name} @{int(p.name[11:])}"
    return p.name


def default_out(args, runs: list[Run]) -> Path:
    if args.out:
        return Path(args.out)
    if len(runs) == 1 and not args.lora:
        return runs[0].dir / "eval"
    names = [r.label for r in runs] + [lora_label(p) for p in args.lora]
    names = [n.replace("/", "-").replace(" @", "-") for n in names]
    return Path("outputs") / "eval" / "_vs_".join(names)


def main(argv=None, prog: str = "apex-fast eval") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if not args.run and not args.lora:
            raise EvalError("nothing to evaluate: give --run DIR (a training run) or --lora PATH --model ID")
        run_dirs = [Path(p) for p in args.run]
        runs = [load_run(p, label, ema=args.ema) for p, label in zip(run_dirs, unique_labels(run_dirs))]
        settings = settings_from_args(args, runs)
        loras = [(lora_label(p), p) for p in args.lora]
        result = evaluate(runs, loras, settings=settings, cache=EvalCache(args.cache_dir),
                          checkpoints=args.checkpoints, progress=not args.no_progress)
        from .report import write_report

        out = write_report(result, default_out(args, runs), grid_prompts=args.grid_prompts)
    except EvalError as e:
        print(f"apex-fast eval: error: {e}", file=sys.stderr)
        return 2
    print(out["table"])
    how = "all from the cache" if result.sampled == 0 else f"{result.sampled} images sampled"
    print(f"\nreport: {out['report']}  ({how}, {result.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
