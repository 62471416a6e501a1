"""The DPO learner (BalancedDPO, docs/SPEC.md section 6) behind the learner seam (apex_fast/learner.py).

Online (``dpo.mode: online``): the trainer samples G images per prompt under ``rollout_model()``,
i.e. with the REFERENCE model (the dynamic-reference idea), and scores them; ``learn`` picks one
(winner, loser) pair per prompt with the configured label mode from the whole batch's scores
(gathered, so every rank picks the same pairs), gathers the pairs' clean latents and trains on them.
Offline (``dpo.mode: offline``, ``needs_rollout`` False): pairs from a jsonl file (dpo/pairs.py);
missing scores are computed once at start (split over ranks), labels once over the whole file, and
each epoch trains on ``dpo.pairs_per_epoch`` of them (their images VAE-encoded when their turn comes).

Training: the epoch's pairs in a seeded order, in global micro-batches of ``train.micro_batch_size x
processes`` pairs, each rank taking a contiguous share (a short last micro-batch is padded with
zero-weight pairs so every rank steps together); loss sum / micro-batch size, so the update does not
depend on the process count. After every optimizer step: the EMA of the learner (evaluation) and
the reference update (copy every N steps, or EMA). Evaluation adds the win rates of the trained
model over the base model (the LoRA-disabled transformer, evaluated once on the same prompts and seeds).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ..eval.metrics import win_rates
from ..learner import Learner
from ..metrics import DPO_STEP_STATS, dpo_pair_metrics, winrate_key
from ..models import lora_disabled
from ..rewards import score_all
from ..run_state import EMA
from ..runtime import seed_for
from .labels import PairLabeler, Pairs
from .pairs import PairsFileError, load_pair_images, read_pairs
from .reference import ReferenceAdapter
from .step import dpo_micro_loss, encode_images, pair_noise

log = logging.getLogger("apex_fast.dpo")


class DPOLearner(Learner):
    def __init__(self, cfg, runtime, engine, weights, sampler, scorers, names: list[str], reference: ReferenceAdapter,
                 records=None):
        self.cfg, self.runtime, self.engine, self.weights = cfg, runtime, engine, weights
        self.transformer, self.sampler, self.vae = weights.transformer, sampler, sampler.pipe.vae
        self.scorers, self.names, self.ref = scorers, list(names), reference
        d, t = cfg.dpo, cfg.train
        self.labeler = PairLabeler(d.label, self.names, [r.weight for r in cfg.rewards], d.single_scorer,
                                   seed=seed_for(t.seed, "dpo-label"))
        self.global_step = 0
        self.ema = EMA(weights, t.ema_decay, t.ema_every, t.ema_warmup) if t.ema else None
        self.base_eval: torch.Tensor | None = None  # scores [n_items, K] of the base model's eval images
        self.needs_rollout = d.mode == "online"
        if not self.needs_rollout:
            self._prepare_offline(records)

    # ------------------------------------------------------------------ the seam
    def rollout_model(self):
        """Online candidates are sampled with the reference model."""
        return self.ref.active()

    def learn(self, batch, R, group_ids, epoch):
        if not self.needs_rollout:
            return self.learn_offline(epoch)
        s = batch.samples
        pairs = self.labeler.select_pairs(R, group_ids)
        X0 = gather_latents(self.runtime, s.latents[:, -1], s.global_index, R.shape[0]) if len(pairs) else None
        chosen, _ = self.sampler.epoch_prompts(epoch)
        prompts = self.sampler.train_prompts

        def get(ids):
            w, l = pairs.winner[ids], pairs.loser[ids]
            return X0[w], X0[l], [prompts[chosen[int(group_ids[i])]][0] for i in w]

        stats = self.train_pairs(get, len(pairs), pairs.p, ("online", epoch))
        return {**dpo_pair_metrics(pairs, self.names), **stats}

    def eval_metrics(self, scores: torch.Tensor, evaluate) -> dict[str, float]:
        """Win rates of the trained model's eval images (scores [n_items, K]) over the base model's,
        whose scores are measured once with ``evaluate()`` under the LoRA-disabled transformer."""
        if self.base_eval is None:
            with lora_disabled(self.transformer):
                self.base_eval = evaluate().clone()
        out = {}
        for k, w in win_rates(scores.numpy(), self.base_eval.numpy(), self.names).items():
            lo, hi = w.interval()
            out.update({winrate_key(k): w.rate, f"{winrate_key(k)}/ci_low": lo, f"{winrate_key(k)}/ci_high": hi})
        return out

    def summary(self, end: dict) -> str:
        """The win-rate table of the run summary."""
        rows = [f"win rate of the trained model over the base model (eval prompts, fixed seeds), "
                f"dpo.label={self.cfg.dpo.label}", "| scorer | win rate | 95% Wilson interval |", "|---|---|---|"]
        for n in [*self.names, "consensus"]:
            k = winrate_key(n)
            rows.append(f"| {n} | {end.get(k, float('nan')):.3f} | "
                        f"[{end.get(k + '/ci_low', float('nan')):.2f}, {end.get(k + '/ci_high', float('nan')):.2f}] |")
        return "\n".join(rows)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "dpo": {"reference": self.ref.state_dict(), "labeler": self.labeler.state_dict(),
                                                "base_eval": self.base_eval}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        st = state["dpo"]
        self.ref.load_state_dict(st["reference"])
        self.labeler.load_state_dict(st["labeler"])
        self.base_eval = st.get("base_eval")

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
        self.file_metrics = dpo_pair_metrics(self.file_pairs, self.names)
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
            tmo = self.sampler.reward_timeouts  # every call bounded by its reward's timeout_s, as in training
            rows.append(torch.cat([score_all(self.scorers, a, prompts, meta, timeout_s=tmo),
                                   score_all(self.scorers, b, prompts, meta, timeout_s=tmo)], 1).double())
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

    def learn_offline(self, epoch: int) -> dict[str, float]:
        fp = self.file_pairs
        chosen = torch.tensor(self.offline_epoch_pairs(epoch), dtype=torch.long)
        P = len(self.records)
        res = self.cfg.model.resolution

        def get(ids):  # winner/loser index into the stacked [a_0..a_{P-1}, b_0..b_{P-1}]
            sel = chosen[ids]
            out = []
            for col in (fp.winner[sel], fp.loser[sel]):
                recs = [self.records[int(j) % P] for j in col]
                a, b = load_pair_images(recs, res)
                imgs = np.stack([a[i] if int(j) < P else b[i] for i, j in enumerate(col)])
                out.append(encode_images(self.vae, imgs, self.runtime.device).cpu())
            return out[0], out[1], [self.records[int(j) % P].prompt for j in fp.winner[sel]]

        stats = self.train_pairs(get, len(chosen), fp.p[chosen], ("offline", epoch))
        return {**self.file_metrics, **stats}

    # ------------------------------------------------------------------ training on pairs
    def train_pairs(self, get_pairs, n_pairs: int, p: torch.Tensor, key) -> dict[str, float]:
        """Train on ``n_pairs`` pairs. ``get_pairs(ids) -> (x0_w, x0_l, prompts)`` for pair ids of
        this epoch; ``p`` [n_pairs] label probabilities; ``key`` seeds the order and the per-pair noise."""
        cfg, t = self.cfg, self.cfg.train
        world, rank, mbs = self.runtime.world_size, self.runtime.rank, t.micro_batch_size
        self.skipped_in_epoch = 0
        if n_pairs == 0:
            return {"dpo/steps": 0.0, "dpo/ref_updates": 0.0, "dpo/ref_is_base": float(self.ref.is_base)}
        sums = torch.zeros(len(DPO_STEP_STATS) + 2, dtype=torch.float64)  # stats..., grad-norm sum, real pairs
        steps = ref_updates = 0
        order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed_for(t.seed, "dpo-order", key)))
        B = mbs * world
        dev = self.runtime.device
        self.transformer.train()
        bar = tqdm(range(-(-n_pairs // B)), desc=f"dpo {key}", leave=False, disable=not (rank == 0 and cfg.log.progress))
        for mb in bar:
            slots = torch.arange(mb * B + rank * mbs, mb * B + (rank + 1) * mbs)
            real = slots < n_pairs
            ids = order[torch.where(real, slots, torch.zeros_like(slots))]  # padding: a real pair with weight 0
            x0_w, x0_l, prompts = get_pairs(ids)
            eps, tt = pair_noise(t.seed, key, ids.tolist(), tuple(x0_w.shape[1:]), cfg.dpo.t_mean, cfg.dpo.t_std)
            out = dpo_micro_loss(self.engine.module, self.ref.active, x0_w.to(dev), x0_l.to(dev),
                                 self.sampler.condition(prompts), eps.to(dev), tt.to(dev), beta=cfg.dpo.beta,
                                 p=p[ids].to(dev), weight=real.float().to(dev), denominator=mbs)
            self.engine.backward(out.loss)
            grad_norm = self.engine.step(t.max_grad_norm)
            if not self.count_step(grad_norm, key[-1] if isinstance(key, tuple) else key):
                continue  # skipped (non-finite loss or gradient): no step, no EMA or reference update
            self.global_step += 1
            steps += 1
            if self.ema is not None:
                self.ema.update(self.global_step)
            ref_updates += int(self.ref.step())
            w = real.double()
            per = [out.per_pair, out.accuracy, out.logits, out.err_w, out.err_l, out.ref_err_w, out.ref_err_l,
                   out.err_w - out.err_l, out.ref_err_w - out.ref_err_l]
            sums[: len(per)] += torch.stack([(w * x.double().cpu()).sum() for x in per])
            sums[-2] += float(grad_norm)
            sums[-1] += float(w.sum())
        tot = self.runtime.all_reduce_sum(sums)  # sums over ranks: the log does not depend on the process count
        n = max(float(tot[-1]), 1.0)
        stats = {name: float(tot[i]) / n for i, name in enumerate(DPO_STEP_STATS)}
        stats["grad_norm"] = float(tot[-2]) / (world * max(steps, 1))  # the same norm on every rank after the reduction
        stats.update({"dpo/steps": float(steps), "dpo/ref_updates": float(ref_updates), "skipped_steps": float(self.skipped_in_epoch),
                      "dpo/ref_is_base": float(self.ref.is_base)})
        return stats


def gather_latents(runtime, x0_local: torch.Tensor, global_index: torch.Tensor, total: int) -> torch.Tensor:
    """Clean latents [N, C, h, w] of the whole batch in global sample order, from each rank's
    [n, C, h, w] (one all-gather of [latent | index] rows, float32)."""
    n = x0_local.shape[0]
    rows = torch.cat([x0_local.reshape(n, -1).float().cpu(), global_index.float()[:, None]], 1)
    rows = runtime.all_gather_rows(rows)
    out = torch.empty(total, rows.shape[1] - 1)
    out[rows[:, -1].long()] = rows[:, :-1]
    return out.view(total, *x0_local.shape[1:])
