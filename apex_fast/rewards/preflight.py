"""The configured rewards as keyed scorers, and their check before training.

    scorers = build_scorers(cfg.rewards)           # one scorer per rewards[i], named by its key
    errors = check_scorers(scorers, cfg.rewards, probe_prompts, resolution)   # {key: message}

A reward is one thing keyed by one name: ``rewards[i].name`` is its key (column of R, metrics,
logs, errors, balancer state), ``rewards[i].type`` the scorer that computes it (default: the
name), so two ``remote`` scorers or two OCR engines can run side by side. ``check_scorers`` calls
every scorer once, bounded by its ``timeout_s``, on a small probe batch before the first epoch
(remote scorers first through GET /health, OCR by creating its engine), so a missing dependency
or a server that is down fails in seconds, not after epochs of sampling.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import _REGISTRY, available_scorers, call_bounded, scores_tensor, unknown_scorer_args


class RewardSetupError(ValueError):
    """A reward cannot be built or failed its check; the message names rewards[i], its key and the fix."""


def _where(i: int, spec) -> str:
    t = spec.scorer_type
    return f"rewards[{i}] {spec.name!r}" + (f" (type {t!r})" if t != spec.name else "")


def build_scorers(specs: Sequence) -> list:
    """One scorer per config reward (``RewardSpec``: name, type, args), its ``name`` set to the key."""
    scorers = []
    for i, spec in enumerate(specs):
        t = spec.scorer_type
        if t not in _REGISTRY:
            field = f"rewards[{i}].type" if spec.type else f"rewards[{i}].name"
            raise RewardSetupError(f"{field}: unknown scorer type {t!r}; available: {', '.join(available_scorers())} "
                                   f"(name is the reward's key; set type to one of these when the key differs)")
        bad, valid = unknown_scorer_args(t, spec.args)
        if bad:
            raise RewardSetupError(f"rewards[{i}].args: unknown argument(s) {', '.join(map(repr, bad))} for scorer type "
                                   f"{t!r}; it takes: {', '.join(valid) or 'no arguments'}")
        try:
            scorer = _REGISTRY[t](**spec.args)
        except RewardSetupError:
            raise
        except Exception as e:  # noqa: BLE001 - any constructor failure, with the reward named
            raise RewardSetupError(f"{_where(i, spec)}: could not create the scorer: {type(e).__name__}: {e}") from e
        scorer.name = spec.name
        scorers.append(scorer)
    return scorers


def probe_images(resolution: int, n: int = 2) -> np.ndarray:
    """A fixed small batch [n, res, res, 3] uint8: mid-gray and seeded noise."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, resolution, resolution, 3), dtype=np.uint8)
    imgs[0] = 128
    imgs.setflags(write=False)
    return imgs


def check_scorers(scorers: Sequence, specs: Sequence, prompts: Sequence[tuple[str, dict]],
                  resolution: int) -> dict[str, str]:
    """{key: message} for every scorer that fails its check: ``scorer.check()`` when it has one
    (remote: GET /health; ocr: create the engine), then one scoring call on ``probe_images`` with
    the first prompts. Each call is bounded by the reward's ``timeout_s``. A scorer passes when it
    answers one finite-or-NaN number per image (NaN: legitimately unscorable)."""
    n = 2
    imgs = probe_images(resolution, n)
    items = (list(prompts) * n)[:n] or [("a photo", {})] * n
    ps, metas = [p for p, _ in items], [dict(m) for _, m in items]
    errors = {}
    for i, (scorer, spec) in enumerate(zip(scorers, specs)):
        try:
            if callable(getattr(scorer, "check", None)):
                call_bounded(scorer, scorer.check, spec.timeout_s)
            r = call_bounded(scorer, lambda s=scorer: s(imgs, list(ps), [dict(m) for m in metas]), spec.timeout_s)
            r = scores_tensor(r, n, spec.name)
            if r.isinf().any():
                raise ValueError(f"returned infinite scores {r.tolist()} (a scorer bug: scores must be finite or NaN)")
        except Exception as e:  # noqa: BLE001 - reported with the key and the fix
            errors[spec.name] = (f"{_where(i, spec)} failed its check before training: {type(e).__name__}: {e}. "
                                 f"{_fix(spec)}")
    return errors


def _fix(spec) -> str:
    if spec.scorer_type == "remote":
        return ("Fix: start the scoring server (python -m apex_fast.rewards.server --scorer TYPE --port PORT) and "
                "check rewards[i].args.url, or remove the reward.")
    return ("Fix: install the scorer's dependencies / check its rewards[i].args (model paths), raise "
            "rewards[i].timeout_s if it is only slow, or remove the reward.")
