"""The optimizer engines behind one interface: plain torch (AdamW, global-norm clipping, gradients
averaged over ranks) or DeepSpeed (ZeRO stage 0-3).

The learner sees one seam, ``make_engine(cfg, model, params, runtime)``:

    engine.module                  what to call for forwards whose loss goes to engine.backward
    engine.backward(loss, retain_graph=False)   accumulate gradients (once per trained timestep)
    engine.add_grads(grads)        add precomputed per-parameter gradients (this rank's, unreduced) to
                                   what backward accumulated: the combined multi-objective update of grad/
    engine.set_lr(lr)              the learning rate of the next step (train.lr_schedule, see lr_schedule)
    engine.step(max_grad_norm)     reduce over ranks, clip to the global norm, AdamW; -> norm before clipping;
                                   a non-finite loss or gradient on any rank skips the step on every rank (-> inf/nan)
                                   (called once per train.gradient_accumulation micro-batches)
    engine.set_hyperparameters(train)   lr, betas, eps, weight decay from the config (after a resume)
    engine.gathered(params, modify=False)   context with full parameters (ZeRO-3; a no-op otherwise)
    engine.consolidated(named)     full copies on rank 0, gathered one parameter at a time (ZeRO-3)
    engine.optimizer_state() / load_optimizer_state(state)   optimizer state inside our checkpoint (torch)
    engine.save_checkpoint(folder) / load_checkpoint(checkpoint)   engine-owned files (DeepSpeed)
    engine.restores_weights        True: load_checkpoint restores the trainable weights (DeepSpeed)
    engine.zero_stage              0 (torch) or DeepSpeed's ZeRO stage
    engine.close()

Both engines compute the same update: gradients of the per-rank losses (fixed denominators, see
``rl.loss.grpo_loss``) averaged over ranks, clipped to ``train.max_grad_norm`` by the global norm,
then AdamW with the ``train.*`` hyperparameters (DeepSpeed gets torch's AdamW as its client
optimizer, so no optimizer JIT build is needed).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from pathlib import Path

import torch

from ..config import ConfigError
from .process import Runtime

log = logging.getLogger("apex_fast.runtime")

DS_CHECKPOINT_DIR = "deepspeed"  # engine files inside one of our checkpoint folders
DS_TAG = "zero"



def lr_schedule(train, total_steps: int):
    """``factor(step) -> float``: the lr multiplier of optimizer step ``step`` (0-based), diffusers'
    schedules (``diffusers.optimization.get_scheduler``: constant, constant_with_warmup, linear,
    cosine; warmup rises linearly from 0 over ``train.lr_warmup_steps``). A pure function of the step
    count, so a resumed run continues the schedule exactly from its checkpointed global step."""
    from diffusers.optimization import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    kw = {} if train.lr_schedule == "constant" else {"num_warmup_steps": train.lr_warmup_steps}
    if train.lr_schedule in ("linear", "cosine"):
        kw["num_training_steps"] = max(1, total_steps)
    return get_scheduler(train.lr_schedule, dummy, **kw).lr_lambdas[0]


class TorchEngine:
    """AdamW + global-norm clipping; gradients averaged over ranks (one flat all-reduce) when distributed."""

    def __init__(self, cfg, params, runtime: Runtime, model=None):
        t = cfg.train
        self.params = params
        self.runtime = runtime
        self.module = model
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                           weight_decay=t.weight_decay)

    zero_stage = 0
    # gradients may reach .grad by any backward (DeepSpeed: only through its backward or add_grads)
    accepts_direct_grads = True
    _nonfinite_loss = False

    def set_hyperparameters(self, t) -> None:
        set_optimizer_hyperparameters(self.optimizer, t)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._nonfinite_loss = True  # this step will be skipped (on every rank, see step)
        loss.backward(retain_graph=retain_graph)

    def add_grads(self, grads: list[torch.Tensor]) -> None:
        """Add this rank's precomputed gradients [one per parameter] to ``.grad``; ``step`` then
        averages them over ranks like any backward's."""
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            torch._foreach_add_([p.grad for p in self.params], [g.to(p.dtype) for p, g in zip(self.params, grads)])

    def step(self, max_grad_norm: float) -> float:
        """Reduce, clip, AdamW; -> the gradient norm before clipping. A non-finite loss or gradient
        skips the update (returns a non-finite norm): a NaN planted in this rank's gradient before
        the all-reduce makes every rank see it and skip together."""
        if self._nonfinite_loss:
            first = next((p for p in self.params), None)
            if first is not None:
                if first.grad is None:
                    first.grad = torch.zeros_like(first)
                first.grad.fill_(float("nan"))
            self._nonfinite_loss = False
        if self.runtime.distributed:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.runtime.all_reduce_mean_([p.grad for p in self.params])
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        if torch.isfinite(norm):
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

    def exp_avg_sq(self, params) -> list[torch.Tensor] | None:
        """AdamW's second-moment EMA v of each of ``params`` (None before the first step)."""
        state = [self.optimizer.state.get(p, {}).get("exp_avg_sq") for p in params]
        return None if any(v is None for v in state) else state

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


