"""Write the shipped demo pairs file apex_fast/data/pairs/tiny_pairs.jsonl and its 64 px images.

Images come from the tiny VAE's procedural generator (scripts/train_tiny_vae.py), so the tiny
model's VAE encodes them well. Prompts are the first shipped training prompts. The first half of
the lines carry the offline scorers' scores (colorfulness, contrast, jpeg_compressibility), the
second half none, so a run exercises both paths (given scores, scorers run on missing ones).
Deterministic:

    python scripts/make_tiny_pairs.py [--pairs 16]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apex_fast.data import load_prompts  # noqa: E402
from apex_fast.dpo.pairs import PAIRS_DIR  # noqa: E402
from apex_fast.rewards import make_scorer, score_all  # noqa: E402

SCORERS = ["colorfulness", "contrast", "jpeg_compressibility"]


def _procedural():
    spec = importlib.util.spec_from_file_location("train_tiny_vae", ROOT / "scripts" / "train_tiny_vae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.procedural_image


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from PIL import Image

    procedural_image = _procedural()
    rng = np.random.default_rng(args.seed)
    prompts = [p for p, _ in load_prompts("tiny_train.txt")]
    img_dir = PAIRS_DIR / "tiny"
    img_dir.mkdir(parents=True, exist_ok=True)
    scorers = [make_scorer(n) for n in SCORERS]
    lines = []
    for i in range(args.pairs):
        pair = np.stack([procedural_image(rng), procedural_image(rng)])
        names = [f"tiny/{i:02d}_a.png", f"tiny/{i:02d}_b.png"]
        for arr, n in zip(pair, names):
            Image.fromarray(arr).save(PAIRS_DIR / n, optimize=True)
        rec = {"prompt": prompts[i % len(prompts)], "images": names}
        if i < args.pairs // 2:
            R = score_all(scorers, pair, [rec["prompt"]] * 2, None)
            rec["scores"] = {n: [round(float(R[0, k]), 5), round(float(R[1, k]), 5)] for k, n in enumerate(SCORERS)}
        lines.append(json.dumps(rec))
    (PAIRS_DIR / "tiny_pairs.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pairs to {PAIRS_DIR / 'tiny_pairs.jsonl'}")


if __name__ == "__main__":
    main()
