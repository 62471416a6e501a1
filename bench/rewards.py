"""Reward benchmarks: OCR accuracy on rendered text (fonts x sizes x styles, per engine) and per-scorer
throughput.

    OMP_NUM_THREADS=1 python bench/rewards.py [--quick] [--engines rapidocr,tesseract] [--arch]

Writes bench/results/rewards_ocr_accuracy.json and bench/results/rewards_throughput.json.
Accuracy: each image shows one phrase; the prompt quotes that phrase; the reward is the SPEC 2 OCR
score. Reported per engine: mean reward, exact rate (reward == 1), by font / size / style, s/image.
Throughput: seconds per 512x512 image for each offline scorer, the OCR engines, the scoring-server
round trip, and with --arch the full-size PickScore (CLIP ViT-H/14) and aesthetic (CLIP ViT-L/14 +
MLP) architectures with random weights (compute does not depend on the weights; no hub access here).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apex_fast.rewards import make_scorer, start_server  # noqa: E402

FONT_DIR = "/usr/share/fonts/truetype/dejavu"
FONTS = {
    "DejaVuSans": "DejaVuSans.ttf",
    "DejaVuSans-Bold": "DejaVuSans-Bold.ttf",
    "DejaVuSerif": "DejaVuSerif.ttf",
    "DejaVuSerif-Italic": "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono": "DejaVuSansMono.ttf",
    "DejaVuSansCondensed-BoldOblique": "DejaVuSansCondensed-BoldOblique.ttf",
    "PillowDefault": None,  # ImageFont.load_default(size=...), Pillow >= 10.1
}
PHRASES = ["HELLO", "Open 24 Hours", "apex fast", "Coffee Shop", "SALE 50% OFF", "Welcome Home", "No Parking",
           "Fresh Bread", "Happy Birthday", "EXIT", "Stable Diffusion", "grpo"]
SIZES = [16, 24, 40, 64]
STYLES = ["plain", "color"]
IMG = 512


def font(name: str, size: int):
    f = FONTS[name]
    return ImageFont.load_default(size=size) if f is None else ImageFont.truetype(os.path.join(FONT_DIR, f), size)


def render(phrase: str, fname: str, size: int, style: str, rng: np.random.Generator) -> np.ndarray | None:
    """Phrase centred on a 512x512 image; None if it does not fit in 95% of the width."""
    if style == "plain":
        img = Image.new("RGB", (IMG, IMG), (255, 255, 255))
        fg = (0, 0, 0)
    else:  # a smooth light colour gradient with a dark coloured text, a little noise
        c0, c1 = rng.integers(150, 256, 3), rng.integers(150, 256, 3)
        t = np.linspace(0, 1, IMG)[:, None, None]
        bg = (c0 * (1 - t) + c1 * t) * np.ones((1, IMG, 1))
        bg = np.clip(bg + rng.normal(0, 6, (IMG, IMG, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(bg)
        fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    d = ImageDraw.Draw(img)
    f = font(fname, size)
    l, t, r, b = d.textbbox((0, 0), phrase, font=f)
    if r - l > 0.95 * IMG:
        return None
    d.text(((IMG - (r - l)) // 2 - l, (IMG - (b - t)) // 2 - t), phrase, fill=fg, font=f)
    return np.asarray(img)


def ocr_accuracy(engines: list[str], quick: bool) -> dict:
    rng = np.random.default_rng(0)
    phrases = PHRASES[:4] if quick else PHRASES
    cases = []
    for fname in FONTS:
        for size in SIZES:
            for style in STYLES:
                for p in phrases:
                    img = render(p, fname, size, style, rng)
                    if img is not None:
                        cases.append((fname, size, style, p, img))
    out = {"n_images": len(cases), "image_size": IMG, "fonts": list(FONTS), "font_px": SIZES, "styles": STYLES,
           "phrases": phrases, "engines": {}}
    for eng in engines:
        try:
            scorer = make_scorer("ocr", engine=eng)
            scorer.engine  # build it now, outside the timing
        except Exception as e:  # noqa: BLE001
            out["engines"][eng] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[ocr] {eng}: unavailable: {e}", flush=True)
            continue
        rows = []
        t0 = time.perf_counter()
        for fname, size, style, p, img in cases:
            r = float(scorer(img[None], [f'a sign that says "{p}"'], [{}])[0])
            rows.append((fname, size, style, r))
        dt = time.perf_counter() - t0
        scores = np.array([r[3] for r in rows])

        def summary(mask):
            s = scores[mask]
            return {"n": int(mask.sum()), "mean_reward": round(float(s.mean()), 4), "exact": round(float((s == 1).mean()), 4)}

        res = {"mean_reward": round(float(scores.mean()), 4), "exact": round(float((scores == 1).mean()), 4),
               "s_per_image": round(dt / len(rows), 4)}
        for key, idx in (("by_font", 0), ("by_font_px", 1), ("by_style", 2)):
            vals = np.array([r[idx] for r in rows], dtype=object)
            res[key] = {str(v): summary(vals == v) for v in dict.fromkeys(vals.tolist())}
        out["engines"][eng] = res
        print(f"[ocr] {eng}: mean {res['mean_reward']:.3f} exact {res['exact']:.3f} over {len(rows)} images, "
              f"{res['s_per_image']:.3f} s/image", flush=True)
    return out


def _time(fn, imgs, prompts, reps=1):
    fn(imgs[:1], prompts[:1], [{}])  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(imgs, prompts, [{}] * len(prompts))
    return (time.perf_counter() - t0) / (reps * len(prompts))


def _arch_dirs(root: Path) -> dict:
    """Full-size PickScore (CLIP-H/14) and aesthetic (CLIP-L/14) architectures, random weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from test_rewards_models import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    ip = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(root / "proc")
    ip.save_pretrained(root / "clip_l")
    # configs of laion/CLIP-ViT-H-14 (PickScore_v1) and openai/clip-vit-large-patch14
    h = CLIPConfig(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                    eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"]),
                   vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                      image_size=224, patch_size=14), projection_dim=1024)
    CLIPModel(h).save_pretrained(root / "clip_h")
    lcfg = CLIPConfig(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                      vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                         image_size=224, patch_size=14), projection_dim=768)
    CLIPModel(lcfg).save_pretrained(root / "clip_l")
    from apex_fast.rewards.models import AestheticMLP

    torch.save(AestheticMLP(768).state_dict(), root / "mlp.pth")
    return {"proc": root / "proc", "clip_h": root / "clip_h", "clip_l": root / "clip_l", "mlp": root / "mlp.pth"}


