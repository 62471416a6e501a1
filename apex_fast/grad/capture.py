"""All K per-objective gradients of the GRPO surrogate from ONE backward pass (docs/DESIGN.md, "The
multi-objective gradient pipeline").

The surrogate is linear in the per-sample advantages: with u_i the unweighted per-sample loss (for
GRPO, ``-ratio_i / denominator`` on the unclipped branch), the loss of objective k is
``sum_i W[i, k] u_i`` with ``W[i, k] = Ahat[i, k] * clip_mask[i]``. Samples are independent in the
transformer (no cross-sample op), so at a linear layer with input a_i [L, in] and output gradient
delta_i [L, out] of ``sum_i u_i`` (sample i's L rows), objective k's weight gradient is

    G_k = sum_i W[i, k] delta_i^T a_i             (= delta^T diag(W[:, k] per row) a)

One backward of ``sum_i u_i`` therefore gives every G_k at every trainable LoRA linear (peft's
lora_A and lora_B, each a bias-free ``nn.Linear``; peft multiplies by ``scaling`` outside lora_B, so
the delta seen at lora_B's output already carries it). The products are formed inside a custom
``autograd.Function`` around those linears (``_CapturedLinear``): its forward saves the input as
F.linear would; its backward returns the unweighted input gradient (so every layer below sees the
same delta as a normal backward) and, instead of the one weight gradient, adds the K weighted
products into an fp32 ``[K, out, in]`` buffer. An optional extra column (``update`` weights, the
advantages actually trained on) is returned as the ordinary weight gradient, so ``.grad`` (and
DeepSpeed's gradient hooks) receive the real update from the same backward.

Why an ``autograd.Function`` and not module or tensor hooks: under gradient checkpointing the
forward runs again during backward (hooks would fire twice), and hooks also fire in no-grad
rollouts; a Function's backward runs exactly once per recorded use, and no-grad forwards take the
plain ``F.linear`` path.

Cost of the products: for a layer seen with L rows per sample, either per-sample products
``P_i = delta_i^T a_i`` (one batched GEMM, ``M out in`` flops for M = n L rows, the cost of the
ordinary weight gradient) then ``W^T P`` (``K n out in``), or ``ops.weighted_grads`` with the
weights repeated per row (``K M out in``); the cheaper is picked per layer (``L > K``: per-sample).
Products of half-precision activations are accumulated in fp32.

    cap = ObjectiveGradients(transformer, params, K=4)
    with cap.capture(W, update=A_masked):      # W [n, K], update [n] or None
        loss_unweighted.backward()             # any number of times: products accumulate
    J = cap.jacobian()                          # per-parameter [K, *p.shape], params order
    cap.zero_()
"""
from __future__ import annotations

import contextlib
import fnmatch
import re

import torch
import torch.nn.functional as F

from ..ops import weighted_grads

_LORA_LINEAR = re.compile(r"\.lora_[AB]\.[^.]+$")
_HALF = (torch.float16, torch.bfloat16)


def lora_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every trainable peft LoRA linear (lora_A / lora_B of an adapter), in module order."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and _LORA_LINEAR.search(name) and mod.weight.requires_grad:
            out.append((name, mod))
    return out


