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
* `lora_merged`: no-grad forwards with the LoRA merged into the weight; `lora_static_forwards` makes
  it compile-friendly (model.compile).
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


def load_lora_init(transformer, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> str:
    """Load an existing LoRA into the adapter as the starting point of training (``lora.init_from``).

    ``path``: a diffusers LoRA (``pytorch_lora_weights.safetensors`` or a folder holding it: what
    ``save_lora_diffusers``, our ``lora/`` and checkpoints write) or a peft folder
    (``adapter_model.safetensors`` + ``adapter_config.json``, e.g. Flow-GRPO's checkpoints). Every
    key must match the adapter (same rank and targets) and a stored alpha/rank must equal the
    adapter's, so the loaded LoRA means the same; errors name ``lora.init_from``. Returns the file read.
    """
    import json

    from safetensors import safe_open

    p = os.fspath(path)
    if os.path.isdir(p):
        for name in (LORA_WEIGHT_NAME, "adapter_model.safetensors"):
            if os.path.isfile(os.path.join(p, name)):
                p = os.path.join(p, name)
                break
        else:
            raise ValueError(f"lora.init_from: {path} holds neither {LORA_WEIGHT_NAME} (diffusers) nor "
                             f"adapter_model.safetensors (peft)")
    if not os.path.isfile(p):
        raise ValueError(f"lora.init_from: {path} does not exist; give a LoRA folder or .safetensors file")
    with safe_open(p, framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    cfg = transformer.peft_config[adapter_name]
    stored = None
    if "lora_adapter_metadata" in meta:  # diffusers' file: the adapter config in the header, "transformer."-keyed
        stored = {k.split(".", 1)[1]: v for k, v in json.loads(meta["lora_adapter_metadata"]).items()
                  if k.startswith("transformer.")}
    elif os.path.isfile(os.path.join(os.path.dirname(p), "adapter_config.json")):  # peft folder
        with open(os.path.join(os.path.dirname(p), "adapter_config.json")) as fh:
            stored = json.load(fh)
    if stored is not None:
        for key, ours in (("r", cfg.r), ("lora_alpha", cfg.lora_alpha)):
            if key in stored and float(stored[key]) != float(ours):
                field = "lora.rank" if key == "r" else "lora.alpha"
                raise ValueError(f"lora.init_from: {p} has {key}={stored[key]} but the run uses {field}={ours}; "
                                 f"set {field} to {stored[key]}")
    prefixes = ("transformer.", "base_model.model.")
    out = {}
    for k, v in sd.items():
        for pre in prefixes:
            if k.startswith(pre):
                k = k[len(pre):]
                break
        out[k.replace(f".{adapter_name}.", ".")] = v.float()
    try:
        load_lora_state_dict(transformer, out, adapter_name)
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"lora.init_from: {p} does not match the adapter (lora.rank, lora.target_modules): "
                         f"{str(e.args[0])[:300]}") from None
    return p


@contextlib.contextmanager
def lora_per_sample(transformer, adapter_names: list[str] | None, lora_rows: int | None = None,
                    adapter_name: str = DEFAULT_ADAPTER) -> Iterator[None]:
    """Inside the block every forward of ``transformer`` applies the LoRA per sample: sample i of the
    batch through adapter ``adapter_names[i]``, or none for ``"__base__"`` (the base model). peft's
    mixed-batch path (``adapter_names`` passed to every LoRA layer, as ``PeftModel`` does with
    forward pre-hooks): one batched forward serves the policy and the LoRA-disabled reference."""
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        names = adapter_names
        if names is None:  # the first lora_rows samples with the adapter, the rest without
            n = args[0].shape[0]
            names = [adapter_name] * lora_rows + ["__base__"] * (n - lora_rows)
        return args, {**kwargs, "adapter_names": names}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in transformer.modules() if isinstance(m, LoraLayer)]
    if not handles:
        raise ValueError("lora_per_sample: the transformer has no LoRA adapter")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def lora_merged(transformer, lora_rows: int | None = None) -> Iterator[bool]:
    """No-grad forwards inside the block run each LoRA linear as ONE linear with the merged weight
    ``W + scaling B A`` (computed on entry, never written into W), instead of peft's base linear plus
    two rank-r matmuls: the same function up to float rounding, and no LoRA cost. ``lora_rows``: only
    the batch's first ``lora_rows`` samples get the LoRA, the rest run the base weight (the policy and
    the LoRA-disabled reference in one forward). Yields False and changes nothing where merging is
    not possible (grad enabled, adapters disabled, not exactly one active adapter, DeepSpeed ZeRO-3
    partitioned weights, dropout, another LoRA variant); callers then get peft's forward
    (``lora_per_sample`` for ``lora_rows``). The active adapter is the one merged (DPO samples with
    its reference adapter active)."""
    import torch.nn.functional as F

    layers, adapter_name = _mergeable_layers(transformer)
    if not layers:
        if lora_rows is None:
            yield False
        else:
            with lora_per_sample(transformer, None, lora_rows=lora_rows, adapter_name=adapter_name):
                yield False
        return

    if all(getattr(m, "_apex_static", False) for m in layers):  # lora_static_forwards: state, not new code
        for m in layers:
            m._apex_merged, m._apex_lora_rows = _merged_weight(m, adapter_name), lora_rows
        try:
            yield True
        finally:
            for m in layers:
                m._apex_merged, m._apex_lora_rows = None, None
        return

    def patched(m):
        w, b = m.base_layer.weight, m.base_layer.bias
        merged = _merged_weight(m, adapter_name)

        def forward(x, *args, **kwargs):
            if lora_rows is None:
                return F.linear(x, merged, b)
            return torch.cat([F.linear(x[:lora_rows], merged, b), F.linear(x[lora_rows:], w, b)])

        return forward

    for m in layers:
        m.forward = patched(m)
    try:
        yield True
    finally:
        for m in layers:
            del m.forward  # back to the class's forward


