"""The prepared GPU check: every CUDA path and every GPU number of the README in one command.

    bash bench/gpu_suite.sh                  # on the GPU machine: the whole check, within --budget-s (470 s)
    python -m bench gpu                      # the same
    python -m bench gpu --cpu-dry-run        # the same script on CPU: tiny sizes, Triton interpreted (CI runs it)
    bash bench/gpu_suite.sh --download-wheels   # HERE, before the device call: the wheels it carries

bench/gpu_suite.sh's header has the wheel list, the download command and the exact device call.

Parts, in order, each in its own process with a time bound (its cap, cut so that the parts after it
keep their reserve inside the total budget; a part out of time is killed and recorded as such):

  setup      install the carried wheels (.gpu_wheels/*.whl: diffusers, rapidocr, ...) into a private
             folder with pip --no-index (no network), check the imports, build the C++/CUDA extension
             apex_fast._C in place against this machine's torch (python setup.py build_ext --inplace)
  ops_tests  tests/test_ops.py with APEX_FAST_TEST_DEVICE=cuda: Triton compiled and the extension's
             CUDA kernel against the torch reference, fp32/bf16/fp16/fp64, odd shapes
  ops_bench  python -m bench ops --preset gpu: group norm N = 1152, 9216 (K = 4); Gram + combine over
             SD3.5-Medium's LoRA r = 32 as per-parameter tensors and at P = 2^24..2^28; vs eager and
             torch.compile; bandwidth against the copy bandwidth measured in the same run
  grad       python -m bench grad (the trainer-parts issue): one GRPO step (K = 4, bf16) of an
             SD3.5-Medium-architecture transformer with random weights, LoRA r = 32, 512 px latents,
             CFG: single-objective step, one_backward, k_backward, peak memory. Recorded as "not
             available (bench grad missing)" while bench/grad.py does not exist.
  train      one epoch of the tiny model end to end (python -m apex_fast.train, configs/tiny_cpu.yaml,
             its four rewards) on CUDA, with the peak CUDA memory

Results (--results-dir, default bench/results; the dry run writes to outputs/gpu_suite_dry_run/):
ops_<dev>.json/.png, ops_tests_<dev>.json, grad_<dev>.json, train_tiny_<dev>.json, each with the
device name, versions and command, and the summary gpu_suite_<dev>.json + gpu_suite_<dev>.md (printed
at the end, with the issue's goals marked met / missed / not measured). <dev> is h100, h200, ... from
the CUDA device name (cpu in the dry run). Logs: outputs/gpu_suite_<dev>/logs/. --archive PATH packs
results and logs into one .tar.gz (the device tool returns at most 8 files).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# The packages the GPU machine lacks (it has torch+CUDA, triton, transformers, peft, accelerate,
# safetensors, onnxruntime, opencv-python-headless, pytest, pytest-xdist, ...; see the device README),
# at the versions this project is tested with. Keep bench/gpu_suite.sh's header in step (a test checks).
WHEELS = [
    ("diffusers==0.42.1", "SD3 transformer, VAE, scheduler, pipeline"),
    ("rapidocr-onnxruntime==1.4.4", "OCR reward of the tiny config (ONNX weights inside the wheel)"),
    ("pyclipper==1.4.0", "rapidocr dependency (binary, cp312)"),
    ("shapely==2.2.0", "rapidocr dependency (binary, cp312)"),
    ("rapidfuzz==3.14.6", "OCR reward's Levenshtein distance (binary, cp312)"),
    ("torchjd==0.18.0", "bench ops: torchjd MGDA provider"),
]
WHEEL_DIR = ".gpu_wheels"
DEVICE_PYTHON = "3.12"  # the GPU machine's python3 (device KINDS.md, 2026-11); setup checks and reports it
# pip download flags for the GPU machine's CPython on x86-64 (pip matches the manylinux N exactly)
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                   "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]

DEFAULT_BUDGET_S = 470  # 8 minutes on an H100 minus the archive and slack
DRY_BUDGET_S = 720


@dataclass
class Part:
    name: str
    cap_s: float  # at most this long on the GPU
    reserve_s: float  # kept free for it by the parts before it
    dry_cap_s: float  # at most this long in the CPU dry run


# GPU caps sum to more than the budget on purpose: a part that ends early leaves its time to the next.
# Dry-run caps only stop a hang (CI machines are slow and shared); it takes ~40 s of CPU time.
PARTS = [
    Part("setup", 150, 60, 120),
    Part("ops_tests", 100, 45, 150),
    Part("ops_bench", 170, 80, 150),
    Part("grad", 150, 60, 150),
    Part("train", 75, 40, 150),
]


def wheel_download_command(dest=WHEEL_DIR):
    """The pip command that fetches WHEELS for the GPU machine (run HERE, where the network is)."""
    cmd = [PY, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
           "--implementation", "cp"]
    for p in WHEEL_PLATFORMS:
        cmd += ["--platform", p]
    return cmd + ["-d", str(dest)] + [w for w, _ in WHEELS]


def _wheel_file(spec, folder):
    """The wheel in ``folder`` for 'name==version', or None."""
    name, ver = spec.split("==")
    norm = re.sub(r"[-_.]+", "_", name).lower()
    for f in sorted(Path(folder).glob("*.whl")):
        parts = f.name.split("-")
        if len(parts) >= 2 and re.sub(r"[-_.]+", "_", parts[0]).lower() == norm and parts[1] == ver:
            return f
    return None


# ---------------------------------------------------------------------------------------------------
# running one part


class Clock:
    """The total budget: a part's bound is its cap, cut so the parts after it keep their reserves."""

    def __init__(self, budget_s, parts, dry):
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.parts = parts
        self.dry = dry

    def elapsed(self):
        return time.monotonic() - self.t0

    def bound(self, name):
        names = [p.name for p in self.parts]
        i = names.index(name)
        later = sum(p.reserve_s for p in self.parts[i + 1:])
        part = self.parts[i]
        cap = part.dry_cap_s if self.dry else part.cap_s
        return min(cap, self.budget_s - self.elapsed() - later)


