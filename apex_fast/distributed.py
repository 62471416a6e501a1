"""Processes and the optimizer engine. One process: plain torch (AdamW, gradient clipping).
Several processes (torchrun / deepspeed launcher): torch.distributed collectives; with
``cfg.deepspeed`` set, the DeepSpeed engine owns the optimizer step (ZeRO)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

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

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def init(cfg) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world, local, device)


class TorchEngine:
    """AdamW + global-norm clipping; gradients averaged over ranks when distributed."""

    def __init__(self, cfg, params, runtime: Runtime):
        t = cfg.train
        self.params = params
        self.runtime = runtime
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                           weight_decay=t.weight_decay)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        if self.runtime.distributed:
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.runtime.world_size
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def make_engine(cfg, model, params, runtime: Runtime):
    if cfg.deepspeed:
        raise NotImplementedError("deepspeed: the DeepSpeed engine is not wired yet (issue 6); drop --deepspeed")
    return TorchEngine(cfg, params, runtime)
