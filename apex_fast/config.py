"""Run configuration: dataclasses, YAML files, dotted CLI overrides, validation whose errors name
the field (e.g. ``train.lr``) and say how to fix it.

    cfg = load_config("configs/tiny_cpu.yaml", overrides=["train.lr=1e-4", "balance.method=apex"])
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .balance.config import BalanceConfig
from .dpo.config import DPOConfig


class ConfigError(ValueError):
    """A bad config value; the message names the field."""


LORA_TARGETS = [
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
]


@dataclass
class ModelConfig:
    pretrained: str = "tiny"  # "tiny" (embedded pretrained testbed) | "tiny-random" (random, from seed) | hub id | local diffusers folder
    seed: int = 0  # seed of the "tiny-random" model's weights
    dtype: str = "fp32"  # fp32 | bf16 | fp16: frozen weights; LoRA and the SDE math stay fp32
    resolution: int = 64  # image side in pixels
    gradient_checkpointing: bool = False
    attention_backend: str = "sdpa"  # sdpa | xformers
    compile: bool = False  # torch.compile the transformer (first call of each shape compiles; GRPO, torch engine, gradients proxy)
    revision: str | None = None
    variant: str | None = None


@dataclass
class LoRAConfig:
    enabled: bool = True  # false: full fine-tuning of the transformer
    rank: int = 32
    alpha: int = 64
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # start from an existing LoRA: a diffusers file/folder (pytorch_lora_weights.safetensors, as
    # written in lora/ and checkpoints) or a peft folder (adapter_model.safetensors, Flow-GRPO's
    # checkpoints); rank, alpha and targets must match. The KL reference stays the base model.
    init_from: str | None = None  # start from an existing LoRA: diffusers file/folder or peft folder (same rank/targets)


@dataclass
class DataConfig:
    train_prompts: str = "tiny_train.txt"  # .txt (one per line) or .jsonl ({"prompt": ...}); bare names resolve to apex_fast/data/prompts
    eval_prompts: str = "tiny_eval.txt"


@dataclass
class SDEWindowConfig:
    """Flow-GRPO-Fast / MixGRPO: SDE steps only inside a window of ``size`` steps (ODE outside), only
    the window's steps trained. The window's start is drawn per epoch in [range[0], range[1] - size]
    (``schedule: random``, Flow-GRPO-Fast) or slides by one step every ``shift_every`` epochs
    (``schedule: sliding``, MixGRPO)."""

    size: int = 0  # 0: off (every step stochastic, the first train.timestep_fraction trained)
    range: list[int] | None = None  # [lo, hi): where the window may lie; null: [0, num_steps - 1]
    schedule: str = "random"  # random | sliding
    shift_every: int = 1  # sliding: epochs between shifts


@dataclass
class SampleConfig:
    num_steps: int = 10  # SDE sampling steps
    guidance_scale: float = 4.5
    noise_level: float = 0.7  # a in SPEC 1; 0 = deterministic ODE
    group_size: int = 24  # images per prompt (G)
    prompts_per_epoch: int = 48  # groups per epoch (global, over all ranks)
    batch_size: int = 8  # images per transformer call while sampling (per rank)
    max_sequence_length: int = 128  # T5 tokens (zeros when the model has no T5 encoder)
    sde_window: SDEWindowConfig = field(default_factory=SDEWindowConfig)  # Flow-GRPO-Fast / MixGRPO SDE window


@dataclass
class TrainConfig:
    epochs: int = 100
    seed: int = 42
    lr: float = 3e-4
    weight_decay: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4  # PPO ratio clip eps_c
    kl_beta: float = 0.04  # beta of the KL to the LoRA-disabled reference (0 disables)
    # flow_grpo: ||mu - mu_ref||^2 / (2 sigma_t^2), Flow-GRPO's code, so its beta values mean the same;
    # exact: / (2 sigma_t^2 |dt|), the exact KL of the two Gaussian steps (3.7x-25x larger at 10 steps)
    kl_form: str = "flow_grpo"  # flow_grpo: KL / (2 sigma_t^2) as Flow-GRPO | exact: / (2 sigma_t^2 |dt|)
    timestep_fraction: float = 0.99  # fraction of the SDE steps that are trained
    micro_batch_size: int = 8  # samples per forward/backward (per rank)
    # micro-batches whose gradients are averaged into one optimizer step (Flow-GRPO's
    # train.gradient_accumulation_steps); must divide the micro-batches per epoch. Its SD3.5 recipes
    # take 2 optimizer steps per epoch: gradient_accumulation = micro-batches per epoch / 2
    gradient_accumulation: int = 1  # micro-batches per optimizer step (Flow-GRPO gradient_accumulation_steps)
    # or, independent of the process count: optimizer steps per epoch (per inner epoch), e.g. 2 as
    # Flow-GRPO's SD3.5 recipes; sets gradient_accumulation = micro-batches per epoch / this (0: off)
    optimizer_steps_per_epoch: int = 0  # or: optimizer steps per epoch (Flow-GRPO SD3.5: 2); 0 = use gradient_accumulation
    lr_schedule: str = "constant"  # constant | constant_with_warmup | linear | cosine (diffusers' schedules)
    lr_warmup_steps: int = 0  # optimizer steps of linear warmup from 0 (constant_with_warmup, linear, cosine)
    inner_epochs: int = 1  # passes over one epoch's samples
    # the rollout's batched forwards also serve training (the same numbers, fewer forwards): the KL
    # reference (LoRA off, CFG) is computed in the sampling forward of each trained step (per-sample
    # LoRA on/off), and the unconditional velocity is reused until the first optimizer step of the
    # epoch. Costs 2 latents per sample and trained step of memory. false: recompute them in training
    reuse_rollout: bool = True  # KL reference and unconditional velocity from the rollout's forwards (same numbers)
    # trained timesteps of a micro-batch stacked into one forward/backward (the same gradient: the loss
    # is a sum over timesteps); fewer, larger calls, activation memory x this. 1: one at a time (Flow-GRPO)
    timesteps_per_forward: int = 1  # trained timesteps stacked per forward/backward (memory x this)
    ema: bool = True  # EMA of the trainable weights, used for evaluation
    ema_decay: float = 0.9
    ema_every: int = 8  # optimizer steps between EMA updates
    # Flow-GRPO's warm-up: decay min(ema_decay, (1 + t) / (10 + t)) after optimizer step t (false: ema_decay from
    # the first update, so the EMA keeps (ema_decay)^n of the initial weights after n updates)
    ema_warmup: bool = True
    gram_every: int = 1  # balance.gradients proxy: epochs between Gram probes for balancers that want one (0: never)
    reward_max_failures: int = 5  # stop after a reward fails a whole batch this many times in a row (0: never)
    max_nonfinite_steps: int = 3  # optimizer steps with a non-finite loss/gradient are skipped; stop after this many in a row


@dataclass
class RewardSpec:
    name: str = ""  # the reward's unique key: column of R, metrics, logs, errors, balancer state
    type: str | None = None  # scorer type (ocr, pickscore, remote, ...); null: the same as name
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the scorer
    timeout_s: float = 600.0  # bound of every call (a batch): longer gives NaN for the batch
    allow_unscorable: bool = False  # true: a batch NaN for every sample is legitimate (OCR on prompts
    #                                 without quoted text), not a failure counted by train.reward_max_failures

    @property
    def scorer_type(self) -> str:
        return self.type or self.name


@dataclass
class EvalConfig:
    every: int = 10  # epochs between evaluations (0: only at start and end)
    num_steps: int = 40  # ODE steps
    num_prompts: int = 16
    images_per_prompt: int = 1
    seed: int = 1234


@dataclass
class LogConfig:
    output_dir: str = "outputs/run"
    tensorboard: bool = True
    csv: bool = True
    wandb: bool = False  # only if installed
    plot: bool = True
    progress: bool = True  # tqdm bars


@dataclass
class CheckpointConfig:
    every: int = 10  # epochs between checkpoints (0: only at the end)
    keep: int = 3  # most recent checkpoints kept
    resume: str | None = None  # None | "latest" (none yet: start fresh) | path to a checkpoint folder
    force_resume: bool = False  # resume although the run's identity changed (base model, reward weights/types/order, balancer)
    new_run: bool = False  # start a new run in a folder that holds one (its files move to previous-runs/<run id>/)


ALGORITHMS = ("grpo", "dpo")


@dataclass
class Config:
    algorithm: str = "grpo"  # grpo: Flow-GRPO with a balancer (balance.*) | dpo: BalancedDPO (dpo.*)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rewards: list[RewardSpec] = field(default_factory=list)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)  # used when algorithm: dpo
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: str | None = None  # path to a DeepSpeed JSON config (ZeRO); None = plain torch

    def validate(self) -> "Config":
        _validate(self)
        return self


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-4 as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"{path}: unknown field; valid fields of {where or 'the config'}: {', '.join(sorted(names))}")
        kwargs[key] = _convert(hints[key], value, path)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def apply_override(data: dict, override: str) -> None:
    """``a.b.c=value`` (value parsed as YAML) into the nested dict; ``rewards.0.weight=2`` (or
    ``rewards[0].weight=2``) indexes lists.
    Errors name the override (``--set KEY=VALUE``) and what is wrong with it."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected the form section.field=value, e.g. train.lr=1e-4")
    key, raw = override.split("=", 1)
    where = f"--set {override}"
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}: the value {raw!r} is not valid YAML ({first}); quote it, e.g. "
                          f"--set '{key}=\"...\"', and write lists/mappings as [a, b] / {{k: v}}") from None
    # rewards[0].weight (how errors name fields) is rewards.0.weight
    parts = re.sub(r"\[\s*(-?\d+)\s*\]", r".\1", key.strip()).split(".")
    node: Any = data
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        path = ".".join(parts[: i + 1])
        if isinstance(node, list):
            try:
                j = int(p)
                if not -len(node) <= j < len(node):
                    raise IndexError
            except ValueError:
                raise ConfigError(f"{where}: {'.'.join(parts[:i]) or 'the config'} is a list; {p!r} is not an index "
                                  f"(write e.g. {'.'.join(parts[:i])}.0.{'.'.join(parts[i + 1:]) or 'field'})") from None
            except IndexError:
                raise ConfigError(f"{where}: index {p} is out of range for {'.'.join(parts[:i])}, a list of "
                                  f"{len(node)} (valid: 0..{len(node) - 1})") from None
            if last:
                node[j] = value
            else:
                node = node[j]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"{where}: {path} is a value ({node!r}), not a section")
        else:  # pragma: no cover - guarded above
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} is not a section")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file {str(p)!r} does not exist; pass a YAML file such as configs/tiny_cpu.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {p} must hold a mapping of sections (model:, train:, ...)")
    for o in overrides or []:
        apply_override(data, o)
        if not isinstance(data, dict):  # pragma: no cover - apply_override keeps the root a dict
            raise ConfigError(f"--set {o}: the config must stay a mapping of sections")
    cfg = from_dict(Config, data)
    given = data.get("balance") if isinstance(data.get("balance"), dict) else {}
    cfg.balance = cfg.balance.with_captured_gradient_defaults(given, kl=cfg.train.kl_beta > 0 and cfg.lora.enabled)
    return cfg.validate()


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# validation


LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def sde_window_range(s: SampleConfig) -> tuple[int, int]:
    """[lo, hi) where sample.sde_window may lie (default: every step but the last, as timestep_fraction)."""
    r = s.sde_window.range
    return (0, s.num_steps - 1) if r is None else (int(r[0]), int(r[1]))


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _validate(c: Config) -> None:
    _require(c.model.dtype in ("fp32", "bf16", "fp16"), "model.dtype", f"{c.model.dtype!r} is not one of fp32, bf16, fp16")
    _require(c.model.attention_backend in ("sdpa", "xformers"), "model.attention_backend",
             f"{c.model.attention_backend!r} is not one of sdpa, xformers")
    if c.model.compile:
        _require(c.algorithm == "grpo", "model.compile", f"supported with algorithm: grpo, not {c.algorithm}; "
                 f"set model.compile: false")
        _require(not c.deepspeed, "model.compile", "not supported under DeepSpeed (its engine wraps the module); "
                 "use DeepSpeed's own \"compile\" section in the JSON, or drop --deepspeed")
        _require(c.balance.gradients == "proxy", "model.compile", f"needs balance.gradients: proxy (the "
                 f"{c.balance.gradients} capture replaces the LoRA linears' backward); set model.compile: false")
    if c.balance.cone_kl:
        _require(c.balance.method == "apex", "balance.cone_kl", f"is APEX's (dual_cone); got balance.method: "
                 f"{c.balance.method}; set balance.method: apex or cone_kl: false")
        _require(c.train.kl_beta > 0 and c.lora.enabled, "balance.cone_kl",
                 "counts the KL term, and this run has none (train.kl_beta 0 or full fine-tuning): "
                 "set train.kl_beta > 0 or cone_kl: false")
    _require(c.model.resolution >= 16 and c.model.resolution % 16 == 0, "model.resolution",
             f"must be a multiple of 16 and >= 16, got {c.model.resolution}")
    _require(c.lora.rank >= 1, "lora.rank", f"must be >= 1, got {c.lora.rank}")
    _require(c.lora.alpha > 0, "lora.alpha", f"must be > 0, got {c.lora.alpha}")
    _require(len(c.lora.target_modules) > 0, "lora.target_modules", "must name at least one module")
    s = c.sample
    _require(s.num_steps >= 2, "sample.num_steps", f"must be >= 2, got {s.num_steps}")
    _require(s.noise_level > 0, "sample.noise_level",
             f"must be > 0 for training (the SDE log-probs of GRPO need noise; evaluation uses the ODE sampler "
             f"by itself), got {s.noise_level}; Flow-GRPO uses 0.7")
    _require(s.group_size >= 2, "sample.group_size",
             f"must be >= 2 (group-relative advantages of a group of 1 are all 0), got {s.group_size}")
    _require(s.prompts_per_epoch >= 1, "sample.prompts_per_epoch", f"must be >= 1, got {s.prompts_per_epoch}")
    _require(s.batch_size >= 1, "sample.batch_size", f"must be >= 1, got {s.batch_size}")
    w = s.sde_window
    _require(w.size >= 0, "sample.sde_window.size", f"must be >= 0, got {w.size}")
    _require(w.schedule in ("random", "sliding"), "sample.sde_window.schedule",
             f"{w.schedule!r} is not one of random, sliding")
    _require(w.shift_every >= 1, "sample.sde_window.shift_every", f"must be >= 1, got {w.shift_every}")
    _require(w.range is None or len(w.range) == 2, "sample.sde_window.range", f"must be [lo, hi] or null, got {w.range}")
    if w.size:
        lo, hi = sde_window_range(s)
        _require(0 <= lo < hi <= s.num_steps and w.size <= hi - lo, "sample.sde_window",
                 f"range [{lo}, {hi}) must lie in [0, sample.num_steps={s.num_steps}] and hold size={w.size} steps")
        _require(s.noise_level > 0, "sample.sde_window", "needs sample.noise_level > 0 (the window's steps are SDE)")
    t = c.train
    _require(t.epochs >= 0, "train.epochs", f"must be >= 0, got {t.epochs}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(t.max_grad_norm > 0, "train.max_grad_norm", f"must be > 0, got {t.max_grad_norm}")
    _require(t.clip_range > 0, "train.clip_range", f"must be > 0, got {t.clip_range}")
    _require(t.kl_beta >= 0, "train.kl_beta", f"must be >= 0, got {t.kl_beta}")
    _require(0 < t.timestep_fraction <= 1, "train.timestep_fraction", f"must be in (0, 1], got {t.timestep_fraction}")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    _require(t.kl_form in ("flow_grpo", "exact"), "train.kl_form", f"{t.kl_form!r} is not one of flow_grpo, exact")
    _require(t.gradient_accumulation >= 1, "train.gradient_accumulation", f"must be >= 1, got {t.gradient_accumulation}")
    _require(t.optimizer_steps_per_epoch >= 0, "train.optimizer_steps_per_epoch",
             f"must be >= 0, got {t.optimizer_steps_per_epoch}")
    _require(not (t.optimizer_steps_per_epoch and t.gradient_accumulation != 1), "train.optimizer_steps_per_epoch",
             "set either it or train.gradient_accumulation, not both")
    _require(t.lr_schedule in LR_SCHEDULES, "train.lr_schedule",
             f"{t.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    _require(t.lr_warmup_steps >= 0, "train.lr_warmup_steps", f"must be >= 0, got {t.lr_warmup_steps}")
    _require(t.timesteps_per_forward >= 1, "train.timesteps_per_forward", f"must be >= 1, got {t.timesteps_per_forward}")
    _require(t.inner_epochs >= 1, "train.inner_epochs", f"must be >= 1, got {t.inner_epochs}")
    _require(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    _require(t.ema_every >= 1, "train.ema_every", f"must be >= 1, got {t.ema_every}")
    _require(t.gram_every >= 0, "train.gram_every", f"must be >= 0, got {t.gram_every}")
    _require(t.reward_max_failures >= 0, "train.reward_max_failures", f"must be >= 0, got {t.reward_max_failures}")
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", f"must be >= 1, got {t.max_nonfinite_steps}")
    _require(len(c.rewards) > 0, "rewards", "no reward given; add e.g. `rewards: [{name: jpeg_compressibility, weight: 1.0}]`")
    names = [r.name for r in c.rewards]
    for i, r in enumerate(c.rewards):
        _require(bool(r.name), f"rewards[{i}].name", "is empty")
        _require(names.index(r.name) == i, f"rewards[{i}].name",
                 f"duplicate key {r.name!r} (also rewards[{names.index(r.name)}]); reward keys must be unique: "
                 f"give each reward its own "
                 f"name and say which scorer it runs with type, e.g. "
                 f"{{name: deqa, type: remote, args: {{url: ...}}}}")
        _require(r.weight >= 0 and r.weight == r.weight and r.weight != float("inf"), f"rewards[{i}].weight",
                 f"must be finite and >= 0, got {r.weight}")
    for i, r in enumerate(c.rewards):
        _require(r.timeout_s is not None and 0 < r.timeout_s < float("inf"), f"rewards[{i}].timeout_s",
                 f"must be a finite number of seconds > 0 (every reward call is bounded), got {r.timeout_s}")
    _require(len(set(names)) == len(names), "rewards", f"reward names must be unique, got {names}")
    _require(sum(r.weight for r in c.rewards) > 0, "rewards[*].weight",
             "all weights are zero; give at least one reward a positive weight")
    try:
        c.balance.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(c.algorithm in ALGORITHMS, "algorithm", f"{c.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if c.algorithm == "dpo":
        try:
            c.dpo.validate(names)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _require(c.lora.enabled, "lora.enabled", "algorithm: dpo keeps its reference model as a second LoRA adapter; "
                 "set lora.enabled: true")
        _require(c.train.gradient_accumulation == 1 and not c.train.optimizer_steps_per_epoch,
                 "train.gradient_accumulation", "accumulation is a GRPO option; algorithm: dpo steps per micro-batch")
    _require(c.eval.every >= 0, "eval.every", f"must be >= 0, got {c.eval.every}")
    _require(c.eval.num_steps >= 1, "eval.num_steps", f"must be >= 1, got {c.eval.num_steps}")
    _require(c.eval.num_prompts >= 1, "eval.num_prompts", f"must be >= 1, got {c.eval.num_prompts}")
    _require(c.eval.images_per_prompt >= 1, "eval.images_per_prompt", f"must be >= 1, got {c.eval.images_per_prompt}")
    _require(c.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0, got {c.checkpoint.every}")
    _require(c.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {c.checkpoint.keep}")
    _require(not (c.checkpoint.new_run and c.checkpoint.resume), "checkpoint.new_run",
             "cannot be combined with checkpoint.resume (--resume): a new run starts from scratch")