def weighted_products(delta: torch.Tensor, a: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """G [C, out, in] fp32 (fp64 for fp64 inputs), ``G[c] = sum_i W[i, c] delta_i^T a_i`` where sample i
    holds rows ``i*L .. (i+1)*L - 1`` of delta [n*L, out] and a [n*L, in]; W [n, C]."""
    n, C = W.shape
    M, out_f = delta.shape
    in_f = a.shape[1]
    L = M // n
    acc = torch.float64 if delta.dtype == torch.float64 else torch.float32
    if delta.dtype in _HALF or a.dtype in _HALF:
        delta, a = delta.to(acc), a.to(acc)
    Wc = W.to(acc)
    if L > C:  # per-sample products: one batched GEMM (the cost of the plain weight gradient), then W^T P
        P = torch.bmm(delta.view(n, L, out_f).transpose(1, 2), a.view(n, L, in_f))  # [n, out, in]
        return (Wc.T @ P.view(n, -1)).view(C, out_f, in_f)
    rows = Wc.repeat_interleave(L, 0).contiguous()  # [M, C]: each row weighted by its sample's weights
    return weighted_grads(delta.contiguous(), a.contiguous(), rows).to(acc)


class _Slot:
    """One captured LoRA linear: its weight, the [K, out, in] fp32 buffer (None when the layer only
    passes the update column through), and its owner session."""

    def __init__(self, session, name: str, module: torch.nn.Linear, collect: bool):
        self.session, self.name, self.module, self.collect = session, name, module, collect
        self.J: torch.Tensor | None = None
        self.kl: torch.Tensor | None = None  # the KL term's gradient (backward_kl), Gram layers only


class _CapturedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, slot):
        ctx.save_for_backward(x, weight)
        ctx.slot = slot
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        slot = ctx.slot
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_x, None, None
        d2 = grad_out.reshape(-1, grad_out.shape[-1])
        a2 = x.reshape(-1, x.shape[-1])
        s = slot.session
        if s.capturing_kl:  # the KL term's backward: the plain weight gradient, kept for the Gram layers
            acc = torch.float64 if d2.dtype == torch.float64 else torch.float32
            G = d2.T.to(acc) @ a2.to(acc)
            if slot.in_gram:
                slot.kl = G.clone() if slot.kl is None else slot.kl.add_(G)
            return grad_x, G.to(weight.dtype), None
        if not s.capturing:  # an ordinary backward (e.g. the KL term's): the plain weight gradient
            return grad_x, (d2.T.to(weight.dtype) @ a2.to(weight.dtype)), None
        take_J = slot.collect and s.W is not None
        Wc = s.columns(take_J)
        if Wc is None:
            return grad_x, None, None
        if grad_out.shape[0] != Wc.shape[0] or d2.shape[0] % Wc.shape[0]:
            raise RuntimeError(
                f"one_backward: LoRA layer {slot.name} saw a batch of {grad_out.shape[0]} (shape "
                f"{tuple(grad_out.shape)}) but the capture has weights for {Wc.shape[0]} samples; every LoRA "
                f"input must be batch-first with one row block per sample")
        G = weighted_products(d2, a2, Wc)
        if take_J:
            K = s.W.shape[1]
            if slot.J is None:
                slot.J = torch.zeros(K, *weight.shape, dtype=G.dtype, device=G.device)
            slot.J += G[:K]
        grad_w = G[-1].to(weight.dtype) if s.update is not None else None
        return grad_x, grad_w, None


