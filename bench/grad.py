"""Per-objective gradients: what do all K gradients cost on top of a plain GRPO step?

    python -m bench grad                                   # CPU: tiny SD3, fp32 -> bench/results/grad_cpu.json
    python -m bench grad --device cuda --dtype bf16 --model sd35m   # SD3.5-Medium architecture, random weights

One optimizer step of the real GRPO learner (apex_fast/rl/learner.py: CFG velocity with the
unconditional branch detached, SDE log-prob, clipped loss, KL to the LoRA-disabled reference, AdamW
step) on one micro-batch over ``--timesteps`` trained timesteps, timed side by side, round-robin over
the modes, median of ``--repeats``:

  single             the plain single-objective step (one backward per timestep), KL beta 0
  single_kl          the same with KL (beta > 0: a reference forward, KL in the same backward)
  one_backward       K objective gradients from the step's own backward (grad/capture.py), their Gram,
                     MGDA coefficients and the combined update c^T J into .grad (ops.gram, ops.combine)
  one_backward_kl    the same with KL: the KL term needs its own backward over the same forward
  one_backward_apex  APEX's path: the update column from the same backward, J kept for the epoch Gram
  one_backward_gram_every4   one captured step out of 4 (balance.gram_every_steps: 4), mean per step
  k_backward         the reference: K extra backward passes of the per-objective losses per timestep

Ratios are over ``single`` of the same run (``one_backward_kl`` over ``single_kl``); on CPU the times
are process CPU seconds (one thread), which other jobs on a shared machine do not inflate the way
they do wall time. Peak memory: CUDA ``max_memory_allocated`` per mode (persistent buffers included);
on CPU the peak growth of the C heap in use during one step (glibc ``mallinfo2``, polled), i.e. the
step's transient memory (the persistent K x LoRA-size J buffers are reported as ``J_buffer_MiB``).

Models (random weights, nothing downloaded): ``tiny`` (the embedded 2-block SD3 transformer, 64 px
latents 16x8x8, LoRA r 16) and ``sd35m`` (SD3Transformer2DModel built from SD3.5 Medium's config:
24 layers, 24 heads x 64 = 1536 hidden, dual attention in layers 0-12, RMS qk-norm; 512 px -> 64x64
latents, 333 text tokens, LoRA r 32 on Flow-GRPO's targets).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apex_fast.balance import make_balancer  # noqa: E402
from apex_fast.config import load_config  # noqa: E402
from apex_fast.grad import KBackwardGradients, ObjectiveGradients  # noqa: E402
from apex_fast.models import add_lora  # noqa: E402
from apex_fast.rl.learner import GRPOLearner  # noqa: E402
from apex_fast.rl.rollout import Conditioning  # noqa: E402
from apex_fast.run_state import TrainableWeights  # noqa: E402
from apex_fast.runtime import Runtime, SampleLayout, TorchEngine  # noqa: E402
from apex_fast.sampling import EpochSamples  # noqa: E402

MODES = ["single", "single_kl", "one_backward", "one_backward_kl", "one_backward_apex", "one_backward_gram_every4",
         "k_backward"]

# SD3.5 Medium's transformer config (stabilityai/stable-diffusion-3.5-medium, transformer/config.json)
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
             dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
PRESETS = {
    # latent side, text tokens (77 CLIP + T5), LoRA rank, micro-batch, trained timesteps
    "tiny": dict(latent=8, tokens=77 + 16, rank=16, batch=8, timesteps=2),
    "sd35m": dict(latent=64, tokens=77 + 256, rank=32, batch=4, timesteps=2),
}


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    from diffusers import SD3Transformer2DModel

    if name == "tiny":
        from apex_fast.models.tiny import _transformer

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _transformer()
        return model.to(device, dtype)
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device (fp32, then cast: 9 GiB at most)
        model = SD3Transformer2DModel(**SD35M)
    return model.to(device, dtype)


def setup(args):
    """The learner over a random micro-batch whose stored log-probs are the current policy's (ratio 1)."""
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    p = PRESETS[args.model]
    n, T = args.batch or p["batch"], args.timesteps or p["timesteps"]
    model = build_model(args.model, device, dtype)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    add_lora(model, rank=p["rank"], alpha=2 * p["rank"], seed=0)
    params = [q for q in model.parameters() if q.requires_grad]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, q in model.named_parameters():
            if "lora_B" in name:  # as after some training: every LoRA gradient non-zero
                q.copy_(torch.randn(q.shape, generator=g) * 1e-3)
    names = [f"r{k}" for k in range(args.K)]
    cfg = load_config(None, [
        f"sample.num_steps={max(T, 2)}", f"train.timestep_fraction={T / max(T, 2)}", f"train.micro_batch_size={n}",
        "train.lr=1e-12", "train.weight_decay=0", "train.ema=false", "train.kl_beta=0", "train.clip_range=0.01",
        "rewards=[" + ",".join(f"{{name: {k}, weight: 1}}" for k in names) + "]", "balance.method=mgda",
        "balance.gradients=one_backward"])
    from diffusers import FlowMatchEulerDiscreteScheduler

    runtime = Runtime(device=device)
    engine = TorchEngine(cfg, params, runtime, model)
    balancer = make_balancer(cfg.balance, [1.0] * args.K, names)
    learner = GRPOLearner(cfg, runtime, engine, TrainableWeights(model, params, engine, True), balancer,
                          SampleLayout(n, n), FlowMatchEulerDiscreteScheduler(shift=3.0))
    C, h = model.config.in_channels, p["latent"]
    D, Dp = model.config.joint_attention_dim, model.config.pooled_projection_dim
    gen = torch.Generator().manual_seed(2)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    cond = Conditioning(rnd(n, p["tokens"], D), rnd(n, Dp), rnd(n, p["tokens"], D), rnd(n, Dp))
    samples = EpochSamples([""] * n, [{}] * n, cond, rnd(n, T + 1, C, h, h), torch.zeros(n, T, device=device),
                           torch.arange(n), torch.zeros(n, 3, 1, 1))
    idx = torch.arange(n)
    with torch.no_grad():
        samples.log_probs = torch.stack([learner.step_terms(samples, idx, j, train=False).log_prob
                                         for j in range(T)], 1)
    R = torch.randn(n, args.K, generator=gen)
    groups = torch.arange(n) // 2
    A, _ = balancer.advantages(R, groups)
    Ahat = balancer.objective_advantages
    learner.transformer.train()
    return dict(learner=learner, samples=samples, idx=idx, A=A.to(device), Ahat=Ahat, cfg=cfg, engine=engine,
                cap=learner.grads, kref=KBackwardGradients(model, params, args.K, collect_all=True), n=n, T=T,
                params=params, device=device, balancer=balancer)


