"""Offline rewards: hand-checked OCR score, rapidocr on rendered text, JPEG, colorfulness, contrast,
NaN handling and the registry (docs/SPEC.md section 2)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from apex_fast.rewards import available_scorers, extract_target, make_scorer, ocr_score, score_all, to_uint8_hwc
from apex_fast.rewards.ocr import OcrScorer

torch.set_num_threads(1)

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def _font(size: int):
    if os.path.exists(DEJAVU):
        return ImageFont.truetype(DEJAVU, size)
    return ImageFont.load_default(size=size)  # Pillow >= 10.1


def render_text(text: str, size: int = 320, font_px: int = 40, bg=(255, 255, 255), fg=(0, 0, 0)) -> np.ndarray:
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    f = _font(font_px)
    l, t, r, b = d.textbbox((0, 0), text, font=f)
    d.text(((size - (r - l)) // 2 - l, (size - (b - t)) // 2 - t), text, fill=fg, font=f)
    return np.asarray(img)


# ------------------------------------------------------------------ ocr_score (pure)


def test_ocr_score_substring_is_one():
    assert ocr_score(["the big", "HELLO world sign"], "hello world") == 1.0
    assert ocr_score(["xxhelloxx"], "Hello") == 1.0


def test_ocr_score_one_edit():
    # "helo" vs "hello": one insertion -> 1 - 1/5
    assert ocr_score(["helo"], "hello") == pytest.approx(0.8)
    # substitution
    assert ocr_score(["hellp"], "hello") == pytest.approx(0.8)


def test_ocr_score_spaces_and_case():
    assert ocr_score(["Hel", "Lo W", "orld"], "hello world") == 1.0  # lines joined, spaces removed
    assert ocr_score(["O P E N"], "open") == 1.0


def test_ocr_score_distance_capped_at_target_length():
    # nothing recognised: dist = len(target) -> 0
    assert ocr_score([], "cat") == 0.0
    # a long unrelated text: Levenshtein > len(target), capped -> 0, never negative
    assert ocr_score(["a very long and unrelated sentence"], "cat") == 0.0
    # extra recognised text: distance counts the extra characters (no substring)
    assert ocr_score(["cart"], "cat") == pytest.approx(1 - 1 / 3)


def test_ocr_score_empty_target_is_nan():
    assert math.isnan(ocr_score(["x"], ""))
    assert math.isnan(ocr_score(["x"], "   "))


def test_extract_target():
    assert extract_target('a sign that says "Open 24h" in neon') == "Open 24h"
    assert extract_target('first "one" then "two"') == "one"
    assert extract_target("curly \u201cHello\u201d quotes") == "Hello"
    assert extract_target('curly \u201cA\u201d before straight "B"') == "A"
    assert extract_target("no quotes here") is None
    assert extract_target('unbalanced "quote') is None


# ------------------------------------------------------------------ OCR scorer, fake engine


def test_ocr_scorer_nan_without_target_and_metadata_override():
    s = OcrScorer(engine=lambda img: ["hello"])
    imgs = np.zeros((3, 16, 16, 3), np.uint8)
    r = s(imgs, ['say "hello"', "no quotes", "no quotes"], [{}, {}, {"ocr_target": "hell"}])
    assert r[0] == 1.0 and math.isnan(r[1]) and r[2] == 1.0


def test_ocr_scorer_engine_error_is_nan_for_that_image_only():
    calls = []

    def flaky(img):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return ["abc"]

    s = make_scorer("ocr", engine=flaky)
    r = s(np.zeros((3, 8, 8, 3), np.uint8), ['"abc"'] * 3, [{}] * 3)
    assert r[0] == 1.0 and math.isnan(r[1]) and r[2] == 1.0
    assert s.last_failures == 1


def test_ocr_unknown_engine_and_missing_easyocr_errors():
    with pytest.raises(ValueError, match="rapidocr"):
        OcrScorer(engine="nope")
    try:
        import easyocr  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="gpu"):
            OcrScorer(engine="easyocr").engine


def test_ocr_tesseract_missing_error_names_fix(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pytesseract", None)  # as if not installed
    with pytest.raises(ImportError, match="apt-get install tesseract-ocr && pip install pytesseract"):
        OcrScorer(engine="tesseract").engine
    monkeypatch.undo()
    pytesseract = pytest.importorskip("pytesseract")
    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", "/nonexistent/tesseract")
    with pytest.raises(RuntimeError, match="apt-get install tesseract-ocr"):
        OcrScorer(engine="tesseract").engine


# ------------------------------------------------------------------ OCR scorer, real rapidocr


@pytest.fixture(scope="module")
def rapid():
    pytest.importorskip("rapidocr_onnxruntime")
    return make_scorer("ocr")


def test_rapidocr_reads_rendered_text(rapid):
    imgs = np.stack([render_text("HELLO", 256, 48), render_text("apex fast", 256, 36)])
    prompts = ['a poster with "hello" on it', 'a sign that says "Apex Fast"']
    r = rapid(imgs, prompts, [{}, {}])
    assert r.tolist() == [1.0, 1.0]
    # same images, wrong targets: low reward
    r_wrong = rapid(imgs, ['"zebra crossing"', '"quokka"'], [{}, {}])
    assert (r_wrong < 0.4).all(), r_wrong
    # float [N, 3, H, W] input in [0, 1] gives the same scores
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    assert rapid(x, prompts, [{}, {}]).tolist() == [1.0, 1.0]


def test_rapidocr_runs_without_the_angle_classifier_by_default(rapid):
    """Flow-GRPO's PaddleOCR call passes cls=False; engine_kwargs use_cls: true opts back in."""
    assert rapid.engine.rapidocr.use_cls is False
    on = make_scorer("ocr", engine_kwargs={"use_cls": True})
    assert on.engine.rapidocr.use_cls is True
    imgs = np.stack([render_text("HELLO", 256, 48)])
    assert on(imgs, ['"hello"'], [{}]).tolist() == rapid(imgs, ['"hello"'], [{}]).tolist() == [1.0]


