"""The scoring server over real HTTP on localhost: a subprocess started by start_server (OCR with
rapidocr), an in-process server for malformed requests, the remote client's retries/timeouts, and
failures turning into NaN."""
from __future__ import annotations

import base64
import http.client
import json
import math
import threading
import time
import uuid

import numpy as np
import pytest
import torch

from apex_fast.rewards import (
    RemoteScorerError,
    RewardFailureError,
    RewardFailureTracker,
    make_scorer,
    score_all,
    start_server,
)
from apex_fast.rewards.remote import RemoteScorer, encode_image, free_port
from apex_fast.rewards.server import make_server

from test_rewards import render_text

torch.set_num_threads(1)


def _noise(n=2, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _b64png(a):
    return base64.b64encode(encode_image(a)).decode()


# ------------------------------------------------------------------ in-process server


class _Serving:
    def __init__(self, scorer, **kw):
        self.srv = make_server(scorer, getattr(scorer, "name", "x"), "127.0.0.1", 0, **kw)
        self.port = self.srv.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def post(self, body: bytes, ctype="application/json", path="/score", headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("POST", path, body=body, headers={"Content-Type": ctype, **(headers or {})})
        r = conn.getresponse()
        out = r.status, json.loads(r.read() or b"{}")
        conn.close()
        return out

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


class _NanForB:
    name = "nan_for_b"

    def __call__(self, images, prompts, metadata):
        return torch.tensor([float("nan") if p == "b" else float(images[i].mean()) for i, p in enumerate(prompts)])


@pytest.fixture(scope="module")
def served():
    s = _Serving(_NanForB(), max_request_mb=0.05, max_images=4)
    yield s
    s.close()


def test_json_request_nan_is_null_and_sizes_grouped(served):
    a, b = _noise(1, 16)[0], _noise(1, 24, seed=1)[0]
    body = json.dumps({"images": [_b64png(a), _b64png(b), _b64png(a)], "prompts": ["a", "b", "c"]}).encode()
    status, out = served.post(body)
    assert status == 200, out
    assert out["scores"][1] is None and out["n"] == 3
    assert out["scores"][0] == pytest.approx(float(a.mean())) and out["scores"][2] == pytest.approx(float(a.mean()))
    # through the client, each image format: null -> NaN; raw and png are lossless
    for fmt in ("raw", "png", "jpeg"):
        r = RemoteScorer(served.url, image_format=fmt)(np.stack([a, a]), ["a", "b"], None)
        assert r[0] == pytest.approx(float(a.mean()), abs=0 if fmt != "jpeg" else 5) and math.isnan(r[1])
    raw = {"raw": base64.b64encode(b.tobytes()).decode(), "shape": list(b.shape)}
    status, out = served.post(json.dumps({"images": [raw], "prompts": ["a"]}).encode())
    assert status == 200 and out["scores"][0] == pytest.approx(float(b.mean()))


def test_multipart_request(served):
    a = _noise(1, 16)[0]
    boundary = uuid.uuid4().hex
    parts = []
    for i in range(2):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + encode_image(a) + b"\r\n")
    for name, val in (("prompts", ["a", "b"]), ("metadata", [{}, {"k": 1}])):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{json.dumps(val)}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, out = served.post(body, f"multipart/form-data; boundary={boundary}")
    assert status == 200, out
    assert out["scores"][0] == pytest.approx(float(a.mean())) and out["scores"][1] is None


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be an object"),
    (json.dumps({"prompts": ["a"]}).encode(), 400, "'images'"),
    (json.dumps({"images": ["!!notbase64"], "prompts": ["a"]}).encode(), 400, "invalid base64"),
    (json.dumps({"images": [base64.b64encode(b"garbage").decode()], "prompts": ["a"]}).encode(), 400, "cannot decode"),
    (json.dumps({"images": [], "prompts": []}).encode(), 400, "no images"),
    (json.dumps({"images": ["AAAA"] * 5, "prompts": ["a"] * 5}).encode(), 413, "limit of 4"),
    (json.dumps({"images": ["AAAA"], "prompts": "a"}).encode(), 400, "list of strings"),
    (json.dumps({"images": ["AAAA", "AAAA"], "prompts": ["a"]}).encode(), 400, "2 images but 1 prompts"),
    (json.dumps({"images": ["AAAA"], "prompts": ["a"], "metadata": [1]}).encode(), 400, "'metadata'"),
    (b"x" * 60000, 413, "over the limit"),
    (json.dumps({"images": [{"raw": "AAAA", "shape": [1, 1]}], "prompts": ["a"]}).encode(), 400, "[H, W, 3]"),
    (json.dumps({"images": [{"raw": "AAAA", "shape": [2, 1, 3]}], "prompts": ["a"]}).encode(), 400, "needs 6"),
])
def test_malformed_requests_are_refused_with_a_message(served, body, status, words):
    got, out = served.post(body)
    assert got == status and words in out["error"], out


