"""model.compile: the transformer through torch.compile in place, with the LoRA merged into swapped
weights for no-grad forwards (models/compile.py, models/lora.lora_merged_weights). The graphs are
traced with the "eager"/"aot_eager" backends here (dynamo and AOTAutograd, no code generation: the
same graphs, guards and recompiles as inductor, in seconds); bench/epoch.py measures inductor."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apex_fast.config import ConfigError, load_config
from apex_fast.models import add_lora, build_tiny_pipeline, lora_disabled, lora_merged, lora_merged_weights
from apex_fast.models import compile as compile_mod
from apex_fast.rl.rollout import Conditioning, predict_velocity

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def lora_transformer(seed=0):
    tr = add_lora(build_tiny_pipeline(seed).transformer, rank=8, alpha=16)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:  # a LoRA away from the base model
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    return tr.eval()


def inputs(tr, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, D, P = 10, tr.config.joint_attention_dim, tr.config.pooled_projection_dim
    cond = Conditioning(torch.randn(n, L, D, generator=g), torch.randn(n, P, generator=g),
                        torch.randn(n, L, D, generator=g), torch.randn(n, P, generator=g))
    return torch.randn(n, 16, 8, 8, generator=g), cond


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given (one per compile or recompile)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_lora_merged_weights_equals_peft_and_restores_the_weights():
    tr = lora_transformer()
    x, c = inputs(tr)
    kw = dict(hidden_states=x, encoder_hidden_states=c.embeds, pooled_projections=c.pooled,
              timestep=torch.full((4,), 500.0), return_dict=False)
    originals = {n: p for n, p in tr.named_parameters()}
    with torch.no_grad():
        peft_out = tr(**kw)[0]
        with lora_merged_weights(tr) as merged:
            out = tr(**kw)[0]
        with lora_disabled(tr):
            base = tr(**kw)[0]
    assert merged
    torch.testing.assert_close(out, peft_out, rtol=1e-4, atol=1e-5)
    assert float((peft_out - base).abs().max()) > 1e-3  # the LoRA matters
    # the very same parameter objects are back (optimizer, EMA and engine hold them), adapters on
    assert all(p is originals[n] for n, p in tr.named_parameters())
    from peft.tuners.lora import LoraLayer

    assert not any(m.disable_adapters for m in tr.modules() if isinstance(m, LoraLayer))
    with lora_merged_weights(tr) as merged:  # grad enabled: nothing changes
        assert not merged and tr(**kw)[0].requires_grad


def test_compiled_predict_velocity_equals_eager_and_compiles_once_per_shape_and_mode():
    eager, compiled = lora_transformer(), lora_transformer()
    backend = CountingBackend()
    compile_mod.compile_transformer(compiled, backend=backend)
    assert compile_mod.is_compiled(compiled) and not compile_mod.is_compiled(eager)
    x, c = inputs(eager)
    with torch.no_grad():
        for step in range(3):  # sampling: reference rows at some steps, plain CFG at others
            sigma = torch.tensor(1.0 - 0.25 * step)
            for model_out, ref_out in ((predict_velocity(eager, x, sigma, c, 4.5, parts=True, reference=True),
                                        predict_velocity(compiled, x, sigma, c, 4.5, parts=True, reference=True)),
                                       (predict_velocity(eager, x, sigma, c, 4.5, parts=True),
                                        predict_velocity(compiled, x, sigma, c, 4.5, parts=True))):
                for a, b in zip(model_out, ref_out):
                    if a is None:
                        assert b is None
                    else:
                        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # no-grad: one graph for the 2N rows (policy merged, reference base weights, CFG: one shape)
    assert backend.graphs == 1
    # training: v_c with grad, v_u without (merged): the grad-mode graph and the N-row no-grad graph
    v_e = predict_velocity(eager, x, torch.tensor(0.5), c, 4.5, train=True)
    v_c = predict_velocity(compiled, x, torch.tensor(0.5), c, 4.5, train=True)
    torch.testing.assert_close(v_c, v_e, rtol=1e-4, atol=1e-5)
    g_e = torch.autograd.grad(v_e.square().sum(), [p for p in eager.parameters() if p.requires_grad])
    g_c = torch.autograd.grad(v_c.square().sum(), [p for p in compiled.parameters() if p.requires_grad])
    for a, b in zip(g_e, g_c):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
    assert backend.graphs == 3
    predict_velocity(compiled, x, torch.tensor(0.25), c, 4.5, train=True)  # same shapes: no recompile
    assert backend.graphs == 3


@pytest.mark.parametrize("extra, needle", [
    (["deepspeed=configs/ds_zero2.json"], "DeepSpeed"),
    (["balance.gradients=one_backward"], "balance.gradients: proxy"),
    (["algorithm=dpo"], "algorithm: grpo"),
])
def test_compile_refuses_what_it_does_not_support(extra, needle):
    with pytest.raises(ConfigError, match="model.compile") as e:
        load_config(ROOT / "configs/tiny_cpu.yaml", ["model.compile=true", *extra])
    assert needle in str(e.value)
