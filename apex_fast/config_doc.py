"""``apex-fast train --print-config``: the effective config as YAML, every field with its default
and its meaning, read from the comments beside the dataclass fields in config.py and
balance/config.py (one source of truth: the field's comment is its documentation)."""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
import typing

import yaml

_FIELD = re.compile(r"^\s+(\w+)\s*:")

# meanings of fields whose definition carries no comment (kept here, not in config.py, so the
# dataclasses stay as they are)
_EXTRA = {
    "model.gradient_checkpointing": "recompute transformer activations in backward (less memory, ~30% slower)",
    "model.revision": "hub revision (branch, tag or commit) of model.pretrained",
    "model.variant": "weight file variant of model.pretrained, e.g. fp16",
    "lora.rank": "LoRA rank r",
    "lora.alpha": "LoRA alpha (scaling alpha / r)",
    "train.epochs": "epochs (one epoch: sample, score, balance, update)",
    "train.lr": "AdamW learning rate of the trainable (LoRA) weights",
    "log.output_dir": "run folder: config.yaml, metrics.csv, checkpoints/, lora/, samples/ (apex-fast eval --run reads it)",
    "lora.target_modules": "module names (suffixes) of the transformer that get a LoRA (Flow-GRPO's attention projections)",
    "data.eval_prompts": "held-out prompts for evaluation (same formats as train_prompts)",
    "sample.guidance_scale": "classifier-free guidance scale s (SPEC 1), also used for evaluation",
    "train.seed": "seed of prompts, rollout noise, LoRA init and micro-batch order",
    "train.weight_decay": "AdamW weight decay",
    "train.adam_betas": "AdamW betas",
    "train.adam_eps": "AdamW epsilon",
    "train.max_grad_norm": "gradient clipping (global L2 norm) before each optimizer step",
    "train.ema_decay": "decay of the EMA of the trainable weights",
    "eval.num_prompts": "first N prompts of data.eval_prompts used for evaluation",
    "eval.images_per_prompt": "images per eval prompt (item i's noise seed: seed_for(eval.seed, 'eval', i))",
    "eval.seed": "noise seed of the eval images (the same for every checkpoint and method)",
    "log.tensorboard": "write TensorBoard event files under output_dir/tensorboard",
    "log.csv": "write output_dir/metrics.csv, one row per epoch",
    "log.plot": "write output_dir/reward_curves.png at the end",
    "balance.method": "static | gdpo | apex | famo | pcgrad | mgda | cagrad | upgrad: how the K rewards become one advantage",
}


def field_comments(cls) -> dict[str, str]:
    """{field name: the comment on its line} for a dataclass defined in a source file."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    lines = src.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            m = _FIELD.match(lines[tok.start[0] - 1])
            if m and m.group(1) not in out:
                out[m.group(1)] = tok.string.lstrip("#").strip()
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _yaml_value(v) -> str:
    from apex_fast.config import to_dict

    if dataclasses.is_dataclass(v):
        v = to_dict(v)
    elif isinstance(v, tuple):
        v = list(v)
    elif isinstance(v, list):
        v = [to_dict(x) if dataclasses.is_dataclass(x) else x for x in v]
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def describe_config(cfg) -> str:
    """YAML of ``cfg`` (loadable with --config) with `# default ...; meaning` after each field."""
    lines = ["# effective config: value  # (default when different) meaning",
             "# every field can be set in the YAML file or with --set section.field=value"]
    hints_top = typing.get_type_hints(type(cfg))
    for top in dataclasses.fields(cfg):
        value = getattr(cfg, top.name)
        if dataclasses.is_dataclass(hints_top[top.name]) if isinstance(hints_top[top.name], type) else False:
            cls = type(value)
            docs = field_comments(cls)
            lines.append(f"{top.name}:")
            for f in dataclasses.fields(cls):
                v, d = getattr(value, f.name), _default(f)
                meaning = _EXTRA.get(f"{top.name}.{f.name}") or docs.get(f.name, "")
                lines.append(_line(f"  {f.name}: {_yaml_value(v)}", v, d, meaning))
        else:
            docs = field_comments(type(cfg))
            meaning = docs.get(top.name, "")
            if top.name == "rewards":
                meaning = meaning or "list of {name, weight, args, timeout_s}: the K objectives"
                rdocs = field_comments(typing.get_args(hints_top["rewards"])[0])
                meaning += "; each: " + ", ".join(f"{k} ({m})" if m else k for k, m in
                                                   [(f.name, rdocs.get(f.name, "")) for f in
                                                    dataclasses.fields(typing.get_args(hints_top["rewards"])[0])])
            if top.name == "rewards" and value:
                lines.append(f"{top.name}:  # {meaning}")
                lines += [f"  - {_yaml_value(r)}" for r in value]
            else:
                lines.append(_line(f"{top.name}: {_yaml_value(value)}", value, _default(top), meaning))
    return "\n".join(lines)


def load_unvalidated(path, overrides):
    """The config as load_config reads it, without validation (to print a config that does not
    validate yet, e.g. the defaults, which name no reward)."""
    from pathlib import Path

    from apex_fast.config import Config, apply_override, from_dict

    data = yaml.safe_load(Path(path).read_text()) if path else {}
    for o in overrides or []:
        apply_override(data, o)
    return from_dict(Config, data or {})


def _line(text: str, value, default, meaning: str) -> str:
    note = []
    if _yaml_value(value) != _yaml_value(default):
        note.append(f"(default {_yaml_value(default)})")
    if meaning:
        note.append(meaning)
    return f"{text}  # {' '.join(note)}" if note else text


def print_config(path, overrides) -> dict:
    """``--print-config``: the effective config, with a note when it does not validate yet."""
    from apex_fast.config import ConfigError, load_config

    try:
        cfg, problem = load_config(path, overrides), None
    except ConfigError as e:
        try:
            cfg, problem = load_unvalidated(path, overrides), str(e)
        except (ConfigError, OSError, yaml.YAMLError):
            raise SystemExit(f"config error: {e}") from None
    text = describe_config(cfg)
    if problem:
        text = f"# NOTE: this config does not validate yet: {problem}\n" + text
    print(text, flush=True)
    return {}