def lora_static_forwards(transformer) -> None:
    """Give every LoRA linear a forward installed once that reads ``lora_merged``'s state from the
    layer (the merged weight and ``lora_rows``, or None: peft's own forward), instead of the new
    forward ``lora_merged`` would patch in on every entry. For ``torch.compile`` (model.compile):
    one compiled graph per mode and shape serves every call, the merged weight being an input,
    where new forwards would recompile on every call. The same function as ``lora_merged``'s."""
    import torch.nn.functional as F
    from peft.tuners.lora import Linear as LoraLinear

    def static(m):
        own = type(m).forward

        def forward(x, *args, **kwargs):
            merged = m._apex_merged
            if merged is None:
                return own(m, x, *args, **kwargs)
            rows, w, b = m._apex_lora_rows, m.base_layer.weight, m.base_layer.bias
            if rows is None:
                return F.linear(x, merged, b)
            return torch.cat([F.linear(x[:rows], merged, b), F.linear(x[rows:], w, b)])

        return forward

    for m in transformer.modules():
        if isinstance(m, LoraLinear) and not getattr(m, "_apex_static", False):
            m._apex_merged, m._apex_lora_rows, m._apex_static = None, None, True
            m.forward = static(m)


def _mergeable_layers(transformer) -> tuple[list, str]:
    """The LoRA linears and the active adapter's name when the adapter can be merged for a no-grad
    forward (see ``lora_merged``), else ([], name)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
    active = layers[0].active_adapters if layers else []
    adapter_name = active[0] if len(active) == 1 else DEFAULT_ADAPTER
    ok = (not torch.is_grad_enabled() and layers and len(active) == 1 and all(
        isinstance(m, LoraLinear) and not m.disable_adapters and not m.merged and m.active_adapters == active
        and adapter_name in m.lora_A
        and not m.lora_variant and isinstance(m.lora_dropout[adapter_name], torch.nn.Identity)
        and not hasattr(m.base_layer.weight, "ds_id") for m in layers))
    return (layers if ok else []), adapter_name


def _merged_weight(m, adapter_name: str) -> torch.Tensor:
    w = m.base_layer.weight
    delta = (m.lora_B[adapter_name].weight.float() @ m.lora_A[adapter_name].weight.float()) * m.scaling[adapter_name]
    return (w.float() + delta).to(w.dtype)


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
    "load_lora_init",
    "lora_disabled",
    "lora_per_sample",
    "lora_merged",
    "lora_static_forwards",
]
