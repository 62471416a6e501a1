"""The pretrained tiny SD3 testbed: the asset loads offline and is what scripts/pretrain_tiny_sd3.py
produces, it follows colour/shape prompts, its OCR reward is sparse, training on it moves a reward."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apex_fast.data import load_prompts, testbed
from apex_fast.models import load_pipeline
from apex_fast.models.tiny import ASSETS_DIR, TINY_SD3_DIR
from apex_fast.rewards import make_scorer
from apex_fast.rewards.alignment import alignment_score, detect_scene

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "pretrain_tiny_sd3.py"


def pretrain_log() -> dict:
    return json.loads((TINY_SD3_DIR / "pretrain_log.json").read_text())


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def samples(pipe):
    """4 images for each of 6 demo prompts, drawn as the trainer's rollouts are (SDE, CFG 4.5)."""
    from bench.tiny_model import rollout_images

    prompts = [p for p, _ in load_prompts("testbed_train.txt")][:6]
    imgs, all_prompts = rollout_images(pipe, prompts, group_size=4, num_steps=10, noise_level=0.7,
                                       guidance_scale=4.5, resolution=64, seed=0)
    return (imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), all_prompts


def test_assets_are_small_and_the_pipeline_loads_offline(pipe):
    total = sum(f.stat().st_size for f in ASSETS_DIR.rglob("*") if f.is_file())
    assert total < 15e6, f"tiny assets take {total / 1e6:.1f} MB"
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == 16
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4  # 64 px <-> 16 x 16 latents
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert not any(p.requires_grad for p in getattr(pipe, name).parameters()), name
    # "tiny" (and None) is the pretrained asset whatever the seed; "tiny-random" is the random model
    other = load_pipeline(None, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), other.transformer.parameters()))
    rnd = load_pipeline("tiny-random")
    assert rnd.transformer.config.num_layers != pipe.transformer.config.num_layers
    log = pretrain_log()
    assert log["sd3"]["steps_done"] >= 1000 and log["decoder"]["steps"] > 0


