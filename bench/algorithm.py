"""Algorithm benchmark: does APEX cure variance hijacking on a cheap multi-objective RL problem?

    OMP_NUM_THREADS=1 python bench/algorithm.py [--seeds 8] [--epochs 150] [--quick]

Not a test: a CPU-only toy with the structure of the APEX paper's setting, trained with Flow-GRPO's
clipped loss (apex_fast.rl.loss.grpo_loss, SPEC 1) and every balancer of apex_fast.balance.

The toy. A "prompt" is an embedding e in R^8; the policy is a Gaussian over a latent z in R^8 with
mean W e + b and a fixed std (the SDE noise), G samples per prompt form a group; the log-prob is a
mean over dims as in SPEC 1. K = 4 rewards of z:
  ocr        sparse, high-variance, highly responsive: the share of 20 "characters" read, a steep
             sigmoid of a . z against a prompt-dependent difficulty tau(e), quantised to 1/20, with a
             spurious 1/20 read 10% of the time (recogniser noise). Raw in-group std up to ~0.5.
             Scenario "jitter" adds N(0, 0.01^2) noise to every OCR reading (a confidence-weighted
             score), so groups that all fail (or all succeed) are no longer exact ties: the
             degenerate groups APEX's std floor is meant for.
  pick, aes, deqa   low-variance perceptual-like scores: base - s_k |z - t_k(e)|^2 / D + a small
             rugged term (scorer idiosyncrasy), s_k = 0.02 / 0.1 / 0.03 (in-group stds ~1e-3..1e-2).
             Their targets t_k(e) differ (partial conflicts among them) and have a . t_k = 0, so
             pushing a . z up for OCR costs every perceptual score (the OCR / aesthetics conflict).
Preference weights are equal (the static baseline sums the rewards, as Flow-GRPO's multi-reward).

Per epoch: 16 prompts x 16 samples, advantages from the balancer, 2 optimizer steps of the GRPO
loss (Adam). Gradient methods get the exact per-objective gradients (K backward passes of the
surrogate with Ahat[:, k] at the sampling policy) and their Gram each epoch, and use the new
coefficients in the same epoch (update(gram) then advantages() again); "apex+gram" feeds the same
Gram to APEX's conflict penalty instead of the advantage-correlation proxy; "apex-noP3" is the
ablation without priorities (dual-stage normalisation with uniform pi: GDPO plus the std floor).

Reported per method, mean +- std over seeds (evaluation: the deterministic policy mean -- the ODE
analogue -- on 64 held-out prompts, noiseless rewards; improvements in units of the base policy's
reward std):
per-objective improvement, worst-objective improvement, hypervolume of the improvement vector
(reference point 0, i.e. the product of the positive parts), final hijack share rho of ocr (SPEC 3,
with the preference weights) and effective share of ocr in the advantage actually trained on (mean of
the last 10 epochs), oscillation (sum over the eval curve of |step| minus |net change|, mean over
objectives, in base stds: movement that was later undone). Writes bench/results/algorithm.json,
algorithm.md, algorithm.png (scenario base) and algorithm_jitter.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apex_fast.balance import BalanceConfig, make_balancer  # noqa: E402
from apex_fast.grad import commit_epoch, epoch_advantages  # noqa: E402
from apex_fast.rl.loss import grpo_loss  # noqa: E402

NAMES = ["ocr", "pick", "aes", "deqa"]
METHODS = ["static", "gdpo", "apex", "apex+gram", "apex-noP3", "pcgrad", "mgda", "cagrad", "upgrad"]
D = 8  # latent dims
E = 8  # prompt embedding dims
CHARS = 20  # OCR quantisation


class Toy:
    """The environment: fixed prompts and reward functions (seeded)."""

    def __init__(self, seed: int, jitter: float = 0.0):
        self.jitter = jitter
        g = torch.Generator().manual_seed(10_000 + seed)
        self.train_prompts = torch.randn(64, E, generator=g) / math.sqrt(E) * 2
        self.eval_prompts = torch.randn(64, E, generator=g) / math.sqrt(E) * 2
        a = torch.randn(D, generator=g)
        self.a = a / a.norm()
        v = torch.randn(E, generator=g)
        self.v = v / v.norm()
        T = torch.randn(D, E, generator=g) * 0.4
        self.targets = []
        for _ in range(3):
            t_b = torch.randn(D, generator=g) * 0.5
            Tk = T + 0.25 * torch.randn(D, E, generator=g)
            # no text in the perceptual optimum: a . t_k(e) = 0 for every prompt
            Tk = Tk - torch.outer(self.a, self.a @ Tk)
            t_b = t_b - self.a * (self.a @ t_b)
            self.targets.append((Tk, t_b))
        self.scale = torch.tensor([0.02, 0.1, 0.03])
        self.base = torch.tensor([0.85, 5.5, 0.7])
        self.freq = torch.randn(3, 4, D, generator=g) * 3.0
        self.phase = torch.rand(3, 4, generator=g) * 2 * math.pi

    def tau(self, e):  # OCR difficulty of each prompt: some prompts are much harder
        return 0.3 + 0.8 * torch.tanh(2 * e @ self.v)

    def rewards(self, z, e, gen: torch.Generator | None = None) -> torch.Tensor:
        """z [N, D], e [N, E] -> R [N, 4]. gen: recogniser noise (None: noiseless, for evaluation)."""
        legible = torch.sigmoid(6.0 * (z @ self.a - self.tau(e)))
        ocr = torch.floor(legible * CHARS) / CHARS
        if gen is not None:
            spurious = (torch.rand(z.shape[0], generator=gen) < 0.1).float() / CHARS
            ocr = (ocr + spurious).clamp(max=1.0)
            if self.jitter:
                ocr = (ocr + self.jitter * torch.randn(z.shape[0], generator=gen)).clamp(0.0, 1.0)
        cols = [ocr]
        for k, (Tk, tb) in enumerate(self.targets):
            t = e @ Tk.T + tb
            smooth = -((z - t) ** 2).mean(1)
            rugged = 0.05 * torch.sin(z @ self.freq[k].T + self.phase[k]).mean(1)
            cols.append(self.base[k] + self.scale[k] * (smooth + rugged))
        return torch.stack(cols, 1)


class Policy(torch.nn.Module):
    def __init__(self, seed: int, sigma: float = 0.3):
        super().__init__()
        g = torch.Generator().manual_seed(20_000 + seed)
        self.W = torch.nn.Parameter(torch.randn(D, E, generator=g) * 0.1)
        self.b = torch.nn.Parameter(torch.zeros(D))
        self.sigma = sigma

    def mean(self, e):
        return e @ self.W.T + self.b

    def log_prob(self, z, e):  # mean over dims (SPEC 1)
        mu = self.mean(e)
        return (-((z - mu) ** 2) / (2 * self.sigma**2) - math.log(self.sigma) - 0.5 * math.log(2 * math.pi)).mean(1)


def make_cfg(method: str) -> BalanceConfig:
    if method == "apex+gram":
        return BalanceConfig(method="apex", conflict_source="gram")
    if method == "apex-noP3":  # ablation: stage 1 + 2 with uniform priorities forever
        return BalanceConfig(method="apex", warmup_epochs=10**9)
    return BalanceConfig(method=method)


def per_objective_gram(policy: Policy, z, e, old_lp, Ahat, clip_range) -> torch.Tensor:
    params = [policy.W, policy.b]
    rows = []
    for k in range(Ahat.shape[1]):
        out = grpo_loss(policy.log_prob(z, e), old_lp, Ahat[:, k], clip_range=clip_range)
        gk = torch.autograd.grad(out.loss, params, allow_unused=True)
        rows.append(torch.cat([g.reshape(-1) for g in gk]))
    J = torch.stack(rows).double()
    return J @ J.T


def run(method: str, seed: int, epochs: int, eval_every: int, lr: float = 0.005, prompts: int = 16, G: int = 16,
        inner: int = 2, clip_range: float = 0.02, kl_beta: float = 0.01, jitter: float = 0.0) -> dict:
    torch.manual_seed(seed)
    toy, policy = Toy(seed, jitter), Policy(seed)
    ref = Policy(seed)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    bal = make_balancer(make_cfg(method), [0.25] * 4, NAMES)
    gen = torch.Generator().manual_seed(30_000 + seed)
    eval_noise = torch.randn(16, 64, D, generator=torch.Generator().manual_seed(40_000 + seed))

    def evaluate():
        with torch.no_grad():
            e = toy.eval_prompts
            det = toy.rewards(policy.mean(e), e).mean(0)
            return det

    with torch.no_grad():  # base-model reward std: stochastic samples on the eval prompts
        e = toy.eval_prompts
        base_samples = torch.cat([toy.rewards(policy.mean(e) + policy.sigma * eval_noise[i], e) for i in range(16)])
        base_std = base_samples.std(0)
    curve = [evaluate()]
    hist = {k: [] for k in ("hijack_ocr", "effective_ocr", "priority", "coef")}
    for epoch in range(epochs):
        idx = torch.randint(0, toy.train_prompts.shape[0], (prompts,), generator=gen)
        e = toy.train_prompts[idx].repeat_interleave(G, 0)
        gid = torch.arange(prompts).repeat_interleave(G)  # one group per sampled prompt
        with torch.no_grad():
            z = policy.mean(e) + policy.sigma * torch.randn(e.shape[0], D, generator=gen)
            old_lp = policy.log_prob(z, e)
            R = toy.rewards(z, e, gen)
        # advantages -> Gram -> update -> advantages (grad.sequence): same-epoch for the aggregators,
        # lagged for APEX (its Gram feeds the conflict penalty after training)
        measure = (lambda Ahat: per_objective_gram(policy, z, e, old_lp, Ahat, clip_range)) if bal.wants_gram else None
        adv = epoch_advantages(bal, R, gid, measure, same_epoch=not method.startswith("apex"))
        A, stats = adv.A, adv.stats
        for _ in range(inner):
            out = grpo_loss(policy.log_prob(z, e), old_lp, A, clip_range=clip_range, mean=policy.mean(e),
                            ref_mean=ref.mean(e).detach(), step_std=torch.full((e.shape[0],), policy.sigma),
                            kl_beta=kl_beta)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            commit_epoch(bal, adv)
        hist["hijack_ocr"].append(stats["hijack_share/ocr"])
        hist["effective_ocr"].append(stats["effective_share/ocr"])
        hist["priority"].append([stats[f"priority/{n}"] for n in NAMES])
        if (epoch + 1) % eval_every == 0:
            curve.append(evaluate())
    curve_t = torch.stack(curve)  # [T, K]
    imp = ((curve_t[-1] - curve_t[0]) / base_std).tolist()
    steps = (curve_t[1:] - curve_t[:-1]) / base_std
    osc = (steps.abs().sum(0) - (curve_t[-1] - curve_t[0]).abs() / base_std).mean().item()
    return dict(
        improvement=imp, worst=min(imp), hypervolume=float(np.prod(np.clip(imp, 0, None))),
        hijack_ocr=float(np.mean(hist["hijack_ocr"][-10:])), effective_ocr=float(np.mean(hist["effective_ocr"][-10:])),
        oscillation=osc, base_std=base_std.tolist(),
        curve=((curve_t - curve_t[0]) / base_std).tolist(), priority=hist["priority"],
    )


def summarise(results: dict) -> dict:
    out = {}
    for m, runs in results.items():
        imp = np.array([r["improvement"] for r in runs])
        row = {"improvement_mean": imp.mean(0).tolist(), "improvement_std": imp.std(0).tolist()}
        for key in ("worst", "hypervolume", "hijack_ocr", "effective_ocr", "oscillation"):
            v = np.array([r[key] for r in runs])
            row[key] = [float(v.mean()), float(v.std())]
        out[m] = row
    return out


def markdown(summary: dict, meta: dict) -> str:
    lines = [
        f"Toy multi-objective GRPO (bench/algorithm.py), {meta['seeds']} seeds x {meta['epochs']} epochs, "
        f"mean +- std over seeds. Improvements of the held-out deterministic policy over the base policy, "
        f"in base-policy reward stds (higher is better). HV: product of the positive improvements. "
        f"rho(ocr): SPEC 3 hijack share; eff(ocr): share of the trained advantage explained by ocr "
        f"(0.25 = balanced). osc: movement later undone, base stds (lower is better).",
        "",
        "| method | " + " | ".join(NAMES) + " | worst | HV | rho(ocr) | eff(ocr) | osc |",
        "|---|" + "---|" * (len(NAMES) + 5),
    ]
    for m, r in summary.items():
        cells = [f"{a:+.2f} ± {s:.2f}" for a, s in zip(r["improvement_mean"], r["improvement_std"])]
        cells.append(f"{r['worst'][0]:+.2f} ± {r['worst'][1]:.2f}")
        cells.append(f"{r['hypervolume'][0]:.2f} ± {r['hypervolume'][1]:.2f}")
        for key in ("hijack_ocr", "effective_ocr", "oscillation"):
            cells.append(f"{r[key][0]:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, summary: dict, path: Path, eval_every: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    width = 0.8 / len(NAMES)
    x = np.arange(len(methods))
    for k, n in enumerate(NAMES):
        ax.bar(x + (k - 1.5) * width, [summary[m]["improvement_mean"][k] for m in methods], width,
               yerr=[summary[m]["improvement_std"][k] for m in methods], label=n, capsize=2)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x, methods, rotation=30)
    ax.set_ylabel("improvement (base stds)")
    ax.set_title("per-objective improvement")
    ax.legend(fontsize=8)
    ax = axes[1]
    for m in methods:
        worst = np.array([np.min(np.array(r["curve"]), 1) for r in results[m]]).mean(0)
        ax.plot(np.arange(len(worst)) * eval_every, worst, label=m)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("worst-objective improvement (base stds)")
    ax.set_title("worst objective during training")
    ax.legend(fontsize=8)
    ax = axes[2]
    if "apex" not in results:
        ax.set_axis_off()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    pri = np.array([r["priority"] for r in results["apex"]]).mean(0)
    for k, n in enumerate(NAMES):
        ax.plot(pri[:, k], label=n)
    ax.set_xlabel("epoch")
    ax.set_ylabel("pi")
    ax.set_title("APEX priorities (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SCENARIOS = {"base": 0.0, "jitter": 0.01}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--quick", action="store_true", help="2 seeds x 40 epochs (smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs = 2, 40
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    t0 = time.time()
    report, blob = [], {}
    for scen in args.scenarios.split(","):
        results = {}
        for m in methods:
            t = time.time()
            results[m] = [run(m, s, args.epochs, args.eval_every, jitter=SCENARIOS[scen]) for s in range(args.seeds)]
            print(f"{scen:7s} {m:10s} {time.time() - t:6.1f}s", flush=True)
        summary = summarise(results)
        meta = dict(seeds=args.seeds, epochs=args.epochs, eval_every=args.eval_every, methods=methods)
        report.append(f"### scenario `{scen}` (OCR jitter {SCENARIOS[scen]})\n\n" + markdown(summary, meta))
        blob[scen] = {"ocr_jitter": SCENARIOS[scen], "summary": summary,
                      "runs": {m: [{k: v for k, v in r.items() if k != "priority"} for r in rs]
                               for m, rs in results.items()}}
        plot(results, summary, out / f"algorithm{suffix}{'' if scen == 'base' else '_' + scen}.png", args.eval_every)
    meta = dict(seeds=args.seeds, epochs=args.epochs, eval_every=args.eval_every, methods=methods,
                seconds=round(time.time() - t0, 1), torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), cpu_threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    md = "\n".join(report) + f"\n({meta['seconds']} s on {meta['machine']}, {meta['cpu_threads']} thread)\n"
    print(md)
    (out / f"algorithm{suffix}.json").write_text(json.dumps({"meta": meta, **blob}, indent=1))
    (out / f"algorithm{suffix}.md").write_text(md)
    print(f"wrote {out}/algorithm{suffix}.json/.md/.png in {meta['seconds']}s")


if __name__ == "__main__":
    main()
