"""How many samples an update needs before each objective's policy gradient points the same way twice,
on the embedded testbed at the start of training. Results: bench/results/gradient_snr.{json,md}.

    OMP_NUM_THREADS=2 python -m bench.gradient_snr [--repeats 2 --chunks 8]

Rollouts are drawn as the demo draws them (configs/tiny_cpu_apex.yaml: SDE, 10 steps, noise level 0.7,
CFG 4.5, groups of 8, the demo's LoRA freshly initialised, its four rewards), every training prompt
``--repeats`` times with fresh seeds. Each objective's advantage is its own group-normalised reward
(SPEC 3, stage 1). The samples are split into ``--chunks`` chunks of whole groups, and for every chunk
m, trained step j and objective k the policy gradient g[m, j, k] = grad (1/c) sum_i A_ik log p_ij
(the GRPO loss at ratio 1, without KL) is taken over the LoRA parameters.

Per objective (and per set of trained steps, g summed over them):

* signal ``|mu|^2``: the mean over pairs m != m' of <g_m, g_m'> (unbiased: chunks are independent);
* noise per sample ``tr Sigma`` = c * (mean |g_m|^2 - |mu|^2);
* ``n_half`` = tr Sigma / |mu|^2: the samples per update at which two independent updates have an
  expected cosine of 1/2 (cos = |mu|^2 / (|mu|^2 + tr Sigma / n)), and the cosine expected at the
  demo's 64 samples per optimizer step and 128 per epoch.

Metrics: the parameters' own (``param``), and Adam's diagonal scaling (``adam``: every coordinate
divided by the root mean square of the chunks' summed-objective gradient, what Adam's second moment
sees at the start). The jackknife over chunks gives each signal's standard error.
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

from apex_fast.config import load_config, sde_window_range
from apex_fast.data import load_prompts
from apex_fast.models import encode_negative, encode_prompts, load_pipeline
from apex_fast.models.lora import add_lora
from apex_fast.ops.reference import group_normalize
from apex_fast.rewards import make_scorer
from apex_fast.rl.rollout import (Conditioning, decode_latents, predict_velocity, sample, sde_window_at,
                                  trained_steps)
from apex_fast.rl.sde import sde_step_with_logprob


def pair_signal(g: torch.Tensor, h: torch.Tensor | None = None) -> float:
    """g, h [M, P] independent chunk gradients -> mean over pairs m != m' of <g_m, h_m'> (h = g: |mu|^2;
    else an unbiased <mu_g, mu_h>)."""
    gram = g @ (g if h is None else h).T
    m = g.shape[0]
    return float((gram.sum() - gram.diagonal().sum()) / (m * (m - 1)))


def mean_gradient_cosines(g: torch.Tensor) -> list[list[float | None]]:
    """g [M, K, P] -> K x K cosines between the objectives' mean gradients (None where a signal is not
    positive): which objectives pull the same way on average, without the per-chunk noise."""
    K = g.shape[1]
    sig = [pair_signal(g[:, k]) for k in range(K)]
    return [[pair_signal(g[:, k], g[:, l]) / (sig[k] * sig[l]) ** 0.5 if sig[k] > 0 and sig[l] > 0 else None
             for l in range(K)] for k in range(K)]


def snr(g: torch.Tensor, chunk: int) -> dict:
    """Signal, noise per sample, samples for cosine 1/2, and the jackknife SE of the signal."""
    m = g.shape[0]
    signal = pair_signal(g)
    mean_sq = float((g * g).sum(1).mean())
    noise = chunk * (mean_sq - signal)
    jack = np.array([pair_signal(torch.cat([g[:i], g[i + 1:]])) for i in range(m)])
    se = float(np.sqrt((m - 1) / m * ((jack - jack.mean()) ** 2).sum()))
    out = {"signal": signal, "signal_se": se, "noise_per_sample": noise}
    if signal > 2 * se and signal > 0:
        n_half = noise / signal
        out["n_half"] = n_half
        out["cos_at_64"] = signal / (signal + noise / 64)
        out["cos_at_128"] = signal / (signal + noise / 128)
    else:  # no measurable mean gradient: a lower bound on n_half from signal + 2 SE
        bound = max(signal, 0.0) + 2 * se
        out["n_half_at_least"] = noise / bound if bound > 0 else float("inf")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny_cpu_apex.yaml")
    ap.add_argument("--repeats", type=int, default=2, help="each training prompt this many times (fresh seeds)")
    ap.add_argument("--chunks", type=int, default=8, help="independent chunks of whole groups")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as the trainer's")
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--name", default="gradient_snr")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg = load_config(args.config, args.set)
    s = cfg.sample
    pipe = load_pipeline(cfg.model.pretrained)
    tr = pipe.transformer
    add_lora(tr, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules, seed=cfg.train.seed)
    params = [p for p in tr.parameters() if p.requires_grad]
    prompts = [p for p, _ in load_prompts(cfg.data.train_prompts)] * args.repeats
    n_groups = len(prompts)
    if n_groups % args.chunks:
        raise SystemExit(f"--chunks: {n_groups} groups do not split into {args.chunks} equal chunks")
    G = s.group_size
    all_prompts = [p for p in prompts for _ in range(G)]
    N = len(all_prompts)
    uniq = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # each distinct prompt encoded once
    emb, pooled = encode_prompts(pipe, list(uniq), "cpu", max_sequence_length=s.max_sequence_length)
    idx = torch.tensor([uniq[p] for p in all_prompts])
    ne, npool = encode_negative(pipe, 1, "cpu", max_sequence_length=s.max_sequence_length)
    cond = Conditioning(emb[idx].float(), pooled[idx].float(), ne.float().expand(N, -1, -1), npool.float().expand(N, -1))
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    h = cfg.model.resolution // vae_factor
    gens = [torch.Generator().manual_seed(args.seed * 1000003 + i) for i in range(N)]
    window = None
    if s.sde_window.size > 0:  # Flow-GRPO-Fast: the first epoch's window, for every chunk
        lo, hi = sde_window_range(s)
        window = sde_window_at(0, size=s.sde_window.size, lo=lo, hi=hi, schedule=s.sde_window.schedule,
                               shift_every=s.sde_window.shift_every, seed=cfg.train.seed)
    ro = sample(tr, pipe.scheduler, cond, latent_shape=(tr.config.in_channels, h, h), num_steps=s.num_steps,
                guidance_scale=s.guidance_scale, noise_level=s.noise_level, generators=gens, batch_size=s.batch_size,
                sde_window=window)
    t_sample = time.perf_counter() - t0
    u8 = np.concatenate([(decode_latents(pipe.vae, ro.final[i:i + s.batch_size]) * 255).round().to(torch.uint8)
                         .permute(0, 2, 3, 1).numpy() for i in range(0, N, s.batch_size)])  # batched: bounded memory
    names = [r.name for r in cfg.rewards]
    R = torch.stack([make_scorer(r.type or r.name, **r.args)(u8, all_prompts, [{} for _ in all_prompts]).float()
                     for r in cfg.rewards], 1)  # [N, K]
    A = group_normalize(R, torch.arange(N) // G)  # [N, K], each objective over its own group std
    steps = trained_steps(s.num_steps, cfg.train.timestep_fraction, window)
    sigmas, sigma_max = ro.sigmas, float(ro.sigmas[1])
    chunk = N // args.chunks
    K, T = len(names), len(steps)
    grads = torch.zeros(args.chunks, T, K, sum(p.numel() for p in params))
    t1 = time.perf_counter()
    for m in range(args.chunks):
        sl = slice(m * chunk, (m + 1) * chunk)
        c = cond.index(sl)
        for jj, j in enumerate(steps):
            v = predict_velocity(tr, ro.latents[sl, j], sigmas[j], c, s.guidance_scale, train=True)
            lp = sde_step_with_logprob(v, ro.latents[sl, j], sigmas[j], sigmas[j + 1], noise_level=s.noise_level,
                                       sigma_max=sigma_max, prev_sample=ro.latents[sl, j + 1]).log_prob
            for k in range(K):
                gk = torch.autograd.grad((A[sl, k] * lp).mean(), params, retain_graph=k < K - 1)
                grads[m, jj, k] = torch.cat([x.reshape(-1) for x in gk])
    t_grad = time.perf_counter() - t1
    # Adam's view at the start: each coordinate over the RMS of the summed-objective chunk gradients
    weights = torch.tensor([r.weight for r in cfg.rewards])
    total = (grads.sum(1) * weights[None, :, None]).sum(1)  # [M, P]
    adam_scale = 1.0 / (total.pow(2).mean(0).sqrt() + 1e-12)
    subsets = {"all trained steps": list(range(T)), "first third": list(range(T // 3)),
               "middle third": list(range(T // 3, 2 * T // 3)), "last third": list(range(2 * T // 3, T))}
    subsets = {k: v for k, v in subsets.items() if v}
    subsets.update({f"step {steps[jj]}": [jj] for jj in range(T)})
    result = {"objectives": names, "weights": weights.tolist(), "samples": N, "groups": n_groups,
              "sde_window": window, "chunks": args.chunks, "chunk_samples": chunk, "trained_steps": steps,
              "lora_parameters": grads.shape[-1],
              "reward_mean": {n: float(torch.nanmean(R[:, k])) for k, n in enumerate(names)},
              "groups_with_spread": {n: float((R[:, k].reshape(-1, G).std(1) > 0).float().mean()) for k, n in enumerate(names)},
              "metrics": {}}
    for metric, scale in (("param", None), ("adam", adam_scale)):
        g_all = grads.sum(1) if scale is None else grads.sum(1) * scale
        result.setdefault("mean_gradient_cosine", {})[metric] = mean_gradient_cosines(g_all)
        per = {}
        for label, js in subsets.items():
            g_js = grads[:, js].sum(1)  # [M, K, P]
            g_js = torch.cat([g_js, (g_js * weights[None, :, None]).sum(1, keepdim=True)], 1)
            if scale is not None:
                g_js = g_js * scale
            per[label] = {n: snr(g_js[:, k], chunk) for k, n in enumerate(names + ["weighted sum"])}
        result["metrics"][metric] = per
    result["setup"] = {"config": args.config, "overrides": args.set, "repeats": args.repeats, "seed": args.seed}
    result["device"] = f"cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}, threads {torch.get_num_threads()}"
    result["seconds"] = {"sampling": round(t_sample, 1), "gradients": round(t_grad, 1), "total": round(time.perf_counter() - t0, 1)}
    result["command"] = "python -m bench.gradient_snr " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(table(result) + "\n")
    print(table(result))
    return result


def fmt_n(row: dict) -> str:
    if "n_half" in row:
        return f"{row['n_half']:.0f} (cos@128 {row['cos_at_128']:.3f})"
    return f">= {row['n_half_at_least']:.0f} (no signal)"


def table(result: dict) -> str:
    names = result["objectives"] + ["weighted sum"]
    lines = [f"# Policy-gradient signal on the testbed at the start ({result['samples']} samples, "
             f"{result['chunks']} chunks of {result['chunk_samples']}"
             + (f"; SDE window {result['sde_window']}: only those steps stochastic and trained" if result.get("sde_window") else "")
             + ")", "",
             f"Command: `{result['command']}`; device: {result['device']}; seconds: {result['seconds']}", "",
             "n_half = samples per update for an expected cosine of 1/2 between two independent updates "
             "(cos@128: expected cosine at the demo's 128 samples an epoch).", ""]
    for metric, per in result["metrics"].items():
        lines += [f"## metric: {metric}", "", "| trained steps | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for label, row in per.items():
            lines.append(f"| {label} | " + " | ".join(fmt_n(row[n]) for n in names) + " |")
        lines.append("")
        cos = result["mean_gradient_cosine"][metric]
        measured = [("n_half" in per["all trained steps"][n]) for n in names[:-1]]
        lines += [f"Cosines between the objectives' mean gradients (all trained steps, {metric}; "
                  "- where a signal is not beyond 2 SE):", "",
                  "| | " + " | ".join(names[:-1]) + " |", "|---" * len(names) + "|"]
        for k, (n, row) in enumerate(zip(names[:-1], cos)):
            lines.append(f"| {n} | " + " | ".join(
                "-" if c is None or not (measured[k] and measured[l]) else f"{c:+.2f}"
                for l, c in enumerate(row)) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