def test_script_reproduces_the_first_losses(tmp_path):
    """Stage sd3 re-run from the asset's tokenizer and VAE: the first two steps' losses of its SD3 stage
    (from scratch, on the layout that stage recorded) match the log; the first pass over the images is in
    generation order, so two batches' worth of images reproduce the first two steps."""
    LOG = pretrain_log()
    out = tmp_path / "tiny_sd3"
    cmd = [sys.executable, str(SCRIPT), "--stage", "sd3", "--from", str(TINY_SD3_DIR), "--out", str(out),
           "--steps", "2", "--images", str(2 * LOG["args"]["batch"]), "--decay-steps", "0", "--seed", str(LOG["args"]["seed"]),
           "--layout", LOG["sd3"]["layout"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((out / "pretrain_log.json").read_text())["sd3"]["first_losses"]
    np.testing.assert_allclose(got, LOG["sd3"]["first_losses"][:2], rtol=1e-4)


def test_vae_stage_reproduces_the_first_losses(tmp_path):
    LOG = pretrain_log()
    out = tmp_path / "tiny_sd3"
    # constant lr: the full run's cosine schedule is within 1e-5 of it over the first steps
    cmd = [sys.executable, str(SCRIPT), "--stage", "vae", "--out", str(out), "--vae-steps", "2", "--no-vae-cosine",
           "--seed", str(LOG["args"]["seed"]), "--layout", LOG["vae"]["layout"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((tmp_path / "tiny_sd3.stage" / "log.json").read_text())["vae"]["first_losses"]
    np.testing.assert_allclose(got, LOG["vae"]["first_losses"][:2], rtol=1e-3)
    # and the tokenizer is the asset's
    from transformers import CLIPTokenizer

    new = CLIPTokenizer.from_pretrained(str(tmp_path / "tiny_sd3.stage" / "tokenizer"))
    shipped = CLIPTokenizer.from_pretrained(str(TINY_SD3_DIR / "tokenizer"))
    assert new.get_vocab() == shipped.get_vocab() and new.model_max_length == shipped.model_max_length


def test_follows_colour_and_shape_prompts(samples):
    imgs, prompts = samples
    hits = {"color": [], "shape": [], "background": []}
    for img, p in zip(imgs, prompts):
        scene = testbed.parse_prompt(p)
        d = detect_scene(img, has_word=True)
        for k in hits:
            hits[k].append(d[k] == getattr(scene, k))
    # chance: colour 1/7, shape 1/3, background 1/8
    assert np.mean(hits["background"]) >= 0.6, hits
    assert np.mean(hits["color"]) >= 0.4, hits
    assert np.mean(hits["shape"]) >= 0.4, hits


def test_ocr_is_sparse_at_the_base_model(samples):
    """The base model's words are partly legible: the OCR reward is mostly 0 (sparse), never mostly
    right, but not absent: some samples are read (fully or partly), with a spread inside some group."""
    from bench.tiny_model import REWARDS

    imgs, prompts = samples
    r = make_scorer("ocr", **REWARDS["ocr"])(imgs, prompts, [{}] * len(prompts))
    assert torch.isfinite(r).all() and ((r >= 0) & (r <= 1)).all()
    assert float(r.mean()) < 0.6 and float((r == 0).float().mean()) > 0.4, r
    assert float(r.mean()) > 0.02 and (r.view(-1, 4).std(1) > 0).any(), r


def test_vae_carries_legible_words(pipe):
    """Words survive the asset's VAE (encode -> decode), so the OCR reward is reachable by the policy."""
    from bench.tiny_model import REWARDS

    rng = np.random.default_rng(0)
    scenes = [testbed.random_scene(rng, p_word=1.0) for _ in range(16)]
    x = torch.from_numpy(np.stack([testbed.render(s, rng) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
    u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    r = make_scorer("ocr", **REWARDS["ocr"])(u8, [s.prompt for s in scenes], [{}] * 16)
    assert float(r.mean()) > 0.2, r


def test_prompt_alignment_reward_prefers_the_named_colours():
    rng = np.random.default_rng(0)
    scene = testbed.Scene("red", "circle", "blue", None, None)
    img = testbed.render(scene, rng)
    good = alignment_score(img, "red", "blue")
    assert good > alignment_score(img, "green", "blue") and good > alignment_score(img, "red", "yellow")
    assert good > alignment_score(np.full_like(img, 128), "red", "blue")
    r = make_scorer("prompt_alignment")(np.stack([img, img]), [scene.prompt, "a cat"], [{}, {}])
    assert r[0] == pytest.approx(good) and torch.isnan(r[1])


def test_detector_reads_rendered_scenes():
    rng = np.random.default_rng(1)
    for _ in range(40):
        scene = testbed.random_scene(rng)
        d = detect_scene(testbed.render(scene, rng), has_word=scene.word is not None)
        assert (d["color"], d["shape"], d["background"]) == (scene.color, scene.shape, scene.background), scene
        if scene.position:
            assert d["position"] == scene.position, scene


def test_prompt_files_are_the_seeded_sets():
    train = [p for p, _ in load_prompts("testbed_train.txt")]
    assert train == testbed.prompt_set(1, 48)
    assert [p for p, _ in load_prompts("testbed_eval.txt")] == testbed.prompt_set(2, 16, exclude=set(train))
    assert all(testbed.parse_prompt(p) is not None and testbed.parse_prompt(p).word for p in train)


def test_demo_learning_direction_on_one_objective(tmp_path):
    """A short demo-config run on JPEG compressibility alone raises its eval reward (same eval prompts
    and seeds). NOT a seed-robust learning test, and not evidence of learning by itself: with train.seed
    0 / 1 / 2 the change is +0.020 / -0.006 / +0.026 (RMS contrast: +0.007 / -0.014 / -0.000; prompt
    alignment alone, 6-8 epochs of 16 images: +0.014 / +0.011 / -0.002 and +0.010 / +0.013 / -0.006 /
    -0.005), and short runs drift towards simpler images whatever the reward: 8 epochs with 4 SDE steps
    raise JPEG compressibility by +0.042 when trained on it and by +0.049 when trained on its negative
    (jpeg_incompressibility), seed 0. The seed-robust check at the demo's settings is the opt-in
    test_demo_learning_follows_the_reward_sign; the 3-seed demo is in bench/results/tiny_demo.md (the 4 x 8 layout it was tuned on: tiny_demo_4x8.md)."""
    from apex_fast.config import load_config
    from apex_fast.train import Trainer

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        f"log.output_dir={tmp_path / 'run'}", "log.progress=false", "log.tensorboard=false", "log.plot=false",
        "rewards=[{name: jpeg_compressibility, weight: 1.0}]", "train.epochs=6", "train.lr=1e-2", "train.seed=0",
        "sample.num_steps=10", "sample.group_size=8", "sample.prompts_per_epoch=4", "eval.every=0", "eval.num_steps=10",
        "eval.num_prompts=6", "eval.images_per_prompt=2", "checkpoint.every=0"])
    result = Trainer(cfg).fit()
    assert result["end"]["jpeg_compressibility"] > result["start"]["jpeg_compressibility"] + 0.005, result


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("APEX_FAST_LONG_TESTS") != "1",
                    reason="about 10 min on one core (6 runs of 16 epochs); set APEX_FAST_LONG_TESTS=1")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_learning_follows_the_reward_sign(tmp_path, seed):
    """The seed-robust learning direction, at the demo's own settings (too slow for CI): 16 epochs of the
    demo config on JPEG compressibility alone leave the eval images more compressible than the same run
    (same seed: LoRA init, prompts, noise) on its negative, jpeg_incompressibility. The pair cancels
    what training does to the images whatever the reward (short runs drift towards simpler images; with
    6 epochs of 16 images the pair was not seed-robust). Measured (end - start of the
    compressibility, trained on it vs on its negative): +0.010 vs -0.025 (seed 0), +0.028 vs -0.037
    (seed 1), +0.020 vs -0.004 (seed 2)."""
    from apex_fast.config import load_config
    from apex_fast.train import Trainer

    def end_compressibility(reward: str) -> tuple[float, float]:
        cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [
            f"log.output_dir={tmp_path / reward}", "log.progress=false", "log.tensorboard=false", "log.plot=false",
            f"rewards=[{{name: {reward}, weight: 1.0}}]", f"train.seed={seed}", "train.epochs=16", "eval.every=0",
            "checkpoint.every=0"])
        result = Trainer(cfg).fit()
        sign = 1.0 if reward == "jpeg_compressibility" else -1.0  # incompressibility = -compressibility
        return sign * result["start"][reward], sign * result["end"][reward]

    start, up = end_compressibility("jpeg_compressibility")
    start_again, down = end_compressibility("jpeg_incompressibility")
    assert start == pytest.approx(start_again, abs=1e-6)  # the same base model, eval prompts and seeds
    assert up - down > 0.01, (seed, start, up, down)


def test_script_word_focused_options_run(tmp_path):
    """--p-word / --word-loss-weight / --timestep-shift (word-focused fine-tuning): one step from the
    asset, only images with a word, a finite weighted loss, a loadable pipeline written."""
    out = tmp_path / "tiny_sd3"
    cmd = [sys.executable, str(SCRIPT), "--stage", "sd3", "--from", str(TINY_SD3_DIR), "--init-from", str(TINY_SD3_DIR),
           "--out", str(out), "--steps", "1", "--images", "8", "--batch", "8", "--decay-steps", "0", "--warmup", "1",
           "--p-word", "1.0", "--word-loss-weight", "4", "--timestep-shift", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads((out / "pretrain_log.json").read_text())
    assert log["args"]["word_loss_weight"] == 4 and np.isfinite(log["sd3"]["first_losses"][0])
    assert load_pipeline(str(out)).transformer.config.num_layers == 4


def test_demo_bench_cuts_images_out_of_the_eval_grid(tmp_path):
    """bench.tiny_demo's start-vs-end figure reads the images back out of the trainer's labelled grid."""
    from apex_fast.eval.grids import save_prompt_grid
    from bench.tiny_demo import eval_tiles

    rng = np.random.default_rng(0)
    imgs = np.repeat(np.repeat(rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), 8, 1), 8, 2)  # 8x8 blocks
    prompts = [f'a red circle on a blue background with the word "W{i // 2}"' for i in range(6)]
    png, _ = save_prompt_grid(imgs, prompts, tmp_path / "eval_epoch00000.png", title="epoch 0: held-out prompts")
    tiles = np.stack(eval_tiles(png, per_prompt=2, n_prompts=3))
    assert tiles.shape == (6, 64, 64, 3)
    assert np.abs(tiles.astype(int) - imgs.astype(int)).mean() < 3, "tiles do not match the drawn images"


def test_demo_config_is_the_static_config_with_apex():
    """`make demo` trains configs/tiny_cpu_apex.yaml: configs/tiny_cpu.yaml (the cheap base of tests and
    benches) with APEX (and its smoothing), its own output folder and the demo's sample layout (16 prompts
    x 8 images an epoch in 2 optimizer steps, Flow-GRPO's EMA warm-up); nothing else differs."""
    import dataclasses

    from apex_fast.config import load_config

    static = dataclasses.asdict(load_config(ROOT / "configs" / "tiny_cpu.yaml"))
    apex = dataclasses.asdict(load_config(ROOT / "configs" / "tiny_cpu_apex.yaml"))
    assert apex["balance"].pop("method") == "apex" and static["balance"].pop("method") == "static"
    assert apex["balance"].pop("rho") == 0.98
    static["balance"].pop("rho")
    assert apex["log"].pop("output_dir") != static["log"].pop("output_dir")
    layout = {("sample", "prompts_per_epoch"): (16, 4), ("sample", "batch_size"): (64, 32),
              ("train", "micro_batch_size"): (16, 8), ("train", "optimizer_steps_per_epoch"): (2, 0),
              ("train", "ema_warmup"): (True, False)}
    for (part, key), (demo, base) in layout.items():
        assert (apex[part].pop(key), static[part].pop(key)) == (demo, base), f"{part}.{key}"
    assert apex == static
