"""Evaluation cache: the images and per-reward scores of one (weights, prompt set, seed, sampler)
combination, so re-running an evaluation is instant and a new checkpoint costs only itself.

Layout: ``<root>/<key>/`` with ``key.json`` (what the key hashes, readable), ``images/NNNNN.png``
(uint8, lossless: re-scoring them gives the scores the sampler's images gave) and ``scores.json``
(``{reward key: [score or null]}``). Weights enter the key by content (sha256 of the LoRA's
tensors and metadata), so a retrained checkpoint under the same name is never served stale
results. Writes are atomic (temporary name + rename); deleting the folder clears the cache."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "apex-fast" / "eval"


def default_cache_dir() -> Path:
    """``$APEX_FAST_EVAL_CACHE``, else ``$XDG_CACHE_HOME/apex-fast/eval`` (~/.cache/apex-fast/eval)."""
    env = os.environ.get("APEX_FAST_EVAL_CACHE")
    return Path(env) if env else DEFAULT_CACHE


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def safetensors_digest(path: str | Path, keys: list[str] | None = None) -> str:
    """sha256 of a safetensors file's content (tensor names, dtypes, shapes, bytes and metadata, in
    sorted order): the file's bytes are not a stable identity, since safetensors may write the same
    metadata in a different order each time."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        if keys is None:
            h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for k in sorted(f.keys()) if keys is None else keys:
            t = f.get_tensor(k).contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CacheEntry:
    def __init__(self, root: Path, key: dict):
        self.key = key
        self.dir = root / stable_hash(key)[:24]

    # images ---------------------------------------------------------------------------------
    @property
    def images_dir(self) -> Path:
        return self.dir / "images"

    def has_images(self, n: int) -> bool:
        return (self.dir / "images.json").is_file() and json.loads((self.dir / "images.json").read_text())["n"] == n

    def save_images(self, images: np.ndarray) -> None:
        """images uint8 [N, H, W, 3]."""
        from PIL import Image

        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "key.json").write_text(json.dumps(self.key, indent=1, sort_keys=True, default=str))
        tmp = self.dir / f".images-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for i, im in enumerate(images):
            Image.fromarray(im).save(tmp / f"{i:05d}.png")
        shutil.rmtree(self.images_dir, ignore_errors=True)
        os.replace(tmp, self.images_dir)
        _write_json(self.dir / "images.json", {"n": int(len(images)), "shape": list(images.shape[1:])})

    def load_images(self, indices=None) -> np.ndarray:
        from PIL import Image

        n = json.loads((self.dir / "images.json").read_text())["n"]
        idx = range(n) if indices is None else indices
        return np.stack([np.asarray(Image.open(self.images_dir / f"{i:05d}.png").convert("RGB")) for i in idx])

    # scores ---------------------------------------------------------------------------------
    def _scores(self) -> dict:
        p = self.dir / "scores.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def scores(self, reward_key: str) -> np.ndarray | None:
        v = self._scores().get(reward_key)
        return None if v is None else np.array([np.nan if x is None else x for x in v], dtype=np.float64)

    def save_scores(self, reward_key: str, values) -> None:
        data = self._scores()
        data[reward_key] = [None if not np.isfinite(x) else float(x) for x in np.asarray(values, dtype=np.float64)]
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / "scores.json", data)


class EvalCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def entry(self, key: dict) -> CacheEntry:
        return CacheEntry(self.root, key)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
