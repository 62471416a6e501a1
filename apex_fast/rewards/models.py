"""The paper's model-based rewards (docs/SPEC.md section 2), loaded by their real code.

  pickscore  transformers CLIPModel + AutoProcessor; model yuvalkirstain/PickScore_v1, processor
             laion/CLIP-ViT-H-14-laion2B-s32B-b79K. r = logit_scale.exp() * cos(text, image) / 26
             (about 0.7..0.9 for SD images); ``raw=True`` gives the paper's raw scale (x26, ~18..23).
  aesthetic  openai/clip-vit-large-patch14 image embedding (get_image_features), L2-normalised, into
             the LAION improved-aesthetic MLP 768-1024-128-64-16-1; raw score, about 1..10. The MLP
             weights (sac+logos+ava1-l14-linearMSE.pth, keys "layers.N.weight") come from a path.
  deqa       zhiyuanyou/DeQA-Score-Mix3 via AutoModelForCausalLM(trust_remote_code=True);
             r = model.score(images) / 5 in [0.2, 1] (``raw=True``: 1..5).

Every path is overridable (a hub id or a local directory / file). Models load when the scorer is
built, so a wrong path fails at start-up with a RewardModelLoadError that names the scorer, the
path and the fix; heavy imports (transformers) happen there too, not at package import.
Options: device ("cuda" when available, else "cpu"), dtype (float16 on CUDA, float32 on CPU; a
torch.dtype or its name), batch_size (images per forward pass).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .base import register_scorer, to_uint8_hwc

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_MLP_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)
DEQA_MODEL = "zhiyuanyou/DeQA-Score-Mix3"


class RewardModelLoadError(RuntimeError):
    """A reward model could not be loaded; the message says which scorer, which path, how to fix."""


def _load_error(scorer: str, what: str, path, err: BaseException, kwarg: str, extra: str = "") -> RewardModelLoadError:
    p = str(path)
    # a hub id is "name" or "org/name"; anything else (absolute, relative with ./ or ../, deeper) is a path
    local = os.path.exists(p) or os.path.isabs(p) or p.startswith((".", "~")) or p.count("/") > 1
    if local:
        hint = (f"check that {p!r} exists and holds the {what} (a save_pretrained directory or a file), "
                f"or pass another with make_scorer({scorer!r}, {kwarg}=PATH)")
    else:
        hint = (
            f"{p!r} is a HuggingFace hub id and could not be fetched (no network, HF_HUB_OFFLINE, or no access): "
            f"download it where there is network (`huggingface-cli download {p} --local-dir DIR`) and pass "
            f"make_scorer({scorer!r}, {kwarg}=DIR)"
        )
    msg = f"reward {scorer!r}: cannot load the {what} from {p!r} ({type(err).__name__}: {err}). Fix: {hint}."
    if extra:
        msg += " " + extra
    return RewardModelLoadError(msg)


def resolve_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
        dt = getattr(torch, aliases.get(name, name), None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return dt
    return dtype


def _dtype_kwarg() -> str:
    """transformers 5 renamed from_pretrained's torch_dtype to dtype."""
    import transformers

    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def _features(out) -> torch.Tensor:
    """get_image/text_features: a tensor in transformers 4, an output with .pooler_output in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _pil_list(arr: np.ndarray):
    from PIL import Image

    return [Image.fromarray(a) for a in arr]


class _ClipScorerBase:
    name = "clip"

    def __init__(self, device=None, dtype=None, batch_size: int = 32):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = max(1, int(batch_size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype}, batch_size={self.batch_size})"


@register_scorer("pickscore")
class PickScoreScorer(_ClipScorerBase):
    """PickScore (Kirstain et al. 2023) as in its model card / Flow-GRPO: both embeddings
    L2-normalised, r = logit_scale.exp() * cos / 26, or the raw value with ``raw=True``.
    ``last_raw`` holds the raw scores of the last call either way."""

    name = "pickscore"

    def __init__(self, model_path: str = PICKSCORE_MODEL, processor_path: str = PICKSCORE_PROCESSOR,
                 device=None, dtype=None, batch_size: int = 32, raw: bool = False, local_files_only: bool | None = None):
        super().__init__(device, dtype, batch_size)
        from transformers import AutoProcessor, CLIPModel

        self.raw = bool(raw)
        self.model_path, self.processor_path = str(model_path), str(processor_path)
        lfo = {} if local_files_only is None else {"local_files_only": local_files_only}
        try:
            self.processor = AutoProcessor.from_pretrained(self.processor_path, **lfo)
        except Exception as e:
            raise _load_error("pickscore", "CLIP processor (tokenizer + image processor)", self.processor_path, e, "processor_path") from e
        try:
            self.model = CLIPModel.from_pretrained(self.model_path, **lfo).eval().to(self.device, self.dtype)
        except Exception as e:
            raise _load_error("pickscore", "PickScore CLIP model", self.model_path, e, "model_path") from e
        self.model.requires_grad_(False)
        self.last_raw: torch.Tensor | None = None

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @torch.no_grad()
    def raw_scores(self, images, prompts: Sequence[str]) -> torch.Tensor:
        """logit_scale.exp() * cos(text_i, image_i), float32 [N] on the CPU."""
        arr = to_uint8_hwc(images)
        if len(prompts) != arr.shape[0]:
            raise ValueError(f"pickscore: {arr.shape[0]} images but {len(prompts)} prompts")
        out = []
        scale = self.model.logit_scale.exp().float()
        for i in range(0, arr.shape[0], self.batch_size):
            pil = _pil_list(arr[i:i + self.batch_size])
            txt = list(prompts[i:i + self.batch_size])
            img_in = self.processor(images=pil, return_tensors="pt")
            txt_in = self.processor(text=txt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            pix = img_in["pixel_values"].to(self.device, self.dtype)
            ie = _features(self.model.get_image_features(pixel_values=pix)).float()
            te = _features(self.model.get_text_features(
                input_ids=txt_in["input_ids"].to(self.device),
                attention_mask=txt_in["attention_mask"].to(self.device))).float()
            ie = ie / ie.norm(dim=-1, keepdim=True)
            te = te / te.norm(dim=-1, keepdim=True)
            out.append((scale * (ie * te).sum(-1)).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        raw = self.raw_scores(images, prompts)
        self.last_raw = raw
        return raw if self.raw else raw / 26.0


class AestheticMLP(nn.Module):
    """LAION improved-aesthetic predictor head (christophschuhmann/improved-aesthetic-predictor),
    the original layer layout so "layers.N.weight" checkpoints load strictly."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_aesthetic_mlp_state(path: str) -> dict[str, torch.Tensor]:
    """State dict of the aesthetic MLP from .safetensors or a torch .pth/.pt/.ckpt (weights_only).
    Accepts a Lightning-style {"state_dict": ...} and strips any prefix before "layers."."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    out = {}
    for k, v in sd.items():
        i = k.find("layers.")
        if i >= 0:
            out[k[i:]] = v
    if not out:
        raise ValueError(f"no 'layers.N.*' keys in {path} (keys: {list(sd)[:8]})")
    return out


@register_scorer("aesthetic")
class AestheticScorer(_ClipScorerBase):
    """LAION improved aesthetic score (raw, about 1..10) as Flow-GRPO/DDPO compute it: CLIP
    get_image_features, L2-normalised, through the MLP (run in float32)."""

    name = "aesthetic"

    def __init__(self, mlp_path: str | None = None, clip_path: str = AESTHETIC_CLIP, device=None, dtype=None,
                 batch_size: int = 32, local_files_only: bool | None = None):
        super().__init__(device, dtype, batch_size)
        from transformers import CLIPImageProcessor, CLIPModel

        mlp_path = mlp_path or os.environ.get("APEX_FAST_AESTHETIC_MLP")
        if not mlp_path:
            raise RewardModelLoadError(
                "reward 'aesthetic': no MLP weights path. Fix: download sac+logos+ava1-l14-linearMSE.pth "
                f"({AESTHETIC_MLP_URL}) and pass make_scorer('aesthetic', mlp_path=FILE) "
                "or set APEX_FAST_AESTHETIC_MLP=FILE."
            )
        self.clip_path, self.mlp_path = str(clip_path), str(mlp_path)
        lfo = {} if local_files_only is None else {"local_files_only": local_files_only}
        try:
            self.processor = CLIPImageProcessor.from_pretrained(self.clip_path, **lfo)
        except Exception as e:
            raise _load_error("aesthetic", "CLIP image processor", self.clip_path, e, "clip_path") from e
        try:
            self.clip = CLIPModel.from_pretrained(self.clip_path, **lfo).eval().to(self.device, self.dtype)
        except Exception as e:
            raise _load_error("aesthetic", "CLIP ViT-L/14 model", self.clip_path, e, "clip_path") from e
        self.clip.requires_grad_(False)
        dim = int(self.clip.config.projection_dim)
        self.mlp = AestheticMLP(dim)
        try:
            self.mlp.load_state_dict(load_aesthetic_mlp_state(self.mlp_path), strict=True)
        except Exception as e:
            raise RewardModelLoadError(
                f"reward 'aesthetic': cannot load the MLP weights from {self.mlp_path!r} ({type(e).__name__}: {e}). "
                f"Fix: pass mlp_path= the improved-aesthetic-predictor checkpoint for a {dim}-dim CLIP embedding "
                f"(sac+logos+ava1-l14-linearMSE.pth, {AESTHETIC_MLP_URL}), keys 'layers.N.weight/bias'."
            ) from e
        self.mlp.eval().to(self.device)
        self.mlp.requires_grad_(False)

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """L2-normalised CLIP image embeddings, float32 [N, D] on self.device."""
        arr = to_uint8_hwc(images)
        out = []
        for i in range(0, arr.shape[0], self.batch_size):
            pix = self.processor(images=_pil_list(arr[i:i + self.batch_size]), return_tensors="pt")["pixel_values"]
            e = _features(self.clip.get_image_features(pixel_values=pix.to(self.device, self.dtype))).float()
            out.append(e / torch.linalg.vector_norm(e, dim=-1, keepdim=True))
        return torch.cat(out) if out else torch.zeros(0, self.mlp.input_size, device=self.device)

    @torch.no_grad()
    def __call__(self, images, prompts: Sequence[str] | None = None, metadata=None) -> torch.Tensor:
        return self.mlp(self.embed(images)).squeeze(-1).cpu()


@register_scorer("deqa")
class DeqaScorer:
    """DeQA-Score (You et al. 2025) through its own remote code: ``model.score(list[PIL]) / 5``.

    Its remote code pins its own transformers/mPLUG-Owl2 dependencies; Flow-GRPO runs it in a
    separate environment behind a scoring server: there, ``python -m apex_fast.rewards.server
    --scorer deqa``; here, ``make_scorer("remote", url=...)``."""

    name = "deqa"

    def __init__(self, model_path: str = DEQA_MODEL, device=None, dtype=None, batch_size: int = 8, raw: bool = False,
                 attn_implementation: str = "eager", local_files_only: bool | None = None):
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = max(1, int(batch_size))
        self.raw = bool(raw)
        self.model_path = str(model_path)
        kw = {_dtype_kwarg(): self.dtype}
        if local_files_only is not None:
            kw["local_files_only"] = local_files_only
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                self.model_path, trust_remote_code=True, attn_implementation=attn_implementation, **kw
            )
            self.model = self.model.to(self.device).eval()
        except Exception as e:
            raise _load_error(
                "deqa", "DeQA-Score model (trust_remote_code)", self.model_path, e, "model_path",
                extra="DeQA-Score's remote code needs the dependencies of github.com/zhiyuanyou/DeQA-Score (an older "
                "transformers); if they clash with this environment, run it in its own environment with "
                "`python -m apex_fast.rewards.server --scorer deqa --port P` and use make_scorer('remote', url=...).",
            ) from e
        self.model.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images, prompts: Sequence[str] | None = None, metadata=None) -> torch.Tensor:
        arr = to_uint8_hwc(images)
        out = []
        for i in range(0, arr.shape[0], self.batch_size):
            s = self.model.score(_pil_list(arr[i:i + self.batch_size]))
            out.append(torch.as_tensor(s, dtype=torch.float32).flatten().cpu())
        r = torch.cat(out) if out else torch.zeros(0)
        return r if self.raw else r / 5.0
