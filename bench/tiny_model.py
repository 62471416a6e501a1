"""How the pretrained tiny SD3 (``load_pipeline("tiny")``) behaves as a testbed: prompt following,
OCR sparsity, reward spreads. Results: bench/results/tiny_model.json (+ tiny_model.png, a labelled grid).

    OMP_NUM_THREADS=1 python -m bench.tiny_model [--groups 16 --group-size 8] [--pretrained tiny]

Samples are drawn as the trainer draws its rollouts (the demo config's SDE sampler: 10 steps, noise
level 0.7, CFG 4.5; one seeded generator per sample), ``--group-size`` images for each of
``--groups`` prompts of the demo's training set (each names a colour, a shape, a background and a
quoted word), then scored with the demo's rewards. Reported:

* ``prompt_following``: how often the simple detector of apex_fast.rewards.alignment agrees with the
  prompt (object colour, shape, background; position when the prompt names one), over all samples,
  with chance levels for comparison;
* per reward: mean, mean in-group std, and ``groups_with_spread`` (fraction of groups whose rewards
  are not all equal) - for OCR, Flow-GRPO's SD3.5-M starts sparse and high-variance.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from apex_fast.data import load_prompts
from apex_fast.data.testbed import COLORS, SHAPES, WORD_POSITIONS, parse_prompt
from apex_fast.models import encode_negative, encode_prompts, load_pipeline
from apex_fast.rewards import make_scorer
from apex_fast.rewards.alignment import detect_scene
from apex_fast.rl.rollout import Conditioning, decode_latents, sample

REWARDS = {
    # as configs/tiny_cpu.yaml: lenient detection thresholds for blurry 64 px words
    "ocr": {"engine_kwargs": {"det_limit_side_len": 128, "det_limit_type": "max", "det_thresh": 0.2,
                              "det_box_thresh": 0.2, "text_score": 0.2, "use_cls": True}},
    "prompt_alignment": {},
    "jpeg_compressibility": {},
    "contrast": {},
    "colorfulness": {},
}


def rollout_images(pipe, prompts: list[str], *, group_size: int, num_steps: int, noise_level: float,
                   guidance_scale: float, resolution: int, seed: int, max_sequence_length: int = 4):
    """[G * len(prompts), 3, H, W] float images in [0, 1], group-major, one generator per sample."""
    all_prompts = [p for p in prompts for _ in range(group_size)]
    emb, pooled = encode_prompts(pipe, prompts, "cpu", max_sequence_length=max_sequence_length)
    idx = torch.arange(len(prompts)).repeat_interleave(group_size)
    ne, npool = encode_negative(pipe, 1, "cpu", max_sequence_length=max_sequence_length)
    n = len(all_prompts)
    cond = Conditioning(emb[idx].float(), pooled[idx].float(), ne.float().expand(n, -1, -1), npool.float().expand(n, -1))
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    h = resolution // vae_factor
    gens = [torch.Generator().manual_seed(seed * 100003 + i) for i in range(n)]
    ro = sample(pipe.transformer, pipe.scheduler, cond, latent_shape=(pipe.transformer.config.in_channels, h, h),
                num_steps=num_steps, guidance_scale=guidance_scale, noise_level=noise_level, generators=gens,
                batch_size=64)
    return decode_latents(pipe.vae, ro.final), all_prompts


def prompt_following(images_u8: np.ndarray, prompts: list[str]) -> dict:
    hits = {"color": [], "shape": [], "background": [], "position": []}
    for img, p in zip(images_u8, prompts):
        scene = parse_prompt(p)
        d = detect_scene(img, has_word=scene.word is not None)
        hits["color"].append(d["color"] == scene.color)
        hits["shape"].append(d["shape"] == scene.shape)
        hits["background"].append(d["background"] == scene.background)
        if scene.position:
            hits["position"].append(d["position"] == scene.position)
    out = {k: {"agreement": float(np.mean(v)) if v else None, "n": len(v)} for k, v in hits.items()}
    out["color"]["chance"] = 1 / (len(COLORS) - 1)
    out["shape"]["chance"] = 1 / len(SHAPES)
    out["background"]["chance"] = 1 / len(COLORS)
    out["position"]["chance"] = 1 / len(WORD_POSITIONS)
    out["all_of_color_shape_background"] = float(np.mean(
        [c and s and b for c, s, b in zip(hits["color"], hits["shape"], hits["background"])]))
    return out


def reward_stats(r: torch.Tensor, group_size: int) -> dict:
    g = r.view(-1, group_size)
    std = g.std(1, unbiased=False)
    return {"mean": float(r.nanmean()), "std": float(r.std()), "mean_in_group_std": float(std.mean()),
            "groups_with_spread": float((std > 1e-6).float().mean()),
            "zero_fraction": float((r == 0).float().mean())}


def grid_png(images_u8: np.ndarray, prompts: list[str], path: Path, title: str, cols: int = 8, rows: int = 4,
             group_size: int = 8) -> None:
    """The first `cols` images of `rows` groups, each row labelled with its prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(rows, len(images_u8) // group_size)
    fig, axes = plt.subplots(rows, 1, figsize=(cols * 0.85, rows * 1.05 + 0.4), squeeze=False)
    for r in range(rows):
        strip = np.concatenate(list(images_u8[r * group_size:r * group_size + cols]), axis=1)
        ax = axes[r, 0]
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(prompts[r * group_size], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrained", default="tiny")
    ap.add_argument("--prompts", default="testbed_train.txt")
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--num-steps", type=int, default=10)
    ap.add_argument("--noise-level", type=float, default=0.7)
    ap.add_argument("--guidance-scale", type=float, default=4.5)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--name", default="tiny_model")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.pretrained)
    prompts = [p for p, _ in load_prompts(args.prompts)][: args.groups]
    imgs, all_prompts = rollout_images(pipe, prompts, group_size=args.group_size, num_steps=args.num_steps,
                                       noise_level=args.noise_level, guidance_scale=args.guidance_scale,
                                       resolution=args.resolution, seed=args.seed)
    u8 = (imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    result = {"model": args.pretrained, "prompt_following": prompt_following(u8, all_prompts)}
    meta = [{} for _ in all_prompts]
    for name, kw in REWARDS.items():
        r = make_scorer(name, **kw)(u8, all_prompts, meta)
        result[name] = reward_stats(r, args.group_size)
    result["setup"] = {k: v for k, v in vars(args).items() if k not in ("results", "name")}
    result["device"] = f"cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}, threads {torch.get_num_threads()}"
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = "python -m bench.tiny_model " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    grid_png(u8, all_prompts, out / f"{args.name}.png",
             f"load_pipeline({args.pretrained!r}): SDE samples as in training, one row per prompt")
    pf = result["prompt_following"]
    print(f"prompt following (detector agrees): colour {pf['color']['agreement']:.2f}  shape {pf['shape']['agreement']:.2f}  "
          f"background {pf['background']['agreement']:.2f}  position {pf['position']['agreement']}")
    for name in REWARDS:
        s = result[name]
        print(f"{name:22s} mean {s['mean']:9.4f}  in-group std {s['mean_in_group_std']:.4f}  groups with spread {s['groups_with_spread']:.2f}")
    return result


if __name__ == "__main__":
    main()
