"""The reference path (``balance.gradients: k_backward``): the same per-objective gradients as
grad/capture.py, by K separate backward passes (``torch.autograd.grad``) of the per-objective
losses over one forward. About K times the backward cost; kept to check and to fall back on."""
from __future__ import annotations

import fnmatch

import torch


class KBackwardGradients:
    """Same interface as ``ObjectiveGradients`` (jacobian, zero_); fill with ``accumulate(losses)``."""

    def __init__(self, model, params: list[torch.Tensor], K: int, gram_layers: list[str] | None = None,
                 collect_all: bool = True):
        self.K, self.params = K, params
        names = {id(p): n.rsplit(".", 1)[0] for n, p in model.named_parameters()}
        self.in_gram = [gram_layers is None or any(fnmatch.fnmatch(names[id(p)], g) or g in names[id(p)]
                                                   for g in gram_layers) for p in params]
        if not any(self.in_gram):
            raise ValueError(f"balance.gram_layers: {gram_layers} matches none of the trainable parameters")
        self.collect = [collect_all or g for g in self.in_gram]
        acc = [torch.float64 if p.dtype == torch.float64 else torch.float32 for p in params]
        self.J = [torch.zeros(K, *p.shape, dtype=a, device=p.device) if c else None
                  for p, a, c in zip(params, acc, self.collect)]
        self.kl = [torch.zeros(p.shape, dtype=a, device=p.device) for p, a, g in zip(params, acc, self.in_gram) if g]

    def accumulate(self, losses: list[torch.Tensor]) -> None:
        """Add the gradients of ``losses[k]`` (one per objective, sharing a graph) to row k."""
        targets = [p for p, c in zip(self.params, self.collect) if c]
        blocks = [j for j in self.J if j is not None]
        for k, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
            for b, g in zip(blocks, grads):
                if g is not None:
                    b[k] += g

    def backward_kl(self, loss: torch.Tensor, backward) -> None:
        """The KL term's gradient on the Gram layers (one more autograd.grad) into ``kl_blocks()``, then
        ``backward(loss)`` as usual."""
        targets = [p for p, g in zip(self.params, self.in_gram) if g]
        grads = torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
        for b, g in zip(self.kl, grads):
            if g is not None:
                b += g
        backward(loss)

    def kl_blocks(self) -> list[torch.Tensor]:
        return list(self.kl)

    def jacobian(self, gram: bool = False) -> list[torch.Tensor]:
        return [j for j, g in zip(self.J, self.in_gram) if j is not None and (g or not gram)]

    def gram_params(self) -> list[torch.Tensor]:
        """The parameters of ``jacobian(gram=True)``'s blocks, in its order."""
        return [p for p, j, g in zip(self.params, self.J, self.in_gram) if j is not None and g]

    def zero_(self) -> None:
        for j in self.J + self.kl:
            if j is not None:
                j.zero_()
