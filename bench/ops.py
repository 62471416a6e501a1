"""Side-by-side benchmarks of the fused multi-objective ops (apex_fast.ops) against the usual ways
of computing the same thing. Not a test: numbers go to bench/results/ops_<device>.json and a plot
bench/results/ops_<device>.png, with the device, versions, threads, load and the command.

    python -m bench ops                      # everything on CUDA if available (preset gpu), else CPU (preset cpu)
    python -m bench ops --only gram --max-log2p 24 --quick
    python bench/ops.py --device cpu --threads 2
    python -m bench ops --preset tiny --compile-backend eager --device cpu   # seconds: what the GPU suite's dry run uses

Presets (sizes): cpu (default on CPU): group norm N = 1152..18432, Gram P = 2^20..2^26, J as random
per-parameter tensors of P = 2^22; gpu (default on CUDA, bench/gpu_suite.sh): group norm N = 1152 and
9216 (K = 4, groups of 24), Gram P = 2^24..2^28, and J as the 382 per-parameter LoRA tensors of
SD3.5-Medium (r = 32, the trainer's target modules, P = 18.8M), built from its config on the meta device;
tiny: the gpu preset's code paths at sizes that take seconds on a CPU.

Sections:
  groupnorm  group-relative normalisation at Flow-GRPO sizes (N = 1152, K = 4, 48 prompts) and larger:
             ours (apex_fast.ops.group_normalize, default dispatch) vs a per-prompt numpy loop like
             Flow-GRPO's PerPromptStatTracker (keyed by prompt strings as Flow-GRPO does, and by integer
             prompt ids) vs the vectorised torch reference vs torch.compile of it; plus the APEX
             dual-stage op vs its reference.
  gram       Gram + combine for K = 4, P = 2^20 .. 2^26: ours vs eager (J @ J.T, c @ J) vs
             torch.compile vs a per-task Python loop (LibMTL style) vs torchjd (MGDA end to end, where
             it applies); achieved GB/s against the streaming bandwidth measured in the same run, and
             the peak extra memory of each provider. Plus J as a list of per-parameter tensors (ours
             never concatenates; eager must torch.cat).
  wgrad      weighted_grads (all K per-objective weight gradients of a linear layer from one
             backward) vs K separate matmuls in eager torch, at LoRA shapes of SD3.5-Medium.

Timing: each provider is warmed up, then run repeatedly; the table shows the MINIMUM (the least
disturbed run: other jobs may share the machine, see load_avg in the JSON) and the median. On CUDA
each run is timed with CUDA events (enqueue to completion, so launch and Python overheads of small
ops count when the GPU waits for them). Achieved bandwidth of Gram + combine counts the bytes it must
move, (2K + 1) P elements (J read twice, the update written once), against the copy bandwidth measured
in the same run (y.copy_(x), read + write). The JSON is rewritten after every section, so a run cut
short keeps what it measured.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apex_fast import ops  # noqa: E402
from apex_fast.ops import reference as ref  # noqa: E402

RESULTS = ROOT / "bench" / "results"


# ---------------------------------------------------------------------------------------------------
# measurement helpers


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


TIME_SCALE = 1.0  # --time-scale: multiplies every min_time (the tiny preset uses 0.05)


def timeit(fn, dev, *, min_time=0.4, max_reps=200, min_reps=3, warmup=2):
    for _ in range(warmup):
        fn()
    sync(dev)
    ts, cs = [], []
    t_end = time.perf_counter() + min_time * TIME_SCALE
    cuda = dev.type == "cuda"
    while len(ts) < min_reps or (len(ts) < max_reps and time.perf_counter() < t_end):
        c0 = time.process_time()
        t0 = time.perf_counter()
        if cuda:
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
            fn()
            ev1.record()
            ev1.synchronize()
            ts.append(ev0.elapsed_time(ev1) / 1e3)
        else:
            fn()
            sync(dev)
            ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    # cpu_min_s: process CPU time; with one thread it excludes the time other jobs held the core
    return {"min_s": min(ts), "median_s": float(np.median(ts)), "cpu_min_s": min(cs), "reps": len(ts)}


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_extra_mb(fn, dev):
    """Peak memory allocated by one call beyond what existed before it, in MiB. CUDA: the caching
    allocator's peak. CPU: resident set sampled every ~0.2 ms from a thread (torch releases the GIL
    inside ops) with glibc's mmap threshold pinned low so freed buffers leave the RSS."""
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        r = fn()
        sync(dev)
        del r
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return None
    stop = [False]
    peak = [_rss()]

    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    base = _rss()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    time.sleep(0.002)
    r = fn()
    stop[0] = True
    th.join()
    peak[0] = max(peak[0], _rss())
    del r
    return max(0.0, (peak[0] - base) / 2**20)