def run_cmd(cmd, *, env, timeout_s, log, cwd=ROOT):
    """Run cmd with its output appended to ``log``; kill its whole process group at timeout_s.
    Returns {rc, wall_s, timed_out}."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(str(c) for c in cmd)}\n")
        f.flush()
        if timeout_s <= 0:
            f.write("not started: no time left in the budget\n")
            return {"rc": None, "wall_s": 0.0, "timed_out": True}
        p = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the process group this call started
            rc = p.wait()
            timed_out = True
            f.write(f"\nKILLED: over its time bound of {timeout_s:.0f} s\n")
    return {"rc": rc, "wall_s": round(time.monotonic() - t0, 2), "timed_out": timed_out}


def tail(path, n=25):
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _status(r):
    if r["timed_out"]:
        return "timeout"
    return "ok" if r["rc"] == 0 else "failed"


def write_json(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------
# what machine this is (in a child: the parent never touches CUDA, so children get the whole card)

PROBE = r"""
import json, platform, subprocess, sys
from importlib.metadata import version
out = {"python": platform.python_version(), "python_executable": sys.executable}
for m in ("torch", "triton", "diffusers", "transformers", "peft", "accelerate", "numpy", "safetensors",
          "rapidocr-onnxruntime", "rapidfuzz", "onnxruntime", "torchjd", "pytest", "pytest-xdist"):
    try:
        out[m] = version(m)
    except Exception:
        out[m] = None
import torch
dev = torch.device(sys.argv[1])
out["cuda_runtime"] = torch.version.cuda
if dev.type == "cuda":
    if not torch.cuda.is_available():
        print("PROBE" + json.dumps({"error": f"torch {torch.__version__} sees no CUDA device"})); sys.exit(0)
    p = torch.cuda.get_device_properties(dev)
    out.update(gpu_memory_GiB=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
               multiprocessors=p.multi_processor_count)
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        out["driver"] = f"nvidia-smi failed: {e}"
try:
    from bench.ops import device_name, device_slug
    out["device"] = device_name(dev); out["device_slug"] = device_slug(dev)
except Exception as e:
    out["device"] = str(dev); out["device_slug"] = dev.type; out["probe_error"] = repr(e)
try:
    out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
except Exception:
    out["git"] = None
import hashlib, pathlib
h = hashlib.sha256()  # the device's copy of the tree has no .git: a hash of the sources says which tree ran
for f in sorted(p for d in ("apex_fast", "bench", "kernel_src", "csrc", "tests", "configs") for p in pathlib.Path(d).rglob("*")
                if p.suffix in (".py", ".cpp", ".cu", ".h", ".yaml", ".json", ".sh") and "results" not in p.parts):
    h.update(str(f).encode()); h.update(f.read_bytes())
out["source_sha256"] = h.hexdigest()[:16]
try:
    from apex_fast import ops
    out["backends"] = ops.available_backends()
except Exception as e:
    out["backends"] = {"error": repr(e)}
print("PROBE" + json.dumps(out))
"""


def probe(device, env, log, timeout_s=90):
    """Device name, slug, versions and available op backends, read in a child process."""
    r = run_cmd([PY, "-c", PROBE, device], env=env, timeout_s=timeout_s, log=log)
    for line in reversed(tail(log, 200)):
        if line.startswith("PROBE"):
            return json.loads(line[5:])
    return {"error": f"probe failed (rc {r['rc']}, timed out {r['timed_out']}); see {log}"}


# ---------------------------------------------------------------------------------------------------
# reading results


def parse_junit(path):
    """Counts, failures (name + first line of the message) and skip reasons of a pytest junit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skips = [], {}
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name')}"
        for tag in ("failure", "error"):
            el = tc.find(tag)
            if el is not None:
                failed.append(f"{name}: {(el.get('message') or '').splitlines()[0][:200] if el.get('message') else tag}")
        el = tc.find("skipped")
        if el is not None:
            why = (el.get("message") or "")[:160]
            skips[why] = skips.get(why, 0) + 1
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return {"counts": n, "failed": failed[:50], "skip_reasons": skips}


