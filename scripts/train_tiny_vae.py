"""Train the tiny embedded VAE (apex_fast/models/tiny.py) and store it in the package assets.

A randomly initialised AutoencoderKL decodes every latent to nearly the same image (GroupNorm
normalises the latent scale away and the output is dominated by the decoder's own patterns), so
no policy could move image rewards. This script trains the tiny VAE (reconstruction + a small
KL), deterministically on one CPU thread, on a small FIXED set of procedurally generated
64 x 64 images of varied colorfulness / contrast / compressibility (flat and gradient
backgrounds, coloured shapes, rendered words with PIL's default FreeType font, noise textures),
which the model largely memorises. Reconstruction quality is modest; what matters for RL is that
the decoded colorfulness / contrast / JPEG size follow the latents (printed before and after).

Then, as for SD3, the latent statistics over the data give ``shift_factor`` (mean) and
``scaling_factor`` (1 / std), so that ``(z - shift) * scale`` has unit std: the transformer
samples from N(0, 1) noise in that space. Both are stored in config.json.

    OMP_NUM_THREADS=1 python scripts/train_tiny_vae.py            # -> apex_fast/models/assets/tiny_vae/
    python scripts/train_tiny_vae.py --out /tmp/vae --steps 100   # quick try
"""
from __future__ import annotations

import argparse
import math
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apex_fast.models.tiny import TINY_IMAGE_SIZE, TINY_VAE_DIR, tiny_vae_config  # noqa: E402

WORDS = ["OPEN", "SALE", "CAFE", "STOP", "HELLO", "EXIT", "BAR", "24h", "NEW", "FREE", "hot", "Love",
         "TAXI", "BOOK", "ART", "Joy", "CODE", "fish", "MOON", "GO", "PIZZA", "Rain", "WIN", "zoo"]
_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int):
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def _color(rng: np.random.Generator, saturated: float) -> tuple[int, int, int]:
    if rng.random() < saturated:
        c = rng.integers(0, 256, 3)
        c[rng.integers(3)] = rng.choice([0, 255])
        return tuple(int(v) for v in c)
    g = int(rng.integers(0, 256))
    d = rng.integers(-30, 31, 3)
    return tuple(int(np.clip(g + v, 0, 255)) for v in d)


