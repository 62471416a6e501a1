"""Scenario files of the algorithm benchmark (bench/scenarios/*.yaml) and the toy they describe.

A scenario is data: K objectives with their kind and shape, the conflict structure between them, the
preference weights and the run lengths. ``load_scenario(path)`` validates a file and returns a
``Scenario``; every error names the file and the field. ``ToyBatch(scenario, seeds)`` builds the
seeded environments of all seeds at once (tensors with a leading seed dimension), so one call scores
every seed's samples.

Schema (defaults in brackets):

    name: str                      [file stem]
    description: str               [""]
    paper_shaped: bool             [false]  the stricter acceptance criterion applies (bench/algorithm.py)
    seeds: int >= 2                [8]
    epochs: int >= 1               [150]
    prompts_per_epoch: int >= 1    [16]
    group_size: int >= 2           [16]
    weights: [K numbers >= 0]      [equal]  preference weights
    target_corr: number or KdxKd   [0.7]    correlation of the dense objectives' optima across prompts
                                            (Kd = number of dense objectives; a scalar fills the off-diagonal)
    K: int                         [len(objectives)]  checked against the list when given
    objectives: list of
      name: str                    (unique)
      kind: sparse | dense | noise
      scale: number > 0            [1.0]  reward units (what makes a high-variance objective hijack a sum)
      responsiveness: number > 0   [1.0 dense, 6.0 sparse]  how strongly the reward moves with the image
      sparsity: number             [0.3]  sparse: mean difficulty offset (higher: more all-fail groups)
      levels: int >= 1             [20]   sparse: quantisation (characters read)
      spurious: number in [0, 1]   [0.1]  sparse: chance of one spurious character read (recogniser noise)
      jitter: number >= 0          [0.0]  per-sample Gaussian noise on the reading, in reward units / scale
      saturation: number in [0, 1) [0.0]  dense: the reward is flat once the squared distance to the optimum
                                          is below saturation x its initial value (saturates early)

The toy. A prompt is an embedding e in R^8; the policy is a Gaussian over z in R^8 with mean W e + b
and fixed std 0.3 (the SDE noise). Rewards of z:
  sparse  scale * (floor(levels * sigmoid(resp * (a . z - tau(e)))) / levels + spurious read + jitter),
          clipped to [0, scale]; tau(e) = sparsity + 0.8 tanh(2 v . e): some prompts are much harder.
  dense   scale * (-resp * max(|z - t_k(e)|^2 / D, sat floor) + 0.05 mean sin(F_k z + phi_k) + jitter N(0,1)),
          t_k(e) = T_k e + t_k with (T_k) correlated across dense objectives by target_corr and
          a . t_k(e) = 0: no text in the perceptual optimum, so pushing a . z up for a sparse objective
          costs every dense one.
  noise   scale * N(0, 1): no signal at all (excluded from the worst-objective and hypervolume metrics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

D = 8  # latent dims
E = 8  # prompt embedding dims
SIGMA = 0.3  # policy (sampling noise) std
KINDS = ("sparse", "dense", "noise")
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


@dataclass
class Objective:
    name: str
    kind: str
    scale: float = 1.0
    responsiveness: float | None = None
    sparsity: float = 0.3
    levels: int = 20
    spurious: float = 0.1
    jitter: float = 0.0
    saturation: float = 0.0

    @property
    def resp(self) -> float:
        if self.responsiveness is not None:
            return self.responsiveness
        return 6.0 if self.kind == "sparse" else 1.0


@dataclass
class Scenario:
    name: str
    objectives: list[Objective]
    description: str = ""
    paper_shaped: bool = False
    seeds: int = 8
    epochs: int = 150
    prompts_per_epoch: int = 16
    group_size: int = 16
    weights: list[float] | None = None
    target_corr: object = 0.7
    path: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def K(self) -> int:
        return len(self.objectives)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def signal(self) -> list[bool]:
        """Objectives with a real signal (the worst-objective and hypervolume metrics use these)."""
        return [o.kind != "noise" for o in self.objectives]

    @property
    def w(self) -> list[float]:
        w = self.weights if self.weights is not None else [1.0] * self.K
        s = float(sum(w))
        return [float(x) / s for x in w]


class ScenarioError(ValueError):
    pass


_TOP = {"name", "description", "paper_shaped", "seeds", "epochs", "prompts_per_epoch", "group_size", "weights",
        "target_corr", "K", "objectives"}
_OBJ = {"name", "kind", "scale", "responsiveness", "sparsity", "levels", "spurious", "jitter", "saturation"}


def _num(where, key, v, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    ok = not isinstance(v, bool) and isinstance(v, int if integer else (int, float)) and math.isfinite(v)
    what = "an integer" if integer else "a finite number"
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        rng = ""
        if lo is not None or hi is not None:
            lb = "-inf" if lo is None else f"{lo}"
            ub = "inf" if hi is None else f"{hi}"
            rng = f" in {'(' if lo_open or lo is None else '['}{lb}, {ub}{')' if hi_open or hi is None else ']'}"
        raise ScenarioError(f"{where}: {key} must be {what}{rng}, got {v!r}")
    return int(v) if integer else float(v)


def parse_scenario(data: dict, where: str = "scenario") -> Scenario:
    """Validate a scenario mapping (the YAML content); errors name ``where`` and the field."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: the file must be a YAML mapping with an 'objectives' list, got "
                            f"{type(data).__name__}")
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise ScenarioError(f"{where}: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(_TOP))}")
    objs = data.get("objectives")
    if not isinstance(objs, list) or not objs:
        raise ScenarioError(f"{where}: objectives must be a non-empty list of {{name, kind, ...}} mappings, "
                            f"got {objs!r}")
    parsed = []
    for i, o in enumerate(objs):
        w = f"{where}: objectives[{i}]"
        if not isinstance(o, dict):
            raise ScenarioError(f"{w} must be a mapping like {{name: ocr, kind: sparse}}, got {o!r}")
        bad = sorted(set(o) - _OBJ)
        if bad:
            raise ScenarioError(f"{w}: unknown field {bad[0]!r}; known fields: {', '.join(sorted(_OBJ))}")
        name = o.get("name")
        if not isinstance(name, str) or not name:
            raise ScenarioError(f"{w}.name must be a non-empty string, got {name!r}")
        kind = o.get("kind")
        if kind not in KINDS:
            raise ScenarioError(f"{w}.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        ob = Objective(name=name, kind=kind)
        ob.scale = _num(w, "scale", o.get("scale", 1.0), lo=0, lo_open=True)
        if o.get("responsiveness") is not None:
            ob.responsiveness = _num(w, "responsiveness", o["responsiveness"], lo=0, lo_open=True)
        ob.sparsity = _num(w, "sparsity", o.get("sparsity", 0.3))
        ob.levels = _num(w, "levels", o.get("levels", 20), lo=1, integer=True)
        ob.spurious = _num(w, "spurious", o.get("spurious", 0.1), lo=0, hi=1)
        ob.jitter = _num(w, "jitter", o.get("jitter", 0.0), lo=0)
        ob.saturation = _num(w, "saturation", o.get("saturation", 0.0), lo=0, hi=1, hi_open=True)
        if ob.saturation and kind != "dense":
            raise ScenarioError(f"{w}.saturation applies to dense objectives only (this one is {kind})")
        parsed.append(ob)
    names = [o.name for o in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ScenarioError(f"{where}: objectives[*].name must be unique, {dup[0]!r} appears twice")
    sc = Scenario(name=str(data.get("name", where)), objectives=parsed)
    if "K" in data and _num(where, "K", data["K"], lo=1, integer=True) != len(parsed):
        raise ScenarioError(f"{where}: K = {data['K']} but {len(parsed)} objectives are listed")
    sc.description = str(data.get("description", ""))
    pb = data.get("paper_shaped", False)
    if not isinstance(pb, bool):
        raise ScenarioError(f"{where}: paper_shaped must be true or false, got {pb!r}")
    sc.paper_shaped = pb
    sc.seeds = _num(where, "seeds", data.get("seeds", 8), lo=2, integer=True)
    sc.epochs = _num(where, "epochs", data.get("epochs", 150), lo=1, integer=True)
    sc.prompts_per_epoch = _num(where, "prompts_per_epoch", data.get("prompts_per_epoch", 16), lo=1, integer=True)
    sc.group_size = _num(where, "group_size", data.get("group_size", 16), lo=2, integer=True)
    if data.get("weights") is not None:
        ws = data["weights"]
        if not isinstance(ws, list) or len(ws) != len(parsed):
            raise ScenarioError(f"{where}: weights must be a list of {len(parsed)} numbers (one per objective), "
                                f"got {ws!r}")
        sc.weights = [_num(where, f"weights[{i}]", x, lo=0) for i, x in enumerate(ws)]
        if sum(sc.weights) <= 0:
            raise ScenarioError(f"{where}: weights are all zero; give at least one objective a positive weight")
    kd = sum(o.kind == "dense" for o in parsed)
    tc = data.get("target_corr", 0.7)
    if isinstance(tc, list):
        if len(tc) != kd or any(not isinstance(r, list) or len(r) != kd for r in tc):
            raise ScenarioError(f"{where}: target_corr must be a number or a {kd} x {kd} matrix (one row per dense "
                                f"objective), got {tc!r}")
        C = torch.tensor([[_num(where, "target_corr entry", x, lo=-1, hi=1) for x in r] for r in tc],
                         dtype=torch.float64)
    else:
        c = _num(where, "target_corr", tc, lo=-1, hi=1)
        C = torch.full((kd, kd), c, dtype=torch.float64).fill_diagonal_(1.0) if kd else torch.zeros(0, 0)
    if kd:
        if not torch.allclose(C, C.T) or not torch.allclose(C.diagonal(), torch.ones(kd, dtype=torch.float64)):
            raise ScenarioError(f"{where}: target_corr must be symmetric with a unit diagonal")
        if float(torch.linalg.eigvalsh(C).min()) < -1e-9:
            lo = -1.0 / (kd - 1) if kd > 1 else -1.0
            raise ScenarioError(f"{where}: target_corr is not a valid correlation (not positive semidefinite); "
                                f"with {kd} dense objectives a scalar must be >= {lo:.3g}")
    sc.target_corr = C
    return sc


def load_scenario(path) -> Scenario:
    """Read and validate bench/scenarios/<name>.yaml (a bare name is looked up there)."""
    p = Path(path)
    if not p.suffix and not p.exists():
        p = SCENARIO_DIR / f"{p.name}.yaml"
    if not p.is_file():
        avail = ", ".join(sorted(q.stem for q in SCENARIO_DIR.glob("*.yaml")))
        raise ScenarioError(f"scenario file {str(path)!r} not found; shipped scenarios: {avail}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ScenarioError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    sc = parse_scenario(data, where=str(p.name))
    sc.path = str(p)
    if "name" not in (data or {}):
        sc.name = p.stem
    return sc


def shipped_scenarios() -> list[Path]:
    return sorted(SCENARIO_DIR.glob("*.yaml"))


class ToyBatch:
    """The seeded environments of ``seeds`` (one per seed), all tensors [S, ...] float64."""

    def __init__(self, sc: Scenario, seeds: list[int], W0: torch.Tensor, b0: torch.Tensor):
        self.sc = sc
        S = len(seeds)
        dt = torch.float64
        self.train_prompts = torch.empty(S, 64, E, dtype=dt)
        self.eval_prompts = torch.empty(S, 64, E, dtype=dt)
        kinds = [o.kind for o in sc.objectives]
        kd = kinds.count("dense")
        self.a = torch.empty(S, D, dtype=dt)
        self.v = torch.empty(S, E, dtype=dt)
        self.T = torch.zeros(S, max(kd, 1), D, E, dtype=dt)
        self.tb = torch.zeros(S, max(kd, 1), D, dtype=dt)
        self.freq = torch.empty(S, max(kd, 1), 4, D, dtype=dt)
        self.phase = torch.empty(S, max(kd, 1), 4, dtype=dt)
        Lc = torch.linalg.cholesky(sc.target_corr + 1e-9 * torch.eye(kd, dtype=dt)) if kd else None
        for s, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(10_000 + seed)
            self.train_prompts[s] = torch.randn(64, E, generator=g, dtype=dt) / math.sqrt(E) * 2
            self.eval_prompts[s] = torch.randn(64, E, generator=g, dtype=dt) / math.sqrt(E) * 2
            a = torch.randn(D, generator=g, dtype=dt)
            self.a[s] = a / a.norm()
            v = torch.randn(E, generator=g, dtype=dt)
            self.v[s] = v / v.norm()
            if kd:
                G = torch.randn(kd, D, E, generator=g, dtype=dt) * 0.47
                T = torch.einsum("kj,jde->kde", Lc, G)
                tb = torch.randn(kd, D, generator=g, dtype=dt) * 0.5
                # no text in the perceptual optimum: a . t_k(e) = 0 for every prompt
                T = T - self.a[s][None, :, None] * torch.einsum("d,kde->ke", self.a[s], T)[:, None, :]
                tb = tb - self.a[s][None] * (tb @ self.a[s])[:, None]
                self.T[s], self.tb[s] = T, tb
                self.freq[s] = torch.randn(kd, 4, D, generator=g, dtype=dt) * 3.0
                self.phase[s] = torch.rand(kd, 4, generator=g, dtype=dt) * 2 * math.pi
        # saturation floors: saturation x the expected squared distance of the INITIAL policy, per prompt
        self.W0, self.b0 = W0.clone(), b0.clone()
        self.dense_idx = [k for k, kk in enumerate(kinds) if kk == "dense"]

    def _dist2(self, z, e, j):
        t = torch.einsum("sde,sne->snd", self.T[:, j], e) + self.tb[:, j, None]
        return ((z - t) ** 2).mean(-1), t

    def rewards(self, z: torch.Tensor, e: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """z [S, N, D], e [S, N, E] -> R [S, N, K]. gen: scorer noise (None: noiseless, for evaluation)."""
        S, N, _ = z.shape
        cols = []
        j = 0
        for o in self.sc.objectives:
            if o.kind == "sparse":
                tau = o.sparsity + 0.8 * torch.tanh(2 * torch.einsum("sne,se->sn", e, self.v))
                legible = torch.sigmoid(o.resp * (torch.einsum("snd,sd->sn", z, self.a) - tau))
                r = torch.floor(legible * o.levels) / o.levels
                if gen is not None:
                    r = r + (torch.rand(S, N, generator=gen, dtype=z.dtype) < o.spurious).to(z.dtype) / o.levels
                    if o.jitter:
                        r = r + o.jitter * torch.randn(S, N, generator=gen, dtype=z.dtype)
                    r = r.clamp(0.0, 1.0)
                cols.append(o.scale * r)
            elif o.kind == "dense":
                d2, _ = self._dist2(z, e, j)
                if o.saturation:
                    mu0 = torch.einsum("sde,sne->snd", self.W0, e) + self.b0[:, None]
                    d20, _ = self._dist2(mu0, e, j)
                    d2 = torch.maximum(d2, o.saturation * (d20 + SIGMA**2))
                rugged = 0.05 * torch.sin(torch.einsum("sfd,snd->snf", self.freq[:, j], z) + self.phase[:, j, None]).mean(-1)
                r = -o.resp * d2 + rugged
                if gen is not None and o.jitter:
                    r = r + o.jitter * torch.randn(S, N, generator=gen, dtype=z.dtype)
                cols.append(o.scale * r)
                j += 1
            else:  # noise
                if gen is None:
                    cols.append(torch.zeros(S, N, dtype=z.dtype))
                else:
                    cols.append(o.scale * torch.randn(S, N, generator=gen, dtype=z.dtype))
        return torch.stack(cols, -1)
