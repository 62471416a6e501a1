"""Held-out sampling and scoring: the ODE sampler (noise level 0) on a fixed prompt set with fixed
per-image seeds, so the base model, every checkpoint and every method see the same initial noise
for the same (prompt, image) item, then the rewards. Item i's noise comes from
``seed_for(eval.seed, "eval", i)``, as in the training run's own evaluation, so the base model's
scores here equal the run's start-of-training eval.

    settings = EvalSettings.from_config(cfg)            # a run's eval settings
    sampler = HeldOutSampler(settings)
    images = sampler.sample(LoraWeights("run/checkpoints/checkpoint-000010"))   # uint8 [N, H, W, 3]
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from apex_fast.runtime import seed_for

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"


class EvalError(ValueError):
    """Bad evaluation input (run folder, LoRA, rewards); the message names the argument and the fix."""


@dataclass
class EvalSettings:
    """Everything that decides the images and scores (and so the cache key), from a run's config."""

    model: str = "tiny"
    model_seed: int = 0
    dtype: str = "fp32"
    resolution: int = 64
    revision: str | None = None
    variant: str | None = None
    prompts: list = field(default_factory=list)  # [(prompt, metadata)], the held-out set
    prompt_source: str = ""
    images_per_prompt: int = 1
    seed: int = 1234
    num_steps: int = 40
    guidance_scale: float = 4.5
    max_sequence_length: int = 128
    rewards: list = field(default_factory=list)  # [RewardSpec]
    # not part of the key: they do not change the images
    batch_size: int = 8
    device: str = "cpu"
    attention_backend: str = "sdpa"

    @classmethod
    def from_config(cls, cfg, *, prompt_source: str | None = None, num_prompts: int | None = None,
                    **overrides) -> "EvalSettings":
        """The run config's eval settings; keyword overrides that are not None replace them."""
        from apex_fast.data import load_prompts

        src = prompt_source or cfg.data.eval_prompts
        prompts = load_prompts(src, "--prompts" if prompt_source else "data.eval_prompts")
        prompts = prompts[: num_prompts or cfg.eval.num_prompts]
        s = cls(model=cfg.model.pretrained, model_seed=cfg.model.seed, dtype=cfg.model.dtype,
                resolution=cfg.model.resolution, revision=cfg.model.revision, variant=cfg.model.variant,
                prompts=prompts, prompt_source=str(src), images_per_prompt=cfg.eval.images_per_prompt,
                seed=cfg.eval.seed, num_steps=cfg.eval.num_steps, guidance_scale=cfg.sample.guidance_scale,
                max_sequence_length=cfg.sample.max_sequence_length, rewards=list(cfg.rewards),
                batch_size=cfg.sample.batch_size, attention_backend=cfg.model.attention_backend)
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        return s

    def items(self) -> list[tuple[str, dict]]:
        """Prompt-major: item i is prompt i // images_per_prompt."""
        return [(p, m) for p, m in self.prompts for _ in range(self.images_per_prompt)]

    def sample_key(self) -> dict:
        """What the images depend on, besides the weights."""
        return {"model": self.model, "model_seed": self.model_seed if self.model == "tiny" else None,
                "dtype": self.dtype, "resolution": self.resolution, "revision": self.revision,
                "variant": self.variant, "prompts": [[p, m] for p, m in self.prompts],
                "images_per_prompt": self.images_per_prompt, "seed": self.seed, "num_steps": self.num_steps,
                "guidance_scale": self.guidance_scale, "max_sequence_length": self.max_sequence_length,
                "sampler": "ode-euler-v1"}


def reward_key(spec) -> str:
    """Cache key of a reward: its name and scorer arguments (not its training weight)."""
    import json

    typed = {"type": spec.type} if getattr(spec, "type", None) else {}  # untyped keys stay as they were
    return json.dumps({"name": spec.name, "args": spec.args, **typed}, sort_keys=True, default=str)


# ------------------------------------------------------------------ weights


class Weights:
    """What to put on the base transformer for sampling; ``apply`` is a context manager."""

    label: str = "base"

    def identity(self) -> dict:
        return {"kind": "base"}

    def check(self, pipe) -> None:
        """Raise EvalError if these weights cannot go on ``pipe`` (called before any sampling)."""

    @contextlib.contextmanager
    def apply(self, pipe):
        yield


class BaseWeights(Weights):
    pass


def lora_file(path: str | Path) -> Path:
    p = Path(path)
    f = p / LORA_FILE if p.is_dir() else p
    if not f.is_file():
        raise EvalError(f"--lora {path}: no LoRA file there (expected a folder holding {LORA_FILE}, as "
                        f"save_lora_diffusers and the training run's checkpoints/checkpoint-N/ write, or the file itself)")
    return f


