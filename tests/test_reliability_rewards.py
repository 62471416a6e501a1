"""Reliability of reward scoring: every call bounded (no pile-up, Ctrl-C at once), rewards keyed by
name with a scorer type, errors that carry the key, the check before the first epoch, read-only
images. Small real runs of the tiny model where the trainer is involved."""
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from apex_fast.config import ConfigError, load_config
from apex_fast.rewards import (
    RemoteScorer,
    RewardSetupError,
    ScorerBusyError,
    build_scorers,
    call_bounded,
    check_scorers,
    make_scorer,
    register_scorer,
    score_all,
)
from apex_fast.rewards.remote import free_port
from apex_fast.train import Trainer

from _fast import quick_run

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
FAST = quick_run(
    "sample.num_steps=3", "train.micro_batch_size=4", "log.plot=false",
)


def cfg_for(tmp_path, rewards, *extra, name="run"):
    return load_config(ROOT / "configs/tiny_cpu.yaml",
                       FAST + [f"rewards={rewards}", f"log.output_dir={tmp_path / name}", *extra])


def _imgs(n=2, s=8):
    return np.random.default_rng(0).integers(0, 256, (n, s, s, 3), dtype=np.uint8)


class Hangs:
    """Answers its first ``ok_calls`` calls, then hangs until released; counts concurrent calls."""

    def __init__(self, ok_calls=0):
        self.name, self.ok_calls, self.calls, self.inside, self.max_inside = "hangs", ok_calls, 0, 0, 0
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, images, prompts, metadata):
        with self.lock:
            self.calls += 1
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
            hang = self.calls > self.ok_calls
        try:
            if hang:
                self.release.wait(60)
            return torch.ones(len(prompts))
        finally:
            with self.lock:
                self.inside -= 1


# ------------------------------------------------------------------ bounded calls


def test_hung_scorer_times_out_and_calls_do_not_pile_up():
    h = Hangs()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        call_bounded(h, lambda: h(None, ["a"], [{}]), 0.3)
    with pytest.raises(ScorerBusyError, match="no new call started"):  # waits its own bound, starts nothing
        call_bounded(h, lambda: h(None, ["a"], [{}]), 0.3)
    assert time.monotonic() - t0 < 3 and h.calls == 1 and h.max_inside == 1
    errors = {}
    R = score_all([h, make_scorer("contrast")], _imgs(), ["a", "b"], None, timeout_s=0.2, errors=errors)
    assert torch.isnan(R[:, 0]).all() and torch.isfinite(R[:, 1]).all() and "busy" in errors["hangs"]
    assert h.calls == 1
    h.release.set()  # the hung call returns: the scorer is usable again
    time.sleep(0.2)
    h.ok_calls = 10
    assert call_bounded(h, lambda: h(None, ["a"], [{}]), 1.0).tolist() == [1.0]


def test_scorers_get_read_only_images_and_their_own_metadata():
    class Editor:
        name = "editor"

        def __call__(self, images, prompts, metadata):
            metadata[0]["x"] = 1
            images[:] = 0  # in-place edit: must fail this scorer only
            return torch.zeros(len(prompts))

    class Reader:
        name = "reader"

        def __call__(self, images, prompts, metadata):
            assert "x" not in metadata[0]
            return torch.as_tensor(images.reshape(len(prompts), -1).astype(np.float64).mean(1))

    imgs = _imgs()
    errors = {}
    R = score_all([Editor(), Reader()], imgs, ["a", "b"], [{}, {}], errors=errors)
    assert torch.isnan(R[:, 0]).all() and "read-only" in errors["editor"]
    assert torch.allclose(R[:, 1].double(), torch.as_tensor(imgs.reshape(2, -1).mean(1)), atol=1e-3)
    assert imgs.flags.writeable  # the caller's array is untouched and still its own


def test_inf_and_non_numeric_answers_carry_the_key():
    class Inf:
        name = "inf_key"

        def __call__(self, images, prompts, metadata):
            return torch.full((len(prompts),), float("inf"))

    class Words:
        name = "words_key"

        def __call__(self, images, prompts, metadata):
            return ["good", "bad"]

    errors = {}
    R = score_all([Inf(), Words()], _imgs(), ["a", "b"], None, errors=errors)
    assert torch.isnan(R).all()
    assert "inf" in errors["inf_key"] and "'words_key'" in errors["words_key"] and "not numeric" in errors["words_key"]


# ------------------------------------------------------------------ keys, types, args


