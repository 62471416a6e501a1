"""Prompt encoding through the pipeline's own `encode_prompt` (no CFG duplication here).

Shapes (SD3 contract): prompt_embeds [N, 77 + max_sequence_length, joint_attention_dim]
(CLIP-L and CLIP-G penultimate hidden states concatenated and zero-padded to the T5 width,
then the T5 tokens, zeros when there is no T5 encoder); pooled [N, pooled_projection_dim].
"""

from __future__ import annotations

import torch

# Flow-GRPO encodes prompts with 128 T5 tokens; SD3's pipeline default is 256.
DEFAULT_MAX_SEQUENCE_LENGTH = 128


@torch.no_grad()
def encode_prompts(
    pipe,
    prompts: list[str],
    device: str | torch.device | None = None,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode `prompts` -> (prompt_embeds [N, L, D], pooled [N, Dp]) on `device`.

    Uses `pipe.encode_prompt(..., do_classifier_free_guidance=False)`; the outputs are
    in the text encoders' dtype, detached.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts: empty prompt list")
    device = torch.device(device) if device is not None else pipe._execution_device
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return prompt_embeds.to(device), pooled.to(device)


@torch.no_grad()
def encode_negative(
    pipe,
    n: int,
    device: str | torch.device | None = None,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty-prompt embeddings for CFG, repeated n times: ([n, L, D], [n, Dp]).

    Identical to what `encode_prompt` computes for its default negative prompt ("").
    The empty prompt is encoded once and expanded (a copy, safe to modify).
    """
    if n < 1:
        raise ValueError(f"encode_negative: n must be >= 1, got {n}")
    embeds, pooled = encode_prompts(pipe, [""], device, max_sequence_length=max_sequence_length)
    return embeds.expand(n, -1, -1).clone(), pooled.expand(n, -1).clone()


__all__ = ["encode_prompts", "encode_negative", "DEFAULT_MAX_SEQUENCE_LENGTH"]
