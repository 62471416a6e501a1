"""The tiny embedded SD3 pipeline: every component of `StableDiffusion3Pipeline`, built
offline and deterministically from a seed, small enough to sample and train on one CPU thread.

Shapes mirror SD3 so every code path of the real model is exercised:

* CLIP-L / CLIP-G stand-ins with different widths (16 and 32); their penultimate hidden
  states are concatenated (48) and zero-padded to ``joint_attention_dim`` (64, the T5 width),
  their projections concatenated into the pooled embedding (48 = ``pooled_projection_dim``);
* an optional T5 encoder (d_model 64); without it the pipeline feeds zeros, as SD3 does;
* a 16-channel VAE with 4 resolution levels (``vae_scale_factor`` 8), so 64 x 64 px images
  <-> 16 x 8 x 8 latents -> 4 x 4 = 16 image tokens at patch 2. Unlike the other components
  it is *trained* (scripts/train_tiny_vae.py: reconstruction + small KL on a fixed set of 96 procedural images
  of shapes, gradients, words and noise) and loaded from ``assets/tiny_vae`` (~1 MB
  safetensors), the same for every seed; its scaling/shift factors are measured on its data
  as SD3's were, so N(0, 1) latents decode to varied images whose colour, contrast and
  detail follow the latents (a random VAE decodes every latent to nearly the same image);
* an ``SD3Transformer2DModel`` with 2 joint blocks (inner dim 32, RMS qk-norm like SD3.5);
* ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.

The transformer and text encoders are random (seeded): samples are not meaningful pictures,
but image rewards respond to the latents the policy produces, and shapes, dtypes, LoRA,
save/load and the sampler behave exactly as with SD3/SD3.5.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER_DIR = ASSETS_DIR / "tiny_clip_tokenizer"

TINY_IMAGE_SIZE = 64  # pixels; 8x VAE down-sampling -> 8 x 8 latents
TINY_SD3_DIR = ASSETS_DIR / "tiny_sd3"  # the pretrained testbed pipeline (scripts/pretrain_tiny_sd3.py)
TINY_VAE_DIR = ASSETS_DIR / "tiny_vae"  # trained weights + config (scripts/train_tiny_vae.py)
TINY_VAE_BLOCK_OUT_CHANNELS = (16, 16, 32, 32)  # 4 levels -> vae_scale_factor 2 ** 3 = 8
TINY_LATENT_SIZE = TINY_IMAGE_SIZE // 2 ** (len(TINY_VAE_BLOCK_OUT_CHANNELS) - 1)
TINY_CLIP_HIDDEN = (16, 32)  # text_encoder (CLIP-L stand-in), text_encoder_2 (CLIP-G stand-in)
TINY_T5_DIM = 64  # = transformer joint_attention_dim, with or without the T5 encoder
TINY_T5_MAX_LENGTH = 256
SD3_VAE_SCALING_FACTOR = 1.5305  # SD3's; the trained tiny VAE stores its own (from its data)
SD3_VAE_SHIFT_FACTOR = 0.0609


def tiny_clip_tokenizer():
    """The committed tiny CLIP BPE tokenizer (see scripts/train_tokenizer.py)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))


def tiny_t5_tokenizer():
    """A T5 (Unigram, sentencepiece-style) tokenizer derived offline from the tiny CLIP vocabulary.

    Pieces: every printable-ASCII CLIP token, as a word start (``"\u2581red"``) and as a
    continuation (``"red"``); every single printable-ASCII character likewise. All pieces
    score the same, so Unigram picks the segmentation with the fewest pieces. Vocabulary
    layout as T5's: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the pieces (no sentinels).
    """
    from transformers import T5TokenizerFast

    vocab = json.loads((TINY_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    pieces: list[str] = ["\u2581"]
    seen = set(pieces)
    chars = [chr(c) for c in range(33, 127)]
    for tok in chars + sorted(vocab, key=vocab.get):
        if tok.startswith("<|"):
            continue
        s = tok[: -len("</w>")] if tok.endswith("</w>") else tok
        if not s or not all(33 <= ord(c) < 127 for c in s):
            continue
        for p in ("\u2581" + s, s):
            if p not in seen:
                seen.add(p)
                pieces.append(p)
    scores = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -10.0) for p in pieces]
    return T5TokenizerFast(vocab=scores, extra_ids=0, model_max_length=TINY_T5_MAX_LENGTH)


