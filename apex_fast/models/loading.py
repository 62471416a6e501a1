"""Load an SD3 / SD3.5 pipeline (hub id or local directory) or build the tiny embedded one.

`load_pipeline` is the single entry point the trainer uses; it returns a
`diffusers.StableDiffusion3Pipeline` on `device`, with every base weight frozen
(`requires_grad=False`), the VAE and text encoders in eval mode, and the requested attention
backend and gradient checkpointing applied to the transformer. LoRA is added separately
(`apex_fast.models.lora.add_lora`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from .tiny import build_tiny_pipeline, load_tiny_pretrained

TINY_NAMES = ("tiny",)  # the pretrained testbed (assets/tiny_sd3, scripts/pretrain_tiny_sd3.py)
TINY_RANDOM_NAMES = ("tiny-random",)  # random transformer and text encoders from `seed`, trained VAE

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}

ATTENTION_BACKENDS = ("sdpa", "eager", "xformers")
_ATTENTION_ALIASES = {"sdpa": "sdpa", "default": "sdpa", "eager": "eager", "math": "eager", "native": "eager", "xformers": "xformers"}


class ModelLoadError(OSError):
    """The configured model could not be found or loaded; the message says which field and how to fix it."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'bf16' / 'fp16' (or long names, or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"model.dtype = {dtype}: expected one of float32, bfloat16, float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"model.dtype = {dtype!r}: expected one of 'fp32', 'bf16', 'fp16'")
    return _DTYPES[key]


def _looks_like_path(s: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else path-like is treated as a local path."""
    return (
        os.path.isabs(s)
        or s.startswith((".", "~"))
        or s.count("/") > 1
        or s.endswith(("/", os.sep))
        or (os.sep != "/" and os.sep in s)
    )


def _fix_hint(pretrained: str) -> str:
    hub_id = pretrained if not _looks_like_path(pretrained) else "stabilityai/stable-diffusion-3.5-medium"
    return (
        "Fix: download it first, e.g. `huggingface-cli download "
        f"{hub_id} --local-dir /path/to/model` (gated models need `huggingface-cli login` and accepted terms), "
        "then set model.pretrained=/path/to/model; or set model.pretrained=tiny to use the embedded offline model."
    )


_T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")


def _missing_optional_components(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.pretrained = {folder!r}: unreadable model_index.json ({e})") from e
    out = {}
    for name in _T5_COMPONENTS:
        entry = index.get(name)
        if entry is None or (isinstance(entry, (list, tuple)) and all(x is None for x in entry)):
            out[name] = None
    return out


def _dtype_kwarg() -> str:
    """diffusers renamed from_pretrained(torch_dtype=) to dtype= (the old name now warns)."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


def _require_sd3_index(pretrained: str, index_path: str) -> None:
    """A local folder must be an SD3/SD3.5 diffusers pipeline (model_index.json's _class_name)."""
    try:
        cls = json.loads(Path(index_path).read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"model.pretrained = {pretrained!r}: model_index.json is unreadable ({e}); "
                             f"{_fix_hint(pretrained)}") from None
    if cls != "StableDiffusion3Pipeline":
        raise ModelLoadError(f"model.pretrained = {pretrained!r} holds a {cls} (model_index.json), not an SD3/SD3.5 "
                             f"pipeline (StableDiffusion3Pipeline); point model.pretrained at an SD3 or SD3.5 "
                             f"diffusers folder, e.g. stabilityai/stable-diffusion-3.5-medium")


def max_resolution(pipe) -> int | None:
    """Largest square image side (pixels) the transformer's position embedding covers
    (pos_embed_max_size x patch_size x VAE downsampling); None: no fixed limit."""
    cfg = pipe.transformer.config
    pos = getattr(cfg, "pos_embed_max_size", None)
    if not pos:
        return None
    return int(pos) * int(cfg.patch_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _from_pretrained(pretrained: str, torch_dtype, revision, variant, local_files_only):
    from diffusers import StableDiffusion3Pipeline

    expanded = os.path.expanduser(pretrained)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "model_index.json")):
            raise ModelLoadError(
                f"model.pretrained = {pretrained!r}: the directory exists but has no model_index.json, so it is not a "
                f"diffusers pipeline folder. {_fix_hint(pretrained)}"
            )
        _require_sd3_index(pretrained, os.path.join(expanded, "model_index.json"))
        source, is_local, lfo = expanded, True, True if local_files_only is None else local_files_only
    elif os.path.exists(expanded) or _looks_like_path(pretrained):
        raise ModelLoadError(
            f"model.pretrained = {pretrained!r}: no such local directory. {_fix_hint(pretrained)}"
        )
    else:
        source, is_local, lfo = pretrained, False, local_files_only

    kwargs = {_dtype_kwarg(): torch_dtype}
    if is_local:
        # SD3 runs without T5 (zeros instead); a pipeline saved that way has no
        # text_encoder_3 / tokenizer_3 entry, which from_pretrained must be told explicitly
        kwargs.update(_missing_optional_components(expanded))
    if revision is not None:
        kwargs["revision"] = revision
    if variant is not None:
        kwargs["variant"] = variant
    if lfo is not None:
        kwargs["local_files_only"] = lfo
    try:
        return StableDiffusion3Pipeline.from_pretrained(source, **kwargs)
    except ModelLoadError:
        raise
    except Exception as e:  # hub / network errors, missing files, offline mode, bad variant or revision
        where = "local directory" if is_local else "Hugging Face hub id (not found locally or unreachable)"
        raise ModelLoadError(
            f"model.pretrained = {pretrained!r}: could not load it as a {where}: {type(e).__name__}: {e}. "
            f"{_fix_hint(pretrained)}"
        ) from e


