"""Many tiny-demo variants over seeds in parallel processes, one table: which settings make training on
the embedded testbed raise every objective's eval reward beyond its 95% interval (issue 14)?

    python -m bench.demo_sweep --spec bench/sweeps/tiny_demo_cpu16.yaml --jobs 2 --threads 1

The spec (YAML) names a base config, the seeds, overrides common to every run and the variants::

    config: configs/tiny_cpu_apex.yaml
    seeds: [0, 1, 2]
    common: [checkpoint.every=0]
    variants:
      noise0.35: {methods: [apex], set: [sample.noise_level=0.35]}

Every (variant, method, seed) is one ``python -m bench.tiny_demo`` process (``--threads`` threads,
CPU unless ``--device cuda``), ``--jobs`` at a time; runs left when ``--budget-s`` is spent are
skipped and those still running are stopped, so a bounded call always writes what finished
(<results>/<name>.json and .md: per variant and method, the eval change per objective with its 95%
t-interval over the finished seeds, and how many objectives rose beyond it). Runs that finished in an
earlier call are reused (tiny_demo's ``--reuse``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tiny_demo import summarize  # noqa: E402


def load_spec(path: str | Path) -> dict:
    """The sweep spec, checked: errors name the field."""
    spec = yaml.safe_load(Path(path).read_text())

    def need(ok, field, msg):
        if not ok:
            raise ValueError(f"{path}: {field}: {msg}")

    need(isinstance(spec, dict), "(top level)", "must be a mapping with config, seeds, variants")
    need(isinstance(spec.get("config"), str), "config", "must name a trainer config file")
    need((ROOT / spec["config"]).is_file() or Path(spec["config"]).is_file(), "config", f"{spec['config']} does not exist")
    seeds = spec.get("seeds", [0, 1, 2])
    need(isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds), "seeds", "must be a list of ints")
    common = spec.get("common", [])
    need(isinstance(common, list) and all(isinstance(s, str) and "=" in s for s in common), "common",
         "must be a list of key=value overrides")
    variants = spec.get("variants")
    need(isinstance(variants, dict) and variants, "variants", "must map names to {methods, set}")
    for name, v in variants.items():
        need(isinstance(v, dict), f"variants.{name}", "must be a mapping {methods: [...], set: [...]}")
        need(str(name).replace("-", "").replace("_", "").replace(".", "").isalnum(), f"variants.{name}",
             "use letters, digits, '-', '_', '.' (it names a folder)")
        need(isinstance(v.get("methods", ["apex"]), list) and v.get("methods", ["apex"]), f"variants.{name}.methods",
             "must be a non-empty list of balance methods")
        need(isinstance(v.get("set", []), list) and all(isinstance(s, str) and "=" in s for s in v.get("set", [])),
             f"variants.{name}.set", "must be a list of key=value overrides")
    return {"config": spec["config"], "seeds": seeds, "common": common,
            "variants": {str(k): {"methods": list(v.get("methods", ["apex"])), "set": list(v.get("set", []))}
                         for k, v in variants.items()}}


def jobs_of(spec: dict) -> list[tuple[str, str, int]]:
    """(variant, method, seed), seeds innermost last so that a cut-off sweep has whole seeds of every variant."""
    return [(v, m, s) for s in spec["seeds"] for v, d in spec["variants"].items() for m in d["methods"]]


def sets_of(spec: dict, variant: str) -> list[str]:
    return spec["common"] + spec["variants"][variant]["set"]


def run_sweep(spec: dict, out: Path, jobs: int, threads: int, device: str, budget_s: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes CUDA whenever it sees it
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    todo, running, status = jobs_of(spec), {}, {}
    deadline = time.monotonic() + budget_s
    while todo or running:
        while todo and len(running) < jobs and time.monotonic() < deadline:
            v, m, s = todo.pop(0)
            folder = out / v
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "bench.tiny_demo", "--config", spec["config"], "--methods", m, "--seeds", str(s),
                   "--out", str(folder), "--results", str(folder / f"_results_{m}_seed{s}"), "--reuse"]
            for kv in sets_of(spec, v):
                cmd += ["--set", kv]
            log = (folder / f"{m}_seed{s}.log").open("w")
            running[(v, m, s)] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log,
                                  time.monotonic())
        if not running and todo:  # budget spent before these started
            for key in todo:
                status[key] = "skipped (budget)"
            todo = []
        for key, (p, log, t0) in list(running.items()):
            if p.poll() is not None:
                status[key] = "ok" if p.returncode == 0 else f"failed (exit {p.returncode}, see {key[0]}/{key[1]}_seed{key[2]}.log)"
            elif time.monotonic() > deadline:
                p.kill()
                p.wait()
                status[key] = "stopped (budget)"
            else:
                continue
            log.close()
            del running[key]
            print(f"{key[0]} {key[1]} seed {key[2]}: {status[key]} ({time.monotonic() - t0:.0f} s)", flush=True)
        time.sleep(1)
    return {f"{v}/{m}/seed{s}": st for (v, m, s), st in status.items()}


def batch_trend(output_dir: str, names: list[str]) -> dict:
    """Per objective: the training batch mean reward (SDE rollouts) over the last quarter of the epochs
    minus the first quarter: what the policy learned on its own samples, next to the ODE eval change."""
    path = Path(output_dir) / "metrics.csv"
    rows = list(csv.DictReader(path.open())) if path.is_file() else []  # a run folder moved away: NaN
    out = {}
    for n in names:
        v = [float(r[f"reward/{n}/mean"]) for r in rows if r.get(f"reward/{n}/mean") not in (None, "")]
        q = len(v) // 4
        out[n] = float(np.mean(v[-q:]) - np.mean(v[:q])) if q else float("nan")
    return out


def collect(spec: dict, out: Path) -> dict:
    """Per variant and method: tiny_demo's summary over the seeds whose run finished with these settings."""
    res = {}
    for v, d in spec["variants"].items():
        res[v] = {"set": d["set"]}
        for m in d["methods"]:
            runs = []
            for s in spec["seeds"]:
                f = out / v / f"{m}_seed{s}" / "bench_run.json"
                if f.is_file():
                    prev = json.loads(f.read_text())
                    if prev.get("sets") == sets_of(spec, v) and prev.get("config") == spec["config"]:
                        runs.append(prev["result"])
            if runs:
                summ = summarize({m: runs})[m]
                trends = [batch_trend(r["output_dir"], list(summ)) for r in runs]  # one metrics.csv read per run
                for n, o in summ.items():  # mean over seeds of the batch trend
                    o["batch_trend"] = float(np.mean([t[n] for t in trends]))
                res[v][m] = {"seeds_finished": len(runs), "objectives": summ,
                             "raised_beyond_ci": sum(bool(o["raised_beyond_ci"]) for o in summ.values()),
                             "seconds_mean": round(sum(r["seconds"] for r in runs) / len(runs), 1)}
    return res


