"""The output folder of a run: one run per folder, one trainer at a time.

    folder = RunFolder(cfg.log.output_dir)
    folder.check_writable()      # a folder we can write (not a file, not read-only), before the model loads
    folder.acquire()             # rank 0: exclusive lock on <output_dir>/.lock; a second trainer is refused
    run_id = folder.claim(new_run=..., resuming=...)   # a new run never silently mixes with another's files
    ...
    folder.release()             # also when the process dies: the kernel drops the lock with the file

``run.json`` names the run that owns the folder (run id, when and where it started); checkpoints
record the same id. A new run into a folder that holds another run is refused unless
``checkpoint.new_run`` (``--new-run``): then the old run's files move, with a log line, to
``previous-runs/<run id>/``; nothing is deleted.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path

log = logging.getLogger("apex_fast.run_folder")

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
ARCHIVE_DIR = "previous-runs"
# what a run writes into its folder (tracking.py, train.py, run_state.py)
RUN_OUTPUTS = (RUN_FILE, "checkpoints", "metrics.csv", "metrics.csv.tmp", "tensorboard", "lora", "summary.txt",
               "samples", "config.yaml", "reward_curves.png", "eval")


class RunFolderError(RuntimeError):
    """The output folder cannot hold this run; the message names log.output_dir and the fix."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    # ------------------------------------------------------------------ checks
    def check_writable(self) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"log.output_dir: {p} is a file, not a folder; choose another --output-dir")
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise RunFolderError(f"log.output_dir: cannot write into {p} ({e.strerror or e}); choose a writable "
                                 f"--output-dir or fix its permissions") from None

    # ------------------------------------------------------------------ lock
    def acquire(self) -> None:
        """Exclusive, non-blocking lock (flock) held until release() or process exit."""
        import fcntl

        if self._fd is not None:
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                info = json.loads(holder)
                who = f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            except (OSError, ValueError, AttributeError):
                who = "another process"
            os.close(fd)
            raise RunFolderError(f"log.output_dir: {self.path} is in use by another trainer ({who}); wait for it to "
                                 f"finish or stop it, or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __del__(self):  # a Trainer dropped without finishing must not keep the folder locked
        try:
            self.release()
        except Exception:  # noqa: BLE001  # pragma: no cover - interpreter shutdown
            pass

    # ------------------------------------------------------------------ ownership
    def run_info(self) -> dict | None:
        try:
            return json.loads((self.path / RUN_FILE).read_text())
        except (OSError, ValueError):
            return None

    def held_outputs(self) -> list[str]:
        return [n for n in RUN_OUTPUTS if (self.path / n).exists()]

    def claim(self, new_run: bool, resuming: bool, run_id: str | None = None, dry: bool = False) -> str | None:
        """The id of the run that writes here from now on.

        ``resuming``: continue the run (``run_id``: the checkpoint's; else the folder's or a new one).
        Otherwise a new run: refused when the folder holds another run's outputs, unless
        ``new_run``, which moves them to previous-runs/<id>/ (logged). ``dry``: only the refusal
        check, nothing moved or written."""
        info = self.run_info()
        if dry:
            if not resuming and not new_run and self.held_outputs():
                self._refuse(info, self.held_outputs())
            return None
        if resuming:
            rid = run_id or (info or {}).get("run_id") or uuid.uuid4().hex[:12]
        else:
            held = self.held_outputs()
            if held and not new_run:
                self._refuse(info, held)
            if held:
                self._archive(held, (info or {}).get("run_id"))
            rid = uuid.uuid4().hex[:12]
        if info is None or info.get("run_id") != rid:
            (self.path / RUN_FILE).write_text(json.dumps(
                {"run_id": rid, "created": _now(), "host": socket.gethostname(), "pid": os.getpid()}, indent=1))
        return rid

    def _refuse(self, info: dict | None, held: list[str]) -> None:
        owner = f"run {info['run_id']} (started {info.get('created')})" if info else "another run"
        raise RunFolderError(
            f"log.output_dir: {self.path} holds {owner}: {', '.join(held)}. Continue it with --resume latest, "
            f"start over with --new-run (its files move to {ARCHIVE_DIR}/), or choose another --output-dir")

    def _archive(self, names: list[str], old_id: str | None) -> None:
        dest = self.path / ARCHIVE_DIR / (old_id or f"unnamed-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while dest.exists():
            dest, n = dest.with_name(f"{dest.name.split('~')[0]}~{n}"), n + 1
        dest.mkdir(parents=True)
        for name in names:
            shutil.move(str(self.path / name), str(dest / name))
        log.warning("new run in %s: the previous run's files (%s) moved to %s", self.path, ", ".join(names), dest)