def test_two_remote_rewards_by_key_and_args_errors(tmp_path):
    cfg = cfg_for(tmp_path, "[{name: deqa, type: remote, args: {url: 'http://127.0.0.1:1'}}, "
                            "{name: unified, type: remote, args: {url: 'http://127.0.0.1:2'}}]")
    a, b = build_scorers(cfg.rewards)
    assert isinstance(a, RemoteScorer) and (a.name, b.name) == ("deqa", "unified") and b.url.endswith(":2")
    with pytest.raises(ConfigError, match=r"rewards\[1\].name: duplicate key 'remote'.*type"):
        cfg_for(tmp_path, "[{name: remote, args: {url: u}}, {name: remote, args: {url: v}}]")
    with pytest.raises(RewardSetupError, match=r"rewards\[0\].args: unknown argument\(s\) 'qualty'.*quality"):
        build_scorers(cfg_for(tmp_path, "[{name: j, type: jpeg_compressibility, args: {qualty: 90}}]").rewards)
    with pytest.raises(RewardSetupError, match=r"rewards\[0\].type: unknown scorer type 'nope'"):
        build_scorers(cfg_for(tmp_path, "[{name: j, type: nope}]").rewards)


class _NotJson(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"<html>hello</html>")


def test_check_names_key_url_and_fix_for_down_and_wrong_servers(tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotJson)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    down = f"http://127.0.0.1:{free_port()}"
    try:
        cfg = cfg_for(tmp_path, f"[{{name: deqa, type: remote, args: {{url: '{down}', retries: 0}}}}, "
                                f"{{name: unified, type: remote, args: {{url: 'http://127.0.0.1:{srv.server_port}'}}}}, "
                                "{name: contrast, weight: 1}]")
        t0 = time.monotonic()
        errors = check_scorers(build_scorers(cfg.rewards), cfg.rewards, [("a", {})], 16)
        assert time.monotonic() - t0 < 10
    finally:
        srv.shutdown()
    assert set(errors) == {"deqa", "unified"}
    assert "rewards[0] 'deqa' (type 'remote')" in errors["deqa"] and down in errors["deqa"]
    assert "start the scoring server" in errors["deqa"]
    assert "not JSON" in errors["unified"] and str(srv.server_port) in errors["unified"]


@register_scorer("missing_dep_test")
class MissingDep:
    def check(self):
        raise ImportError("the engine needs `pip install some-ocr-engine`")

    def __call__(self, images, prompts, metadata):
        raise AssertionError("not reached")


def test_trainer_checks_every_scorer_before_loading_the_model(tmp_path, monkeypatch):
    import apex_fast.train as train_mod

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the reward check")

    monkeypatch.setattr(train_mod, "load_pipeline", no_model)
    cfg = cfg_for(tmp_path, "[{name: ocr_a, type: missing_dep_test}, {name: contrast}]")
    with pytest.raises(RewardSetupError, match=r"rewards\[0\] 'ocr_a' \(type 'missing_dep_test'\).*pip install some-ocr"):
        Trainer(cfg)


def test_missing_ocr_engine_fails_the_call_not_image_by_image(monkeypatch):
    from apex_fast.rewards import ocr

    def broken(**kw):
        raise ImportError("ocr reward (engine='rapidocr') needs `pip install rapidocr-onnxruntime`")

    monkeypatch.setitem(ocr.OCR_ENGINES, "rapidocr", broken)
    errors = {}
    score_all([make_scorer("ocr")], _imgs(), ['"a"', '"b"'], None, errors=errors)
    assert "pip install rapidocr-onnxruntime" in errors["ocr"]


# ------------------------------------------------------------------ real tiny runs


@register_scorer("hangs_after_check_test")
class HangsAfterCheck(Hangs):
    """Answers the check before training, then hangs on every call (like a wedged model)."""

    instances: list = []

    def __init__(self):
        super().__init__(ok_calls=1)
        HangsAfterCheck.instances.append(self)


def test_hung_scorer_never_hangs_the_run_nor_loses_its_outputs(tmp_path):
    cfg = cfg_for(tmp_path, "[{name: wedged, type: hangs_after_check_test, timeout_s: 0.5}, {name: contrast}]",
                  "train.epochs=2", "train.reward_max_failures=0", "eval.num_prompts=2")
    t0 = time.monotonic()
    result = Trainer(cfg).fit()
    out = tmp_path / "run"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "summary.txt").is_file()
    assert (out / "checkpoints" / "checkpoint-000002" / "state.json").is_file()
    h = HangsAfterCheck.instances[-1]
    assert h.max_inside == 1  # one call at a time inside the model, however many batches timed out
    assert np.isnan(result["end"]["wedged"]) and np.isfinite(result["end"]["contrast"])
    assert time.monotonic() - t0 < 120
    h.release.set()


