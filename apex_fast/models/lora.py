"""LoRA on the SD3 transformer with peft, following diffusers / Flow-GRPO conventions.

* `add_lora` = diffusers' train_dreambooth_lora_sd3: `transformer.add_adapter(LoraConfig(...))`,
  gaussian init (lora_B = 0, so the model starts equal to the base), Flow-GRPO targets and
  r=32, alpha=64 by default; LoRA parameters kept in fp32 (diffusers' `cast_training_params`)
  and the only trainable parameters.
* `lora_state_dict` / `load_lora_state_dict`: peft-format state dicts for exact checkpoints.
* `save_lora_diffusers`: `pytorch_lora_weights.safetensors` in diffusers format with the adapter
  config as metadata, so `StableDiffusion3Pipeline.load_lora_weights(dir)` restores the same
  scaling (alpha / r) on a fresh pipeline.
* `lora_disabled`: context manager giving the base model (the KL reference).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

DEFAULT_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
DEFAULT_ADAPTER = "default"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(
    transformer,
    rank: int = 32,
    alpha: float = 64,
    target_modules: Sequence[str] = tuple(DEFAULT_TARGETS),
    init_lora_weights: str | bool = "gaussian",
    seed: int = 0,
    *,
    dropout: float = 0.0,
    lora_dtype: torch.dtype | None = torch.float32,
    adapter_name: str = DEFAULT_ADAPTER,
):
    """Add a LoRA adapter to `transformer` in place (and return it).

    Deterministic under `seed` (the global torch RNG is not disturbed). Afterwards exactly
    the LoRA parameters require grad. `lora_dtype` (default fp32) casts the LoRA weights,
    as diffusers' `cast_training_params` does for bf16/fp16 bases; None keeps peft's choice.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights=init_lora_weights,
        target_modules=list(target_modules),
    )
    devices = [transformer.device] if transformer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        transformer.add_adapter(config, adapter_name=adapter_name)
    n_lora = 0
    for name, p in transformer.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        if is_lora:
            n_lora += 1
            if lora_dtype is not None and p.dtype != lora_dtype:
                p.data = p.data.to(lora_dtype)
    if n_lora == 0:
        raise ValueError(f"add_lora: no module of the transformer matches target_modules={list(target_modules)}")
    return transformer


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    """The trainable (LoRA) parameters, in module order."""
    return [p for n, p in transformer.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(transformer, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """peft-format LoRA state dict (keys like 'transformer_blocks.0.attn.to_q.lora_A.weight'), detached copies."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {k: v.detach().clone() for k, v in sd.items()}


def load_lora_state_dict(transformer, state_dict: dict[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Restore LoRA weights saved by `lora_state_dict` exactly (strict: every key must match)."""
    from peft import set_peft_model_state_dict

    expected = set(lora_state_dict(transformer, adapter_name))
    given = set(state_dict)
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise KeyError(
            f"LoRA state dict does not match the adapter: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it saved with the same rank/targets?"
        )
    result = set_peft_model_state_dict(transformer, state_dict, adapter_name=adapter_name)
    bad = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
    if bad:
        raise KeyError(f"LoRA keys not loaded: {bad[:5]}")


def save_lora_diffusers(
    transformer,
    out_dir: str | os.PathLike,
    weight_name: str = LORA_WEIGHT_NAME,
    adapter_name: str = DEFAULT_ADAPTER,
) -> str:
    """Write the LoRA in diffusers format (safetensors + adapter config metadata); returns the file path.

    Load it with `StableDiffusion3Pipeline.load_lora_weights(out_dir)` (on the same base model).
    """
    from diffusers import StableDiffusion3Pipeline

    layers = {k: v.contiguous() for k, v in lora_state_dict(transformer, adapter_name).items()}
    metadata = transformer.peft_config[adapter_name].to_dict()
    if isinstance(metadata.get("target_modules"), (set, list, tuple)):
        metadata["target_modules"] = sorted(metadata["target_modules"])  # peft keeps a set: fix the file bytes
    os.makedirs(out_dir, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(
        save_directory=os.fspath(out_dir),
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=metadata,
        weight_name=weight_name,
        safe_serialization=True,
    )
    return os.path.join(os.fspath(out_dir), weight_name)


def _adapters_disabled(transformer) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in transformer.modules():
        if isinstance(m, BaseTunerLayer):
            return bool(m.disable_adapters)
    raise ValueError("lora_disabled: the transformer has no LoRA adapter")


@contextlib.contextmanager
def lora_disabled(transformer) -> Iterator[None]:
    """Run the base model (LoRA bypassed) inside the block; restores the previous state after."""
    was_disabled = _adapters_disabled(transformer)
    transformer.disable_adapters()
    try:
        yield
    finally:
        if not was_disabled:
            transformer.enable_adapters()


__all__ = [
    "DEFAULT_TARGETS",
    "LORA_WEIGHT_NAME",
    "add_lora",
    "lora_parameters",
    "lora_state_dict",
    "load_lora_state_dict",
    "save_lora_diffusers",
    "lora_disabled",
]