class LoraWeights(Weights):
    """A diffusers-format LoRA (``pytorch_lora_weights.safetensors``), loaded with diffusers' own
    ``load_lora_weights`` after checking that every module it names exists with matching shapes.

    ``ema=True`` (a training checkpoint folder): the LoRA's values are then replaced by the EMA of the
    trainable weights stored in the checkpoint's state.safetensors (``ema.<i>``, in the order of the
    transformer's LoRA parameters), i.e. the weights the training run's own evaluation used."""

    def __init__(self, path: str | Path, label: str | None = None, ema: bool = False):
        self.file = lora_file(path)
        self.label = label or Path(path).name
        self.ema_file = self.file.parent / "state.safetensors" if ema else None
        if ema and not self._ema_keys():
            raise EvalError(f"--ema: {self.file.parent} holds no EMA weights (the run trained with train.ema=false, "
                            f"or this is not a training checkpoint); drop --ema")
        self._digest = None

    def _ema_keys(self) -> list[str]:
        from safetensors import safe_open

        if self.ema_file is None or not self.ema_file.is_file():
            return []
        with safe_open(str(self.ema_file), "pt") as f:
            keys = [k for k in f.keys() if k.startswith("ema.") and k[4:].isdigit()]
        return sorted(keys, key=lambda k: int(k[4:]))

    def identity(self) -> dict:
        from .cache import safetensors_digest

        if self._digest is None:
            self._digest = safetensors_digest(self.file)
            if self.ema_file is not None:
                self._digest += "+ema:" + safetensors_digest(self.ema_file, keys=self._ema_keys())
        return {"kind": "lora", "sha256": self._digest}

    def check(self, pipe) -> None:
        check_lora_fits(pipe.transformer, self.file)

    @contextlib.contextmanager
    def apply(self, pipe):
        self.check(pipe)
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()  # "no LoRA keys for text_encoder" notices: expected here
        try:
            pipe.load_lora_weights(str(self.file.parent), weight_name=self.file.name, adapter_name="apex_fast_eval")
        finally:
            dlog.set_verbosity(level)
        try:
            if self.ema_file is not None:
                self._load_ema(pipe.transformer)
            yield
        finally:
            pipe.unload_lora_weights()

    def _load_ema(self, transformer) -> None:
        from safetensors import safe_open

        params = [p for n, p in transformer.named_parameters() if "lora_" in n]
        keys = self._ema_keys()
        if len(keys) != len(params):
            raise EvalError(f"--ema: {self.ema_file} holds {len(keys)} EMA tensors but the LoRA has {len(params)} "
                            f"parameters; this checkpoint's EMA does not belong to its LoRA")
        with safe_open(str(self.ema_file), "pt") as f, torch.no_grad():
            for k, p in zip(keys, params):
                t = f.get_tensor(k)
                if t.shape != p.shape:
                    raise EvalError(f"--ema: EMA tensor {k} has shape {tuple(t.shape)}, the LoRA parameter "
                                    f"{tuple(p.shape)}; this checkpoint's EMA does not belong to its LoRA")
                p.copy_(t.to(p.dtype))