def throughput(engines: list[str], arch: bool, n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    phrases = (PHRASES * 4)[:n]
    imgs = np.stack([render(p, "DejaVuSans", 40, "color", rng) for p in phrases])
    prompts = [f'a sign that says "{p}"' for p in phrases]
    rows = []

    def add(name, spi, **extra):
        rows.append({"scorer": name, "s_per_image": round(spi, 5), "images_per_s": round(1 / spi, 2), "n": n,
                     "image_px": IMG, **extra})
        print(f"[throughput] {name}: {spi * 1000:.1f} ms/image", flush=True)

    for name in ("jpeg_compressibility", "colorfulness", "contrast"):
        add(name, _time(make_scorer(name), imgs, prompts, reps=3))
    for eng in engines:
        try:
            s = make_scorer("ocr", engine=eng)
            s.engine
        except Exception as e:  # noqa: BLE001
            print(f"[throughput] ocr/{eng}: unavailable: {e}")
            continue
        add(f"ocr/{eng}", _time(s, imgs, prompts))
    with start_server("contrast") as srv:
        for fmt in ("raw", "png"):
            add(f"remote(contrast) {fmt} round trip", _time(srv.client(image_format=fmt), imgs, prompts, reps=3),
                note=f"scoring-server overhead ({fmt} encode + base64 + HTTP + decode); contrast itself ~1 ms")
    if arch:
        with tempfile.TemporaryDirectory() as d:
            print("[throughput] building full-size random CLIP-H/14 and CLIP-L/14 (a minute) ...", flush=True)
            p = _arch_dirs(Path(d))
            k = min(n, 4)
            for bs in (1, 4):
                s = make_scorer("pickscore", model_path=p["clip_h"], processor_path=p["proc"], device="cpu",
                                dtype="float32", batch_size=bs)
                add(f"pickscore arch (CLIP ViT-H/14, random weights) cpu fp32 bs{bs}", _time(s, imgs[:k], prompts[:k]))
                del s
                s = make_scorer("aesthetic", mlp_path=p["mlp"], clip_path=p["clip_l"], device="cpu", dtype="float32",
                                batch_size=bs)
                add(f"aesthetic arch (CLIP ViT-L/14 + MLP, random weights) cpu fp32 bs{bs}", _time(s, imgs[:k], prompts[:k]))
                del s
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 phrases instead of 12")
    ap.add_argument("--engines", default="rapidocr,tesseract")
    ap.add_argument("--arch", action="store_true", help="also time full-size PickScore/aesthetic architectures")
    ap.add_argument("--n", type=int, default=16, help="images for the throughput rows")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    engines = [e for e in args.engines.split(",") if e]
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
           "machine": platform.machine(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d")}
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.skip_accuracy:
        acc = ocr_accuracy(engines, args.quick)
        acc["env"] = env
        (out_dir / "rewards_ocr_accuracy.json").write_text(json.dumps(acc, indent=1) + "\n")
    rows = throughput(engines, args.arch, args.n)
    (out_dir / "rewards_throughput.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