def run_mode(s, mode: str, step: int) -> None:
    L, cfg, stats = s["learner"], s["cfg"], {k: [] for k in ("approx_kl", "clipfrac", "kl", "policy_loss")}
    cfg.train.kl_beta = 0.01 if mode.endswith("_kl") else 0.0
    cap: ObjectiveGradients = s["cap"]
    Ahat = s["Ahat"].to(s["device"])
    if mode.startswith("single") or (mode == "one_backward_gram_every4" and step % 4):
        cap.remove()
        L.plain_step(s["samples"], s["idx"], s["A"], stats)
    elif mode == "k_backward":
        cap.remove()
        L.grads, L.aggregates = s["kref"], True
        L.captured_step(s["samples"], s["idx"], s["A"], Ahat, s["Ahat"], stats)
    else:
        cap.install()
        L.grads, L.aggregates = cap, mode != "one_backward_apex"
        L._epoch_J = None
        L.captured_step(s["samples"], s["idx"], s["A"], Ahat, s["Ahat"], stats)
    s["engine"].step(1.0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(s, mode: str) -> tuple[float, float]:
    """(wall, process CPU) seconds per optimizer step; the every-4 mode is timed over 4 steps (1
    captured, 3 plain)."""
    steps = 4 if mode.endswith("every4") else 1
    sync(s["device"])
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        run_mode(s, mode, step)
    sync(s["device"])
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


class HeapPeak:
    """CPU: peak bytes in use on the C heap (glibc mallinfo2: small blocks + mmapped large blocks,
    where torch's CPU tensors live) while the block runs, polled every 0.2 ms on a thread, minus the
    bytes in use when it started."""

    def __init__(self):
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = MallInfo2

    def in_use(self) -> int:
        m = self._libc.mallinfo2()
        return m.uordblks + m.hblkhd

    def __enter__(self):
        import threading

        self.base = self.peak = self.in_use()
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.in_use())
                self._stop.wait(0.0002)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.in_use())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="frozen weights (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--model", default=None, choices=sorted(PRESETS), help="default: tiny on CPU, sd35m on CUDA")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--batch", type=int, default=None, help="micro-batch size (default: the preset's)")
    ap.add_argument("--timesteps", type=int, default=None, help="trained timesteps per step (default: the preset's)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per mode (default: 12 CPU, 8 CUDA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-memory", action="store_true", help="CPU: skip the heap measurement")
    ap.add_argument("--out", default=None, help="default: bench/results/grad_<device type>.json")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    args.model = args.model or ("sd35m" if dev.type == "cuda" else "tiny")
    if dev.type == "cpu":
        torch.set_num_threads(1)
    s = setup(args)
    modes = args.modes.split(",")
    repeats = args.repeats or (8 if dev.type == "cuda" else 12)
    times = {m: [] for m in modes}
    cpu_times = {m: [] for m in modes}
    peak = {}
    for m in modes:  # warm-up (and CUDA peak memory per mode)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for step in range(max(args.warmup, 4 if m.endswith("every4") else 1)):
            run_mode(s, m, step)
        if dev.type == "cuda":
            sync(dev)
            peak[m] = torch.cuda.max_memory_allocated() / 2**20
    for _ in range(repeats):  # round-robin: every mode sees the same machine load
        for m in modes:
            wall, cpu = timed(s, m)
            times[m].append(wall)
            cpu_times[m].append(cpu)
    # CPU: process CPU time (one thread), which a machine shared with other jobs does not inflate the
    # way it does wall time; CUDA: wall time after synchronize
    basis = cpu_times if dev.type == "cpu" else times
    med = {m: statistics.median(v) for m, v in basis.items()}
    wall_med = {m: statistics.median(v) for m, v in times.items()}
    if dev.type == "cpu" and not args.no_memory:  # per mode, after the warm-up: one step (4 for every4)
        for m in modes:
            with HeapPeak() as hp:
                for step in range(4 if m.endswith("every4") else 1):
                    run_mode(s, m, step)
            peak[m] = hp.growth_mib
    base = med.get("single")
    res = {}
    if base:
        for m in modes:
            if m.startswith("one_backward") or m == "k_backward":
                den = med["single_kl"] if m.endswith("_kl") and "single_kl" in med else base
                res[f"ratio_{m}"] = med[m] / den
    n_lora = sum(q.numel() for q in s["params"])
    meta = {
        "command": "python -m bench grad " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "model": args.model, "dtype": args.dtype,
        "K": args.K, "micro_batch": s["n"], "timesteps": s["T"], "lora_params": n_lora, "repeats": repeats,
        "gradient_checkpointing": args.gradient_checkpointing,
        "J_buffer_MiB": 4 * args.K * n_lora / 2**20,
    }
    out = {**res, "step_seconds": med,
           "step_seconds_basis": "median process CPU time (1 thread)" if dev.type == "cpu" else "median wall time",
           "step_wall_seconds": wall_med, "peak_memory_MiB": peak,
           "peak_memory_note": ("torch.cuda.max_memory_allocated per mode" if dev.type == "cuda" else
                                "CPU: peak growth of the C heap in use during one step (glibc mallinfo2, polled)"),
           "meta": meta}
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"grad_{dev.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'mode':28s} {'step s':>10s} {'ratio':>7s} {'peak MiB':>9s}")
    for m in modes:
        r = res.get(f"ratio_{m}", 1.0 if m == "single" else med[m] / base if base else float("nan"))
        print(f"{m:28s} {med[m]:10.4f} {r:7.2f} {peak.get(m, float('nan')):9.1f}")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
