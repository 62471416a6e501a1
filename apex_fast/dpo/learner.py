"""The DPO learner (BalancedDPO, docs/SPEC.md section 6) behind the learner seam (apex_fast/learner.py).

Online (``dpo.mode: online``): the trainer samples G images per prompt with the REFERENCE model
(``rollout_model()``, the dynamic-reference idea) and scores them; ``learn`` picks one (winner,
loser) pair per prompt with the configured label mode, over the whole batch's scores (gathered,
so every rank picks the same pairs), gathers the pairs' clean latents and trains on them.
Offline (``dpo.mode: offline``): pairs come from a jsonl file (dpo/pairs.py); missing scores are
computed once at start (sharded over ranks), labels once over the whole file, and each epoch trains
on ``dpo.pairs_per_epoch`` of them (the images encoded by the VAE when their epoch comes).

Training: the epoch's pairs in a seeded order, split into global micro-batches of
``train.micro_batch_size x processes`` pairs, each rank taking a contiguous share (a short last
micro-batch is padded with zero-weight pairs so every rank steps together); loss sum / micro-batch
size, so the update does not depend on the process count. After every optimizer step: the EMA of
the learner (for evaluation) and the reference update (copy every N steps, or EMA).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from apex_fast.distributed import seed_for
from apex_fast.rewards import score_all

from .labels import PairLabeler, Pairs
from .pairs import PairsFileError, load_pair_images, read_pairs
from .reference import ReferenceAdapter
from .step import dpo_micro_loss, encode_images, pair_noise
from .winrate import win_rates

log = logging.getLogger("apex_fast.dpo")

# per optimizer step of a DPO epoch, averaged over the epoch's real pairs (and ranks)
DPO_STEP_STATS = ("dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/err_w", "dpo/err_l", "dpo/ref_err_w", "dpo/ref_err_l",
                  "dpo/model_term", "dpo/ref_term")


class DPOCore:
    """Everything of the DPO learner that does not depend on the trainer's parts: the reference,
    the labeler, the offline pairs, the pair training loop. ``host`` gives transformer, engine,
    runtime, cfg, names, scorers and ``condition(prompts)``; ``after_step(global_step)`` (EMA) is
    called after every optimizer step."""

    def __init__(self, cfg, runtime, engine, transformer, scorers, names: list[str], weights: list[float],
                 condition, vae, reference: ReferenceAdapter, after_step=None, records=None):
        self.cfg, self.runtime, self.engine, self.transformer = cfg, runtime, engine, transformer
        self.scorers, self.names, self.condition, self.vae = scorers, names, condition, vae
        self.ref = reference
        self.after_step = after_step or (lambda step: None)
        d = cfg.dpo
        self.labeler = PairLabeler(d.label, names, weights, d.single_scorer, seed=seed_for(cfg.train.seed, "dpo-label"))
        self.global_step = 0
        self.base_eval: torch.Tensor | None = None  # scores [n_items, K] of the base model's eval images
        self.offline = d.mode == "offline"
        if self.offline:
            self._prepare_offline(records)

    # ------------------------------------------------------------------ offline data
    def _prepare_offline(self, records=None) -> None:
        d = self.cfg.dpo
        self.records = records if records is not None else read_pairs(d.pairs_file, skip_bad=d.skip_bad_pairs)
        P, K = len(self.records), len(self.names)
        Sa = torch.full((P, K), math.nan, dtype=torch.float64)
        Sb = torch.full((P, K), math.nan, dtype=torch.float64)
        need = torch.zeros(P, dtype=torch.bool)
        for i, r in enumerate(self.records):
            for k, n in enumerate(self.names):
                if n in r.scores:
                    Sa[i, k], Sb[i, k] = r.scores[n]
                else:
                    need[i] = True
        todo = torch.nonzero(need).flatten()
        if len(todo):
            Ra, Rb = self._score_pairs(todo)
            for j, i in enumerate(todo.tolist()):
                for k, n in enumerate(self.names):
                    if n not in self.records[i].scores:
                        Sa[i, k], Sb[i, k] = Ra[j, k], Rb[j, k]
        self.pair_scores = (Sa, Sb)
        self.file_pairs: Pairs = self.labeler.label_pairs(Sa, Sb)
        if len(self.file_pairs) == 0:
            raise PairsFileError(f"dpo.pairs_file: none of the {P} pairs of {d.pairs_file} gets a label with "
                                 f"dpo.label={d.label} (all ties or unscored); check the scores or the rewards")
        if self.runtime.rank == 0:
            log.info("offline DPO: %d pairs, %d scored here, %d labelled (%d ties, %d unscored dropped)", P, len(todo),
                     len(self.file_pairs), self.file_pairs.n_ties, self.file_pairs.n_abstained)

    def _score_pairs(self, todo: torch.Tensor):
        """Scores [n, K] of images a and b of the pairs ``todo``, split over ranks (equal shares, the
        last padded) and gathered."""
        world, rank = self.runtime.world_size, self.runtime.rank
        per = -(-len(todo) // world)
        mine = [int(todo[min(i, len(todo) - 1)]) for i in range(rank * per, (rank + 1) * per)]
        res = self.cfg.model.resolution
        rows = []
        for lo in range(0, len(mine), 32):
            recs = [self.records[i] for i in mine[lo:lo + 32]]
            a, b = load_pair_images(recs, res)
            prompts = [r.prompt for r in recs]
            meta = [dict(r.metadata) for r in recs]
            rows.append(torch.cat([score_all(self.scorers, a, prompts, meta),
                                   score_all(self.scorers, b, prompts, meta)], 1).double())
        R = torch.cat(rows) if rows else torch.zeros(0, 2 * len(self.names), dtype=torch.float64)
        R = self.runtime.all_gather_rows(R)[: len(todo)]  # rank-major = todo order
        K = len(self.names)
        return R[:, :K], R[:, K:]

    def offline_epoch_pairs(self, epoch: int) -> list[int]:
        """Numbers (into ``file_pairs``) of this epoch's pairs: seeded passes over the labelled
        pairs, ``dpo.pairs_per_epoch`` at a time (0: all of them every epoch)."""
        n = len(self.file_pairs)
        k = self.cfg.dpo.pairs_per_epoch or n
        start = epoch * k
        order = []
        for cycle in range(start // n, (start + k - 1) // n + 1):
            g = torch.Generator().manual_seed(seed_for(self.cfg.train.seed, "dpo-offline-order", cycle))
            order.append(torch.randperm(n, generator=g))
        order = torch.cat(order)
        base = (start // n) * n
        return order[start - base: start - base + k].tolist()

    # ------------------------------------------------------------------ training on pairs
    def train_pairs(self, get_pairs, n_pairs: int, p: torch.Tensor, key) -> dict[str, float]:
        """Train on ``n_pairs`` pairs. ``get_pairs(ids) -> (x0_w, x0_l, prompts)`` for pair ids of
        this epoch; ``p`` [n_pairs] label probabilities; ``key`` seeds the per-pair noise."""
        cfg, t = self.cfg, self.cfg.train
        world, rank, mbs = self.runtime.world_size, self.runtime.rank, t.micro_batch_size
        sums = torch.zeros(len(DPO_STEP_STATS) + 2, dtype=torch.float64)  # stats..., grad_norm sum, real pairs
        steps = 0
        ref_updates = 0
        if n_pairs == 0:
            return {"dpo/steps": 0.0, "dpo/ref_updates": 0.0}
        g = torch.Generator().manual_seed(seed_for(t.seed, "dpo-order", key))
        order = torch.randperm(n_pairs, generator=g)
        B = mbs * world
        self.transformer.train()
        n_mb = -(-n_pairs // B)
        bar = tqdm(range(n_mb), desc=f"dpo {key}", leave=False, disable=not (rank == 0 and cfg.log.progress))
        for mb in bar:
            slots = torch.arange(mb * B + rank * mbs, mb * B + (rank + 1) * mbs)
            real = slots < n_pairs
            ids = order[torch.where(real, slots, torch.zeros_like(slots))]  # padding: pair order[0], weight 0
            x0_w, x0_l, prompts = get_pairs(ids.tolist())
            dev = self.runtime.device
            eps, tt = pair_noise(t.seed, key, ids.tolist(), tuple(x0_w.shape[1:]), cfg.dpo.t_mean, cfg.dpo.t_std)
            cond = self.condition(prompts)
            out = dpo_micro_loss(self.engine.module, self.ref.active, x0_w.to(dev), x0_l.to(dev), cond, eps.to(dev),
                                 tt.to(dev), beta=cfg.dpo.beta, p=p[ids].to(dev), weight=real.float().to(dev),
                                 denominator=mbs)
            self.engine.backward(out.loss)
            gn = self.engine.step(t.max_grad_norm)
            self.global_step += 1
            steps += 1
            self.after_step(self.global_step)
            ref_updates += int(self.ref.step())
            w = real.double()
            per = [out.per_pair, out.accuracy, out.logits, out.err_w, out.err_l, out.ref_err_w, out.ref_err_l,
                   out.err_w - out.err_l, out.ref_err_w - out.ref_err_l]
            sums[: len(per)] += torch.stack([(w * x.double().cpu()).sum() for x in per])
            sums[-2] += float(gn) * float(real.any())
            sums[-1] += float(w.sum())
        tot = self.runtime.all_reduce_sum(sums)
        n = max(float(tot[-1]), 1.0)
        stats = {name: float(tot[i]) / n for i, name in enumerate(DPO_STEP_STATS)}
        stats["grad_norm"] = float(tot[-2]) / max(world * steps, 1)
        stats["dpo/steps"] = float(steps)
        stats["dpo/ref_updates"] = float(ref_updates)
        stats["dpo/ref_is_base"] = float(self.ref.is_base)
        return stats

    # ------------------------------------------------------------------ one epoch
    def learn_online(self, x0_local: torch.Tensor, global_index: torch.Tensor, R: torch.Tensor,
                     group_ids: torch.Tensor, prompts: list[str], epoch: int) -> dict[str, float]:
        """This rank's final latents x0_local [n, C, h, w] (global indices [n]) of the epoch's
        rollouts; R [N, K] and group_ids [N] of the whole batch; prompts [N] of every global sample."""
        pairs = self.labeler.select_pairs(R, group_ids)
        X0 = gather_latents(self.runtime, x0_local, global_index, R.shape[0]) if len(pairs) else None

        def get(ids):
            w, l = pairs.winner[ids], pairs.loser[ids]
            return X0[w], X0[l], [prompts[int(i)] for i in w]

        stats = self.train_pairs(get, len(pairs), pairs.p, ("online", epoch))
        return {**pairs.stats, **stats}

    def learn_offline(self, epoch: int) -> dict[str, float]:
        fp = self.file_pairs
        chosen = torch.tensor(self.offline_epoch_pairs(epoch), dtype=torch.long)
        P = len(self.records)
        res = self.cfg.model.resolution

        def image_of(j: int):  # an index into the stacked [a_0..a_{P-1}, b_0..b_{P-1}]
            return self.records[j % P], j // P

        def get(ids):
            sel = chosen[ids]
            out = []
            for col in (fp.winner[sel], fp.loser[sel]):
                recs = [image_of(int(j)) for j in col]
                a, b = load_pair_images([r for r, _ in recs], res)
                imgs = np.stack([a[i] if side == 0 else b[i] for i, (_, side) in enumerate(recs)])
                out.append(encode_images(self.vae, imgs, self.runtime.device).cpu())
            return out[0], out[1], [self.records[int(j) % P].prompt for j in fp.winner[sel]]

        stats = self.train_pairs(get, len(chosen), fp.p[chosen], ("offline", epoch))
        return {**fp.stats, **stats}

    # ------------------------------------------------------------------ evaluation
    def win_rate_metrics(self, trained: torch.Tensor) -> dict[str, float]:
        """``winrate/<reward>`` and ``winrate/consensus`` of the trained model's eval images over the
        base model's (same prompts and seeds)."""
        if self.base_eval is None:
            return {}
        return {f"winrate/{k}": v for k, v in win_rates(trained, self.base_eval, self.names).items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"dpo": {"reference": self.ref.state_dict(), "labeler": self.labeler.state_dict(),
                        "base_eval": self.base_eval}}

    def load_state_dict(self, state: dict) -> None:
        st = state["dpo"]
        self.ref.load_state_dict(st["reference"])
        self.labeler.load_state_dict(st["labeler"])
        self.base_eval = st.get("base_eval")


def gather_latents(runtime, x0_local: torch.Tensor, global_index: torch.Tensor, total: int) -> torch.Tensor:
    """Clean latents [N, C, h, w] of the whole batch in global sample order, from each rank's
    [n, C, h, w] (one all-gather of [latent | index] rows, float32)."""
    n = x0_local.shape[0]
    rows = torch.cat([x0_local.reshape(n, -1).float().cpu(), global_index.float()[:, None]], 1)
    rows = runtime.all_gather_rows(rows)
    out = torch.empty(total, rows.shape[1] - 1)
    out[rows[:, -1].long()] = rows[:, :-1]
    return out.view(total, *x0_local.shape[1:])



def format_win_rates(names: list[str], end: dict, label: str) -> str:
    """The summary's win-rate table: trained vs base on the eval prompts, per scorer and consensus."""
    rows = [f"win rate of the trained model over the base model (eval prompts, fixed seeds), dpo.label={label}",
            "| scorer | win rate |", "|---|---|"]
    for n in [*names, "consensus"]:
        v = end.get(f"winrate/{n}", float("nan"))
        rows.append(f"| {n} | {v:.3f} |")
    return "\n".join(rows)
