"""Models: load SD3 / SD3.5 (hub id or local path) or build the tiny embedded pipeline; prompt
encoding; LoRA (peft, diffusers format).

    pipe = load_pipeline("tiny")                       # or "stabilityai/stable-diffusion-3.5-medium", a local dir
    embeds, pooled = encode_prompts(pipe, ["a red apple"], "cpu")
    add_lora(pipe.transformer, rank=32, alpha=64)
    with lora_disabled(pipe.transformer): ...          # base model, the KL reference
    save_lora_diffusers(pipe.transformer, "out/")      # -> StableDiffusion3Pipeline.load_lora_weights("out/")
"""

from pathlib import Path

from .loading import ModelLoadError, load_pipeline, max_resolution, resolve_dtype
from .lora import (
    DEFAULT_TARGETS,
    add_lora,
    load_lora_init,
    load_lora_state_dict,
    lora_disabled,
    lora_merged,
    lora_static_forwards,
    lora_parameters,
    lora_per_sample,
    lora_state_dict,
    save_lora_diffusers,
)
from .text import encode_negative, encode_prompts
from .tiny import TINY_IMAGE_SIZE, build_tiny_pipeline

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "data" / "prompts"

__all__ = [
    "PROMPTS_DIR",
    "TINY_IMAGE_SIZE",
    "DEFAULT_TARGETS",
    "ModelLoadError",
    "build_tiny_pipeline",
    "load_pipeline",
    "max_resolution",
    "resolve_dtype",
    "encode_prompts",
    "encode_negative",
    "add_lora",
    "lora_parameters",
    "lora_state_dict",
    "load_lora_state_dict",
    "load_lora_init",
    "save_lora_diffusers",
    "lora_disabled",
    "lora_per_sample",
    "lora_merged",
    "lora_static_forwards",
]