def test_rapidocr_blank_image_scores_zero(rapid):
    r = rapid(np.full((1, 128, 128, 3), 255, np.uint8), ['"hello"'], [{}])
    assert r.tolist() == [0.0]


# ------------------------------------------------------------------ JPEG, colorfulness, contrast


def _noise(n=2, size=128, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_jpeg_flat_beats_noise():
    flat = np.full((2, 128, 128, 3), 120, np.uint8)
    imgs = np.concatenate([flat, _noise()])
    c = make_scorer("jpeg_compressibility")(imgs, [""] * 4, [{}] * 4)
    inc = make_scorer("jpeg_incompressibility")(imgs, [""] * 4, [{}] * 4)
    assert (c[:2] > c[2:].max()).all()
    assert torch.equal(c, -inc)
    assert (inc > 0).all() and inc[2] > 15  # 128x128 noise at q95: ~20 kB
    assert inc[0] < 2


def test_colorfulness():
    gray = np.repeat(np.random.default_rng(1).integers(0, 256, (1, 64, 64, 1), dtype=np.uint8), 3, -1)
    red = np.zeros((1, 64, 64, 3), np.uint8)
    red[..., 0] = 255
    half = red.copy()
    half[:, :, 32:] = (0, 0, 255)
    r = make_scorer("colorfulness")(np.concatenate([gray, red, half]), [""] * 3, [{}] * 3)
    assert r[0] == 0.0
    # pure red: rg = 255, yb = 127.5 constant -> M = 0.3 * sqrt(255^2 + 127.5^2)
    assert r[1].item() == pytest.approx(0.3 * math.hypot(255, 127.5), rel=1e-5)
    assert r[2] > r[1] > r[0]


def test_contrast():
    flat = np.full((1, 32, 32, 3), 77, np.uint8)
    bw = np.zeros((1, 32, 32, 3), np.uint8)
    bw[:, :, 16:] = 255
    r = make_scorer("contrast")(np.concatenate([flat, bw]), ["", ""], [{}, {}])
    assert r[0].item() == pytest.approx(0.0, abs=1e-9)
    assert r[1].item() == pytest.approx(0.5, abs=1e-6)


# ------------------------------------------------------------------ base: inputs, score_all, registry


def test_to_uint8_hwc_both_layouts():
    u8 = _noise(2, 16)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    assert np.array_equal(to_uint8_hwc(x), u8)
    assert np.array_equal(to_uint8_hwc(torch.from_numpy(u8)), u8)
    scorer = make_scorer("jpeg_incompressibility")
    assert torch.equal(scorer(u8, ["", ""], [{}, {}]), scorer(x, ["", ""], [{}, {}]))
    with pytest.raises(ValueError):
        to_uint8_hwc(np.zeros((2, 16, 16, 3), np.float32))


def test_score_all_exception_becomes_nan_column():
    class Boom:
        name = "boom"

        def __call__(self, images, prompts, metadata):
            raise RuntimeError("model crashed")

    imgs = _noise(3, 32)
    timings = {}
    R = score_all([make_scorer("contrast"), Boom(), make_scorer("colorfulness")], imgs, ["a", "b", "c"], None, timings)
    assert R.shape == (3, 3) and R.dtype == torch.float32
    assert torch.isnan(R[:, 1]).all()
    assert torch.isfinite(R[:, [0, 2]]).all()
    assert set(timings) == {"contrast", "boom", "colorfulness"}


def test_score_all_ocr_column_nan_for_unquoted_prompt():
    R = score_all([make_scorer("ocr", engine=lambda im: ["hi"])], _noise(2, 16), ['"hi"', "none"], [{}, {}])
    assert R[0, 0] == 1.0 and math.isnan(R[1, 0])


def test_registry_unknown_name_lists_available():
    names = available_scorers()
    for n in ("jpeg_compressibility", "jpeg_incompressibility", "colorfulness", "contrast", "ocr"):
        assert n in names
    with pytest.raises(ValueError) as ei:
        make_scorer("definitely_not_a_reward")
    msg = str(ei.value)
    assert "definitely_not_a_reward" in msg and "colorfulness" in msg and "ocr" in msg


# ------------------------------------------------------------------ failures, timeouts, async


class _Flaky:
    """Raises on the calls listed in ``fail_on`` (0-based), else returns ones."""

    def __init__(self, name="flaky", fail_on=()):
        self.name, self.fail_on, self.calls = name, set(fail_on), 0

    def __call__(self, images, prompts, metadata):
        i, self.calls = self.calls, self.calls + 1
        if i in self.fail_on:
            raise RuntimeError(f"failure {i}")
        return torch.ones(len(prompts))


def test_failure_tracker_raises_after_consecutive_whole_batch_failures():
    from apex_fast.rewards import RewardFailureError, RewardFailureTracker

    imgs = _noise(2, 8)
    tr = RewardFailureTracker(max_consecutive=3)
    flaky = _Flaky(fail_on={0, 1, 3, 4, 5})
    ok = make_scorer("contrast")
    score_all([flaky, ok], imgs, ["a", "b"], None, tracker=tr)  # fail 1
    score_all([flaky, ok], imgs, ["a", "b"], None, tracker=tr)  # fail 2
    score_all([flaky, ok], imgs, ["a", "b"], None, tracker=tr)  # success resets the streak
    assert tr.streak["flaky"] == 0 and tr.failed_batches["flaky"] == 2 and tr.nan_samples["flaky"] == 4
    score_all([flaky, ok], imgs, ["a", "b"], None, tracker=tr)
    score_all([flaky, ok], imgs, ["a", "b"], None, tracker=tr)
    with pytest.raises(RewardFailureError, match=r"'flaky' failed for 3 whole batches in a row.*failure 5"):
        score_all([flaky, ok], imgs, ["a", "b"], None, tracker=tr)
    assert tr.stats()["contrast"] == {"batches": 6, "failed_batches": 0, "nan_samples": 0, "streak": 0}


def test_failure_tracker_all_nan_option():
    from apex_fast.rewards import RewardFailureTracker

    ocr = make_scorer("ocr", engine=lambda im: [])
    tr = RewardFailureTracker(max_consecutive=1, all_nan_is_failure=False)
    R = score_all([ocr], _noise(2, 8), ["no", "target"], None, tracker=tr)  # all NaN but not a failure
    assert torch.isnan(R).all() and tr.nan_samples["ocr"] == 2
    with pytest.raises(Exception, match="all 2 samples NaN"):
        score_all([ocr], _noise(2, 8), ["no", "target"], None, tracker=RewardFailureTracker(max_consecutive=1))


def test_score_all_timeout_gives_nan():
    import time

    class Slow:
        name = "slow"

        def __call__(self, images, prompts, metadata):
            time.sleep(2.0)
            return torch.ones(len(prompts))

    errors, timings = {}, {}
    t0 = time.perf_counter()
    R = score_all([Slow(), make_scorer("contrast")], _noise(2, 8), ["a", "b"], None, timings,
                  timeout_s={"slow": 0.2}, errors=errors)
    assert time.perf_counter() - t0 < 1.5
    assert torch.isnan(R[:, 0]).all() and torch.isfinite(R[:, 1]).all()
    assert "TimeoutError" in errors["slow"] and timings["slow"] < 1.0


def test_score_all_async_overlaps_and_keeps_order():
    import time

    from apex_fast.rewards import score_all_async

    class Slow:
        name = "slow"

        def __call__(self, images, prompts, metadata):
            time.sleep(0.3)
            return torch.arange(len(prompts), dtype=torch.float32)

    t0 = time.perf_counter()
    f1 = score_all_async([Slow()], _noise(2, 8), ["a", "b"], None)
    f2 = score_all_async([Slow()], _noise(3, 8), ["a", "b", "c"], None)
    assert time.perf_counter() - t0 < 0.2  # returned at once: the caller can sample meanwhile
    assert f1.result(timeout=5).shape == (2, 1) and f2.result(timeout=5)[:, 0].tolist() == [0.0, 1.0, 2.0]


def test_tesseract_engine_reads_rendered_text_if_installed():
    pytesseract = pytest.importorskip("pytesseract")
    try:
        pytesseract.get_tesseract_version()
    except Exception:
        pytest.skip("tesseract binary not installed (apt-get install tesseract-ocr)")
    s = make_scorer("ocr", engine="tesseract")
    r = s(render_text("HELLO", 256, 48)[None], ['"hello"'], [{}])
    assert r.tolist() == [1.0]
