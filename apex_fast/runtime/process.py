"""Processes: rank and world from the launcher (torchrun, deepspeed, plain python), the process
group (NCCL on GPUs, gloo on CPU), the few collectives the trainer needs, a clean shutdown and a
fail-fast abort, and stable seeds."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import sys
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ConfigError

log = logging.getLogger("apex_fast.runtime")


def seed_for(*parts) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)




@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable)
    _closers: list = field(default_factory=list, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equally sized [n, ...] tensors of all ranks in rank order (one collective)."""
        if not self.distributed:
            return x
        y = x.to(self.device).contiguous()
        out = [torch.empty_like(y) for _ in range(self.world_size)]
        dist.all_gather(out, y)
        return torch.cat(out).to(x.device)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return x
        y = x.to(self.device).clone()
        dist.all_reduce(y)
        return y.to(x.device)

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average a list of tensors over ranks in place with ONE all-reduce of a flat buffer."""
        if not self.distributed or not tensors:
            return tensors
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = torch.cat([t.detach().reshape(-1).to(self.device, dtype) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
        return tensors

    def gather_samples(self, R_local: torch.Tensor, groups_local: torch.Tensor, index_local: torch.Tensor):
        """Rewards R [n, K] and group ids [n] of this rank's samples (global indices ``index_local``)
        -> R [N, K] and groups [N] of the whole batch in global sample order, with ONE all-gather of
        [R | group | index] rows (float64: exact for float32 rewards and integer ids)."""
        rows = torch.cat([R_local.double(), groups_local.double()[:, None], index_local.double()[:, None]], 1)
        rows = self.all_gather_rows(rows)
        order = rows[:, -1].long()
        R = torch.empty(len(order), R_local.shape[1], dtype=R_local.dtype)
        groups = torch.empty(len(order), dtype=torch.long)
        R[order] = rows[:, :-2].to(R_local.dtype)
        groups[order] = rows[:, -2].long()
        if not torch.equal(order.sort().values, torch.arange(len(order))):
            raise RuntimeError("gather_samples: the ranks' sample indices do not cover the batch exactly once")
        return R, groups

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_shutdown(self, fn) -> None:
        """Run ``fn()`` in ``shutdown()`` before the process group is destroyed (engines)."""
        self._closers.append(fn)

    def shutdown(self) -> None:
        """Clean end of a successful run, on every rank: engines first, then all process groups.

        Exiting with a live gloo process group lets its C++ worker threads be destroyed while the
        interpreter tears down, which aborts the process now and then with "terminate called
        without an active exception" (rc 134) after training has finished: with gloo, 9 of 60
        processes of a 2-rank script that skipped ``destroy_process_group`` aborted so, none of 60
        that called it. So a run always ends here, after a barrier (no rank leaves while another
        still reduces)."""
        while self._closers:
            self._closers.pop()()
        if dist.is_available() and dist.is_initialized():
            if self.world_size > 1:
                dist.barrier()
            dist.destroy_process_group()

    def abort(self, exc: BaseException | None = None, brief: bool = False, code: int | None = None) -> None:
        """A rank failed. Several processes: print the error with the rank and leave NOW with exit
        code 1, without a barrier or ``destroy_process_group`` (both wait for peers that are inside
        another collective: a deadlock). The peers' next collective fails at once (gloo: "Connection
        closed by peer"; NCCL: the launcher, torchrun or deepspeed, stops the other ranks when one
        exits non-zero), so the job ends with this rank's error. One process: returns (the caller
        re-raises)."""
        if self.world_size <= 1:
            return
        if brief and exc is not None:  # a user error: its one-line message says what to fix
            sys.stderr.write(f"[apex_fast rank {self.rank}/{self.world_size}] error: {exc}\n")
        else:
            text = "".join(traceback.format_exception(exc)) if exc is not None else traceback.format_exc()
            sys.stderr.write(f"[apex_fast rank {self.rank}/{self.world_size}] training failed on this rank; "
                             f"stopping it so the other ranks stop too:\n{text}")
        sys.stderr.flush()
        sys.stdout.flush()
        logging.shutdown()
        os._exit(code if code is not None else 2 if brief else 1)


def fail(exc: BaseException | None = None, brief: bool = False, code: int | None = None) -> None:
    """Call from an ``except`` block of the entry point. Several processes: report this rank's
    error and exit 1 at once (``Runtime.abort``). One process: release the process group, if any
    (nobody to wait for), and return so the caller re-raises."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world > 1:
            Runtime(rank=dist.get_rank(), world_size=world).abort(exc, brief=brief, code=code)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timeout() -> timedelta:
    """Collective timeout: APEX_FAST_DIST_TIMEOUT seconds (default 1800)."""
    return timedelta(seconds=float(os.environ.get("APEX_FAST_DIST_TIMEOUT", "1800")))


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op when it starts (tens of
    seconds to minutes on a first run). Only its inference all-reduce uses it, never training, so
    it is marked unavailable unless APEX_FAST_DS_SHM=1 (DeepSpeed then uses torch's gloo)."""
    if os.environ.get("APEX_FAST_DS_SHM", "0") == "1":
        return
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # module-level cache, edits persist
    except Exception as e:  # noqa: BLE001  # pragma: no cover - depends on the DeepSpeed build
        log.debug("could not disable the DeepSpeed shm comm op: %r", e)


def init(cfg) -> Runtime:
    """Read WORLD_SIZE/RANK/LOCAL_RANK (torchrun, deepspeed launcher; unset: one process) and
    start the process group: NCCL on GPUs, gloo on CPU. With ``cfg.deepspeed`` DeepSpeed starts it
    (``deepspeed.init_distributed``), also for one plain ``python`` process."""
    if cfg.deepspeed and "WORLD_SIZE" not in os.environ:
        # plain `python train.py --deepspeed ...`: one process; without these DeepSpeed asks for mpi4py
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.deepspeed:
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("deepspeed: the deepspeed package is not installed (pip install deepspeed), "
                              "or drop --deepspeed to train with plain torch") from None
        _skip_deepspeed_shm_build()
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                       timeout=_timeout(), verbose=False)
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_timeout())
    return Runtime(rank, world, local, device)


