"""Evaluation: held-out ODE sampling and scoring in paper units, cross-objective metrics
(intervals, improvements, worst objective, hypervolume, Pareto front, win rates), the cache and the
report folder. ``apex-fast eval`` is ``apex_fast.eval.evaluate.main``.

    from apex_fast.eval import evaluate, load_run, EvalSettings, write_report
    run = load_run("outputs/tiny_cpu")
    result = evaluate([run], settings=EvalSettings.from_config(run.config))
    write_report(result, "outputs/tiny_cpu/eval")
"""
from .cache import EvalCache, default_cache_dir
from .evaluate import EvalResult, ModelMetrics, ModelScores, evaluate
from .grids import save_labelled_grid, save_prompt_grid
from .metrics import (
    Interval, WinRate, hypervolume, improvement_in_base_std, mean_interval, paired_difference_interval, pareto_front,
    t_quantile, win_rates, worst_improvement,
)
from .report import write_report
from .runs import Run, load_run
from .heldout import BaseWeights, EvalError, EvalSettings, HeldOutSampler, LoraWeights, check_lora_fits
from .units import PaperUnit, paper_unit

__all__ = [
    "EvalCache", "default_cache_dir", "EvalResult", "ModelMetrics", "ModelScores", "evaluate", "save_labelled_grid",
    "save_prompt_grid", "Interval", "WinRate", "hypervolume", "improvement_in_base_std", "mean_interval",
    "paired_difference_interval", "pareto_front", "t_quantile", "win_rates", "worst_improvement", "write_report",
    "Run", "load_run", "BaseWeights", "EvalError", "EvalSettings", "HeldOutSampler", "LoraWeights", "check_lora_fits",
    "PaperUnit", "paper_unit",
]
