"""Two more CLIP-based voters for BalancedDPO (docs/SPEC.md sections 2 and 6), on transformers' CLIPModel.

  clip_score  cos(text, image) of a CLIP model (default openai/clip-vit-large-patch14, as
              Flow-GRPO's CLIPScore reward); about 0.15..0.35; ``raw=True`` gives
              logit_scale.exp() * cos (x100 for OpenAI CLIP).
  hpsv2       Human Preference Score v2 (Wu et al. 2023): an open_clip ViT-H-14 fine-tune. Its
              checkpoint (xswu/HPSv2: HPS_v2_compressed.pt or HPS_v2.1_compressed.pt, open_clip key
              names) is loaded into a transformers CLIPModel of the ViT-H-14 architecture through
              ``open_clip_to_hf`` (open_clip itself pulls torchvision, which this project never
              installs). Score = cos(text, image), as HPSv2's own img_score (about 0.2..0.35).
              The model config and processor come from ``clip_path`` (default
              laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the HF copy of the open_clip model HPSv2
              starts from, same preprocessing: 224 px bicubic, OpenAI mean/std).

Both load when built (a wrong path fails at start-up with a RewardModelLoadError naming the scorer,
the path and the fix) and accept device, dtype, batch_size, local_files_only like pickscore.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import torch

from .base import register_scorer, to_uint8_hwc
from .models import RewardModelLoadError, _ClipScorerBase, _features, _load_error, _pil_list

CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"
HPSV2_CLIP = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPSV2_REPO = "xswu/HPSv2"
HPSV2_FILE = "HPS_v2.1_compressed.pt"


class _CosineClipScorer(_ClipScorerBase):
    """cos(text_i, image_i) of a transformers CLIPModel + CLIPProcessor, batched."""

    def _cosine(self, images, prompts: Sequence[str]) -> torch.Tensor:
        arr = to_uint8_hwc(images)
        if len(prompts) != arr.shape[0]:
            raise ValueError(f"{self.name}: {arr.shape[0]} images but {len(prompts)} prompts")
        out = []
        for i in range(0, arr.shape[0], self.batch_size):
            img_in = self.processor(images=_pil_list(arr[i:i + self.batch_size]), return_tensors="pt")
            txt_in = self.processor(text=list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                    max_length=77, return_tensors="pt")
            ie = _features(self.model.get_image_features(pixel_values=img_in["pixel_values"].to(self.device, self.dtype))).float()
            te = _features(self.model.get_text_features(input_ids=txt_in["input_ids"].to(self.device),
                                                        attention_mask=txt_in["attention_mask"].to(self.device))).float()
            out.append((ie / ie.norm(dim=-1, keepdim=True) * te / te.norm(dim=-1, keepdim=True)).sum(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _load_processor(self, path: str, lfo: dict, kwarg: str):
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(path, **lfo)
        except Exception as e:
            raise _load_error(self.name, "CLIP processor (tokenizer + image processor)", path, e, kwarg) from e


@register_scorer("clip_score")
class ClipScoreScorer(_CosineClipScorer):
    name = "clip_score"

    def __init__(self, model_path: str = CLIP_SCORE_MODEL, processor_path: str | None = None, device=None, dtype=None,
                 batch_size: int = 32, raw: bool = False, local_files_only: bool | None = None):
        super().__init__(device, dtype, batch_size)
        from transformers import CLIPModel

        self.raw = bool(raw)
        self.model_path = str(model_path)
        self.processor_path = str(processor_path or model_path)
        lfo = {} if local_files_only is None else {"local_files_only": local_files_only}
        self.processor = self._load_processor(self.processor_path, lfo, "processor_path")
        try:
            self.model = CLIPModel.from_pretrained(self.model_path, **lfo).eval().to(self.device, self.dtype)
        except Exception as e:
            raise _load_error("clip_score", "CLIP model", self.model_path, e, "model_path") from e
        self.model.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images, prompts: Sequence[str], metadata=None) -> torch.Tensor:
        cos = self._cosine(images, prompts)
        return cos * float(self.model.logit_scale.detach().exp()) if self.raw else cos


# ------------------------------------------------------------------ open_clip -> transformers CLIP

_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def open_clip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (ViT visual tower, keys like ``visual.transformer.resblocks.0.
    attn.in_proj_weight``, ``token_embedding.weight``, ``text_projection``) -> transformers
    CLIPModel keys. The fused attention input projection is split into q/k/v; the projections are
    transposed (open_clip multiplies x @ proj, nn.Linear x @ W^T). A "module." prefix is stripped."""
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    rb = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")  # in_proj_weight too
    for k, v in sd.items():
        m = rb.match(k)
        if m:
            tower = "vision_model" if m.group(1) else "text_model"
            pre = f"{tower}.encoder.layers.{m.group(2)}."
            sub, kind = m.group(3), m.group(4)
            if sub == "attn.in_proj":
                q, kk, vv = v.chunk(3, dim=0)
                for name, t in zip(("q_proj", "k_proj", "v_proj"), (q, kk, vv)):
                    out[f"{pre}self_attn.{name}.{kind}"] = t.clone()
            elif sub in _BLOCK:
                out[f"{pre}{_BLOCK[sub]}.{kind}"] = v
            else:
                raise KeyError(f"unexpected open_clip block key {k!r}")
            continue
        simple = {
            "visual.class_embedding": "vision_model.embeddings.class_embedding",
            "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
            "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
            "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
            "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
            "visual.ln_post.weight": "vision_model.post_layernorm.weight",
            "visual.ln_post.bias": "vision_model.post_layernorm.bias",
            "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            "positional_embedding": "text_model.embeddings.position_embedding.weight",
            "ln_final.weight": "text_model.final_layer_norm.weight",
            "ln_final.bias": "text_model.final_layer_norm.bias",
            "logit_scale": "logit_scale",
        }
        if k in simple:
            out[simple[k]] = v
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif k in ("attn_mask", "visual.attn_mask"):  # causal-mask buffer; CLIPModel builds its own
            continue
        else:
            raise KeyError(f"unexpected open_clip key {k!r} (only ViT-tower CLIP checkpoints are supported)")
    return out


