"""Pretrain the embedded tiny SD3 (``load_pipeline("tiny")``) on the procedural testbed and store it
as a package asset (a diffusers pipeline folder, apex_fast/models/assets/tiny_sd3/).

Deterministic stages, each seeded on its own so any stage can be re-run alone:

1. tokenizer: the project's CLIP-style BPE (scripts/train_tokenizer.py) learned on testbed prompts,
   so every colour, shape and word is one token; ``model_max_length`` 32.
2. VAE: a 16-channel ``AutoencoderKL`` with x4 down-sampling (64 px <-> 16 x 16 latents, fine
   enough for the words to survive decoding), trained for reconstruction (+ a small KL) on
   testbed images and the varied procedural images of scripts/train_tiny_vae.py; SD3-style
   ``shift_factor`` / ``scaling_factor`` measured on the data.
3. SD3: an ``SD3Transformer2DModel`` (4 joint blocks) and the two ``CLIPTextModelWithProjection``
   encoders trained jointly with SD3's rectified-flow objective (x_t = (1 - s) x_0 + s eps, target
   eps - x_0, logit-normal s shifted by 2; the sampler uses 3), 10% empty prompts for
   classifier-free guidance, EMA of the weights; images and prompts streamed from
   `apex_fast.data.testbed` with a seeded generator (85% with a quoted word).
4. decoder: the VAE decoder alone, encoder frozen (same latent space, so the SD3 stage does not
   depend on it), on word-heavy batches: sharper words for the same latents. ``--stage all`` runs it
   right after the VAE.

``--layout`` (apex_fast.data.testbed.LAYOUTS) selects the data of every stage: ``big-words`` (the
default: 3-letter words at 0.32 of the side) or ``small-words`` (4-letter words at 0.22, too fine for
this model to draw legibly); each stage's log records its layout.

The shipped asset is this script's default run, one command from scratch on ``big-words``
(README "The embedded testbed" gives its cost and properties): tokenizer, VAE (600 steps), decoder
(300), then 9000 word-focused SD3 steps (85% of images with a word, the word band's latent rows
weighted 4x in the loss, timesteps shifted by 2: more weight on mid/low noise, where letters form).

The output folder is a ``StableDiffusion3Pipeline.save_pretrained`` folder plus ``pretrain_log.json``
(arguments, the losses of the first steps of each stage, loss curve, timings). A checkpoint of the
pipeline (EMA weights) is written every ``--save-every`` steps, so a partial run is usable.

    OMP_NUM_THREADS=2 python scripts/pretrain_tiny_sd3.py                       # the shipped asset, ~30 min on 2 cores
    python scripts/pretrain_tiny_sd3.py --out /tmp/t --vae-steps 20 --steps 20  # quick try
    python scripts/pretrain_tiny_sd3.py --stage sd3 --from apex_fast/models/assets/tiny_sd3 --steps 3 --out /tmp/t

Continue a run: ``--stage sd3 --from A --init-from A [--steps N]``; ``--p-word 0.5 --word-loss-weight 1
--timestep-shift 3`` is the plain SD3 objective on this data.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from apex_fast.data import testbed  # noqa: E402
from apex_fast.models.tiny import TINY_SD3_DIR  # noqa: E402

IMAGE_SIZE = 64
MAX_TOKENS = 24  # CLIP context of the tiny encoders: the longest testbed prompt is 16 tokens
T5_TOKENS = 4  # zero "T5" tokens appended as SD3 does without T5 (configs: sample.max_sequence_length)
CLIP_HIDDEN = (32, 32)  # CLIP-L / CLIP-G stand-ins: concatenated = joint_attention_dim, pooled = 64
FIRST_LOSSES = 5  # losses of the first steps kept in the log (the reproducibility test compares them)


# ------------------------------------------------------------------ data

LAYOUT = testbed.LAYOUT  # the testbed layout of all stages' data (--layout)


def testbed_batch(rng: np.random.Generator, n: int, p_word: float = 0.5):
    scenes = [testbed.random_scene(rng, p_word=p_word, layout_name=LAYOUT) for _ in range(n)]
    x = np.stack([testbed.render(s, rng, IMAGE_SIZE, layout_name=LAYOUT) for s in scenes])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1, [s.prompt for s in scenes]


def testbed_items(rng: np.random.Generator, n: int, p_word: float = 0.5):
    """Like testbed_batch, but each scene is drawn and rendered in turn, so the first k items do not
    depend on n (the SD3 data set's first batches are the same whatever --images)."""
    pairs = []
    for _ in range(n):
        scene = testbed.random_scene(rng, p_word=p_word, layout_name=LAYOUT)
        pairs.append((testbed.render(scene, rng, IMAGE_SIZE, layout_name=LAYOUT), scene.prompt))
    x = np.stack([a for a, _ in pairs])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1, [p for _, p in pairs]


def vae_batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    """3/4 testbed images, 1/4 the varied procedural images of train_tiny_vae.py (gradients, noise,
    words anywhere) so decoded colorfulness / contrast / detail keep following the latents."""
    import train_tiny_vae

    k = n // 4
    a, _ = testbed_batch(rng, n - k)
    b = np.stack([train_tiny_vae.procedural_image(rng, IMAGE_SIZE) for _ in range(k)])
    b = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 127.5 - 1
    return torch.cat([a, b])


# ------------------------------------------------------------------ stage 1: tokenizer

def train_tokenizer(out: Path, seed: int) -> None:
    import train_tokenizer as tt

    rng = np.random.default_rng([seed, 1])
    words = testbed.layout(LAYOUT).words
    prompts = [testbed.random_scene(rng, layout_name=LAYOUT).prompt for _ in range(4000)]
    for c in testbed.COLORS:  # every word of the vocabulary, whatever the draw
        prompts += [testbed.Scene(c, s, "white" if c != "white" else "black", p, w).prompt
                    for s in testbed.SHAPES for p in testbed.POSITIONS for w in words[:1]]
    prompts += [f'with the word "{w}"' for w in words]
    merges = tt.learn_merges(tt.word_counts(prompts), 400)
    vocab = tt.build_vocab(merges)
    for name in ("tokenizer", "tokenizer_2"):
        tt.write_tokenizer(out / name, vocab, merges)
        cfg_path = out / name / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model_max_length"] = MAX_TOKENS
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


# ------------------------------------------------------------------ stage 2: VAE

def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=2,
        sample_size=IMAGE_SIZE, scaling_factor=1.0, shift_factor=0.0,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )


def train_vae(args, log: dict):
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config())
    with torch.no_grad():  # narrow initial posterior (see train_tiny_vae.py)
        vae.encoder.conv_out.bias[16:].fill_(-6.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng([args.seed, 2])
    g = torch.Generator().manual_seed(args.seed)
    losses, t0 = [], time.time()
    vae.train()
    for step in range(1, args.vae_steps + 1):
        x = vae_batch(rng, args.vae_batch)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        lr = args.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))) if args.vae_cosine else args.vae_lr
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.vae_steps:
            print(f"vae step {step:5d}  loss {np.mean(losses[-50:]):.4f}  {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    with torch.no_grad():  # SD3-style latent statistics on fresh data
        rng = np.random.default_rng([args.seed, 3])
        z = torch.cat([vae.encode(vae_batch(rng, 32)).latent_dist.sample(generator=g) for _ in range(4)])
    vae.register_to_config(shift_factor=round(float(z.mean()), 4), scaling_factor=round(float(1 / z.std()), 4))
    log["vae"] = {"layout": LAYOUT, "first_losses": losses[:FIRST_LOSSES], "curve": losses[::25], "steps": args.vae_steps,
                  "seconds": round(time.time() - t0), "shift_factor": vae.config.shift_factor,
                  "scaling_factor": vae.config.scaling_factor}
    return vae


def finetune_decoder(args, vae, log: dict):
    """Stage 2b: the decoder alone, encoder frozen (the latent space, and so an SD3 trained on it, is
    unchanged), on text-heavy batches: sharper words for the same latents."""
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    params = [p for p in vae.decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng([args.seed, 6])
    g = torch.Generator().manual_seed(args.seed + 6)
    losses, t0 = [], time.time()
    vae.decoder.train()
    for step in range(1, args.decoder_steps + 1):
        k = args.vae_batch // 4
        a, _ = testbed_batch(rng, args.vae_batch - k, p_word=0.9)
        x = torch.cat([a, vae_batch(rng, 4 * k)[-k:]])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + (rec - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = args.decoder_lr * 0.5 * (1 + math.cos(math.pi * step / args.decoder_steps))
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.decoder_steps:
            print(f"decoder step {step:5d}  loss {np.mean(losses[-50:]):.4f}  {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    vae.requires_grad_(False)
    log["decoder"] = {"layout": LAYOUT, "first_losses": losses[:FIRST_LOSSES], "curve": losses[::25], "steps": args.decoder_steps,
                      "seconds": round(time.time() - t0)}
    return vae


# ------------------------------------------------------------------ stage 3: transformer + text encoders

def build_sd3(tokenizer, seed: int):
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    encoders = []
    for hidden in CLIP_HIDDEN:
        cfg = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, projection_dim=hidden,
            num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
            hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        encoders.append(CLIPTextModelWithProjection(cfg))
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 4, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=sum(CLIP_HIDDEN),
        caption_projection_dim=64, pooled_projection_dim=sum(CLIP_HIDDEN), pos_embed_max_size=16,
        qk_norm="rms_norm",
    )
    return transformer, encoders[0], encoders[1]


def make_pipeline(transformer, te1, te2, tok_dir: Path, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=te1, tokenizer=load_tokenizer(tok_dir / "tokenizer"), text_encoder_2=te2,
        tokenizer_2=load_tokenizer(tok_dir / "tokenizer_2"), text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, out: Path, log: dict) -> None:
    """Atomic: write to a sibling temp folder, then swap it in."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "pretrain_log.json").write_text(json.dumps(log, indent=1) + "\n")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def train_sd3(args, vae, tok_dir: Path, log: dict, out: Path):
    import copy

    tokenizer = load_tokenizer(tok_dir / "tokenizer")
    transformer, te1, te2 = build_sd3(tokenizer, args.seed)
    if args.init_from:  # continue from a saved pipeline's (EMA) weights; fresh optimizer state
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        src = Path(args.init_from)
        transformer.load_state_dict(SD3Transformer2DModel.from_pretrained(str(src / "transformer")).state_dict())
        te1.load_state_dict(CLIPTextModelWithProjection.from_pretrained(str(src / "text_encoder")).state_dict())
        te2.load_state_dict(CLIPTextModelWithProjection.from_pretrained(str(src / "text_encoder_2")).state_dict())
        prev = json.loads((src / "pretrain_log.json").read_text()).get("sd3", {})
        log["sd3_before"] = prev
        print(f"continuing from {src} (after {prev.get('steps_done')} steps)", flush=True)
    pipe = make_pipeline(transformer, te1, te2, tok_dir, vae)
    vae.requires_grad_(False)
    modules = torch.nn.ModuleList([transformer, te1, te2])
    ema = copy.deepcopy(modules).requires_grad_(False)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in zip(("transformer", "text_encoder", "text_encoder_2"), modules)}
    print(f"parameters: {n_params}", flush=True)
    opt = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    # a fixed data set, encoded once (the VAE encoder would cost as much as the transformer per step)
    rng = np.random.default_rng([args.seed, 4])
    g = torch.Generator().manual_seed(args.seed + 4)
    t0 = time.time()
    prompts_all, means, stds = [], [], []
    with torch.no_grad():
        for i in range(0, args.images, 64):
            x, p = testbed_items(rng, min(64, args.images - i), p_word=args.p_word)
            post = vae.encode(x).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            prompts_all += p
    means, stds = torch.cat(means), torch.cat(stds)
    print(f"encoded {len(prompts_all)} images in {time.time() - t0:.0f}s", flush=True)
    losses, t0 = [], time.time()
    modules.train()
    h = means.shape[2]  # latent rows covering the word band (the layout's word height and font size)
    lay = testbed.layout(LAYOUT)
    half = max(0.15, 0.6 * lay.font)
    word_rows = slice(int((lay.word_y - half) * h), int(math.ceil((lay.word_y + half) * h)))
    drop_rng = np.random.default_rng([args.seed, 5])
    # first pass in generation order, then reshuffled each pass: the first steps do not depend on --images
    order = torch.arange(len(prompts_all))
    for step in range(1, args.steps + 1):
        start = ((step - 1) * args.batch) % len(order)
        if step > 1 and start < args.batch:
            order = torch.randperm(len(prompts_all), generator=g)
        idx = order[start:start + args.batch]
        prompts = ["" if drop_rng.random() < args.cfg_dropout else prompts_all[i] for i in idx.tolist()]
        z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)
        x0 = (z - shift) * scale
        u = torch.sigmoid(torch.randn(len(x0), generator=g))
        shift_t = args.timestep_shift
        s = shift_t * u / (1 + (shift_t - 1.0) * u)  # 3: the sampler's shift-3 schedule
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * eps
        emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=T5_TOKENS)
        v = transformer(hidden_states=xt, encoder_hidden_states=emb, pooled_projections=pooled,
                        timestep=s * 1000, return_dict=False)[0]
        err = (v - (eps - x0)).square()
        if args.word_loss_weight == 1.0:
            loss = err.mean()
        else:  # the latent rows of the word band count more for images with a word (sharper glyphs)
            w = torch.ones(len(x0), 1, err.shape[2], 1)
            has_word = torch.tensor(['"' in prompts_all[i] for i in idx.tolist()])
            w[has_word, :, word_rows] = args.word_loss_weight
            loss = (err * w).sum() / (w.sum() * err.shape[1] * err.shape[3])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        warm = min(1.0, step / args.warmup)
        decay = 1.0 if step <= args.steps - args.decay_steps else (args.steps - step) / max(1, args.decay_steps)
        for group in opt.param_groups:
            group["lr"] = args.lr * warm * max(decay, 0.05)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), modules.parameters()):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            print(f"sd3 step {step:6d}  loss {np.mean(losses[-50:]):.4f}  {time.time() - t0:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            log["sd3"] = {"layout": LAYOUT, "first_losses": losses[:FIRST_LOSSES], "curve": [round(float(np.mean(losses[i:i + 50])), 5) for i in range(0, len(losses), 50)],
                          "steps_done": step, "steps": args.steps, "seconds": round(time.time() - t0), "parameters": n_params}
            save_pipeline(make_pipeline(*[copy.deepcopy(m).eval() for m in ema], tok_dir, vae), out, log)
            if args.keep_checkpoints:
                shutil.copytree(out, out.with_name(f"{out.name}.step{step:05d}"), dirs_exist_ok=True)
            print(f"saved {out} at step {step}", flush=True)
    return log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(TINY_SD3_DIR))
    ap.add_argument("--stage", choices=("all", "vae", "sd3", "decoder"), default="all",
                    help="vae: tokenizer + VAE only; sd3: reuse tokenizer and VAE of --from; "
                         "decoder: fine-tune the VAE decoder of --from (written to OUT.stage/vae_decoder)")
    ap.add_argument("--from", dest="src", default=None, help="pipeline folder whose tokenizer and VAE --stage sd3 reuses")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-kl", type=float, default=1e-3)
    ap.add_argument("--vae-cosine", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--decoder-steps", type=int, default=300)
    ap.add_argument("--decoder-lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=9000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=6144, help="size of the fixed, pre-encoded training set")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--decay-steps", type=int, default=1500, help="linear lr decay over the last N steps")
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--p-word", type=float, default=0.85, help="fraction of SD3 training images with a quoted word")
    ap.add_argument("--word-loss-weight", type=float, default=4.0,
                    help="loss weight of the word band's latent rows in images with a word (1: plain SD3 loss)")
    ap.add_argument("--timestep-shift", type=float, default=2.0,
                    help="shift of the logit-normal training timesteps (3: the sampler's; 1: more weight on detail)")
    ap.add_argument("--layout", choices=tuple(testbed.LAYOUTS), default=testbed.LAYOUT,
                    help="testbed layout of the data (word list, font size; apex_fast.data.testbed.LAYOUTS)")
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--init-from", default=None, help="--stage sd3: start from this pipeline folder's weights (continue a run)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="also keep a copy of every checkpoint (OUT.stepNNNNN)")
    args = ap.parse_args(argv)
    global LAYOUT
    LAYOUT = args.layout
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = out.with_name(out.name + ".stage")
    log = {"args": vars(args) | {"out": None}}
    t0 = time.time()
    if args.stage == "decoder":
        from diffusers import AutoencoderKL

        if not args.src:
            raise SystemExit("--stage decoder needs --from DIR (a pipeline folder or a previous run's .stage folder)")
        vae = AutoencoderKL.from_pretrained(str(Path(args.src) / "vae"), local_files_only=True)
        vae = finetune_decoder(args, vae, log)
        work.mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(work / "vae_decoder", safe_serialization=True)
        (work / "decoder_log.json").write_text(json.dumps(log) + "\n")
        return log
    if args.stage in ("all", "vae"):
        shutil.rmtree(work, ignore_errors=True)
        train_tokenizer(work, args.seed)
        vae = train_vae(args, log)
        if args.stage == "all" and args.decoder_steps > 0:  # the SD3 stage does not depend on the decoder
            vae = finetune_decoder(args, vae, log)
        vae.save_pretrained(work / "vae", safe_serialization=True)
        (work / "log.json").write_text(json.dumps(log) + "\n")
        tok_dir = work
        if args.stage == "vae":
            return log
    else:
        from diffusers import AutoencoderKL

        if not args.src:
            raise SystemExit("--stage sd3 needs --from DIR (a pipeline folder or a previous run's .stage folder)")
        tok_dir = Path(args.src)
        vae = AutoencoderKL.from_pretrained(str(tok_dir / "vae"), local_files_only=True)
        for prev in (tok_dir / "pretrain_log.json", tok_dir / "log.json"):
            if prev.is_file():
                log["vae"] = json.loads(prev.read_text()).get("vae")
                break
    vae.eval()
    log = train_sd3(args, vae, tok_dir, log, out)
    print(f"done in {time.time() - t0:.0f}s: {out}")
    return log


if __name__ == "__main__":
    main()
