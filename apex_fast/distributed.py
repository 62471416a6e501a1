"""Processes, the data layout over ranks, and the optimizer engine.

One process: plain torch (AdamW, global-norm clipping). Several processes (``torchrun`` or the
``deepspeed`` launcher): torch.distributed collectives (gloo on CPU, NCCL on GPUs); with
``cfg.deepspeed`` set (``--deepspeed configs/ds_zero2.json``) the DeepSpeed engine owns gradient
reduction, clipping and the optimizer step (ZeRO stage 1, 2 or 3).

The trainer sees one seam, ``make_engine(cfg, model, params, runtime)``:

    engine.module                  what to call for forwards whose loss goes to engine.backward
    engine.backward(loss)          accumulate gradients (called once per trained timestep)
    engine.step(max_grad_norm)     reduce over ranks, clip to the global norm, AdamW; -> norm before clipping
    engine.gathered(params, modify=False)   context with full parameters (ZeRO-3; a no-op otherwise)
    engine.consolidated(named)     full copies on rank 0, gathered one parameter at a time (ZeRO-3)
    engine.optimizer_state() / load_optimizer_state(state)   optimizer state inside our checkpoint (torch)
    engine.save_checkpoint(folder) / load_checkpoint(checkpoint)   engine-owned files (DeepSpeed)
    engine.restores_weights        True: load_checkpoint restores the trainable weights (DeepSpeed)
    engine.close()

Both engines compute the same update: gradients of the per-rank losses (fixed denominators, see
``rl.loss.grpo_loss``) averaged over ranks, clipped to ``train.max_grad_norm`` by the global norm,
then AdamW with the ``train.*`` hyperparameters (DeepSpeed gets torch's AdamW as its client
optimizer, so no optimizer JIT build is needed).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError

log = logging.getLogger("apex_fast.distributed")

DS_CHECKPOINT_DIR = "deepspeed"  # engine files inside one of our checkpoint folders
DS_TAG = "zero"


def seed_for(*parts) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------
# processes


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

    def abort(self, exc: BaseException | None = None) -> None:
        """A rank failed. Several processes: print the error with the rank and leave NOW with exit
        code 1, without a barrier or ``destroy_process_group`` (both wait for peers that are inside
        another collective: a deadlock). The peers' next collective fails at once (gloo: "Connection
        closed by peer"; NCCL: the launcher, torchrun or deepspeed, stops the other ranks when one
        exits non-zero), so the job ends with this rank's error. One process: returns (the caller
        re-raises)."""
        if self.world_size <= 1:
            return
        text = "".join(traceback.format_exception(exc)) if exc is not None else traceback.format_exc()
        sys.stderr.write(f"[apex_fast rank {self.rank}/{self.world_size}] training failed on this rank; "
                         f"stopping it so the other ranks stop too:\n{text}")
        sys.stderr.flush()
        sys.stdout.flush()
        logging.shutdown()
        os._exit(1)


def fail(exc: BaseException | None = None) -> None:
    """Call from an ``except`` block of the entry point. Several processes: report this rank's
    error and exit 1 at once (``Runtime.abort``). One process: release the process group, if any
    (nobody to wait for), and return so the caller re-raises."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world > 1:
            Runtime(rank=dist.get_rank(), world_size=world).abort(exc)
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


# ---------------------------------------------------------------------------------------------
# which samples a rank holds, and which of them train together