def load_open_clip_state(path: str) -> dict[str, torch.Tensor]:
    """Tensors of an open_clip checkpoint: .safetensors, or a torch file loaded with weights_only
    (HPSv2's .pt holds {"state_dict": ...} or the bare state dict)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _no_init():
    import contextlib

    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


@register_scorer("hpsv2")
class HPSv2Scorer(_CosineClipScorer):
    name = "hpsv2"

    def __init__(self, checkpoint_path: str | None = None, clip_path: str = HPSV2_CLIP, device=None, dtype=None,
                 batch_size: int = 32, local_files_only: bool | None = None):
        super().__init__(device, dtype, batch_size)
        from transformers import CLIPConfig, CLIPModel

        self.clip_path = str(clip_path)
        lfo = {} if local_files_only is None else {"local_files_only": local_files_only}
        self.processor = self._load_processor(self.clip_path, lfo, "clip_path")
        try:
            config = CLIPConfig.from_pretrained(self.clip_path, **lfo)
        except Exception as e:
            raise _load_error("hpsv2", "ViT-H-14 CLIP config", self.clip_path, e, "clip_path") from e
        ckpt = checkpoint_path or os.environ.get("APEX_FAST_HPSV2_CHECKPOINT")
        if not ckpt:
            try:
                from huggingface_hub import hf_hub_download

                ckpt = hf_hub_download(HPSV2_REPO, HPSV2_FILE, **lfo)
            except Exception as e:
                raise RewardModelLoadError(
                    f"reward 'hpsv2': cannot fetch {HPSV2_FILE} from the hub repo {HPSV2_REPO} ({type(e).__name__}: {e}). "
                    f"Fix: `huggingface-cli download {HPSV2_REPO} {HPSV2_FILE} --local-dir DIR` where there is network, "
                    f"then make_scorer('hpsv2', checkpoint_path='DIR/{HPSV2_FILE}') or APEX_FAST_HPSV2_CHECKPOINT=FILE."
                ) from e
        self.checkpoint_path = str(ckpt)
        try:
            state = open_clip_to_hf(load_open_clip_state(self.checkpoint_path))
            with _no_init():  # every weight comes from the checkpoint: skip ViT-H's random init
                model = CLIPModel(config)
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise ValueError(f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                                 f"(e.g. {unexpected[:3]}): is the checkpoint for the architecture of {self.clip_path}?")
        except RewardModelLoadError:
            raise
        except Exception as e:
            raise RewardModelLoadError(
                f"reward 'hpsv2': cannot load the HPSv2 checkpoint {self.checkpoint_path!r} into the CLIP model of "
                f"{self.clip_path!r} ({type(e).__name__}: {e}). Fix: pass checkpoint_path= an open_clip ViT-H-14 "
                f"checkpoint ({HPSV2_REPO}: HPS_v2_compressed.pt or {HPSV2_FILE}) and clip_path= the matching "
                f"transformers CLIP folder ({HPSV2_CLIP})."
            ) from e
        self.model = model.eval().to(self.device, self.dtype)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images, prompts: Sequence[str], metadata=None) -> torch.Tensor:
        return self._cosine(images, prompts)
