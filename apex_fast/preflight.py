"""``apex-fast train --dry-run``: check that a config can run, then stop. Every check prints one
line (ok / FAIL with the reason and the fix); all checks run even after a failure, so one dry run
lists every problem.

Checks: prompt files, DeepSpeed JSON, the model (loaded for real: a missing path or an unreachable
hub id fails here, not after an hour), LoRA targets, every scorer (built and run on one image, so a
missing reward model or an unreachable scoring server shows), the output folder (writable; existing
checkpoints and what training will do with them), and the resume checkpoint if one is asked for.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def _report(ok: bool, what: str, detail: str) -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'}  {what}: {detail}", flush=True)
    return ok


def dry_run(cfg, device: str | None = None) -> bool:
    import torch

    how = f"algorithm=dpo, dpo.label={cfg.dpo.label}" if cfg.algorithm == "dpo" else f"balance.method={cfg.balance.method}"
    print(f"dry run of {cfg.log.output_dir} ({how}, {len(cfg.rewards)} rewards)", flush=True)
    good = _report(True, "config", "valid")
    from apex_fast.data import load_prompts

    prompts = []
    for field in ("train_prompts", "eval_prompts"):
        try:
            items = load_prompts(getattr(cfg.data, field), f"data.{field}")
            prompts = prompts or items
            good &= _report(True, f"data.{field}", f"{len(items)} prompts")
        except (FileNotFoundError, ValueError) as e:
            good &= _report(False, f"data.{field}", str(e))
    if cfg.algorithm == "dpo" and cfg.dpo.mode == "offline":
        from apex_fast.dpo import read_pairs

        try:
            recs = read_pairs(cfg.dpo.pairs_file, skip_bad=cfg.dpo.skip_bad_pairs)
            good &= _report(True, "dpo.pairs_file", f"{len(recs)} pairs, {sum(1 for r in recs if r.scores)} with scores")
        except (FileNotFoundError, ValueError) as e:
            good &= _report(False, "dpo.pairs_file", str(e))
    if cfg.deepspeed:
        try:
            json.loads(Path(cfg.deepspeed).read_text())
            good &= _report(True, "deepspeed", f"{cfg.deepspeed} is valid JSON")
        except (OSError, ValueError) as e:
            good &= _report(False, "deepspeed",
                            f"{cfg.deepspeed}: {e}; point --deepspeed at a JSON file like configs/ds_zero2.json")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = None
    t0 = time.perf_counter()
    try:
        from apex_fast.models import load_pipeline

        m = cfg.model
        pipe = load_pipeline(m.pretrained, dtype=m.dtype, device=device, seed=m.seed, revision=m.revision,
                             variant=m.variant, attention_backend=m.attention_backend)
        n = sum(p.numel() for p in pipe.transformer.parameters())
        good &= _report(True, "model.pretrained", f"{m.pretrained!r} loaded on {device} in {time.perf_counter() - t0:.1f} s "
                                                  f"(transformer {n / 1e6:.3g} M parameters, {m.dtype})")
    except Exception as e:  # noqa: BLE001 - the loader's message names the field and the fix
        good &= _report(False, "model.pretrained", f"{type(e).__name__}: {e}")
    if pipe is not None:
        if cfg.lora.enabled:
            try:
                from apex_fast.models import add_lora

                add_lora(pipe.transformer, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules)
                n = sum(p.numel() for p in pipe.transformer.parameters() if p.requires_grad)
                good &= _report(True, "lora", f"rank {cfg.lora.rank}, {n / 1e6:.3g} M trainable parameters")
            except ValueError as e:
                good &= _report(False, "lora.target_modules", str(e))
        else:
            n = sum(p.numel() for p in pipe.transformer.parameters())
            good &= _report(True, "lora", f"disabled: full fine-tuning of {n / 1e6:.3g} M parameters")

    # the trainer's own reward check (rewards/preflight.py): keys and types, bounded calls, /health
    from apex_fast.rewards import RewardSetupError, build_scorers, check_scorers

    t0 = time.perf_counter()
    try:
        scorers = build_scorers(cfg.rewards)
    except RewardSetupError as e:
        scorers = None
        good &= _report(False, "rewards", str(e))
    if scorers is not None:
        errors = check_scorers(scorers, cfg.rewards, prompts, cfg.model.resolution)
        for i, r in enumerate(cfg.rewards):
            good &= _report(r.name not in errors, f"rewards[{i}] {r.name}",
                            errors.get(r.name) or f"checked on a probe batch ({time.perf_counter() - t0:.1f} s so far)")

    # the trainer's own output-folder rules (run_folder.py): writable, not locked, one run per folder
    from apex_fast.checkpoint import checkpoint_dirs, resolve_resume
    from apex_fast.run_folder import RunFolder, RunFolderError

    out = Path(cfg.log.output_dir)
    folder = RunFolder(out)
    try:
        folder.check_writable()
        folder.acquire()
        folder.release()
        found = checkpoint_dirs(out / "checkpoints")
        held = folder.held_outputs()
        if cfg.checkpoint.resume:
            note = "writable" + (f"; {len(found)} checkpoint(s)" if found else "")
            good &= _report(True, "log.output_dir", f"{out} {note}")
        elif held and not cfg.checkpoint.new_run:
            good &= _report(False, "log.output_dir", f"{out} holds another run ({', '.join(held)}); continue it with "
                                                     f"--resume latest, start over with --new-run, or choose another "
                                                     f"--output-dir")
        else:
            note = "; the run there moves to previous-runs/ (--new-run)" if held else ""
            good &= _report(True, "log.output_dir", f"{out} writable{note}")
    except RunFolderError as e:
        good &= _report(False, "log.output_dir", str(e))
    if cfg.checkpoint.resume:
        try:
            found = resolve_resume(cfg.checkpoint.resume, out / "checkpoints")
            good &= _report(True, "checkpoint.resume", str(found) if found else "no checkpoint yet: starts a fresh run")
        except Exception as e:  # noqa: BLE001
            good &= _report(False, "checkpoint.resume", str(e))
    print("dry run: " + ("everything checks out; run the same command without --dry-run to train" if good
                         else "problems found (FAIL lines above); nothing was trained"), flush=True)
    return bool(good)
