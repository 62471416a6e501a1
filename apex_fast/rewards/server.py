"""A reward scoring server over HTTP on localhost (stdlib ThreadingHTTPServer).

    python -m apex_fast.rewards.server --scorer ocr --port 8765 [--kwargs '{"engine": "rapidocr"}']

GET  /health  -> 200 {"status": "ok", "scorer": NAME, "name": scorer.name, "pid": PID}
POST /score   -> 200 {"scores": [float | null, ...], "n": N, "elapsed_s": T}   (null = NaN)
  body, either
    application/json:     {"images": [base64 PNG/JPEG bytes, ...], "prompts": [str, ...],
                           "metadata": [dict, ...] (optional)}; an image may also be
                           {"raw": base64 uint8 RGB bytes, "shape": [H, W, 3]} (no codec cost)
    multipart/form-data:  one file part named "images" per image (PNG/JPEG bytes, in order), and
                          text parts "prompts" and optionally "metadata", each a JSON list.
  A malformed request is refused with 4xx {"error": message}: 400 bad body/JSON/image, 404 unknown
  path, 411 no Content-Length, 413 body over --max-request-mb or more than --max-images images,
  415 other content types. A scorer exception gives 500 {"error": ...} (the client turns it into
  NaN). Images of different sizes in one request are scored in groups of equal size. One request
  is scored at a time (a lock), so a GPU model is never used from two threads.

The model is built once at start-up; a load error exits with status 2 and the error on stderr.
Clients: apex_fast.rewards.remote (make_scorer("remote", url=...)), start_server(...).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import math
import os
import sys
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

log = logging.getLogger("apex_fast.rewards.server")

DEFAULT_MAX_REQUEST_MB = 256.0
DEFAULT_MAX_IMAGES = 1024
MAX_SIDE = 8192


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_image(data, i: int) -> np.ndarray:
    from PIL import Image

    if isinstance(data, np.ndarray):  # already decoded raw uint8 RGB
        return data
    try:
        im = Image.open(io.BytesIO(data))
        if max(im.size) > MAX_SIDE:
            raise BadRequest(413, f"image {i}: {im.size[0]}x{im.size[1]} is larger than {MAX_SIDE} px on a side")
        return np.asarray(im.convert("RGB"))
    except BadRequest:
        raise
    except Exception as e:
        raise BadRequest(400, f"image {i}: cannot decode as PNG/JPEG ({type(e).__name__}: {e})") from e


def parse_json_body(body: bytes) -> tuple[list[bytes], list, list | None]:
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"body is not valid JSON: {e}") from e
    if not isinstance(req, dict):
        raise BadRequest(400, "JSON body must be an object with 'images', 'prompts' and optional 'metadata'")
    imgs = req.get("images")
    if not isinstance(imgs, list) or not all(isinstance(x, (str, dict)) for x in imgs):
        raise BadRequest(400, "'images' must be a list of base64 strings (PNG or JPEG bytes) "
                              "or {'raw': base64 uint8 RGB bytes, 'shape': [H, W, 3]} objects")
    raw = []
    for i, b in enumerate(imgs):
        try:
            if isinstance(b, str):
                raw.append(base64.b64decode(b, validate=True))
            else:
                raw.append(_raw_image(b, i))
        except (binascii.Error, ValueError, TypeError) as e:
            raise BadRequest(400, f"image {i}: invalid base64 ({e})") from e
    return raw, req.get("prompts"), req.get("metadata")


def _raw_image(obj: dict, i: int) -> np.ndarray:
    shape = obj.get("shape")
    if (not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(v, int) for v in shape)
            or shape[2] != 3 or not (0 < shape[0] <= MAX_SIDE and 0 < shape[1] <= MAX_SIDE)):
        raise BadRequest(400, f"image {i}: raw image needs 'shape' [H, W, 3] with 0 < H, W <= {MAX_SIDE}")
    data = base64.b64decode(obj.get("raw", ""), validate=True)
    if len(data) != shape[0] * shape[1] * 3:
        raise BadRequest(400, f"image {i}: raw image has {len(data)} bytes, shape {shape} needs {shape[0] * shape[1] * 3}")
    return np.frombuffer(data, np.uint8).reshape(shape)


def parse_multipart_body(body: bytes, content_type: str) -> tuple[list[bytes], list, list | None]:
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise BadRequest(400, "multipart body could not be parsed (boundary?)")
    raw, prompts, metadata = [], None, None
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "images":
            raw.append(payload)
        elif name in ("prompts", "metadata"):
            try:
                val = json.loads(payload)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadRequest(400, f"multipart field {name!r} must be a JSON list: {e}") from e
            if name == "prompts":
                prompts = val
            else:
                metadata = val
    return raw, prompts, metadata


def validate(raw: list[bytes], prompts, metadata, max_images: int):
    n = len(raw)
    if n == 0:
        raise BadRequest(400, "no images")
    if n > max_images:
        raise BadRequest(413, f"{n} images is more than the limit of {max_images} per request")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(400, "'prompts' must be a list of strings")
    if len(prompts) != n:
        raise BadRequest(400, f"{n} images but {len(prompts)} prompts")
    if metadata is None:
        metadata = [{} for _ in range(n)]
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata) or len(metadata) != n:
        raise BadRequest(400, f"'metadata' must be a list of {n} objects")
    return prompts, metadata


def score_images(scorer, images: list[np.ndarray], prompts: list[str], metadata: list[dict]) -> list[float]:
    """Score images of possibly different sizes: one scorer call per group of equal shape."""
    import torch

    out = [float("nan")] * len(images)
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    for idx in groups.values():
        batch = np.stack([images[i] for i in idx])
        r = torch.as_tensor(scorer(batch, [prompts[i] for i in idx], [metadata[i] for i in idx]), dtype=torch.float32)
        r = r.flatten().cpu()
        if r.numel() != len(idx):
            raise ValueError(f"scorer returned {r.numel()} scores for {len(idx)} images")
        for i, v in zip(idx, r.tolist()):
            out[i] = v
    return out


def make_handler(scorer, scorer_name: str, max_request_bytes: int, max_images: int):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "apex-fast-reward/1"

        def log_message(self, fmt, *args):  # quiet by default
            log.debug("%s - %s", self.address_string(), fmt % args)

        def _send(self, status: int, obj: dict, close: bool = False):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): nothing to do
                log.info("client %s went away before the answer", self.address_string())
                self.close_connection = True

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", "scorer": scorer_name, "name": getattr(scorer, "name", scorer_name),
                                 "pid": os.getpid()})
            else:
                self._send(404, {"error": f"unknown path {self.path!r}; use GET /health or POST /score"})

        def do_POST(self):
            if self.path.rstrip("/") != "/score":
                # the body is not read: close the connection rather than parse it as the next request
                self._send(404, {"error": f"unknown path {self.path!r}; use POST /score"}, close=True)
                return
            t0 = time.perf_counter()
            try:
                length = self.headers.get("Content-Length")
                if length is None:
                    raise BadRequest(411, "Content-Length is required")
                try:
                    length = int(length)
                except ValueError:
                    raise BadRequest(400, f"bad Content-Length {length!r}") from None
                if length < 0 or length > max_request_bytes:
                    raise BadRequest(413, f"request body of {length} bytes is over the limit of {max_request_bytes} bytes")
                ctype = self.headers.get("Content-Type", "application/json")
                body = self.rfile.read(length)
                if len(body) != length:
                    raise BadRequest(400, f"body ended after {len(body)} of {length} bytes")
                if ctype.startswith("application/json"):
                    raw, prompts, metadata = parse_json_body(body)
                elif ctype.startswith("multipart/form-data"):
                    raw, prompts, metadata = parse_multipart_body(body, ctype)
                else:
                    raise BadRequest(415, f"Content-Type {ctype!r} not supported; use application/json or multipart/form-data")
                prompts, metadata = validate(raw, prompts, metadata, max_images)
                images = [decode_image(b, i) for i, b in enumerate(raw)]
            except BadRequest as e:
                # a refused body may be unread: close the connection
                self._send(e.status, {"error": str(e)}, close=True)
                return
            try:
                with lock:
                    scores = score_images(scorer, images, prompts, metadata)
            except Exception as e:  # noqa: BLE001 - reported to the client, server keeps serving
                log.warning("scorer %s failed on a request of %d images: %r", scorer_name, len(images), e)
                self._send(500, {"error": f"scorer {scorer_name!r} failed: {type(e).__name__}: {e}"})
                return
            clean = [None if (v is None or not math.isfinite(v)) else v for v in scores]
            self._send(200, {"scores": clean, "n": len(clean), "elapsed_s": time.perf_counter() - t0})

    return Handler


def make_server(scorer, scorer_name: str, host: str = "127.0.0.1", port: int = 0,
                max_request_mb: float = DEFAULT_MAX_REQUEST_MB, max_images: int = DEFAULT_MAX_IMAGES) -> ThreadingHTTPServer:
    """A ready ThreadingHTTPServer serving ``scorer`` (call serve_forever(); port 0 = any free port)."""
    handler = make_handler(scorer, scorer_name, int(max_request_mb * 1024 * 1024), int(max_images))
    srv = ThreadingHTTPServer((host, port), handler)
    srv.daemon_threads = True
    return srv


def main(argv=None, prog: str = "python -m apex_fast.rewards.server") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n")[0].rstrip(".") + ". Run a scorer whose dependencies clash with training (e.g. DeQA) in "
                    "its own process or environment; the trainer calls it through the `remote` reward.",
        epilog="example:\n"
               f"  {prog} --scorer deqa --kwargs '{{\"device\": \"cuda\"}}' --port 8765\n"
               "then in the training config:\n"
               "  rewards: [{name: remote, args: {url: \"http://127.0.0.1:8765\", name: deqa, timeout: 120, retries: 2}}]\n"
               "endpoints: GET /health, POST /score")
    ap.add_argument("--scorer", required=True, help="registered reward name, e.g. deqa, pickscore, aesthetic, ocr "
                                                    "(apex_fast.rewards.available_scorers())")
    ap.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the scorer, e.g. "
                                                   "'{\"device\": \"cuda\", \"model_path\": \"/models/deqa\"}'")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port, printed on stdout)")
    ap.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB, help="largest accepted request body")
    ap.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="most images in one request")
    ap.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        print(f"reward server: --kwargs must be a JSON object: {e}", file=sys.stderr)
        return 2
    from . import make_scorer

    try:
        scorer = make_scorer(args.scorer, **kwargs)
    except Exception as e:  # noqa: BLE001 - load errors are the user's to fix
        print(f"reward server: cannot build scorer {args.scorer!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    srv = make_server(scorer, args.scorer, args.host, args.port, args.max_request_mb, args.max_images)
    host, port = srv.server_address[:2]
    print(f"apex-fast reward server: scorer {args.scorer!r} listening on http://{host}:{port}", flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
