"""The DPO reference model as a second LoRA adapter on the same transformer (as Flow-GRPO's
train_sd3_dpo.py keeps a "ref" adapter), with BalancedDPO's dynamic update (docs/SPEC.md section 6).

    ref = ReferenceAdapter(transformer, update_every=40)      # or ema=0.99
    with ref.active():      # forwards here run the reference (no grad wanted)
        ...
    ref.step()              # after every optimizer step: copy every N steps, or EMA every step

Until its first update the reference IS the LoRA-disabled base model (``active()`` disables the
adapters then), exactly, whatever the learner's LoRA initialisation. At the first update the
reference adapter starts from a copy of the learner's weights at construction (for gaussian LoRA
init, lora_B = 0: the base again), so an EMA starts from the base too. peft's ``set_adapter``
switches requires_grad to the active adapter; ``active()`` restores the learner's trainable state.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from apex_fast.models.lora import DEFAULT_ADAPTER, lora_disabled

REF_ADAPTER = "ref"


def _adapter_params(transformer, adapter: str) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters of one adapter by a name shared across adapters ('...lora_A.<adapter>.weight'
    -> '...lora_A.weight')."""
    tag = f".{adapter}."
    return {n.replace(tag, "."): p for n, p in transformer.named_parameters() if "lora_" in n and tag in n}


class ReferenceAdapter:
    def __init__(self, transformer, update_every: int = 40, ema: float = 0.0, learner: str = DEFAULT_ADAPTER,
                 name: str = REF_ADAPTER):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"dpo.ref_ema: must be in [0, 1) (0: copy every dpo.ref_update_every steps), got {ema}")
        if update_every < 1:
            raise ValueError(f"dpo.ref_update_every: must be >= 1, got {update_every}")
        if learner not in getattr(transformer, "peft_config", {}):
            raise ValueError("dpo: the transformer has no LoRA adapter; the reference is a second adapter (lora.enabled: true)")
        self.transformer, self.learner, self.name = transformer, learner, name
        self.update_every, self.ema = int(update_every), float(ema)
        learner_params = _adapter_params(transformer, learner)
        trainable = {n: p.requires_grad for n, p in learner_params.items()}
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            transformer.add_adapter(transformer.peft_config[learner], adapter_name=name)
        self._activate(learner)
        self.learner_params = _adapter_params(transformer, learner)
        self.ref_params = _adapter_params(transformer, name)
        if set(self.learner_params) != set(self.ref_params):
            raise RuntimeError("dpo: the reference adapter's parameters do not mirror the learner's")
        for n, p in self.learner_params.items():
            p.requires_grad_(trainable[n])
        with torch.no_grad():
            for n, q in self.ref_params.items():
                q.data = self.learner_params[n].detach().clone()  # same dtype (fp32 LoRA) and values
                q.requires_grad_(False)
        self.is_base = True  # the reference is the LoRA-disabled base until the first update
        self.steps = 0  # optimizer steps seen
        self.updates = 0  # reference updates done

    def _activate(self, adapter: str) -> None:
        grads = {n: p.requires_grad for n, p in getattr(self, "learner_params", {}).items()}
        self.transformer.set_adapter(adapter)
        for n, p in getattr(self, "learner_params", {}).items():
            p.requires_grad_(grads[n])
        for p in getattr(self, "ref_params", {}).values():
            p.requires_grad_(False)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Forwards inside run the reference model (the base while ``is_base``)."""
        if self.is_base:
            with lora_disabled(self.transformer):
                yield
            return
        self._activate(self.name)
        try:
            yield
        finally:
            self._activate(self.learner)

    @torch.no_grad()
    def step(self) -> bool:
        """Call after each optimizer step; returns True when the reference changed."""
        self.steps += 1
        if self.ema > 0:
            for n, q in self.ref_params.items():
                q.lerp_(self.learner_params[n].detach().to(q.dtype), 1.0 - self.ema)
        elif self.steps % self.update_every == 0:
            for n, q in self.ref_params.items():
                q.copy_(self.learner_params[n].detach())
        else:
            return False
        self.is_base = False
        self.updates += 1
        return True

    def state_dict(self) -> dict:
        return {"weights": {n: q.detach().clone() for n, q in self.ref_params.items()},
                "is_base": self.is_base, "steps": self.steps, "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        w = state["weights"]
        if set(w) != set(self.ref_params):
            raise KeyError("dpo reference adapter state does not match this model's LoRA (same lora.rank and targets?)")
        for n, q in self.ref_params.items():
            q.copy_(w[n])
        self.is_base = bool(state["is_base"])
        self.steps, self.updates = int(state["steps"]), int(state["updates"])