def _clip_text_encoder(vocab_size: int, hidden: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    return CLIPTextModelWithProjection(config)


def _t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=TINY_T5_DIM,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _transformer():
    from diffusers import SD3Transformer2DModel

    heads, head_dim = 2, 16
    return SD3Transformer2DModel(
        sample_size=TINY_LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=TINY_T5_DIM,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=sum(TINY_CLIP_HIDDEN),
        pos_embed_max_size=16,  # up to 16 patches a side: images up to 256 px
        qk_norm="rms_norm",
    )


def tiny_vae_config() -> dict:
    """`AutoencoderKL` kwargs of the tiny VAE (SD3's layout, 16 latent channels, x8 down-sampling).

    scaling/shift factors here are SD3's placeholders; the trained asset stores the ones measured
    on its training data (scripts/train_tiny_vae.py)."""
    n = len(TINY_VAE_BLOCK_OUT_CHANNELS)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=TINY_VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=2,  # >= 8 channels a group: a 2-channel group normalises a flat colour to +-1
        sample_size=TINY_IMAGE_SIZE,
        scaling_factor=SD3_VAE_SCALING_FACTOR,
        shift_factor=SD3_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def _vae():
    """The trained tiny VAE from the package assets (independent of the seed)."""
    from diffusers import AutoencoderKL

    if not (TINY_VAE_DIR / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(f"tiny VAE weights missing in {TINY_VAE_DIR}: run scripts/train_tiny_vae.py")
    return AutoencoderKL.from_pretrained(str(TINY_VAE_DIR), local_files_only=True)


def build_tiny_pipeline(seed: int = 0, *, with_t5: bool = False, dtype: torch.dtype = torch.float32):
    """Build the tiny `StableDiffusion3Pipeline` offline, deterministically from `seed`.

    Same seed -> bit-identical weights; the global torch RNG is left untouched. The
    transformer and CLIP encoders do not depend on `with_t5` (T5 is initialised last); the
    VAE is the trained asset, identical for every seed.
    Components: see the module docstring. Default image size: TINY_IMAGE_SIZE (64 px).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizer = tiny_clip_tokenizer()
    vocab_size = len(tokenizer)
    ids = dict(bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _clip_text_encoder(vocab_size, TINY_CLIP_HIDDEN[0], **ids)
        text_encoder_2 = _clip_text_encoder(vocab_size, TINY_CLIP_HIDDEN[1], **ids)
        transformer = _transformer()
        text_encoder_3 = tokenizer_3 = None
        if with_t5:
            tokenizer_3 = tiny_t5_tokenizer()
            text_encoder_3 = _t5_encoder(len(tokenizer_3))

    vae = _vae()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    for m in (text_encoder, text_encoder_2, text_encoder_3, vae, transformer):
        if m is not None:
            m.eval()
            if dtype != torch.float32:
                # plain nn.Module.to: the tiny models keep no module in fp32, so diffusers'
                # "cast with from_pretrained(torch_dtype=...)" warning does not apply
                torch.nn.Module.to(m, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_tiny_pretrained(dtype: torch.dtype = torch.float32):
    """The pretrained tiny SD3 testbed (``load_pipeline("tiny")``): the diffusers pipeline folder
    written by scripts/pretrain_tiny_sd3.py into the package assets, loaded with the standard
    ``StableDiffusion3Pipeline.from_pretrained`` (offline; no T5, as SD3 allows)."""
    from diffusers import StableDiffusion3Pipeline

    if not (TINY_SD3_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"tiny SD3 asset missing in {TINY_SD3_DIR}: run scripts/pretrain_tiny_sd3.py")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()  # a 7-file load needs no progress bars
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(
            str(TINY_SD3_DIR), text_encoder_3=None, tokenizer_3=None, local_files_only=True
        )
    finally:
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.transformer):
        m.eval()
        if dtype != torch.float32:
            torch.nn.Module.to(m, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "TINY_IMAGE_SIZE",
    "TINY_LATENT_SIZE",
    "TINY_TOKENIZER_DIR",
    "TINY_VAE_DIR",
    "tiny_vae_config",
    "build_tiny_pipeline",
    "load_tiny_pretrained",
    "TINY_SD3_DIR",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
    "count_parameters",
]
