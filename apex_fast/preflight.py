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

    from apex_fast.rewards import make_scorer, score_all

    res = cfg.model.resolution
    image = torch.full((1, 3, res, res), 0.5)
    prompt = prompts[0] if prompts else ("a photo", {})
    for i, r in enumerate(cfg.rewards):
        t0 = time.perf_counter()
        try:
            scorer = make_scorer(r.name, **r.args)
            errors: dict = {}
            v = score_all([scorer], image, [prompt[0]], [dict(prompt[1])], timeout_s=r.timeout_s or 300, errors=errors)
            if errors:
                raise RuntimeError(errors[scorer.name if getattr(scorer, "name", None) in errors else next(iter(errors))])
            val = float(v[0, 0])
            shown = "NaN: unscorable, counted as failed" if val != val else f"{val:.4g}"
            good &= _report(True, f"rewards[{i}] {r.name}",
                            f"scored a test image in {time.perf_counter() - t0:.1f} s ({shown})")
        except Exception as e:  # noqa: BLE001 - builder errors name the scorer, the path and the fix
            good &= _report(False, f"rewards[{i}] {r.name}", f"{type(e).__name__}: {e}")

    out = Path(cfg.log.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".apex-fast-write-test"
        probe.write_text("ok")
        probe.unlink()
        from apex_fast.checkpoint import checkpoint_dirs

        found = checkpoint_dirs(out / "checkpoints")
        if found and not cfg.checkpoint.resume:
            note = (f"writable; holds {len(found)} checkpoint(s) up to {found[-1].name}: this run starts from scratch "
                    f"and overwrites them (continue it with --resume latest)")
        else:
            note = "writable" + (f"; {len(found)} checkpoint(s)" if found else "")
        good &= _report(True, "log.output_dir", f"{out} {note}")
    except OSError as e:
        good &= _report(False, "log.output_dir", f"{out}: not writable ({e}); choose another --output-dir")
    if cfg.checkpoint.resume:
        try:
            from apex_fast.checkpoint import resolve_resume

            good &= _report(True, "checkpoint.resume", str(resolve_resume(cfg.checkpoint.resume, out / "checkpoints")))
        except Exception as e:  # noqa: BLE001
            good &= _report(False, "checkpoint.resume", str(e))
    print("dry run: " + ("everything checks out; run the same command without --dry-run to train" if good
                         else "problems found (FAIL lines above); nothing was trained"), flush=True)
    return bool(good)
