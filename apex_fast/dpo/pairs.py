"""Offline preference pairs from a JSON-lines file, one pair per line:

    {"prompt": "a red apple", "images": ["img/0_a.png", "img/0_b.png"],
     "scores": {"colorfulness": [41.2, 12.9], "contrast": [0.21, 0.17]}, "metadata": {...}}

``images``: two paths, relative to the file's folder (or absolute). ``scores`` (optional): per scorer
the scores of image a and image b; a scorer of the run missing from a line (or null) is run on
that pair's images. ``metadata`` (optional) is passed to the scorers. Every malformed line is
reported with its line number in one error, before any image is decoded; ``skip_bad=True`` keeps
the good lines and logs the bad ones instead. The shipped demo file is ``TINY_PAIRS``.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PAIRS_DIR = Path(__file__).resolve().parent.parent / "data" / "pairs"
TINY_PAIRS = PAIRS_DIR / "tiny_pairs.jsonl"
FORMAT = ('{"prompt": str, "images": [path_a, path_b], "scores": {scorer: [score_a, score_b]} (optional), '
          '"metadata": {...} (optional)}')


class PairsFileError(ValueError):
    """A malformed pairs file; the message names the file and every bad line."""


@dataclass
class PairRecord:
    prompt: str
    images: tuple[Path, Path]
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    line: int = 0


def resolve_pairs_file(path: str | Path) -> Path:
    """A path as given, or a bare file name of the shipped pairs files."""
    p = Path(path)
    if p.is_file():
        return p
    if p.parent == Path(".") and (PAIRS_DIR / p.name).is_file():
        return PAIRS_DIR / p.name
    shipped = ", ".join(sorted(x.name for x in PAIRS_DIR.glob("*.jsonl"))) if PAIRS_DIR.is_dir() else "none"
    raise FileNotFoundError(f"dpo.pairs_file: {str(path)!r} not found (shipped pairs files: {shipped})")


def _number(x) -> float:
    if x is None:
        return math.nan
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"score {x!r} is not a number")
    return float(x)


def _parse(rec, base: Path, lineno: int, check_images: bool) -> PairRecord:
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    unknown = set(rec) - {"prompt", "images", "scores", "metadata"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}")
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError('needs a non-empty string "prompt"')
    imgs = rec.get("images")
    if not isinstance(imgs, list) or len(imgs) != 2 or not all(isinstance(x, str) and x for x in imgs):
        raise ValueError(f'"images" must be a list of two paths, got {imgs!r}')
    paths = tuple((Path(x) if Path(x).is_absolute() else base / x) for x in imgs)
    if check_images:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"image file(s) not found: {', '.join(missing)}")
    scores = {}
    raw = rec.get("scores") or {}
    if not isinstance(raw, dict):
        raise ValueError(f'"scores" must map scorer names to [score_a, score_b], got {raw!r}')
    for name, v in raw.items():
        if v is None:
            continue
        if not isinstance(v, list) or len(v) != 2:
            raise ValueError(f'"scores.{name}" must be [score_a, score_b], got {v!r}')
        try:
            scores[name] = (_number(v[0]), _number(v[1]))
        except ValueError as e:
            raise ValueError(f'"scores.{name}": {e}') from None
    meta = rec.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValueError(f'"metadata" must be an object, got {meta!r}')
    return PairRecord(prompt.strip(), paths, scores, dict(meta), lineno)


def read_pairs(path: str | Path, *, skip_bad: bool = False, check_images: bool = True) -> list[PairRecord]:
    """Every pair of a jsonl file (blank lines and lines starting with # are skipped)."""
    p = resolve_pairs_file(path)
    good, bad = [], []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            good.append(_parse(json.loads(s), p.parent, i, check_images))
        except json.JSONDecodeError as e:
            bad.append(f"line {i}: not valid JSON ({e.msg} at column {e.colno})")
        except ValueError as e:
            bad.append(f"line {i}: {e}")
    if bad and not skip_bad:
        shown = "; ".join(bad[:10]) + (f"; ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise PairsFileError(f"pairs file {p}: {len(bad)} malformed line(s): {shown}. Expected one object per line: "
                             f"{FORMAT}. Fix the lines, or set dpo.skip_bad_pairs: true to train on the "
                             f"{len(good)} good ones.")
    for b in bad:
        log.warning("pairs file %s: skipped %s", p, b)
    if not good:
        raise PairsFileError(f"pairs file {p} holds no valid pair; expected one object per line: {FORMAT}")
    return good


def load_pair_images(records: list[PairRecord], size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [P, size, size, 3] images a and b (RGB; resized with bicubic when needed). A file PIL
    cannot read raises PairsFileError naming its line."""
    from PIL import Image

    def load(path: Path, rec: PairRecord) -> np.ndarray:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                return np.asarray(im, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - any decoder error becomes a line-numbered error
            raise PairsFileError(f"pairs file line {rec.line}: cannot read image {path} ({type(e).__name__}: {e})") from None

    a = np.stack([load(r.images[0], r) for r in records])
    b = np.stack([load(r.images[1], r) for r in records])
    return a, b