def test_offline_dpo_pair_scoring_is_bounded(tmp_path):
    """Offline DPO scores the pairs file's unscored pairs before training: each call is bounded by
    the reward's timeout_s like training batches (a wedged scorer gives NaN scores, never a hang)."""
    cfg = load_config(ROOT / "configs/tiny_dpo.yaml", [
        "model.pretrained=tiny-random", "sample.num_steps=2", "sample.max_sequence_length=8", "train.micro_batch_size=2",
        "eval.num_steps=2", "eval.num_prompts=2", "log.progress=false", "log.tensorboard=false", "log.plot=false",
        "dpo.mode=offline", "dpo.pairs_file=tiny_pairs.jsonl", f"log.output_dir={tmp_path / 'dpo'}",
        "rewards=[{name: wedged, type: hangs_after_check_test, timeout_s: 0.5}, {name: colorfulness}, {name: contrast}]"])
    t0 = time.monotonic()
    tr = Trainer(cfg)
    took = time.monotonic() - t0
    Sa, Sb = tr.learner.pair_scores
    assert torch.isnan(Sa[:, 0]).all() and torch.isnan(Sb[:, 0]).all()  # the wedged reward: NaN, not a hang
    assert torch.isfinite(Sa[:, 1:]).all() and torch.isfinite(Sb[:, 1:]).all()
    assert HangsAfterCheck.instances[-1].max_inside == 1
    assert took < 120
    HangsAfterCheck.instances[-1].release.set()
    tr.folder.release()


SCRIPT = """
import sys, threading, time, torch
from apex_fast.rewards import register_scorer
@register_scorer("hangs_forever_test")
class H:
    calls = 0
    def __call__(self, images, prompts, metadata):
        H.calls += 1
        if H.calls > 1:  # after the check: hang, and say so
            open(sys.argv[1], "w").write("hanging")
            threading.Event().wait()
        return torch.ones(len(prompts))
from apex_fast.train import main
main(sys.argv[2:])
"""


def test_ctrl_c_stops_a_run_at_once_while_a_scorer_hangs(tmp_path):
    script, marker = tmp_path / "run.py", tmp_path / "hanging"
    script.write_text(SCRIPT)
    args = ["--config", str(ROOT / "configs/tiny_cpu.yaml"), "--output-dir", str(tmp_path / "out")]
    for o in FAST + ["train.epochs=3", "rewards=[{name: h, type: hangs_forever_test, timeout_s: 600}]"]:
        args += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(marker), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert time.monotonic() - t0 < 30
        assert proc.returncode == 130 and "stopped by SIGINT" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_scoring_server_killed_mid_run_stops_it_with_key_and_url(tmp_path):
    from apex_fast.rewards import RewardFailureError, start_server

    with start_server("contrast") as srv:
        cfg = cfg_for(tmp_path, f"[{{name: sharpness, type: remote, args: {{url: '{srv.url}', retries: 0, timeout: 5}}}}]",
                      "train.epochs=3", "train.reward_max_failures=1")
        tr = Trainer(cfg)  # the check before training passes: the server is up
        collect = tr.sampler.collect

        def collect_then_kill(epoch):
            if epoch == 1:
                srv.proc.kill()
                srv.proc.wait()
            return collect(epoch)

        tr.sampler.collect = collect_then_kill
        with pytest.raises(RewardFailureError, match=f"reward 'sharpness' failed.*{srv.url}.*unreachable"):
            tr.fit()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-000001" / "state.json").is_file()  # epoch 1 kept


RANK_SCRIPT = """
import os, sys, torch
from apex_fast.rewards import register_scorer
@register_scorer("down_on_rank1_test")
class D:
    def __call__(self, images, prompts, metadata):
        if os.environ["RANK"] == "1":
            raise ConnectionError("connection refused by http://10.0.0.1:8765")
        return torch.ones(len(prompts))
from apex_fast.train import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_scorer_failing_its_check_on_one_rank_stops_every_rank(tmp_path):
    script = tmp_path / "r.py"
    script.write_text(RANK_SCRIPT)
    args = ["--config", str(ROOT / "configs/tiny_cpu.yaml"), "--output-dir", str(tmp_path / "out")]
    for o in FAST + ["train.epochs=1", "rewards=[{name: server, type: down_on_rank1_test}, {name: contrast}]"]:
        args += ["--set", o]
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                                              "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [2, 2], outs
    assert "failed its check on rank(s) [1]" in outs[0] and "Traceback" not in outs[0]
    assert "rewards[0] 'server' (type 'down_on_rank1_test') failed its check" in outs[1]
    assert "connection refused by http://10.0.0.1:8765" in outs[1]
    assert not (tmp_path / "out" / "checkpoints").exists()