def set_optimizer_hyperparameters(optimizer, t) -> None:
    """``train.lr``, ``adam_betas``, ``adam_eps``, ``weight_decay`` into every param group (a resumed
    optimizer state carries the checkpoint's; the config's must win)."""
    for g in optimizer.param_groups:
        g.update(lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON of ``cfg.deepspeed`` with the fields our config owns filled in.

    Batch sizes, gradient accumulation and clipping come from ``train.*``; "auto" (or a missing
    key) takes our value, a different explicit value is an error, so the JSON can never silently
    train with other hyperparameters than the YAML. DeepSpeed's gradient accumulation is
    ``train.gradient_accumulation`` (``train_batch_size`` = micro-batch x processes x accumulation),
    in its caller-owned mode (``managed_gradient_accumulation: false``): the trainer calls
    ``backward`` once per trained timestep of each micro-batch and ``step`` at the accumulation
    boundary, like with the torch engine; the loss is already divided by the accumulation count."""
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
    from .layout import gradient_accumulation

    accum = gradient_accumulation(cfg, world_size)
    owned = {
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (accum, "train.gradient_accumulation / optimizer_steps_per_epoch"),
        "train_batch_size": (t.micro_batch_size * world_size * accum,
                             "train.micro_batch_size x processes x train.gradient_accumulation"),
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
                              f"with train.lr/adam_betas/adam_eps/weight_decay and train.lr_schedule")
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


class _SkippingAdamW(torch.optim.AdamW):
    """The client optimizer of DeepSpeed without ZeRO (stage 0), where DeepSpeed steps it as is: in
    fp32 it checks no overflow and reports no gradient norm, so a NaN gradient would reach the
    weights. This AdamW clips to the global norm itself (DeepSpeed's own clipping is turned off for
    it), skips the update when that norm is not finite, and reports both through the attributes
    DeepSpeed's engine reads from its optimizer after a step (``_global_grad_norm``, ``overflow``).
    The gradients are already averaged over ranks when it runs, so every rank skips alike."""

    def __init__(self, params, max_grad_norm: float, **kw):
        super().__init__(params, **kw)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self._global_grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        # max_grad_norm 0 is DeepSpeed's "no clipping": an infinite bound only measures the norm
        norm = torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm if self.max_grad_norm > 0 else math.inf)
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        return super().step(closure)


class DeepSpeedEngine:
    """``deepspeed.initialize`` on the transformer with its trainable parameters and torch AdamW.

    The trainer calls ``backward`` once per trained timestep of each micro-batch (gradients accumulate;
    ZeRO-2/3 reduce-scatter them as they come) and ``step`` once per ``train.gradient_accumulation``
    micro-batches: DeepSpeed averages over ranks,
    clips to ``train.max_grad_norm`` by the global norm over all shards, and steps AdamW on each
    rank's shard. The trainer already divides the loss by the number of timesteps and accumulated
    micro-batches, so DeepSpeed's own division by ``gradient_accumulation_steps`` is off. Forwards whose loss
    is passed to ``backward`` must call ``engine.module`` (the DeepSpeed engine), not the bare model;
    forwards without ``backward`` (sampling, the KL reference, ``torch.autograd.grad``) call the model."""

    def __init__(self, cfg, model, params, runtime: Runtime):
        import deepspeed

        t = cfg.train
        self.runtime = runtime
        self.params = params
        self.config = deepspeed_config(cfg, runtime.world_size)
        self.stage = int(self.config["zero_optimization"].get("stage", 0))
        adamw = dict(lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
        config = self.config
        if self.stage == 0:  # no ZeRO: our AdamW clips and skips non-finite steps (DeepSpeed's clipping off)
            optimizer = _SkippingAdamW(params, max_grad_norm=self.config["gradient_clipping"], **adamw)
            config = {**self.config, "gradient_clipping": 0.0}
        else:  # ZeRO clips by the global norm over all shards and skips a step whose norm is not finite
            optimizer = torch.optim.AdamW(params, **adamw)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, config=config)
        # training forwards go through the DeepSpeed engine: its forward() arms the ZeRO backward
        # bookkeeping (micro-step ids, gradient hooks) that engine.backward() relies on
        self.module = self.engine
        self._closed = False
        runtime.on_shutdown(self.close)

    @property
    def zero3(self) -> bool:
        return self.stage == 3

    accepts_direct_grads = False
    def set_hyperparameters(self, t) -> None:
        set_optimizer_hyperparameters(self.optimizer, t)  # the ZeRO wrapper's groups are the client optimizer's

    @property
    def zero_stage(self) -> int:
        return self.stage

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        # a non-finite loss may still give finite gradients (a NaN term without gradient); multiplying
        # by NaN makes its whole gradient NaN, so the step's overflow check skips it on every rank
        # (x 1.0 otherwise: exact, and no host sync)
        detached = loss.detach()
        poison = torch.where(torch.isfinite(detached), torch.ones_like(detached), torch.full_like(detached, math.nan))
        self.engine.backward(loss * poison, retain_graph=retain_graph, scale_wrt_gas=False)

    def add_grads(self, grads: list[torch.Tensor]) -> None:
        """Feed precomputed gradients through DeepSpeed's own backward, so its reduction (ZeRO-2:
        reduce-scatter into the rank's partition), accumulation and clipping treat them exactly
        like a loss's: the backward of ``sum_p <p, g_p>`` gives ``g_p`` at every parameter. Not
        under ZeRO-3, whose parameters are partitioned outside a forward."""
        if self.zero3:
            raise ValueError("DeepSpeedEngine.add_grads: not supported under ZeRO-3 (parameters are partitioned)")
        surrogate = sum((p * g.to(p.dtype).detach()).sum() for p, g in zip(self.params, grads))
        self.engine.backward(surrogate, scale_wrt_gas=False)

    def set_lr(self, lr: float) -> None:
        for g in self.engine.optimizer.param_groups:  # the ZeRO optimizer's groups are the client's
            g["lr"] = lr

    def step(self, max_grad_norm: float) -> float:
        if max_grad_norm != self.config["gradient_clipping"]:
            raise ValueError(f"DeepSpeedEngine.step: max_grad_norm={max_grad_norm} but the engine clips at "
                             f"{self.config['gradient_clipping']} (train.max_grad_norm when it was built)")
        self.engine.step()  # a non-finite gradient norm skips the step (ZeRO's overflow check, _SkippingAdamW)
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

    def exp_avg_sq(self, params) -> list[torch.Tensor] | None:
        """AdamW's second-moment EMA v of each of ``params``, full (None before the first step). ZeRO-1/2
        keep it in fp32 partitions: DeepSpeed's ``safe_get_full_optimizer_state`` assembles each (a
        collective: call on every rank, same order); without ZeRO it is the client optimizer's state."""
        from deepspeed.utils import safe_get_full_optimizer_state

        out = []
        for p in params:
            v = safe_get_full_optimizer_state(p, "exp_avg_sq") if self.stage in (1, 2) else None
            if v is None:
                v = self.optimizer.state.get(p, {}).get("exp_avg_sq") if self.stage == 0 else None
            if v is None:
                return None
            out.append(v.reshape(p.shape))
        return out

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