class ObjectiveGradients:
    """Per-objective gradients of the trainable LoRA linears of ``model`` from one backward.

    ``params``: the trainable parameters in the order J is returned (every one must be the weight of
    a LoRA linear). ``gram_layers``: glob patterns (fnmatch) of module names whose gradients enter
    ``jacobian(gram=True)`` (None: all); ``collect_all``: buffer every layer anyway (needed when the
    update is combined from J, ``c^T J``), else layers outside ``gram_layers`` only pass the update
    column through.
    """

    def __init__(self, model, params: list[torch.Tensor], K: int, gram_layers: list[str] | None = None,
                 collect_all: bool = True):
        self.K = K
        self.W: torch.Tensor | None = None
        self.update: torch.Tensor | None = None
        self.capturing = False
        self.capturing_kl = False
        self._cols: dict = {}
        mods = lora_linears(model)
        by_param = {id(m.weight): (n, m) for n, m in mods}
        missing = [i for i, p in enumerate(params) if id(p) not in by_param]
        if missing:
            raise ValueError(f"one_backward: {len(missing)} trainable parameters are not LoRA linear weights (first: "
                             f"index {missing[0]}, shape {tuple(params[missing[0]].shape)}); per-objective gradients "
                             f"from one backward need LoRA (lora.enabled: true) or balance.gradients: k_backward")
        self.slots: list[_Slot] = []
        for p in params:
            name, mod = by_param[id(p)]
            if mod.bias is not None:
                raise ValueError(f"one_backward: LoRA linear {name} has a bias")
            in_gram = gram_layers is None or any(fnmatch.fnmatch(name, g) or g in name for g in gram_layers)
            slot = _Slot(self, name, mod, collect=collect_all or in_gram)
            slot.in_gram = in_gram
            self.slots.append(slot)
        if not any(s.in_gram for s in self.slots):
            raise ValueError(f"balance.gram_layers: {gram_layers} matches none of the {len(self.slots)} LoRA layers "
                             f"(names look like {self.slots[0].name!r})")
        self.install()

    def install(self) -> None:
        """Route the LoRA linears' grad-enabled forwards through the capture Function (done at init)."""
        for slot in self.slots:
            self._install(slot)

    @staticmethod
    def _install(slot: _Slot) -> None:
        mod = slot.module

        def forward(x, _slot=slot, _mod=mod):
            if torch.is_grad_enabled() and _mod.weight.requires_grad:
                return _CapturedLinear.apply(x, _mod.weight, _slot)
            return F.linear(x, _mod.weight)

        mod.forward = forward

    def remove(self) -> None:
        """Restore the modules' own forward."""
        for slot in self.slots:
            slot.module.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def capture(self, W: torch.Tensor | None, update: torch.Tensor | None = None):
        """Backward passes inside the block add ``W``-weighted products ([n, K]: objective columns; None:
        none) to the buffers and return the ``update``-weighted ([n]; None: no weight gradient) one
        as the weight gradient. Outside the block, backward passes are ordinary."""
        if W is not None and (W.dim() != 2 or W.shape[1] != self.K):
            raise ValueError(f"capture: W must be [n, K={self.K}], got shape {tuple(W.shape)}")
        if W is not None and update is not None and update.shape != (W.shape[0],):
            raise ValueError(f"capture: update must be [n={W.shape[0]}], got shape {tuple(update.shape)}")
        self.W = None if W is None else W.detach()
        self.update = None if update is None else update.detach()
        # the weight columns each layer multiplies by, built once per capture: [W | update], W, update
        u = None if self.update is None else self.update[:, None]
        self._cols = {True: self.W if u is None else u if self.W is None else torch.cat([self.W, u], 1),
                      False: u}
        self.capturing = True
        try:
            yield self
        finally:
            self.capturing, self.W, self.update, self._cols = False, None, None, {}

    def backward_kl(self, loss: torch.Tensor, backward) -> None:
        """``backward(loss)`` for the KL term (an ordinary weight gradient into ``.grad``), also adding that
        gradient on the Gram layers to ``kl_blocks()`` (APEX's cone_kl: the objectives' products with it)."""
        self.capturing_kl = True
        try:
            backward(loss)
        finally:
            self.capturing_kl = False

    def kl_blocks(self) -> list[torch.Tensor]:
        """The KL term's gradient per Gram-layer parameter [*shape] (``jacobian(gram=True)``'s order); zeros
        where no backward_kl ran."""
        out = []
        for s in self.slots:
            if s.in_gram:
                if s.kl is None:
                    w = s.module.weight
                    s.kl = torch.zeros(w.shape, dtype=torch.float64 if w.dtype == torch.float64 else torch.float32,
                                       device=w.device)
                out.append(s.kl)
        return out

    def columns(self, with_objectives: bool) -> torch.Tensor | None:
        """[n, C] weights of a layer that collects the objectives (``with_objectives``) or only the update."""
        return self._cols[with_objectives]

    def jacobian(self, gram: bool = False) -> list[torch.Tensor]:
        """Per-parameter blocks [K, *shape] (params order); ``gram=True``: only the Gram layers'.
        Layers that saw no capture yet give zeros."""
        out = []
        for s in self.slots:
            if gram and not s.in_gram:
                continue
            if s.J is None and s.collect:
                w = s.module.weight
                dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
                s.J = torch.zeros(self.K, *w.shape, dtype=dtype, device=w.device)
            if s.J is not None:
                out.append(s.J)
        return out

    def gram_params(self) -> list[torch.Tensor]:
        """The parameters of ``jacobian(gram=True)``'s blocks, in its order."""
        return [s.module.weight for s in self.slots if s.in_gram]

    def zero_(self) -> None:
        bufs = [s.J for s in self.slots if s.J is not None] + [s.kl for s in self.slots if s.kl is not None]
        if bufs:
            torch._foreach_zero_(bufs)