class FullWeights(Weights):
    """The trainable weights of a full fine-tuning checkpoint (``trainable.*`` tensors of its
    state.safetensors, read without the optimizer state); the base weights come back afterwards."""

    def __init__(self, ckpt_dir: str | Path, label: str | None = None):
        self.file = Path(ckpt_dir) / "state.safetensors"
        self.label = label or Path(ckpt_dir).name

    def identity(self) -> dict:
        st = self.file.stat()
        return {"kind": "full", "path": str(self.file.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}

    @contextlib.contextmanager
    def apply(self, pipe):
        from safetensors import safe_open

        named = dict(pipe.transformer.named_parameters())
        backup = {}
        with safe_open(str(self.file), "pt") as f:
            keys = [k for k in f.keys() if k.startswith("trainable.")]
            if not keys:
                raise EvalError(f"{self.file.parent}: the checkpoint holds no trainable weights")
            with torch.no_grad():
                for k in keys:
                    n = k[len("trainable."):]
                    if n not in named or tuple(named[n].shape) != tuple(f.get_slice(k).get_shape()):
                        raise EvalError(f"{self.file.parent}: weight {n} does not fit the model; evaluate it with the "
                                        f"base model it was trained from (the run's model.pretrained)")
                    backup[n] = named[n].detach().clone()
                    named[n].copy_(f.get_tensor(k).to(named[n].dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in backup.items():
                    named[n].copy_(v)


def check_lora_fits(transformer, file: str | Path) -> int:
    """Raise EvalError unless every transformer module the LoRA file names exists in ``transformer``
    as a linear layer of matching shape; returns the number of adapted modules."""
    from safetensors import safe_open

    modules = dict(transformer.named_modules())
    adapted: dict[str, dict[str, tuple]] = {}
    with safe_open(str(file), "pt") as f:
        for k in f.keys():
            if not k.startswith("transformer.") or ".lora_" not in k:
                continue
            mod, part = k[len("transformer."):].split(".lora_", 1)
            adapted.setdefault(mod, {})[part.split(".")[0]] = tuple(f.get_slice(k).get_shape())
    if not adapted:
        raise EvalError(f"--lora {file}: holds no transformer LoRA weights (keys 'transformer.<module>.lora_A.weight')")
    for mod, shapes in sorted(adapted.items()):
        m = modules.get(mod)
        base = getattr(m, "base_layer", m)
        if base is None or not hasattr(base, "in_features"):
            n_blocks = len(getattr(transformer, "transformer_blocks", []))
            raise EvalError(f"--lora {file} does not fit the model: it adapts module {mod!r}, which the model does not "
                            f"have (the model has {n_blocks} transformer blocks); evaluate it with the base model it was "
                            f"trained on (--model, or the run's model.pretrained)")
        a, b = shapes.get("A"), shapes.get("B")
        if (a is not None and a[1] != base.in_features) or (b is not None and b[0] != base.out_features):
            raise EvalError(f"--lora {file} does not fit the model: module {mod!r} is {base.in_features} -> "
                            f"{base.out_features} in the model but {a[1] if a else '?'} -> {b[0] if b else '?'} in the "
                            f"LoRA; evaluate it with the base model it was trained on")
    return len(adapted)


# ------------------------------------------------------------------ sampling


class HeldOutSampler:
    """Loads the pipeline on first use; ``sample(weights)`` -> uint8 images [N, H, W, 3] of
    ``settings.items()``; ``samples_drawn`` counts sampled images (the cache tests read it)."""

    def __init__(self, settings: EvalSettings):
        self.s = settings
        self._pipe = None
        self._cond = None
        self.samples_drawn = 0

    @property
    def pipe(self):
        if self._pipe is None:
            from apex_fast.models import load_pipeline

            s = self.s
            self._pipe = load_pipeline(s.model, dtype=s.dtype, device=s.device, seed=s.model_seed, revision=s.revision,
                                       variant=s.variant, attention_backend=s.attention_backend)
        return self._pipe

    def _conditioning(self):
        from apex_fast.models import encode_negative, encode_prompts
        from apex_fast.rl.rollout import Conditioning

        if self._cond is None:
            prompts = [p for p, _ in self.s.items()]
            uniq = sorted(set(prompts))
            dev, L = self.s.device, self.s.max_sequence_length
            emb, pooled = encode_prompts(self.pipe, uniq, dev, max_sequence_length=L)
            idx = torch.tensor([uniq.index(p) for p in prompts], device=dev)
            emb, pooled = emb[idx].float(), pooled[idx].float()
            if self.s.guidance_scale > 1:
                ne, npool = encode_negative(self.pipe, 1, dev, max_sequence_length=L)
                self._cond = Conditioning(emb, pooled, ne.float().expand(len(prompts), -1, -1),
                                          npool.float().expand(len(prompts), -1))
            else:
                self._cond = Conditioning(emb, pooled)
        return self._cond

    @torch.no_grad()
    def sample(self, weights: Weights, progress=None) -> np.ndarray:
        from apex_fast.rl.rollout import decode_latents, sample

        pipe = self.pipe
        cond = self._conditioning()
        n = cond.embeds.shape[0]
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        h = self.s.resolution // vae_factor
        shape = (pipe.transformer.config.in_channels, h, h)
        gens = [torch.Generator().manual_seed(seed_for(self.s.seed, "eval", i)) for i in range(n)]
        out = []
        with weights.apply(pipe):
            pipe.transformer.eval()
            for lo in range(0, n, self.s.batch_size):
                sl = slice(lo, min(n, lo + self.s.batch_size))
                ro = sample(pipe.transformer, pipe.scheduler, cond.index(sl), latent_shape=shape,
                            num_steps=self.s.num_steps, guidance_scale=self.s.guidance_scale, noise_level=0.0,
                            generators=gens[sl])
                img = decode_latents(pipe.vae, ro.final)
                out.append((img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
                self.samples_drawn += sl.stop - sl.start
                if progress is not None:
                    progress.update(sl.stop - sl.start)
        return np.concatenate(out)