def stream_bandwidth(dev, nbytes=1 << 29):
    """Streaming bandwidth measured now: read (x.sum()) and copy (y.copy_(x), 2 x bytes), GB/s.
    nbytes must be far above the last-level cache (CPU: 512 MiB; GPU suite: 2 GiB)."""
    n = nbytes // 4
    x = torch.rand(n, device=dev)
    y = torch.empty_like(x)
    y.fill_(1.0)
    rd1 = timeit(lambda: x.sum(), dev, min_time=0.5, max_reps=20, warmup=2)
    rd2 = timeit(lambda: x.amax(), dev, min_time=0.5, max_reps=20, warmup=2)
    rd = {"min_s": min(rd1["min_s"], rd2["min_s"]), "cpu_min_s": min(rd1["cpu_min_s"], rd2["cpu_min_s"])}
    cp = timeit(lambda: y.copy_(x), dev, min_time=0.5, max_reps=20, warmup=2)
    del x, y
    return {"read_GBps": nbytes / rd["min_s"] / 1e9, "copy_GBps": 2 * nbytes / cp["min_s"] / 1e9,
            "read_GBps_cpu_time": nbytes / max(rd["cpu_min_s"], 1e-9) / 1e9,
            "copy_GBps_cpu_time": 2 * nbytes / max(cp["cpu_min_s"], 1e-9) / 1e9,
            "bytes": nbytes, "threads": torch.get_num_threads(),
            "method": f"read: best of x.sum() and x.amax() over {nbytes >> 20} MiB; copy: y.copy_(x), counted as 2 x bytes; *_cpu_time: "
                      "bytes / process CPU time (meaningful with 1 thread on a shared machine)"}


def device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug(dev):
    """Short name for result files: 'h100', 'h200', 'a100' from the CUDA device name; 'cpu' on CPU."""
    if dev.type != "cuda":
        return dev.type
    words = [w for w in torch.cuda.get_device_name(dev).lower().replace("-", " ").split() if w not in ("nvidia", "tesla")]
    slug = "".join(ch for ch in (words[0] if words else "cuda") if ch.isalnum())
    return slug or "cuda"