def table(res: dict) -> str:
    names = next((list(d[m]["objectives"]) for d in res.values() for m in d if m != "set"), [])
    head = "| variant | method | seeds | " + " | ".join(f"{n}: change, 95% CI" for n in names) + " | raised beyond CI | s/run |"
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for v, d in res.items():
        for m, r in d.items():
            if m == "set":
                continue
            cells = [f"{o['change_mean']:+.4f} ± {o['change_ci95']:.4f}{' *' if o['raised_beyond_ci'] else ''} "
                     f"(batch {o.get('batch_trend', float('nan')):+.3f})" for o in r["objectives"].values()]
            lines.append(f"| {v} | {m} | {r['seeds_finished']} | " + " | ".join(cells) +
                         f" | {r['raised_beyond_ci']}/{len(cells)} | {r['seconds_mean']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--budget-s", type=float, default=3600, help="no run starts after this, running ones are stopped")
    ap.add_argument("--out", default="outputs/demo_sweep")
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--name", default=None, help="results file stem (default: demo_sweep_<spec stem>)")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec)
    out = Path(args.out)
    t0 = time.time()
    status = run_sweep(spec, out, args.jobs, args.threads, args.device, args.budget_s)
    res = collect(spec, out)
    import torch

    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    cmd = "python -m bench.demo_sweep " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": cmd, "device": dev, "torch": torch.__version__, "spec": spec, "wall_s": round(time.time() - t0),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    tab = table(res)
    name = args.name or f"demo_sweep_{Path(args.spec).stem}"
    rdir = Path(args.results)
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / f"{name}.json").write_text(json.dumps({"meta": meta, "status": status, "results": res}, indent=1) + "\n")
    (rdir / f"{name}.md").write_text(f"`{cmd}` ({dev}, torch {meta['torch']}, {meta['date']}, {meta['wall_s']} s; "
                                     f"config {spec['config']}, common {spec['common']}; eval change end - start "
                                     f"(ODE, held-out prompts), * = raised beyond the 95% interval; batch: the "
                                     f"training batch mean (SDE), last quarter of epochs - first)\n\n{tab}\n")
    print("\n" + tab)
    return res


if __name__ == "__main__":
    main()
