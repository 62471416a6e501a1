"""Client side of the scoring server (apex_fast/rewards/server.py).

    with start_server("ocr", port=None) as srv:           # subprocess, waits for GET /health
        scorer = make_scorer("remote", url=srv.url, timeout=60, retries=2, name="ocr")
        R = score_all([scorer], images, prompts, metadata)

The client retries connection errors, timeouts and 502/503/504 (``retries`` more attempts, with
exponential backoff); a 4xx/500 answer is not retried. When every attempt fails it raises
RemoteScorerError saying the server is down and how to start it; inside score_all that becomes a
NaN column (and counts towards a RewardFailureTracker).
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np
import torch

from .base import register_scorer, to_uint8_hwc

_RETRY_STATUS = {502, 503, 504}


class RemoteScorerError(RuntimeError):
    """The scoring server is unreachable, or refused/failed the request."""


def _opener():
    # never route localhost scoring through an http_proxy from the environment
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def encode_image(img: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(img))
    if fmt.lower() in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=quality)
    else:
        im.save(buf, format="PNG", compress_level=1)  # lossless; level 1: fast
    return buf.getvalue()


@register_scorer("remote")
class RemoteScorer:
    """A scorer that POSTs to a scoring server. ``name``: the column name in R (defaults to "remote").

    url: server base URL, e.g. "http://127.0.0.1:8765". timeout: seconds per attempt.
    retries: extra attempts after the first on connection errors/timeouts/502-504.
    image_format: "raw" (uint8 bytes, lossless, no codec cost: default, best on localhost), "png"
    (lossless, ~1.5-3x smaller, ~30 ms encode per noisy 512 px image) or "jpeg" (smallest, lossy:
    not for jpeg/ocr rewards).
    batch_size: images per request (None: all in one).
    """

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 2, backoff: float = 0.5, name: str = "remote",
                 image_format: str = "raw", batch_size: int | None = None):
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.name = name
        if image_format not in ("raw", "png", "jpeg", "jpg"):
            raise ValueError(f"remote reward: image_format must be raw, png or jpeg, got {image_format!r}")
        self.image_format = image_format
        self.batch_size = batch_size
        self._open = _opener().open

    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json",
                 timeout: float | None = None) -> dict:
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Content-Type": ctype} if body is not None else {})
            try:
                with self._open(req, timeout=timeout or self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                try:
                    msg = json.loads(e.read()).get("error", "")
                except Exception:  # noqa: BLE001
                    msg = ""
                last = f"HTTP {e.code}: {msg or e.reason}"
                if e.code not in _RETRY_STATUS:
                    raise RemoteScorerError(f"remote reward {self.name!r} at {self.url}{path}: {last}") from None
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            else:
                try:
                    out = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise RemoteScorerError(
                        f"remote reward {self.name!r} at {self.url}{path}: the answer is not JSON "
                        f"({raw[:120]!r}); is {self.url} an apex_fast.rewards.server?") from None
                if not isinstance(out, dict):
                    raise RemoteScorerError(f"remote reward {self.name!r} at {self.url}{path}: expected a JSON "
                                            f"object, got {str(out)[:120]}")
                return out
        raise RemoteScorerError(
            f"remote reward {self.name!r}: scoring server at {self.url} is unreachable or not answering after "
            f"{self.retries + 1} attempt(s) (timeout {timeout or self.timeout:g} s; last error {last}). Is it running? "
            f"Start it with `python -m apex_fast.rewards.server --scorer NAME --port PORT` or "
            f"apex_fast.rewards.start_server(NAME, ...)."
        )

    def health(self, timeout: float | None = None) -> dict:
        return self._request("GET", "/health", timeout=timeout)

    def check(self) -> None:
        """GET /health (the trainer's check before the first epoch)."""
        self.health()

    def _score_chunk(self, arr: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
        if self.image_format == "raw":
            images = [{"raw": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii"), "shape": list(a.shape)}
                      for a in arr]
        else:
            images = [base64.b64encode(encode_image(a, self.image_format)).decode("ascii") for a in arr]
        body = json.dumps({
            "images": images,
            "prompts": list(prompts),
            "metadata": [dict(m or {}) for m in metadata],
        }).encode()
        resp = self._request("POST", "/score", body)
        scores = resp.get("scores")
        if not isinstance(scores, list) or len(scores) != len(arr):
            raise RemoteScorerError(f"remote reward {self.name!r}: bad answer from {self.url}: {str(resp)[:200]}")
        try:
            return torch.tensor([float("nan") if v is None else float(v) for v in scores], dtype=torch.float32)
        except (TypeError, ValueError):
            raise RemoteScorerError(f"remote reward {self.name!r}: non-numeric scores from {self.url}/score: "
                                    f"{str(scores)[:200]}") from None

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        arr = to_uint8_hwc(images)
        n = arr.shape[0]
        metadata = list(metadata) if metadata else [{} for _ in range(n)]
        bs = self.batch_size or max(n, 1)
        outs = [self._score_chunk(arr[i:i + bs], prompts[i:i + bs], metadata[i:i + bs]) for i in range(0, n, bs)]
        return torch.cat(outs) if outs else torch.zeros(0)

    def __repr__(self) -> str:
        return f"RemoteScorer(name={self.name!r}, url={self.url!r})"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running scoring server subprocess (from start_server)."""

    def __init__(self, proc: subprocess.Popen, url: str, scorer: str, log_path: str):
        self.proc, self.url, self.scorer, self.log_path = proc, url, scorer, log_path

    def client(self, **kwargs) -> RemoteScorer:
        kwargs.setdefault("name", self.scorer)
        return RemoteScorer(self.url, **kwargs)

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def start_server(scorer: str, kwargs: dict | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 300.0, python: str | None = None, env: dict | None = None,
                 log_path: str | None = None, max_request_mb: float | None = None, max_images: int | None = None):
    """Start ``python -m apex_fast.rewards.server`` as a subprocess, wait until GET /health answers,
    yield a ServerProcess (``.url``, ``.client(**kw)``), stop it on exit. Output goes to ``log_path``
    (a temp file by default); if the server exits or does not answer within ``startup_timeout``
    seconds, RuntimeError with the end of its log."""
    port = port or free_port(host)
    cmd = [python or sys.executable, "-m", "apex_fast.rewards.server", "--scorer", scorer,
           "--kwargs", json.dumps(kwargs or {}), "--host", host, "--port", str(port)]
    if max_request_mb is not None:
        cmd += ["--max-request-mb", str(max_request_mb)]
    if max_images is not None:
        cmd += ["--max-images", str(max_images)]
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"reward-server-{scorer}-", suffix=".log")
        os.close(fd)
    full_env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    full_env["PYTHONPATH"] = root + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    full_env.update(env or {})
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=full_env, stdin=subprocess.DEVNULL)
    url = f"http://{host}:{port}"
    srv = ServerProcess(proc, url, scorer, log_path)
    try:
        probe = RemoteScorer(url, timeout=2.0, retries=0, name=scorer)
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"reward server {scorer!r} exited with status {proc.returncode} during start-up; "
                                   f"log ({log_path}):\n{srv.log_tail()}")
            try:
                probe.health()
                break
            except RemoteScorerError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"reward server {scorer!r} did not answer GET {url}/health within "
                                       f"{startup_timeout:g} s; log ({log_path}):\n{srv.log_tail()}") from None
                time.sleep(0.2)
        yield srv
    finally:
        srv.stop()