def _background(rng: np.random.Generator, size: int, saturated: float) -> np.ndarray:
    kind = rng.integers(4)
    a = np.array(_color(rng, saturated), np.float32)
    if kind == 0:  # flat
        return np.broadcast_to(a, (size, size, 3)).copy()
    b = np.array(_color(rng, saturated), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    if kind == 1:  # linear gradient
        th = rng.uniform(0, 2 * math.pi)
        t = (np.cos(th) * (xx - 0.5) + np.sin(th) * (yy - 0.5)) / math.sqrt(0.5) + 0.5
    elif kind == 2:  # radial gradient
        cx, cy = rng.uniform(0, 1, 2)
        t = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / 1.2
    else:  # low-frequency noise / stripes
        f = rng.uniform(1, 8)
        th = rng.uniform(0, 2 * math.pi)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * f * (np.cos(th) * xx + np.sin(th) * yy) + rng.uniform(0, 6.3))
    t = np.clip(t, 0, 1)[..., None]
    return a * (1 - t) + b * t


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multi-scale coloured noise texture in [-1, 1]."""
    out = np.zeros((size, size, 3), np.float32)
    for cells in rng.choice([2, 4, 8, 16, 32, 64], size=rng.integers(1, 4), replace=False):
        n = rng.standard_normal((int(cells), int(cells), 3)).astype(np.float32)
        img = Image.fromarray(((np.clip(n, -2.5, 2.5) + 2.5) * 51).astype(np.uint8))
        up = np.asarray(img.resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1
        if rng.random() < 0.5:
            up = up.mean(-1, keepdims=True).repeat(3, -1)
        out += up * rng.uniform(0.3, 1.0)
    return np.clip(out, -1, 1)


def procedural_image(rng: np.random.Generator, size: int = TINY_IMAGE_SIZE) -> np.ndarray:
    """One random uint8 RGB [size, size, 3] image."""
    saturated = rng.uniform(0, 1)
    arr = _background(rng, size, saturated)
    if rng.random() < 0.2:
        arr = arr + _noise(rng, size) * rng.uniform(10, 120)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 6)):
        x0, y0 = rng.integers(-size // 4, size, 2)
        w, h = rng.integers(4, size, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        col = _color(rng, saturated)
        kind = rng.integers(4)
        if kind == 0:
            draw.rectangle(box, fill=col)
        elif kind == 1:
            draw.ellipse(box, fill=col)
        elif kind == 2:
            pts = [tuple(int(v) for v in rng.integers(-8, size + 8, 2)) for _ in range(3)]
            draw.polygon(pts, fill=col)
        else:
            draw.line(box, fill=col, width=int(rng.integers(1, 6)))
    for _ in range(rng.integers(0, 3) if rng.random() < 0.6 else 0):
        if rng.random() < 0.7:
            word = str(rng.choice(WORDS))
        else:
            word = "".join(rng.choice(list(string.ascii_letters + string.digits), size=rng.integers(2, 6)))
        fs = int(rng.integers(9, 26))
        xy = (int(rng.integers(-4, size // 2)), int(rng.integers(-4, size - fs // 2)))
        draw.text(xy, word, fill=_color(rng, saturated), font=_font(fs))
    arr = np.asarray(img, np.float32)
    if rng.random() < 0.1:  # fine noise (incompressible)
        arr = arr + rng.standard_normal(arr.shape).astype(np.float32) * rng.uniform(5, 60)
    return np.clip(arr, 0, 255).astype(np.uint8)


def batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    """n images as float [n, 3, H, W] in [-1, 1] (the VAE's input range)."""
    x = np.stack([procedural_image(rng) for _ in range(n)])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def _feats(img01: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> [N, 3]: colorfulness, RMS contrast, JPEG kB (the reward functions)."""
    from apex_fast.rewards.simple import colorfulness_hasler, jpeg_size_kb, rms_contrast

    a = (img01.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return np.array([[colorfulness_hasler(i), rms_contrast(i), jpeg_size_kb(i)] for i in a])


@torch.no_grad()
def sensitivity(vae, n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Reward features of decoded N(0, 1) latents (SD3 scaling/shift), scaled by 0.25 / 1 / 2 and
    shifted by +1 on 4 of the 16 channels: the spread across samples and the response to the latents."""
    from apex_fast.rl.rollout import decode_latents

    z = torch.randn(n, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    shift = torch.zeros_like(z[:1])
    shift[:, :4] = 1.0
    out = {}
    for name, zz in (("x0.25", 0.25 * z), ("x1", z), ("x2", 2 * z), ("x1+shift", z + shift)):
        out[name] = _feats(decode_latents(vae, zz))
    return out


def print_sensitivity(title: str, sens: dict[str, np.ndarray]) -> None:
    print(f"{title}: decoded N(0,1) latents, mean (std across samples)")
    print(f"  {'latents':10s} {'colorfulness':>16s} {'contrast':>16s} {'jpeg kB':>16s}")
    for name, f in sens.items():
        cells = "".join(f" {m:9.3f} ({s:5.3f})" for m, s in zip(f.mean(0), f.std(0)))
        print(f"  {name:10s}{cells}")


def train(images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int,
          log_every: int = 50):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config())
    print(f"tiny VAE: {sum(p.numel() for p in vae.parameters())} parameters", flush=True)
    vae.eval()
    print_sensitivity("random init", sensitivity(vae, seed=seed))
    with torch.no_grad():  # start with a narrow posterior (std ~0.05): unit-std sampling noise
        c = vae.config.latent_channels  # would drown the small initial latent means for hundreds of steps
        vae.encoder.conv_out.bias[c:].fill_(-6.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    vae.train()
    for step in range(1, steps + 1):
        x = images[torch.randperm(len(images), generator=g)[:batch_size]]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).square().mean()
        kl = post.kl().mean() / x[0].numel()  # KL summed over latent dims, per pixel value
        loss = l1 + l2 + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                vae.eval()
                p = psnr(vae.decode(vae.encode(images[:32]).latent_dist.mode()).sample, images[:32])
                vae.train()
            print(f"step {step:5d}  l1 {l1.item():.4f}  kl/px {kl.item():.4f}  train-set psnr {p:.2f} dB  "
                  f"{time.time() - t0:.0f}s", flush=True)
    vae.eval()
    return vae


@torch.no_grad()
def latent_stats(vae, images: torch.Tensor, seed: int) -> tuple[float, float]:
    """SD3-style: shift = mean, scale = 1 / std of posterior samples over the data."""
    g = torch.Generator().manual_seed(seed)
    z = torch.cat([vae.encode(images[i:i + 32]).latent_dist.sample(generator=g) for i in range(0, len(images), 32)])
    return float(z.mean()), float(1.0 / z.std())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(TINY_VAE_DIR))
    ap.add_argument("--images", type=int, default=96, help="size of the fixed training set")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    images = batch(np.random.default_rng(args.seed), args.images)
    vae = train(images, args.steps, args.batch_size, args.lr, args.kl_weight, args.seed)
    shift, scale = latent_stats(vae, images, args.seed)
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    print(f"latent shift_factor {shift:.4f}  scaling_factor {scale:.4f}")
    print_sensitivity("trained", sensitivity(vae, seed=args.seed))
    data = _feats(images / 2 + 0.5)
    print("  training images: " + "".join(f" {m:9.3f} ({s:5.3f})" for m, s in zip(data.mean(0), data.std(0))))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out, safe_serialization=True)
    print(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e3:.0f} kB)")
    return vae


if __name__ == "__main__":
    main()
