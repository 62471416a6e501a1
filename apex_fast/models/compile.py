"""``model.compile``: the transformer's forward through ``torch.compile`` (inductor), in place
(``nn.Module.compile``: the same module object, state dict keys and hooks' owners; checkpoints and
LoRA exports are unchanged).

The first call of every new input shape and mode (no-grad sampling, training with grad, the
evaluation batch) compiles, which takes seconds to minutes; later calls run the compiled code.
Shapes are static (``dynamic=False``): an epoch has few distinct ones (the sampling batch's CFG
rows, with the reference's, the training micro-batch's rows), and static kernels are the fastest.
The LoRA linears get forwards installed once (``lora_static_forwards``), so ``lora_merged``'s
no-grad forwards (sampling, the reference rows, the detached unconditional branch) reuse their
graph with the merged weight as an input instead of recompiling on every call.
"""
from __future__ import annotations

import torch

from .lora import lora_static_forwards


BACKEND = "inductor"  # torch.compile's backend (tests trace with "eager"/"aot_eager": no code generation)


def compile_transformer(transformer, backend: str | None = None) -> None:
    """Compile ``transformer``'s forward in place."""
    if getattr(transformer, "peft_config", None) is not None:
        lora_static_forwards(transformer)
    # every distinct shape and grad mode is one cache entry (sampling, training, evaluation, smaller
    # last batches): room for more than the default 8 before dynamo falls back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    transformer.compile(backend=backend or BACKEND, dynamic=False)


def is_compiled(module) -> bool:
    """Whether ``module`` was compiled in place (``nn.Module.compile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None