def test_other_refusals(served):
    assert served.post(b"{}", ctype="text/plain")[0] == 415
    assert served.post(b"{}", path="/nope")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    conn.putrequest("POST", "/score")
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    # the client does not retry a 4xx and says what the server said
    with pytest.raises(RemoteScorerError, match="HTTP 413.*limit of 4"):
        RemoteScorer(served.url, retries=3)(_noise(5, 8), list("abcde"), None)


def test_scorer_exception_is_500_and_nan_in_score_all():
    class Boom:
        name = "boom"

        def __call__(self, images, prompts, metadata):
            raise RuntimeError("model crashed")

    s = _Serving(Boom())
    try:
        client = RemoteScorer(s.url, name="boom", retries=2)
        with pytest.raises(RemoteScorerError, match="HTTP 500.*model crashed"):
            client(_noise(1), ["a"], None)
        errors = {}
        R = score_all([client, make_scorer("contrast")], _noise(2), ["a", "b"], None, errors=errors)
        assert torch.isnan(R[:, 0]).all() and torch.isfinite(R[:, 1]).all() and "model crashed" in errors["boom"]
    finally:
        s.close()


def test_client_timeout_and_retries_then_nan():
    class Slow:
        name = "slow"

        def __call__(self, images, prompts, metadata):
            time.sleep(1.0)
            return torch.ones(len(prompts))

    s = _Serving(Slow())
    try:
        client = RemoteScorer(s.url, name="slow", timeout=0.2, retries=1, backoff=0.05)
        t0 = time.perf_counter()
        with pytest.raises(RemoteScorerError, match="not answering after 2 attempt"):
            client(_noise(1), ["a"], None)
        assert time.perf_counter() - t0 < 1.5
    finally:
        s.close()


def test_server_down_clear_error_nan_and_tracker():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = RemoteScorer(url, name="pickscore", timeout=1, retries=1, backoff=0.01)
    with pytest.raises(RemoteScorerError) as ei:
        client(_noise(1), ["a"], None)
    msg = str(ei.value)
    assert url in msg and "unreachable" in msg and "python -m apex_fast.rewards.server" in msg
    with pytest.raises(RemoteScorerError, match="unreachable"):
        client.health()
    tr = RewardFailureTracker(max_consecutive=2)
    R = score_all([client], _noise(2), ["a", "b"], None, tracker=tr)
    assert torch.isnan(R).all()
    with pytest.raises(RewardFailureError, match="'pickscore' failed for 2 whole batches.*unreachable"):
        score_all([client], _noise(2), ["a", "b"], None, tracker=tr)


def test_make_scorer_remote_options():
    c = make_scorer("remote", url="http://127.0.0.1:1/", timeout=3, retries=4, name="deqa", batch_size=2)
    assert (c.url, c.timeout, c.retries, c.name, c.batch_size) == ("http://127.0.0.1:1", 3.0, 4, "deqa", 2)


# ------------------------------------------------------------------ subprocess server (start_server)


def test_start_server_ocr_over_http_matches_local():
    imgs = np.stack([render_text("HELLO", 256, 48), render_text("apex", 256, 48)])
    prompts = ['a sign "hello"', 'a sign "apex"']
    with start_server("ocr", {"engine": "rapidocr"}, startup_timeout=120) as srv:
        assert srv.client().health()["scorer"] == "ocr"
        client = srv.client(timeout=60, batch_size=1)
        R = score_all([client], imgs, prompts, [{}, {}])
        assert R[:, 0].tolist() == [1.0, 1.0]
        # metadata travels: an override target that is not in the image scores low
        assert client(imgs[:1], prompts[:1], [{"ocr_target": "zebra"}])[0] < 0.5
        # a prompt without target: NaN through the server
        assert math.isnan(client(imgs[:1], ["no quotes"], None)[0])
    # stopped: now the client reports the server down
    assert srv.proc.poll() is not None
    with pytest.raises(RemoteScorerError, match="unreachable"):
        RemoteScorer(srv.url, timeout=1, retries=0)(imgs[:1], prompts[:1], None)


def test_start_server_reports_startup_failure():
    with pytest.raises(RuntimeError, match="(?s)exited with status 2.*unknown reward name 'no_such_reward'"):
        with start_server("no_such_reward", startup_timeout=60):
            pass
