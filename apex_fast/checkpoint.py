"""Atomic checkpoints without pickle: tensors in safetensors, everything else in JSON.

Layout of one checkpoint folder (``<output_dir>/checkpoints/checkpoint-<epoch>``):
  pytorch_lora_weights.safetensors  LoRA in diffusers format (``pipe.load_lora_weights(folder)``)
  state.safetensors                 every tensor of the trainer state (weights, optimizer, EMA, RNG, balancer)
  state.json                        the rest (epoch, step, hyperparameters, history), with tensor placeholders
  checksums.json                    sha256 of every other file (also engine shards): a corrupted or edited
                                    checkpoint is refused on resume with the file named
A folder is written under a temporary name and renamed when complete, so a crash never leaves a
half-written checkpoint under a real name and never damages an earlier one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("apex_fast.checkpoint")

_TENSOR = "__tensor__"
CHECKSUMS = "checksums.json"
_CHECKSUMMED = "__checksummed__"  # in state.json: this checkpoint was written with checksums.json
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: str | Path) -> None:
    """checksums.json: sha256 of every file under ``folder`` (relative paths), written last."""
    folder = Path(folder)
    sums = {str(f.relative_to(folder)): _sha256(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != CHECKSUMS}
    (folder / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=0))


def verify_checkpoint(folder: str | Path) -> None:
    """Every file listed in checksums.json is present and unchanged; CheckpointError naming the file
    otherwise. A checkpoint of an older apex-fast without checksums.json is accepted with a warning."""
    folder = Path(folder)
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())["sha256"]
    except FileNotFoundError:
        try:
            marked = json.loads((folder / "state.json").read_text()).get(_CHECKSUMMED, False)
        except (OSError, ValueError, AttributeError):
            marked = False  # load_checkpoint names what is wrong with state.json
        if marked:  # written with checksums, so the file was removed: an edited checkpoint
            raise CheckpointError(f"checkpoint {folder}: file {CHECKSUMS} is missing (it was written with one), so "
                                  f"its files cannot be verified; resume from an earlier checkpoint "
                                  f"(checkpoint.resume=<folder>) or restore the file")
        log.warning("checkpoint %s has no %s (written by an older apex-fast): not verified", folder, CHECKSUMS)
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {folder}: {CHECKSUMS} is unreadable ({type(e).__name__}: {e}); resume from "
                              f"an earlier checkpoint (checkpoint.resume=<folder>)") from None
    for rel, digest in sums.items():
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {folder}: file {rel} is missing; resume from an earlier checkpoint "
                                  f"(checkpoint.resume=<folder>) or restore the file")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {folder}: file {rel} does not match its checksum (corrupted or edited "
                                  f"after it was written); resume from an earlier checkpoint "
                                  f"(checkpoint.resume=<folder>) or restore the file")


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Nested dicts/lists/tuples of tensors and JSON scalars -> JSON skeleton + flat tensor dict."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "t"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[str(k)] = flatten_state(v, tensors, f"{prefix}.{k}" if prefix else str(k))
        # remember integer keys (torch optimizers key their state by parameter index)
        if obj and all(isinstance(k, int) for k in obj):
            out["__int_keys__"] = True
        return out
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint value of type {type(obj).__name__} at {prefix!r}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        int_keys = obj.get("__int_keys__", False)
        return {(int(k) if int_keys else k): unflatten_state(v, tensors) for k, v in obj.items() if k != "__int_keys__"}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def write_folder_atomically(final: str | Path, write) -> Path:
    """``write(tmp_dir)`` fills a temporary sibling folder, which then takes ``final``'s name in one
    rename: a crash or a stop never leaves a half-written folder under the real name, and a folder
    being replaced is moved aside first and removed only after (recover_interrupted_writes puts it
    back if the process dies between the two renames)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(root: str | Path, epoch: int, state: dict, write_extra=None, keep: int | None = None) -> Path:
    """Write ``state`` (nested tensors + JSON values) atomically as checkpoint-<epoch> under ``root``.
    ``write_extra(tmp_dir)`` adds files (e.g. the diffusers-format LoRA) before the rename."""
    root = Path(root)

    def write(tmp: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten_state(state, tensors)
        save_file(tensors, str(tmp / "state.safetensors"))
        if write_extra is not None:
            write_extra(tmp)
        marked = {**skeleton, _CHECKSUMMED: True} if isinstance(skeleton, dict) else skeleton
        (tmp / "state.json").write_text(json.dumps(marked))
        write_checksums(tmp)  # last: covers every file above

    final = write_folder_atomically(root / f"checkpoint-{epoch:06d}", write)
    if keep is not None:
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


_STAGING = re.compile(r"^\.(tmp|old)-(.+)-\d+$|^\.engine-\d+$")


def recover_interrupted_writes(root: str | Path, names=_NAME) -> list[str]:
    """Tidy what a write killed outright (kill -9, power loss, a second Ctrl-C) left under ``root``:
    a folder moved aside while it was being replaced (``.old-<name>-<pid>``, see
    write_folder_atomically) is put back if its replacement never arrived; unfinished temporary
    folders (``.tmp-<name>-<pid>``, the engine's ``.engine-*`` staging) are removed, so a large run
    never fills the disk with them. Only folders whose <name> matches ``names`` (a regex; default:
    checkpoints) are touched. Call only while holding the output folder's lock (no other writer can
    be running). Returns what was done, one line per folder (also logged)."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = []
    for p in sorted(root.iterdir()):
        m = _STAGING.match(p.name)
        if not m or not p.is_dir() or (m.group(2) is not None and not re.match(names, m.group(2))):
            continue
        if m.group(1) == "old" and not (root / m.group(2)).exists() and any(p.iterdir()):
            os.replace(p, root / m.group(2))
            done.append(f"restored {m.group(2)} (its replacement was interrupted)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name} (left by an interrupted write)")
    for line in done:
        log.warning("%s: %s", root, line)
    return done


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """``latest`` -> newest complete checkpoint under root, or None when there is none (the caller
    starts fresh: a job script may always pass --resume latest); otherwise a checkpoint folder path."""
    if resume == "latest":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise CheckpointError(
            f"checkpoint.resume: {resume!r} is not a checkpoint folder (no state.json); "
            f"use 'latest' or a path like <output_dir>/checkpoints/checkpoint-000010")
    return p


def load_checkpoint(path: str | Path, verify: bool = True) -> dict:
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        skeleton = json.loads((path / "state.json").read_text())
        if isinstance(skeleton, dict):
            skeleton.pop(_CHECKSUMMED, None)
        tensors = load_file(str(path / "state.safetensors"))
        return unflatten_state(skeleton, tensors)
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e}); resume from an "
            f"earlier checkpoint (checkpoint.resume=<folder>) or delete this folder") from None