class SampleLayout:
    """The epoch's N samples on a grid of micro-batches, identical for any number of processes.

    The grid has ``ceil(N / B)`` rows (global micro-batches) of ``B = micro_batch_size * world``
    columns; rank r owns columns ``[r*M, (r+1)*M)`` (M = per-rank micro-batch size), so global
    micro-batch b is the union over ranks of the ranks' local micro-batch b. Which sample sits in
    which cell depends only on (seed, epoch, N, B), never on the number of processes:

    * rollout: cell c holds sample ``perm_epoch[c]`` (a seeded permutation of the N samples), so
      each rank rolls out the samples of its columns, a random share of the prompts;
    * inner epoch i > 0 re-shuffles each column's rows with its own seeded permutation, so samples
      meet new micro-batch partners but stay on the rank that holds their latents.

    One process with ``micro_batch_size = B`` and W processes with ``B / W`` therefore train on
    the same global micro-batches in the same order: the same gradients, up to float rounding.
    With several processes every rank must hold whole micro-batches (N/W a multiple of M).
    """

    def __init__(self, total: int, micro_batch_size: int, world: int = 1, rank: int = 0, seed: int = 0):
        if total % world:
            raise ConfigError(
                f"sample.prompts_per_epoch * sample.group_size = {total} must be divisible by the number of "
                f"processes ({world}) so every rank samples the same number of images")
        self.total, self.world, self.rank, self.seed = total, world, rank, seed
        self.local_n = total // world
        self.m = min(micro_batch_size, self.local_n)
        if world > 1 and self.local_n % self.m:
            raise ConfigError(
                f"train.micro_batch_size = {micro_batch_size} must divide the {self.local_n} samples each of the "
                f"{world} processes holds (sample.prompts_per_epoch * sample.group_size / processes), so every "
                f"global micro-batch takes the same number of samples from every rank")
        self.width = self.m * world  # global micro-batch size B
        self.rows = -(-total // self.width)

    def _cells(self, rank: int) -> torch.Tensor:
        """Grid cells (row-major indices) of ``rank``'s local positions 0..local_n-1."""
        loc = torch.arange(self.local_n)
        return (loc // self.m) * self.width + rank * self.m + loc % self.m

    def _placement(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_for(self.seed, "layout", epoch))
        return torch.randperm(self.total, generator=g)

    def rollout_indices(self, epoch: int, rank: int | None = None) -> torch.Tensor:
        """Global sample indices [local_n] of ``rank``'s samples, in local order."""
        return self._placement(epoch)[self._cells(self.rank if rank is None else rank)]

    def all_rollout_indices(self, epoch: int) -> torch.Tensor:
        """Global indices [N] of every rank's samples, concatenated in rank order (= all_gather order)."""
        perm = self._placement(epoch)
        return torch.cat([perm[self._cells(r)] for r in range(self.world)])

    def micro_batches(self, epoch: int, inner: int) -> list[torch.Tensor]:
        """Local positions of this rank's micro-batches for inner epoch ``inner``, in training order."""
        cols = []  # for each of my columns: the local positions of its rows, in this inner epoch's order
        for c in range(self.m):
            q = self.rank * self.m + c  # global column
            n_rows = len(range(c, self.local_n, self.m))
            rows = torch.arange(n_rows)
            if inner > 0:
                g = torch.Generator().manual_seed(seed_for(self.seed, "shuffle", epoch, inner, q))
                rows = rows[torch.randperm(n_rows, generator=g)]
            cols.append(rows * self.m + c)
        n_mb = -(-self.local_n // self.m)
        return [torch.stack([col[b] for col in cols if b < len(col)]) for b in range(n_mb)]


# ---------------------------------------------------------------------------------------------
# engines


class TorchEngine:
    """AdamW + global-norm clipping; gradients averaged over ranks (one flat all-reduce) when distributed."""

    def __init__(self, cfg, params, runtime: Runtime, model=None):
        t = cfg.train
        self.params = params
        self.runtime = runtime
        self.module = model
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                           weight_decay=t.weight_decay)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        if self.runtime.distributed:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.runtime.all_reduce_mean_([p.grad for p in self.params])
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    restores_weights = False  # a resume loads weights and optimizer state from the trainer state

    def gathered(self, params=None, modify: bool = False):
        return contextlib.nullcontext()

    def consolidated(self, named: dict) -> dict:
        return {n: p.detach() for n, p in named.items()}

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        if not state:
            raise ConfigError("checkpoint: it holds no torch optimizer state (it was written by a DeepSpeed run, "
                              "whose optimizer state is in its deepspeed/ folder); resume it with --deepspeed")
        self.optimizer.load_state_dict(state)

    def save_checkpoint(self, folder) -> Path | None:
        return None  # the optimizer state travels in the trainer state

    def load_checkpoint(self, checkpoint) -> None:
        return None

    def close(self) -> None:
        pass


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON of ``cfg.deepspeed`` with the fields our config owns filled in.

    Batch sizes, gradient accumulation and clipping come from ``train.*``; "auto" (or a missing
    key) takes our value, a different explicit value is an error, so the JSON can never silently
    train with other hyperparameters than the YAML. Gradient accumulation is unmanaged
    (``managed_gradient_accumulation: false``): the trainer calls ``backward`` once per trained
    timestep and ``step`` once per micro-batch, like with the torch engine."""
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise ConfigError(f"deepspeed: file {str(path)!r} does not exist; pass a DeepSpeed JSON such as "
                          f"configs/ds_zero2.json")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: {path} must hold a JSON object")
    t = cfg.train
    owned = {
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (1, "one optimizer step per micro-batch after its trained timesteps"),
        "train_batch_size": (t.micro_batch_size * world_size, "train.micro_batch_size x processes"),
        "gradient_clipping": (t.max_grad_norm, "train.max_grad_norm"),
    }
    for key, (value, source) in owned.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"deepspeed: {path} sets {key}={given!r} but the run uses {value!r} ({source}); "
                              f"set it to \"auto\" (or remove it) in the JSON")
        ds[key] = value
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"deepspeed: remove the {key!r} section from {path}: the optimizer is torch AdamW "
                              f"with train.lr/adam_betas/adam_eps/weight_decay (constant learning rate)")
    for key in ("fp16", "bf16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled", False) not in (False, "auto"):
            raise ConfigError(f"deepspeed: {path} enables {key}: trainable weights and their optimizer state "
                              f"stay fp32 here; set model.dtype=bf16 to keep the frozen base in bf16 instead")
        ds.pop(key, None)
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict) or int(zero.get("stage", 0)) not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: zero_optimization.stage in {path} must be 0, 1, 2 or 3")
    if zero.get("offload_optimizer") and zero["offload_optimizer"].get("device", "none") != "none":
        raise ConfigError(f"deepspeed: {path}: offload_optimizer needs DeepSpeed's CPUAdam; not supported "
                          f"with the torch AdamW client optimizer (use offload_param or more GPUs)")
    if int(zero.get("stage", 0)) == 1 or int(zero.get("stage", 0)) == 0:
        zero["overlap_comm"] = False  # unmanaged accumulation allows overlap_comm only for stage 2/3
    ds["managed_gradient_accumulation"] = False
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs; keep DeepSpeed's progress lines off
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class DeepSpeedEngine:
    """``deepspeed.initialize`` on the transformer with its trainable parameters and torch AdamW.

    Per micro-batch the trainer calls ``backward`` once per trained timestep (gradients accumulate;
    ZeRO-2/3 reduce-scatter them as they come) and ``step`` once: DeepSpeed averages over ranks,
    clips to ``train.max_grad_norm`` by the global norm over all shards, and steps AdamW on each
    rank's shard. The trainer already divides the loss by the number of timesteps, so DeepSpeed's
    own division by ``gradient_accumulation_steps`` is off (it is 1 anyway). Forwards whose loss
    is passed to ``backward`` must call ``engine.module`` (the DeepSpeed engine), not the bare model;
    forwards without ``backward`` (sampling, the KL reference, ``torch.autograd.grad``) call the model."""

    def __init__(self, cfg, model, params, runtime: Runtime):
        import deepspeed

        t = cfg.train
        self.runtime = runtime
        self.params = params
        self.config = deepspeed_config(cfg, runtime.world_size)
        self.stage = int(self.config["zero_optimization"].get("stage", 0))
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                      weight_decay=t.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, config=self.config)
        # training forwards go through the DeepSpeed engine: its forward() arms the ZeRO backward
        # bookkeeping (micro-step ids, gradient hooks) that engine.backward() relies on
        self.module = self.engine
        self._closed = False
        runtime.on_shutdown(self.close)

    @property
    def zero3(self) -> bool:
        return self.stage == 3

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, max_grad_norm: float) -> float:
        if max_grad_norm != self.config["gradient_clipping"]:
            raise ValueError(f"DeepSpeedEngine.step: max_grad_norm={max_grad_norm} but the engine clips at "
                             f"{self.config['gradient_clipping']} (train.max_grad_norm when it was built)")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def gathered(self, params=None, modify: bool = False):
        """Full parameters inside the block on every rank (ZeRO-3: a collective, enter it on all ranks).
        ``modify=True``: what rank 0 writes into them is kept (broadcast and re-partitioned on exit)."""
        params = list(self.params if params is None else params)
        if not self.zero3 or not params:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def consolidated(self, named: dict) -> dict:
        """Full copies of the named parameters on rank 0 (CPU under ZeRO-3, gathered one at a time so
        no rank ever holds all of them: the full fine-tuning checkpoint of a ZeRO-3 model); {} on the
        other ranks under ZeRO-3. A collective under ZeRO-3: call it on every rank."""
        if not self.zero3:
            return {n: p.detach() for n, p in named.items()}
        import deepspeed

        out = {}
        for n, p in named.items():
            with deepspeed.zero.GatheredParameters([p]):
                if self.runtime.rank == 0:
                    out[n] = p.detach().to("cpu", copy=True)
        return out

    restores_weights = True  # load_checkpoint restores the trainable weights with their fp32 masters

    def optimizer_state(self) -> dict:
        return {}  # in the checkpoint's deepspeed/ folder (save_checkpoint), one shard per rank

    def load_optimizer_state(self, state: dict) -> None:
        pass

    def save_checkpoint(self, folder) -> Path:
        """DeepSpeed checkpoint (ZeRO shards of the optimizer state, trainable weights) written by all
        ranks into ``folder`` (a collective; output_dir must be on a filesystem all nodes share)."""
        folder = Path(folder)
        if self.runtime.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        self.runtime.barrier()
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
        self.runtime.barrier()
        return folder

    def load_checkpoint(self, checkpoint) -> None:
        folder = Path(checkpoint) / DS_CHECKPOINT_DIR
        if not (folder / DS_TAG).is_dir():
            raise ConfigError(f"checkpoint {checkpoint}: no {DS_CHECKPOINT_DIR}/{DS_TAG} folder, so it was not written "
                              f"by a DeepSpeed run; resume it without --deepspeed")
        path, _ = self.engine.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"checkpoint {checkpoint}: DeepSpeed could not load {folder / DS_TAG}")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.destroy()


def make_engine(cfg, model, params, runtime: Runtime):
    if cfg.deepspeed:
        return DeepSpeedEngine(cfg, model, params, runtime)
    return TorchEngine(cfg, params, runtime, model)
