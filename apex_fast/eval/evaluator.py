"""The evaluator: mean reward per objective on the held-out prompts with the ODE sampler (noise
level 0, fixed per-item seeds), with whatever weights the caller swaps in (the EMA), split over
ranks and gathered; rank 0 saves the image grid."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..rewards import score_all
from ..rl.rollout import decode_latents, sample
from ..sampling import generators_for
from ..tracking import bar
from .grids import save_prompt_grid


class Evaluator:
    def __init__(self, cfg, runtime, pipe, sampler, scorers, names: list[str], prompts, out_dir: Path):
        self.cfg, self.runtime, self.pipe, self.sampler = cfg, runtime, pipe, sampler
        self.scorers, self.names, self.prompts, self.out_dir = scorers, names, prompts, Path(out_dir)

    @torch.no_grad()
    def evaluate(self, epoch: int, grid_name: str | None = None, grid_title: str | None = None) -> dict[str, float]:
        """{reward name: mean eval reward} with the transformer's current weights; the per-item
        scores [n_items, K] stay in ``last_scores``. ``grid_name``/``grid_title``: the image grid's
        file name and title (default: the epoch's)."""
        e = self.cfg.eval
        world, rank = self.runtime.world_size, self.runtime.rank
        items = [(p, m) for p, m in self.prompts for _ in range(e.images_per_prompt)]
        n_items, per = len(items), -(-len(items) // world)
        # every rank takes `per` items (indices >= n_items repeat items and are dropped after the
        # gather): equal counts for the all-gather and for ZeRO-3, whose forwards are collectives
        mine = list(range(rank, per * world, world))
        prompts = [items[i % n_items][0] for i in mine]
        meta = [dict(items[i % n_items][1]) for i in mine]
        transformer = self.pipe.transformer
        transformer.eval()
        R = torch.zeros(0, len(self.scorers))
        if prompts:
            bs = self.cfg.sample.batch_size
            with bar(-(-len(prompts) // bs) * e.num_steps, f"eval (epoch {epoch})", self.sampler.bars) as pbar:
                ro = sample(transformer, self.pipe.scheduler, self.sampler.condition(prompts),
                            latent_shape=self.sampler.latent_shape, num_steps=e.num_steps,
                            guidance_scale=self.cfg.sample.guidance_scale, noise_level=0.0,
                            generators=generators_for(e.seed, "eval", indices=mine), batch_size=bs,
                            progress=pbar.update)
            images = decode_latents(self.pipe.vae, ro.final)
            # bounded like training: each batch of sample.batch_size images, each reward's timeout_s
            bs = self.cfg.sample.batch_size
            R = torch.cat([score_all(self.scorers, images[i:i + bs], prompts[i:i + bs], meta[i:i + bs],
                                     timeout_s=self.sampler.reward_timeouts) for i in range(0, len(prompts), bs)])
            if rank == 0:  # labelled by prompt; the prompts also in eval_epochNNNNN.txt beside it
                save_prompt_grid(images, prompts, self.out_dir / "samples" / (grid_name or f"eval_epoch{epoch:05d}.png"),
                                 title=grid_title or (f"epoch {epoch}: held-out prompts, ODE {e.num_steps} steps, "
                                                      f"{'EMA weights, ' if self.cfg.train.ema else ''}seed {e.seed}"))
        R = self.runtime.all_gather_rows(R)  # rank-major; item r + k*world is row r*per + k
        R = R.view(world, per, -1).transpose(0, 1).reshape(per * world, -1)[:n_items]
        self.last_scores = R
        return {n: float(torch.nanmean(R[:, k])) if R.numel() else float("nan") for k, n in enumerate(self.names)}


def save_image_grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    """An unlabelled strip of images (the trainer's grids are labelled: grids.save_prompt_grid)."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    n, h, w, _ = arr.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