def parse_pytest_log(path):
    """Counts from ``pytest -v`` lines (``... PASSED``, ``[gw1] FAILED ...``) of a run cut short."""
    n = {"passed": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for line in tail(path, 100000):
        m = re.search(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", line)
        if not m or "::" not in line:
            continue
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failures", "ERROR": "errors"}.get(m.group(1), "skipped")
        n[key] += 1
        if key in ("failures", "errors"):
            failed.append(line.strip()[:200])
    n["tests"] = sum(n.values())
    return {"counts": n, "failed": failed[:50], "note": "counted from the log: the run ended before its junit report"}


def _t(r):
    return r.get("min_s") if isinstance(r, dict) else None


def summarize_ops(d):
    """The numbers the README and the issue's goals need, from bench/ops.py's JSON."""
    s = {"copy_GBps": d.get("bandwidth", {}).get("copy_GBps"), "read_GBps": d.get("bandwidth", {}).get("read_GBps"),
         "groupnorm": [], "gram": []}
    for row in d.get("groupnorm", []):
        p = row["providers"]
        s["groupnorm"].append({"N": row["N"], "K": row["K"], "ours_s": _t(p.get("ours")),
                               "eager_s": _t(p.get("torch_reference")), "compile_s": _t(p.get("torch_compile")),
                               "beats_eager_and_compile": p.get("ours", {}).get("beats_eager_and_compile")})
    rows = []
    if "gram_list" in d:
        gl = d["gram_list"]
        rows.append((gl["layout"], gl["P"], gl["providers"], ("eager_cat", "eager_per_block")))
    for row in d.get("gram", []):
        rows.append((f"one tensor [4, 2^{row['log2P']}]", row["P"], row["providers"], ("eager",)))
    for label, P, p, eagers in rows:
        ours = p.get("ours", {})
        te = [_t(p.get(e)) for e in eagers if _t(p.get(e)) is not None]
        s["gram"].append({"layout": label, "P": P, "ours_s": _t(ours), "eager_s": min(te) if te else None,
                          "compile_s": _t(p.get("torch_compile")),
                          "frac_of_copy_bw": ours.get("frac_of_copy_bw_total"),
                          "beats_eager_and_compile": ours.get("beats_eager_and_compile"),
                          "error": ours.get("error")})
    return s


def summarize_grad(d):
    """Ratios (each over the single-objective step, as bench grad defines them), step times and peak
    memory: the numeric leaves whose names say so."""
    s = {}

    def walk(x, prefix):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{prefix}{k}/" if prefix or isinstance(v, dict) else f"{k}/")
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            key = prefix.rstrip("/")
            if re.search(r"ratio|peak|memory|second|_s$|_ms$|_MiB$", key, re.I) and len(s) < 60:
                s[key] = x

    walk({k: v for k, v in d.items() if k not in ("suite", "versions", "env", "meta")}, "")
    return s


# ---------------------------------------------------------------------------------------------------
# the suite


class Suite:
    def __init__(self, args):
        self.args = args
        self.dry = args.cpu_dry_run
        self.device = args.device or ("cpu" if self.dry else "cuda")
        self.results = Path(args.results_dir or (ROOT / ("outputs/gpu_suite_dry_run" if self.dry else "bench/results")))
        self.work = Path(args.work_dir or (ROOT / "outputs" / ("gpu_suite_dry_run" if self.dry else "gpu_suite")))
        self.logs = self.work / "logs"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        if self.dry:
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.info = {}
        self.slug = "cpu" if self.device == "cpu" else "cuda"
        self.parts = [p for p in PARTS if p.name in args.only.split(",")]
        self.clock = Clock(args.budget_s, self.parts, self.dry)
        self.report = {}
        self.written = []  # result files of this run (for the archive and the summary)

    def header(self):
        """Device name, versions and command: every result file of this run carries them."""
        keys = ("device", "device_slug", "capability", "gpu_memory_GiB", "driver", "python", "torch", "cuda_runtime",
                "triton", "diffusers", "transformers", "peft", "accelerate", "numpy", "git", "source_sha256", "backends")
        return {"device": self.info.get("device", self.device), "device_type": self.device,
                "versions": {k: self.info.get(k) for k in keys if k not in ("device", "device_slug", "backends")},
                "backends": self.info.get("backends"), "suite_command": self.command, "dry_run": self.dry,
                "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    @property
    def command(self):
        return " ".join([Path(PY).name, "-m", "bench", "gpu"] + sys.argv[1:])

    def log(self, name):
        return self.logs / f"{name}.log"

    def result_path(self, stem):
        return self.results / f"{stem}_{self.slug}.json"

    def note_written(self, path):
        path = Path(path)
        if path.exists() and path not in self.written:
            self.written.append(path)

    # -- setup ------------------------------------------------------------------------------------

    def part_setup(self, bound):
        t_end = time.monotonic() + bound
        left = lambda: t_end - time.monotonic()  # noqa: E731
        out = {"steps": {}}
        wdir = (ROOT / self.args.wheel_dir).resolve()
        found = {spec: _wheel_file(spec, wdir) for spec, _ in WHEELS}
        missing = [s for s, f in found.items() if f is None]
        files = [f for f in found.values() if f is not None]
        st = {"wheel_dir": str(wdir), "missing": missing, "present": [f.name for f in files]}
        if self.dry:
            st.update(status="skipped", note="dry run: this venv has the packages; the carried list was only checked")
        elif not files:
            st.update(status="failed", note=f"no wheels in {wdir}: run `bash bench/gpu_suite.sh --download-wheels` "
                                            "where the network is and carry the folder (see the script's header)")
        else:
            site = Path(self.args.site_dir)
            pip = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                   "--upgrade", "--target", str(site)]
            r = run_cmd(pip + files, env=self.env, timeout_s=min(90, left()), log=self.log("setup"))
            failed = []
            if r["rc"] != 0 and not r["timed_out"]:  # e.g. a cp312 wheel on another python: install one by one
                for f in files:
                    if run_cmd(pip + [f], env=self.env, timeout_s=min(30, left()), log=self.log("setup"))["rc"] != 0:
                        failed.append(f.name)
            st.update(r, status="ok" if not missing and not failed and not r["timed_out"] else "partial",
                      site=str(site), failed=failed)
            # carried packages first, the project next, the machine's own after
            self.env["PYTHONPATH"] = os.pathsep.join([str(site), self.env["PYTHONPATH"]])
        out["steps"]["wheels"] = st
        self.info = probe(self.device, self.env, self.log("setup"), timeout_s=max(1, min(90, left())))
        if "error" in self.info:
            out["steps"]["probe"] = {"status": "failed", "error": self.info["error"]}
            out["status"] = "failed"
            return out
        self.slug = self.info.get("device_slug", self.slug)
        if self.info.get("python", "").rsplit(".", 1)[0] != DEVICE_PYTHON and not self.dry:
            out["steps"]["wheels"]["python_mismatch"] = (
                f"the carried binary wheels are for CPython {DEVICE_PYTHON}, this is {self.info.get('python')}: "
                f"set DEVICE_PYTHON in bench/gpu.py to it and download again")
        imports = {m: self.info.get(m) for m in ("diffusers", "rapidocr-onnxruntime", "rapidfuzz", "peft",
                                                 "transformers", "triton", "torchjd")}
        out["steps"]["probe"] = {"status": "ok", "versions": imports,
                                 "not_importable": [m for m, v in imports.items() if v is None]}
        # the extension, against this machine's torch (CUDA kernels where torch has CUDA and nvcc exists)
        if self.dry and not self.args.build_ext:
            out["steps"]["build_ext"] = {"status": "skipped", "note": "dry run: uses the extension built here "
                                         "(--build-ext to rebuild it)"}
        else:
            benv = dict(self.env, APEX_FAST_REQUIRE_EXT="1", MAX_JOBS=str(os.cpu_count() or 4))
            if self.info.get("capability"):
                benv["TORCH_CUDA_ARCH_LIST"] = self.info["capability"]
            r = run_cmd([PY, "setup.py", "build_ext", "--inplace"], env=benv, timeout_s=left() - 15,
                        log=self.log("setup"))
            out["steps"]["build_ext"] = dict(r, status=_status(r))
            self.info = probe(self.device, self.env, self.log("setup"), timeout_s=max(1, min(60, left())))
        b = self.info.get("backends") or {}
        out["backends"] = b
        need_cuda = self.device != "cpu"
        ext_ok = bool(b.get("cpp")) and (bool(b.get("cpp_cuda")) or not need_cuda)
        out["steps"]["extension_loads"] = {"status": "ok" if ext_ok else "failed", "backends": b}
        bad = [k for k, v in out["steps"].items() if v.get("status") in ("failed", "timeout")]
        out["status"] = "failed" if bad else "ok"
        if bad:
            out["note"] = "failed steps: " + ", ".join(bad)
        return out

    # -- ops tests --------------------------------------------------------------------------------

    # the dry run's share of tests/test_ops.py (the whole module takes ~2 CPU-minutes): every backend,
    # Triton interpreted, on a few shapes
    DRY_TESTS = ("(group_normalize_matches and 257-4-40) or edge_cases or (dual_stage_matches and 50-3-7) or "
                 "(gram_cosine_combine and K4_many and dtype0) or (weighted_grads and 64-32-16-4 and dtype1) or bad_input")

    def part_ops_tests(self, bound):
        junit = self.logs / "ops_tests_junit.xml"
        junit.unlink(missing_ok=True)
        # -v: one line per test, so a run killed at its bound still tells what passed (no junit then)
        cmd = [PY, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "tests/test_ops.py", f"--junitxml={junit}"]
        env = dict(self.env, APEX_FAST_TEST_DEVICE="cpu" if self.device == "cpu" else "cuda")
        if self.dry:
            cmd += ["-k", self.DRY_TESTS]
        elif self.info.get("pytest-xdist"):
            cmd += ["-n", "4"]  # Triton compiles kernels per process: 4 workers share the card
        r = run_cmd(cmd, env=env, timeout_s=bound, log=self.log("ops_tests"))
        out = dict(r, status=_status(r), command=shlex.join(cmd), env={"APEX_FAST_TEST_DEVICE": env["APEX_FAST_TEST_DEVICE"]})
        if junit.exists():
            out.update(parse_junit(junit))
        else:
            out.update(parse_pytest_log(self.log("ops_tests")))
        if r["rc"] == 5:  # pytest: no tests collected
            out["status"] = "failed"
        res = dict(self.header(), part="ops_tests", **out)
        path = self.result_path("ops_tests")
        write_json(res, path)
        self.note_written(path)
        return out

    # -- ops benchmark ----------------------------------------------------------------------------

    def part_ops_bench(self, bound):
        path = self.result_path("ops")
        cmd = [PY, "-m", "bench", "ops", "--device", self.device, "--out", str(path)]
        env = dict(self.env)
        if self.dry:
            # the GPU preset's code paths at tiny sizes, torch.compile traced but not compiled; "ours" is
            # the CPU dispatch (the interpreted Triton kernels take seconds a call: ops_tests checks them)
            cmd += ["--preset", "tiny", "--compile-backend", "eager", "--time-scale", "0.01"]
        else:
            cmd += ["--preset", "gpu"]
        r = run_cmd(cmd, env=env, timeout_s=bound, log=self.log("ops_bench"))
        out = dict(r, status=_status(r), command=shlex.join(cmd), result=str(path))
        if path.exists():
            self.note_written(path)
            self.note_written(path.with_suffix(".png"))
            try:
                data = json.loads(path.read_text())
                data["suite"] = self.header()  # the JSON has its own command and versions; add the suite's
                write_json(data, path)
                out["summary"] = summarize_ops(data)
            except (OSError, ValueError) as e:
                out["summary"] = {"error": repr(e)}
        elif out["status"] == "ok":
            out.update(status="failed", note=f"{path} was not written")
        return out


    # -- GRPO step of SD3.5-Medium (python -m bench grad, from the trainer-parts issue) -----------

    def grad_command(self, path, base=None):
        """``python -m bench grad`` (or ``base``) with this run's device, dtype, model preset, K = 4 and
        output, read off its --help, so this suite needs no edit when bench/grad.py lands;
        APEX_FAST_GPU_GRAD_ARGS replaces the detected arguments. Returns (command, error)."""
        base = base or [PY, "-m", "bench", "grad"]
        if os.environ.get("APEX_FAST_GPU_GRAD_ARGS"):
            return base + shlex.split(os.environ["APEX_FAST_GPU_GRAD_ARGS"]), None
        h = subprocess.run(base + ["--help"], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120)
        text = h.stdout + h.stderr
        if h.returncode != 0:
            return None, f"`python -m bench grad --help` failed (rc {h.returncode}): {text.strip()[-300:]}"
        opts = set(re.findall(r"(--[A-Za-z0-9][A-Za-z0-9_-]*)", text))

        def choices(opt):
            m = re.search(re.escape(opt) + r"[ =]\{([^}]*)\}", text)
            return [c.strip() for c in m.group(1).split(",")] if m else []

        def pick(opt, patterns, default):
            ch = choices(opt)
            for pat in patterns:
                for c in ch:
                    if re.search(pat, c, re.I):
                        return c
            return default if not ch else None

        args = []
        if "--device" in opts:
            args += ["--device", self.device]
        if "--dtype" in opts:
            v = pick("--dtype", ["fp32|float32"] if self.dry else ["^bf16$", "bfloat16"], "fp32" if self.dry else "bf16")
            if v:
                args += ["--dtype", v]
        for opt in ("--model", "--model-preset", "--preset", "--arch", "--transformer"):
            if opt in opts:
                v = pick(opt, ["tiny"] if self.dry else [r"sd3\.?5.?m", "medium", "sd35"], None)
                if v:
                    args += [opt, v]
                break
        for opt in ("--K", "--k", "--objectives", "--num-objectives"):
            if opt in opts:
                args += [opt, "4"]
                break
        # fewer timed steps than its defaults, to fit the budget: a bf16 SD3.5-Medium step is about a
        # second, so 3 repeats of every mode after 1 warm-up take about a minute; the dry run checks the
        # code path only (and skips per-mode memory processes)
        for opt in ("--repeats", "--reps", "--iters", "--steps"):
            if opt in opts:
                args += [opt, "1" if self.dry else "3"]
                break
        if "--warmup" in opts:
            args += ["--warmup", "1"]
        if self.dry:
            args += [o for o in ("--quick", "--no-memory") if o in opts]
        if "--out" in opts:
            args += ["--out", str(path)]
        return base + args, None

    def part_grad(self, bound):
        path = self.result_path("grad")
        if not (ROOT / "bench" / "grad.py").exists():
            return {"status": "not available", "note": "not available (bench grad missing): bench/grad.py comes "
                    "with the trainer-parts issue (single-objective step, one_backward, k_backward); this part "
                    "runs it unchanged once it is merged"}
        t0 = time.time()
        try:
            cmd, err = self.grad_command(path)
        except subprocess.TimeoutExpired:
            cmd, err = None, "`python -m bench grad --help` took over 120 s"
        if cmd is None:
            return {"status": "failed", "note": err}
        r = run_cmd(cmd, env=self.env, timeout_s=bound - (time.time() - t0), log=self.log("grad"))
        out = dict(r, status=_status(r), command=shlex.join(cmd), result=str(path))
        if not path.exists():  # no --out option: its default file, if this run wrote one
            fresh = [p for p in (ROOT / "bench" / "results").glob("grad_*.json") if p.stat().st_mtime >= t0]
            if fresh:
                data = json.loads(max(fresh, key=lambda p: p.stat().st_mtime).read_text())
                write_json(data, path)
        if path.exists():
            data = json.loads(path.read_text())
            data["suite"] = self.header()
            write_json(data, path)
            self.note_written(path)
            out["summary"] = summarize_grad(data)
        elif out["status"] == "ok":
            out.update(status="failed", note="bench grad wrote no grad_*.json")
        return out

    # -- one tiny-model training epoch ------------------------------------------------------------

    def part_train(self, bound):
        path = self.result_path("train_tiny")
        cmd = [PY, "-m", "bench", "gpu", "--part", "train", "--device", self.device, "--out", str(path),
               "--work-dir", str(self.work / "train_tiny")]
        if self.dry:
            cmd += ["--tiny-train"]
        r = run_cmd(cmd, env=self.env, timeout_s=bound, log=self.log("train"))
        out = dict(r, status=_status(r), command=shlex.join(cmd), result=str(path))
        if path.exists():
            data = json.loads(path.read_text())
            data["suite"] = self.header()
            write_json(data, path)
            self.note_written(path)
            out["summary"] = {k: (round(data[k], 3) if isinstance(data[k], float) else data[k])
                              for k in ("ran_on", "wall_s", "epoch_s", "peak_cuda_MiB", "time/sample", "time/train",
                                        "time/reward") if k in data}
            if data.get("error"):
                out.update(status="failed", note=data["error"])
        elif out["status"] == "ok":
            out.update(status="failed", note=f"{path} was not written")
        return out


# the training run of the train part (in its own process: `python -m bench gpu --part train`)
TRAIN_SETS = ["train.epochs=1", "eval.every=0", "log.progress=false", "checkpoint.every=0"]
# --tiny-train (dry run on a CPU): the same run, smaller
TINY_TRAIN_SETS = ["sample.group_size=4", "sample.prompts_per_epoch=2", "sample.batch_size=8", "sample.num_steps=4",
                   "train.micro_batch_size=4", "eval.num_prompts=2", "eval.num_steps=2", "log.tensorboard=false",
                   "log.plot=false"]


def train_epoch(args):
    """One epoch of configs/tiny_cpu.yaml (its four rewards, start and end evaluation, the final
    checkpoint) through the CLI's main(); records wall time, peak CUDA memory and the epoch's metrics."""
    import shutil

    import torch

    from apex_fast import train

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    sets = TRAIN_SETS + (TINY_TRAIN_SETS if args.tiny_train else [])
    argv = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--output-dir", str(work)]
    for s in sets:
        argv += ["--set", s]
    dev = torch.device(args.device)
    res = {"part": "train", "command": " ".join(["python", "-m", "apex_fast.train"] + argv), "overrides": sets}
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
        torch.cuda.reset_peak_memory_stats()
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes CUDA whenever it sees it
    t0 = time.perf_counter()
    try:
        train.main(argv)
    except BaseException as e:  # noqa: BLE001 - recorded, then re-raised as a failed exit
        res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    if dev.type == "cuda":
        res["peak_cuda_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        res["ran_on"] = "cuda" if torch.cuda.max_memory_allocated() > 0 else "cpu (no CUDA memory was allocated)"
        if not torch.cuda.max_memory_allocated() and "error" not in res:
            res["error"] = "the trainer allocated no CUDA memory: it did not run on the GPU"
    else:
        res["ran_on"] = "cpu"
    metrics = work / "metrics.csv"
    if metrics.exists():
        rows = list(csv.DictReader(metrics.open()))
        last = next((r for r in reversed(rows) if r.get("time/train")), rows[-1] if rows else {})
        for k, v in last.items():
            if v not in ("", None) and (k.startswith(("time/", "reward/")) or k in ("epoch", "grad_norm", "kl",
                                                                               "policy_loss", "clipfrac")):
                res[k] = float(v)
        res["epoch_s"] = sum(res.get(k, 0.0) for k in ("time/sample", "time/reward", "time/train"))
    summary = work / "summary.txt"
    if summary.exists():
        res["summary"] = summary.read_text()
    res["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    res["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    write_json(res, args.out)
    print(json.dumps({k: v for k, v in res.items() if k != "summary"}, indent=1))
    return 1 if "error" in res else 0


# ---------------------------------------------------------------------------------------------------
# goals and summary


def goals(report):
    """The issue's goals, each met / missed / not measured, with the numbers behind it."""
    g = {}
    ops_s = report.get("ops_bench", {}).get("summary") or {}
    gn = [r for r in ops_s.get("groupnorm", []) if r.get("ours_s")]
    g["group normalization faster than eager and torch.compile (N = 1152, 9216)"] = (
        {"status": "met" if all(r["beats_eager_and_compile"] for r in gn) else "missed",
         "by_N": {r["N"]: r["beats_eager_and_compile"] for r in gn}} if gn else {"status": "not measured"})
    gr = [r for r in ops_s.get("gram", []) if r.get("ours_s")]
    if gr:
        bw_ok = all((r.get("frac_of_copy_bw") or 0) >= 0.85 for r in gr)
        fast = all(r.get("beats_eager_and_compile") for r in gr)
        g["Gram + combine >= 85% of copy bandwidth at every size"] = {
            "status": "met" if bw_ok else "missed",
            "by_size": {r["layout"]: round(r["frac_of_copy_bw"] or 0, 3) for r in gr}}
        g["Gram + combine faster than eager and torch.compile at every size"] = {
            "status": "met" if fast else "missed", "by_size": {r["layout"]: r["beats_eager_and_compile"] for r in gr}}
    else:
        g["Gram + combine >= 85% of copy bandwidth at every size"] = {"status": "not measured"}
        g["Gram + combine faster than eager and torch.compile at every size"] = {"status": "not measured"}
    gs = report.get("grad", {}).get("summary") or {}
    r1 = next((v for k, v in gs.items() if k == "ratio_one_backward"), None)
    g["one_backward within 1.15x of the single-objective step"] = (
        {"status": "met" if r1 <= 1.15 else "missed", "ratio_one_backward": r1} if r1 is not None
        else {"status": "not measured", "why": report.get("grad", {}).get("note") or report.get("grad", {}).get("status")})
    return g


def _ms(s):
    return "-" if s is None else (f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms")


def _x(a, b):
    return "-" if a is None or b is None else f"{b / a:.2f}x"


def summary_markdown(sm):
    h = sm["header"]
    v = h["versions"]
    lines = [f"# GPU suite on {h['device']}" + (" (CPU DRY RUN: tiny sizes, numbers mean nothing)" if sm["dry_run"] else ""),
             "", f"`{sm['command']}`, {h['time']}; torch {v.get('torch')} (CUDA {v.get('cuda_runtime')}), triton "
             f"{v.get('triton')}, diffusers {v.get('diffusers')}, transformers {v.get('transformers')}, peft {v.get('peft')}, "
             f"python {v.get('python')}, driver {v.get('driver')}, git {v.get('git')}; total {sm['wall_s']:.0f} s "
             f"of a {sm['budget_s']:.0f} s budget", "",
             "| part | status | wall | bound | note |", "|---|---|---|---|---|"]
    for name, r in sm["parts"].items():
        note = r.get("note") or ""
        if name == "ops_tests" and "counts" in r:
            c = r["counts"]
            note = f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped " + note
        lines.append(f"| {name} | {r.get('status')} | {r.get('wall_s', 0):.0f} s | {r.get('bound_s', 0):.0f} s | {note[:160]} |")
    ops_s = sm["parts"].get("ops_bench", {}).get("summary") or {}
    if ops_s.get("copy_GBps"):
        lines += ["", f"Copy bandwidth measured in the same run: {ops_s['copy_GBps']:.0f} GB/s (read + write); "
                  f"read {ops_s['read_GBps']:.0f} GB/s.", "", "| op | size | ours | eager (x ours) | torch.compile (x ours) | % copy BW |",
                  "|---|---|---|---|---|---|"]
        for r in ops_s["groupnorm"]:
            lines.append(f"| group_normalize | N={r['N']}, K={r['K']} | {_ms(r['ours_s'])} | {_ms(r['eager_s'])} "
                         f"({_x(r['ours_s'], r['eager_s'])}) | {_ms(r['compile_s'])} ({_x(r['ours_s'], r['compile_s'])}) | |")
        for r in ops_s["gram"]:
            bw = "-" if r.get("frac_of_copy_bw") is None else f"{100 * r['frac_of_copy_bw']:.0f}%"
            lines.append(f"| gram + combine, K=4 | {r['layout']}, P={r['P']} | {_ms(r['ours_s'])} | {_ms(r['eager_s'])} "
                         f"({_x(r['ours_s'], r['eager_s'])}) | {_ms(r['compile_s'])} ({_x(r['ours_s'], r['compile_s'])}) | {bw} |")
    gs = sm["parts"].get("grad", {}).get("summary")
    if gs:
        lines += ["", "GRPO step (bench grad): " + ", ".join(f"{k} {v:.4g}" for k, v in gs.items())]
    ts = sm["parts"].get("train", {}).get("summary")
    if ts:
        lines += ["", "Tiny-model epoch: " + ", ".join(f"{k} {v}" for k, v in ts.items() if v is not None)]
    lines += ["", "| goal | status |", "|---|---|"]
    for k, r in sm["goals"].items():
        extra = {kk: vv for kk, vv in r.items() if kk != "status"}
        lines.append(f"| {k} | {r['status']}{' ' + json.dumps(extra) if extra else ''} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# main


def run_suite(args):
    s = Suite(args)
    s.logs.mkdir(parents=True, exist_ok=True)
    for f in s.logs.glob("*"):
        f.unlink()
    print(f"GPU suite{' (CPU dry run)' if s.dry else ''}: parts {', '.join(p.name for p in s.parts)}; "
          f"budget {args.budget_s:.0f} s; logs in {s.logs}", flush=True)
    if "setup" not in [p.name for p in s.parts]:
        if not s.dry and Path(args.site_dir).is_dir():  # wheels installed by an earlier run on this machine
            s.env["PYTHONPATH"] = os.pathsep.join([args.site_dir, s.env["PYTHONPATH"]])
        s.info = probe(s.device, s.env, s.log("setup"))
        s.slug = s.info.get("device_slug", s.slug)
    for part in s.parts:
        bound = s.clock.bound(part.name)
        t0 = time.monotonic()
        print(f"[{s.clock.elapsed():5.0f} s] {part.name} (bound {bound:.0f} s) ...", flush=True)
        if bound < 5:
            r = {"status": "timeout", "note": "not started: no time left in the budget"}
        else:
            try:
                r = getattr(s, f"part_{part.name}")(bound)
            except Exception as e:  # a bug of the suite itself: record it, go on with the next part
                r = {"status": "failed", "note": f"suite error: {type(e).__name__}: {e}"}
        r.setdefault("wall_s", round(time.monotonic() - t0, 2))
        r["bound_s"] = round(bound, 1)
        if r["status"] in ("failed", "timeout"):
            r["log_tail"] = tail(s.log(part.name))
        s.report[part.name] = r
        print(f"[{s.clock.elapsed():5.0f} s] {part.name}: {r['status']} in {r['wall_s']:.0f} s"
              + (f" ({r['note']})" if r.get("note") else ""), flush=True)
        if part.name == "setup" and r["status"] == "failed" and "error" in s.info:
            break  # no interpreter / no device: nothing after it can run
    sm = {"header": s.header(), "command": s.command, "dry_run": s.dry, "budget_s": args.budget_s,
          "wall_s": round(s.clock.elapsed(), 1), "parts": s.report, "goals": goals(s.report),
          "results": [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in s.written],
          "logs": str(s.logs)}
    path = s.result_path("gpu_suite")
    write_json(sm, path)
    md = summary_markdown(sm)
    path.with_suffix(".md").write_text(md)
    s.note_written(path)
    s.note_written(path.with_suffix(".md"))
    if args.archive:
        arch = Path(args.archive)
        arch.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(arch, "w:gz") as tf:
            for p in s.written:
                tf.add(p, arcname=f"results/{p.name}")
            for p in sorted(s.logs.glob("*")):
                tf.add(p, arcname=f"logs/{p.name}")
        print(f"archive: {arch}")
    print("\n" + md)
    print(f"summary: {path} and {path.with_suffix('.md')}")
    bad = [k for k, r in s.report.items() if r["status"] in ("failed", "timeout")]
    return 1 if bad else 0


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same suite on CPU: tiny sizes, Triton interpreted")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --cpu-dry-run)")
    ap.add_argument("--only", default=",".join(p.name for p in PARTS), help="comma list of parts (default: all)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"total wall-time budget of all parts (default {DEFAULT_BUDGET_S}; dry run {DRY_BUDGET_S})")
    ap.add_argument("--results-dir", default=None, help="default bench/results (dry run: outputs/gpu_suite_dry_run)")
    ap.add_argument("--work-dir", default=None, help="logs and training outputs (default outputs/gpu_suite[_dry_run])")
    ap.add_argument("--wheel-dir", default=WHEEL_DIR, help="the carried wheels (default .gpu_wheels)")
    ap.add_argument("--site-dir", default="/tmp/apex_fast_site", help="where the carried wheels are installed")
    ap.add_argument("--build-ext", action="store_true", help="dry run: rebuild the extension too")
    ap.add_argument("--archive", default=None, help="also pack results and logs into this .tar.gz")
    ap.add_argument("--download-wheels", action="store_true",
                    help="fetch the wheels for the GPU machine into --wheel-dir (run where the network is), then exit")
    ap.add_argument("--part", choices=["train"], default=None, help=argparse.SUPPRESS)  # a part's own process
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tiny-train", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    unknown = set(args.only.split(",")) - {p.name for p in PARTS}
    if unknown:
        raise SystemExit(f"--only: unknown part(s) {sorted(unknown)}; choose from {', '.join(p.name for p in PARTS)}")
    if args.device not in (None, "cpu", "cuda") and not str(args.device).startswith("cuda:"):
        raise SystemExit(f"--device {args.device}: use cuda or cpu")
    if args.budget_s is None:
        args.budget_s = DRY_BUDGET_S if args.cpu_dry_run else DEFAULT_BUDGET_S
    if args.part == "train":
        args.device = args.device or "cuda"
        args.work_dir = args.work_dir or str(ROOT / "outputs" / "gpu_suite" / "train_tiny")
        args.out = args.out or str(ROOT / "outputs" / "gpu_suite" / "train_tiny.json")
        return train_epoch(args)
    if args.download_wheels:
        cmd = wheel_download_command(ROOT / args.wheel_dir)
        print("$ " + shlex.join(cmd), flush=True)
        return subprocess.run(cmd, cwd=ROOT, timeout=900).returncode
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