def versions():
    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    v["cuda"] = torch.version.cuda
    for mod in ("triton", "torchjd"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = None
    try:
        v["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True, timeout=10).stdout.strip()
    except Exception:
        v["git"] = None
    return v


def load_avg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _pin_malloc():
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: big buffers are returned at free
    except OSError:
        pass


COMPILE_BACKEND = "inductor"  # --compile-backend; the dry run uses "eager" (same code path, no codegen)


def _compile(fn, **kw):
    try:
        return torch.compile(fn, backend=COMPILE_BACKEND, **kw)
    except Exception as e:  # pragma: no cover - torch.compile unavailable
        print(f"  torch.compile unavailable: {e}")
        return None


def _fmt_t(s):
    return f"{s * 1e6:9.1f} us" if s < 1e-3 else f"{s * 1e3:9.2f} ms"


# ---------------------------------------------------------------------------------------------------
# group normalisation


def flowgrpo_stat_tracker(prompts, rewards):
    """Per-prompt loop as in Flow-GRPO's PerPromptStatTracker.update (grpo branch, no history)."""
    prompts = np.array(prompts)
    unique = np.unique(prompts)
    advantages = np.empty_like(rewards) * 0.0
    stats = {}
    for prompt in unique:
        stats[prompt] = []
        stats[prompt].extend(rewards[prompts == prompt])
    for prompt in unique:
        stats[prompt] = np.stack(stats[prompt])
        prompt_rewards = rewards[prompts == prompt]
        mean = np.mean(stats[prompt], axis=0, keepdims=True)
        std = np.std(stats[prompt], axis=0, keepdims=True) + 1e-4
        advantages[prompts == prompt] = (prompt_rewards - mean) / std
    return advantages


def bench_groupnorm(dev, sizes, out):
    rows = []
    gn_compiled = _compile(ref.group_normalize, dynamic=True)
    for N, K, G in sizes:
        gen = torch.Generator().manual_seed(0)
        R = (torch.rand(N, K, generator=gen) * torch.linspace(1, 5, K)).to(dev)
        ids = torch.randperm(N, generator=gen).remainder(G).to(dev)  # prompt index per sample
        prompts = [f"prompt number {int(i)}" for i in ids.cpu()]
        Rn = R.cpu().numpy().astype(np.float64)
        want = ref.group_normalize(R, ids)
        ids_np = ids.cpu().numpy()
        provs = {
            "ours": lambda: ops.group_normalize(R, ids),
            "torch_reference": lambda: ref.group_normalize(R, ids),
            "numpy_per_prompt_loop": lambda: flowgrpo_stat_tracker(prompts, Rn),
            "numpy_per_prompt_loop_int_ids": lambda: flowgrpo_stat_tracker(ids_np, Rn),
        }
        if gn_compiled is not None:
            provs["torch_compile"] = lambda: gn_compiled(R, ids)
        res = {}
        for name, fn in provs.items():
            try:
                t0 = time.perf_counter()
                got = fn()
                first = time.perf_counter() - t0
                got = torch.as_tensor(got, dtype=torch.float32, device="cpu")
                err = float((got - want.cpu()).abs().max())
                res[name] = dict(timeit(fn, dev), max_abs_err_vs_reference=err, first_call_s=first)
            except Exception as e:
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        w = torch.full((K,), 1.0 / K, device=dev)
        res["dual_stage_ours"] = dict(timeit(lambda: ops.dual_stage_advantages(R, ids, w, std_floor=0.05), dev))
        res["dual_stage_reference"] = dict(timeit(lambda: ref.dual_stage_advantages(R, ids, w, std_floor=0.05), dev))
        base = res["ours"]["min_s"]
        for name, r in res.items():
            if "min_s" in r:
                r["ours_speedup"] = r["min_s"] / base
        # goal (README): faster than the eager torch reference and than torch.compile of it
        rivals = [res[n]["min_s"] for n in ("torch_reference", "torch_compile") if "min_s" in res.get(n, {})]
        res["ours"]["beats_eager_and_compile"] = bool(rivals) and all(base < t for t in rivals)
        res["dual_stage_ours"]["ours_speedup"] = res["dual_stage_reference"]["min_s"] / res["dual_stage_ours"]["min_s"]
        rows.append({"N": N, "K": K, "groups": G, "providers": res})
        print(f"\n[groupnorm] N={N} K={K} groups={G}  (backend: {ops.choose('group_normalize', dev)})")
        for name, r in res.items():
            if "error" in r:
                print(f"  {name:24s} ERROR {r['error'][:120]}")
            else:
                tag = "speedup vs reference" if name == "dual_stage_ours" else "x ours"
                print(f"  {name:24s} min {_fmt_t(r['min_s'])}  median {_fmt_t(r['median_s'])}  "
                      f"{tag} {r.get('ours_speedup', float('nan')):8.1f}")
    out["groupnorm"] = rows


# ---------------------------------------------------------------------------------------------------
# gram + combine


def loop_gram_combine(J, c):
    """LibMTL-style per-task loop: K(K+1)/2 dot products, then sum_k c_k g_k."""
    K = J.shape[0]
    M = torch.empty(K, K, device=J.device)
    for i in range(K):
        for j in range(i, K):
            M[i, j] = M[j, i] = torch.dot(J[i], J[j])
    d = c[0] * J[0]
    for k in range(1, K):
        d = d + c[k] * J[k]
    return M, d


def bench_gram(dev, logs, out, bw):
    K = 4
    try:
        import torchjd
        from torchjd.aggregation import MGDA, MGDAWeighting
    except Exception:
        torchjd = None
    eager = lambda J, c, o: (J @ J.T, c @ J)  # noqa: E731
    compiled = _compile(lambda J, c: (J @ J.T, c @ J))
    rows = []
    for lp in logs:
        P = 1 << lp
        # drawn where it is used (on a GPU, 2^28 x 4 normals on the host would take seconds); the
        # same numbers as before on the CPU
        gen = torch.Generator(device=dev).manual_seed(lp)
        J = torch.randn(K, P, generator=gen, device=dev)
        c = torch.tensor([0.4, 0.3, 0.2, 0.1], device=dev)
        o = torch.empty(P, device=dev)
        o.zero_()
        Mref = J.double() @ J.double().T
        byt_g = K * P * 4
        byt_c = (K + 1) * P * 4
        provs = {
            "ours": lambda: (ops.gram(J), ops.combine(J, c, out=o)),
            "eager": lambda: eager(J, c, o),
            "loop": lambda: loop_gram_combine(J, c),
        }
        if compiled is not None:
            provs["torch_compile"] = lambda: compiled(J, c)
        parts = {"ours": (lambda: ops.gram(J), lambda: ops.combine(J, c, out=o)),
                 "eager": (lambda: J @ J.T, lambda: c @ J)}
        res = {}
        big = lp >= 24
        for name, fn in provs.items():
            try:
                t0 = time.perf_counter()
                M = fn()[0]
                first = time.perf_counter() - t0
                err = float(((M.double() - Mref).abs().max() / Mref.abs().max()).cpu())
                r = dict(timeit(fn, dev, min_time=0.3 if big else 0.5, max_reps=10 if big else 100),
                         rel_err_gram=err, first_call_s=first)
                r["GBps_total"] = (byt_g + byt_c) / r["min_s"] / 1e9
                r["frac_of_copy_bw_total"] = r["GBps_total"] / bw["copy_GBps"]
                r["peak_extra_MiB"] = peak_extra_mb(fn, dev)
                if name in parts:
                    tg = timeit(parts[name][0], dev, min_time=0.3, max_reps=10 if big else 100)
                    tc = timeit(parts[name][1], dev, min_time=0.3, max_reps=10 if big else 100)
                    r["gram"] = dict(tg, GBps=byt_g / tg["min_s"] / 1e9, frac_of_read_bw=byt_g / tg["min_s"] / 1e9 / bw["read_GBps"])
                    r["combine"] = dict(tc, GBps=byt_c / tc["min_s"] / 1e9, frac_of_copy_bw=byt_c / tc["min_s"] / 1e9 / bw["copy_GBps"])
                    if dev.type == "cpu" and torch.get_num_threads() == 1:
                        r["gram"]["GBps_cpu_time"] = byt_g / max(tg["cpu_min_s"], 1e-9) / 1e9
                        r["gram"]["frac_of_read_bw_cpu_time"] = r["gram"]["GBps_cpu_time"] / bw["read_GBps_cpu_time"]
                        r["combine"]["GBps_cpu_time"] = byt_c / max(tc["cpu_min_s"], 1e-9) / 1e9
                        r["combine"]["frac_of_copy_bw_cpu_time"] = r["combine"]["GBps_cpu_time"] / bw["copy_GBps_cpu_time"]
                res[name] = r
            except Exception as e:
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if lp >= 24:
            # the same P spread over 4 separately allocated parameters (the real layout of J)
            Js = [J[:, i * (P // 4):(i + 1) * (P // 4)].contiguous() for i in range(4)]
            outs4 = [torch.zeros(P // 4, device=dev) for _ in range(4)]
            fn = lambda: (ops.gram(Js), ops.combine(Js, c, out=outs4))  # noqa: E731
            r = dict(timeit(fn, dev, min_time=0.3, max_reps=10), note="J as 4 tensors [K, P/4]")
            r["GBps_total"] = (byt_g + byt_c) / r["min_s"] / 1e9
            r["frac_of_copy_bw_total"] = r["GBps_total"] / bw["copy_GBps"]
            res["ours_list4"] = r
            del Js, outs4
        if torchjd is not None:
            try:
                agg = MGDA()
                wfn = MGDAWeighting()
                res["torchjd_MGDA"] = dict(timeit(lambda: agg(J), dev, min_time=0.3, max_reps=10 if big else 50),
                                           note="torchjd.aggregation.MGDA()(J): gram + Frank-Wolfe + combine")
                res["ours_MGDA"] = dict(
                    timeit(lambda: ops.combine(J, wfn(ops.gram(J)), out=o), dev, min_time=0.3, max_reps=10 if big else 50),
                    note="ops.gram -> torchjd MGDAWeighting -> ops.combine (same weights)")
            except Exception as e:
                res["torchjd_MGDA"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        base = res["ours"]["min_s"]
        for name, r in res.items():
            if "min_s" in r and not name.endswith("MGDA"):
                r["time_vs_ours"] = r["min_s"] / base
        rivals = [res[n]["min_s"] for n in ("eager", "torch_compile") if "min_s" in res.get(n, {})]
        res["ours"]["beats_eager_and_compile"] = bool(rivals) and all(base < t for t in rivals)
        row = {"K": K, "P": P, "log2P": lp, "bytes_gram": byt_g, "bytes_combine": byt_c, "providers": res}
        rows.append(row)
        print(f"\n[gram+combine] K={K} P=2^{lp} fp32 (backend: {ops.choose('gram', dev)}; read BW "
              f"{bw['read_GBps']:.1f} GB/s, copy BW {bw['copy_GBps']:.1f} GB/s)")
        for name, r in res.items():
            if "error" in r:
                print(f"  {name:14s} ERROR {r['error'][:150]}")
                continue
            line = f"  {name:14s} total min {_fmt_t(r['min_s'])}"
            if "frac_of_copy_bw_total" in r:
                line += f"  {100 * r['frac_of_copy_bw_total']:3.0f}% copy BW"
            if "time_vs_ours" in r:
                line += f"  x ours {r['time_vs_ours']:5.2f}"
            if "gram" in r:
                line += (f"  | gram {r['gram']['GBps']:6.1f} GB/s ({100 * r['gram']['frac_of_read_bw']:3.0f}% read BW)"
                         f"  combine {r['combine']['GBps']:6.1f} GB/s ({100 * r['combine']['frac_of_copy_bw']:3.0f}% copy BW)")
                if "GBps_cpu_time" in r["gram"]:
                    line += (f"  | by CPU time: gram {100 * r['gram']['frac_of_read_bw_cpu_time']:3.0f}%"
                             f" combine {100 * r['combine']['frac_of_copy_bw_cpu_time']:3.0f}%")
            if r.get("peak_extra_MiB") is not None:
                line += f"  peak +{r['peak_extra_MiB']:.0f} MiB"
            print(line)
        del J, o
    out["gram"] = rows


# SD3.5-Medium's transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json): MMDiT-X,
# 24 blocks of width 1536, dual attention in blocks 0-12, RMS qk-norm
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def sd35m_lora_shapes(rank=32):
    """Shapes of the LoRA parameters the trainer adds to SD3.5-Medium (apex_fast.models.add_lora,
    its default targets), read off the real diffusers model built on the meta device (no memory, no
    download): 382 tensors, [r, 1536] and [1536, r]."""
    from diffusers import SD3Transformer2DModel

    from apex_fast.models.lora import add_lora, lora_parameters

    with torch.device("meta"):
        tr = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
    add_lora(tr, rank=rank, alpha=2 * rank)
    return [tuple(p.shape) for p in lora_parameters(tr)]


def bench_gram_list(dev, spec, out, bw):
    """Gram + combine with J as a list of per-parameter tensors [K, *shape] (how gradients live).
    spec: ("random", P): LoRA-like random sizes summing to P; ("sd35m", n): SD3.5-Medium's LoRA r = 32
    tensors (the first n of them, or all for None)."""
    K = 4
    if spec[0] == "sd35m":
        shapes = sd35m_lora_shapes(32)
        label = f"SD3.5-Medium LoRA r=32, {len(shapes)} tensors"
        if spec[1] is not None:
            shapes = shapes[:spec[1]]
            label += f" (first {len(shapes)})"
    else:
        P_target = spec[1]
        shapes, tot = [], 0
        gen = torch.Generator().manual_seed(1)
        while tot < P_target:
            n = int(2 ** torch.randint(12, 17, (1,), generator=gen).item())
            n = min(n, P_target - tot)
            shapes.append((n,))
            tot += n
        label = f"random LoRA-like sizes, {len(shapes)} tensors"
    sizes = [int(np.prod(s)) for s in shapes]
    P_list = sum(sizes)
    gen = torch.Generator().manual_seed(2)
    Js = [torch.randn(K, *s, generator=gen).to(dev) for s in shapes]
    Jflat = [j.view(K, -1) for j in Js]
    c = torch.tensor([0.4, 0.3, 0.2, 0.1], device=dev)
    outs = [torch.zeros(s, device=dev) for s in shapes]

    def cat_gram_combine(Jflat, c):
        Jc = torch.cat(Jflat, 1)
        return Jc @ Jc.T, c @ Jc

    def eager_list():
        M, d = cat_gram_combine(Jflat, c)
        for dst, piece in zip(outs, d.split(sizes)):
            dst.view(-1).copy_(piece)
        return M

    def eager_blocks():
        M = sum(j @ j.T for j in Jflat)
        for dst, j in zip(outs, Jflat):
            dst.view(-1).copy_(c @ j)
        return M

    compiled = _compile(cat_gram_combine)

    def compiled_list():
        M, d = compiled(Jflat, c)
        for dst, piece in zip(outs, d.split(sizes)):
            dst.view(-1).copy_(piece)
        return M

    Mref = sum(j.double() @ j.double().T for j in Jflat)
    provs = {"ours": lambda: (ops.gram(Js), ops.combine(Js, c, out=outs))[0],
             "eager_cat": eager_list, "eager_per_block": eager_blocks}
    if compiled is not None:
        provs["torch_compile"] = compiled_list
    lres = {}
    for name, fn in provs.items():
        try:
            t0 = time.perf_counter()
            M = fn()
            sync(dev)
            first = time.perf_counter() - t0
            err = float(((M.double() - Mref).abs().max() / Mref.abs().max()).cpu())
            r = dict(timeit(fn, dev, min_time=0.5), rel_err_gram=err, first_call_s=first)
            r["peak_extra_MiB"] = peak_extra_mb(fn, dev)
            r["GBps_total"] = (2 * K + 1) * P_list * 4 / r["min_s"] / 1e9
            r["frac_of_copy_bw_total"] = r["GBps_total"] / bw["copy_GBps"]
            lres[name] = r
        except Exception as e:
            lres[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    base = lres["ours"]["min_s"]
    for r in lres.values():
        if "min_s" in r:
            r["time_vs_ours"] = r["min_s"] / base
    rivals = [lres[n]["min_s"] for n in ("eager_cat", "eager_per_block", "torch_compile") if "min_s" in lres.get(n, {})]
    lres["ours"]["beats_eager_and_compile"] = bool(rivals) and all(base < t for t in rivals)
    print(f"\n[gram+combine, J as {len(sizes)} per-parameter tensors ({label}), P = {P_list}]")
    for name, r in lres.items():
        if "error" in r:
            print(f"  {name:16s} ERROR {r['error'][:150]}")
            continue
        print(f"  {name:16s} min {_fmt_t(r['min_s'])}  {r['GBps_total']:6.1f} GB/s ({100 * r['frac_of_copy_bw_total']:3.0f}% copy BW)"
              f"  x ours {r['time_vs_ours']:5.2f}  peak +{r['peak_extra_MiB'] or 0:.0f} MiB")
    out["gram_list"] = {"K": K, "P": P_list, "n_tensors": len(sizes), "layout": label, "providers": lres}


# ---------------------------------------------------------------------------------------------------
# weighted_grads


# SD3.5-Medium: hidden 1536, LoRA r = 32; M = tokens in a micro-batch
WGRAD_SHAPES = [
    ("lora_A [r=32, in=1536]", 4096, 32, 1536, 4),
    ("lora_B [out=1536, r=32]", 4096, 1536, 32, 4),
    ("dense 1536x1536", 2048, 1536, 1536, 4),
    ("lora_A K=8", 4096, 32, 1536, 8),
]


def bench_wgrad(dev, shapes, out):
    rows = []
    for label, M, O, I, K in shapes:
        gen = torch.Generator().manual_seed(M + O)
        d = torch.randn(M, O, generator=gen).to(dev)
        a = torch.randn(M, I, generator=gen).to(dev)
        W = torch.randn(M, K, generator=gen).to(dev)
        want = ref.weighted_grads(d, a, W)

        def k_matmuls():
            return torch.stack([d.T @ (W[:, k, None] * a) for k in range(K)])

        res = {}
        for name, fn in {"ours": lambda: ops.weighted_grads(d, a, W), "eager_K_matmuls": k_matmuls,
                         "einsum": lambda: torch.einsum("mo,mk,mi->koi", d, W, a)}.items():
            G = fn()
            err = float(((G - want).abs().max() / want.abs().max()).cpu())
            r = dict(timeit(fn, dev, min_time=0.5, max_reps=30), rel_err=err)
            r["GFLOPs"] = 2 * M * O * I * K / r["min_s"] / 1e9
            r["peak_extra_MiB"] = peak_extra_mb(fn, dev)
            res[name] = r
        for r in res.values():
            r["time_vs_ours"] = r["min_s"] / res["ours"]["min_s"]
        rows.append({"label": label, "M": M, "out": O, "in": I, "K": K, "providers": res})
        print(f"\n[weighted_grads] {label}: M={M} out={O} in={I} K={K} (backend: {ops.choose('weighted_grads', dev)})")
        for name, r in res.items():
            print(f"  {name:16s} min {_fmt_t(r['min_s'])}  {r['GFLOPs']:6.1f} GFLOP/s  x ours {r['time_vs_ours']:5.2f}"
                  f"  peak +{r['peak_extra_MiB'] or 0:.0f} MiB")
    out["wgrad"] = rows


# ---------------------------------------------------------------------------------------------------
# plot


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("groupnorm", "gram_list", "gram", "wgrad") if k in out]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "groupnorm":
            provs = ["ours", "torch_reference", "torch_compile", "numpy_per_prompt_loop_int_ids",
                     "numpy_per_prompt_loop"]
            labels = [f"N={r['N']}\nK={r['K']}" for r in out[key]]
            x = np.arange(len(labels))
            for i, p in enumerate(provs):
                ys = [r["providers"].get(p, {}).get("min_s", np.nan) * 1e6 for r in out[key]]
                ax.bar(x + (i - 2) * 0.16, ys, 0.16, label=p.replace("numpy_per_prompt_loop", "numpy loop"))
            ax.set_yscale("log")
            ax.set_xticks(x, labels)
            ax.set_ylabel("time per call (us, min)")
            ax.set_title("group normalisation")
        elif key == "gram":
            xs = [r["log2P"] for r in out[key]]
            for p in ("ours", "eager", "torch_compile", "loop"):
                ys = [r["providers"].get(p, {}).get("GBps_total", np.nan) for r in out[key]]
                ax.plot(xs, ys, "o-", label=p)
            bw = out["bandwidth"]
            ax.axhline(bw["copy_GBps"], color="k", ls="--", lw=1, label="copy BW (measured)")
            ax.axhline(0.85 * bw["copy_GBps"], color="gray", ls=":", lw=1, label="85% copy BW (goal)")
            ax.set_xlabel("log2 P")
            ax.set_ylabel("GB/s (gram + combine bytes / time)")
            ax.set_title("gram + combine, K = 4, fp32, one [K, P] tensor")
        elif key == "gram_list":
            gl = out[key]
            provs = [p for p in ("ours", "eager_cat", "eager_per_block", "torch_compile") if "GBps_total" in gl["providers"].get(p, {})]
            ys = [gl["providers"][p]["GBps_total"] for p in provs]
            ax.bar(np.arange(len(provs)), ys, 0.6, color=[f"C{i}" for i in range(len(provs))])
            ax.set_xticks(np.arange(len(provs)), [p.replace("_", "\n", 1) for p in provs], fontsize=8)
            bw = out["bandwidth"]
            ax.axhline(bw["copy_GBps"], color="k", ls="--", lw=1, label="copy BW (measured)")
            ax.axhline(0.85 * bw["copy_GBps"], color="gray", ls=":", lw=1, label="85% copy BW (goal)")
            ax.set_ylabel("GB/s (gram + combine bytes / time)")
            ax.set_title(f"gram + combine, K = 4: {gl['n_tensors']} tensors, P = {gl['P'] / 1e6:.1f}M", fontsize=10)
        else:
            labels = [r["label"] for r in out[key]]
            x = np.arange(len(labels))
            for i, p in enumerate(("ours", "eager_K_matmuls", "einsum")):
                ys = [r["providers"][p]["min_s"] * 1e3 for r in out[key]]
                ax.bar(x + (i - 1) * 0.25, ys, 0.25, label=p)
            ax.set_xticks(x, [lbl.replace(" ", "\n", 1) for lbl in labels], fontsize=8)
            ax.set_ylabel("time (ms, min)")
            ax.set_title("weighted_grads")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"apex_fast.ops on {out['device']} ({out['threads']} threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PRESETS = {
    # the sizes this file has always run on the CPU (README's CPU table)
    "cpu": dict(groupnorm=[(1152, 4, 48), (1152, 1, 48), (4608, 4, 192), (18432, 4, 768)],
                gram=[20, 22, 24, 26], gram_list=("random", 1 << 22), wgrad=WGRAD_SHAPES, bw_mib=512, time_scale=1.0),
    # the GPU suite's sizes (issue: group norm N = 1152 and 9216, K = 4; Gram + combine over SD3.5-Medium's
    # LoRA r = 32 as per-parameter tensors and at P = 2^24..2^28)
    "gpu": dict(groupnorm=[(1152, 4, 48), (9216, 4, 384)], gram=[24, 25, 26, 27, 28], gram_list=("sd35m", None),
                wgrad=WGRAD_SHAPES, bw_mib=2048, time_scale=1.0),
    # the gpu preset's code paths in seconds on a CPU (bench/gpu_suite.sh --cpu-dry-run)
    "tiny": dict(groupnorm=[(1152, 4, 48), (2304, 4, 96)], gram=[12, 14], gram_list=("sd35m", 6),
                 wgrad=[("lora_A [r=32, in=1536], M=256", 256, 32, 1536, 4)], bw_mib=16, time_scale=0.05),
}


def _write(out, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)


def main(argv=None):
    global TIME_SCALE, COMPILE_BACKEND
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="sizes (default: gpu on CUDA, cpu on CPU); see the module docstring")
    ap.add_argument("--only", default="groupnorm,gram,gram_list,wgrad", help="comma list of sections")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: all)")
    ap.add_argument("--groupnorm-threads", type=int, default=1,
                    help="threads for the (tiny) group-norm section: 1 avoids OpenMP spin costs")
    ap.add_argument("--max-log2p", type=int, default=None, help="drop Gram sizes above 2^this")
    ap.add_argument("--quick", action="store_true", help="fewer sizes (the first two of each section)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the torch.compile providers (eager: trace only, for dry runs)")
    ap.add_argument("--bw-mib", type=int, default=None, help="buffer size of the bandwidth measurement (default: preset's)")
    ap.add_argument("--time-scale", type=float, default=None, help="multiplies every timing window (default: preset's)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/ops_<device>.json, e.g. ops_cpu.json, ops_h100.json)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    preset = dict(PRESETS[args.preset or ("gpu" if dev.type == "cuda" else "cpu")])
    if args.quick:
        preset["groupnorm"] = preset["groupnorm"][:2]
        preset["gram"] = preset["gram"][:2]
        preset["wgrad"] = preset["wgrad"][:2]
        if preset["gram_list"][0] == "random":
            preset["gram_list"] = ("random", 1 << 20)
    if args.max_log2p is not None:
        preset["gram"] = [p for p in preset["gram"] if p <= args.max_log2p]
    TIME_SCALE = args.time_scale if args.time_scale is not None else preset["time_scale"]
    COMPILE_BACKEND = args.compile_backend
    _pin_malloc()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": device_name(dev),
        "device_type": dev.type,
        "versions": versions(),
        "backends": ops.available_backends(),
        "threads": threads,
        "preset": args.preset or ("gpu" if dev.type == "cuda" else "cpu"),
        "compile_backend": COMPILE_BACKEND,
        "load_avg_start": load_avg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "timing": "min over repeats (median also recorded); seconds" + ("; CUDA events" if dev.type == "cuda" else ""),
    }
    path = Path(args.out) if args.out else RESULTS / f"ops_{device_slug(dev)}.json"
    print(f"device: {out['device']} | threads {threads} | load {out['load_avg_start']} | backends {out['backends']}")
    sections = args.only.split(",")
    unknown = set(sections) - {"groupnorm", "gram", "gram_list", "wgrad"}
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {sorted(unknown)}; choose from groupnorm, gram, gram_list, wgrad")
    out["bandwidth"] = stream_bandwidth(dev, (args.bw_mib or preset["bw_mib"]) << 20)
    bw = out["bandwidth"]
    print(f"streaming bandwidth: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s "
          f"(by CPU time: read {bw['read_GBps_cpu_time']:.1f}, copy {bw['copy_GBps_cpu_time']:.1f})")
    _write(out, path)
    if "groupnorm" in sections:
        torch.set_num_threads(args.groupnorm_threads if dev.type == "cpu" else threads)
        out["groupnorm_threads"] = torch.get_num_threads()
        bench_groupnorm(dev, preset["groupnorm"], out)
        torch.set_num_threads(threads)
        _write(out, path)
    if "gram_list" in sections:  # the realistic layout first: a run cut short still has it
        bench_gram_list(dev, preset["gram_list"], out, bw)
        _write(out, path)
    if "gram" in sections and preset["gram"]:
        bench_gram(dev, preset["gram"], out, bw)
        _write(out, path)
    if "wgrad" in sections:
        bench_wgrad(dev, preset["wgrad"], out)
    out["load_avg_end"] = load_avg()
    _write(out, path)
    try:
        plot(out, path.with_suffix(".png"))
        print(f"\nwrote {path} and {path.with_suffix('.png')}")
    except Exception as e:
        print(f"\nwrote {path} (plot failed: {e})")
    return out


if __name__ == "__main__":
    main()