def _eager_joint_processor():
    """JointAttnProcessor2_0 with SDPA forced onto its math (eager) kernel: a slow reference path."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class EagerJointAttnProcessor(JointAttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            with sdpa_kernel([SDPBackend.MATH]):
                return super().__call__(*args, **kwargs)

    return EagerJointAttnProcessor()


def set_attention_backend(pipe, attention_backend: str = "sdpa") -> str:
    """Apply 'sdpa' (default, torch scaled_dot_product_attention), 'eager' (math kernel) or 'xformers'."""
    name = _ATTENTION_ALIASES.get(str(attention_backend).lower())
    if name is None:
        raise ValueError(
            f"model.attention_backend = {attention_backend!r}: expected one of {', '.join(ATTENTION_BACKENDS)}"
        )
    transformer = pipe.transformer
    if name == "sdpa":
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        transformer.set_attn_processor(JointAttnProcessor2_0())
    elif name == "eager":
        transformer.set_attn_processor(_eager_joint_processor())
    else:  # xformers
        if importlib.util.find_spec("xformers") is None:
            raise ImportError(
                "model.attention_backend = 'xformers' but the xformers package is not installed. "
                "Install it (`pip install xformers`, matching your torch/CUDA; it is in the `gpu` extra: "
                "`pip install apex-fast[gpu]`) or use model.attention_backend=sdpa (torch's fused attention, the default)."
            )
        if not torch.cuda.is_available():
            raise ValueError("model.attention_backend = 'xformers' needs a CUDA device; use 'sdpa' on CPU")
        transformer.enable_xformers_memory_efficient_attention()
    return name


def freeze_pipeline(pipe) -> None:
    """requires_grad=False on every base weight; VAE and text encoders to eval mode."""
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    pipe.transformer.requires_grad_(False)


def load_pipeline(
    pretrained: str | os.PathLike | None = "tiny",
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    revision: str | None = None,
    variant: str | None = None,
    gradient_checkpointing: bool = False,
    attention_backend: str = "sdpa",
    local_files_only: bool | None = None,
):
    """Return a frozen `StableDiffusion3Pipeline` on `device`.

    pretrained: "tiny" or None -> the embedded pretrained tiny SD3 testbed (offline, no download;
        `seed` is ignored); "tiny-random" -> the tiny SD3 with random transformer and text encoders
        built from `seed`; otherwise a hub id ("stabilityai/stable-diffusion-3.5-medium") or a local
        directory holding a diffusers pipeline (model_index.json). A missing path or an
        unreachable hub id raises `ModelLoadError` naming `model.pretrained` and the fix.
    dtype: "fp32" | "bf16" | "fp16" or a torch dtype; all components are loaded in it.
    revision, variant: passed to `from_pretrained` (ignored for tiny).
    gradient_checkpointing: enable it on the transformer.
    attention_backend: "sdpa" (default), "eager" (math SDPA kernel, for debugging) or
        "xformers" (needs the package and CUDA).
    local_files_only: passed to `from_pretrained`; None -> True for local dirs, else the hub default.
    """
    torch_dtype = resolve_dtype(dtype)
    name = pretrained.strip().lower() if isinstance(pretrained, str) else None
    if pretrained is None or name in TINY_NAMES:
        pipe = load_tiny_pretrained(torch_dtype)
    elif name in TINY_RANDOM_NAMES:
        pipe = build_tiny_pipeline(seed, dtype=torch_dtype)
    else:
        pretrained = str(pretrained) if isinstance(pretrained, Path) else os.fspath(pretrained)
        if not pretrained.strip():
            raise ModelLoadError(f"model.pretrained = {pretrained!r} is empty. {_fix_hint('')}")
        pipe = _from_pretrained(pretrained, torch_dtype, revision, variant, local_files_only)
        pipe.set_progress_bar_config(disable=True)

    freeze_pipeline(pipe)
    set_attention_backend(pipe, attention_backend)
    if gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    pipe.to(torch.device(device))
    return pipe


__all__ = ["load_pipeline", "max_resolution", "resolve_dtype", "set_attention_backend", "freeze_pipeline", "ModelLoadError", "ATTENTION_BACKENDS"]
