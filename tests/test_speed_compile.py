"""model.compile: the transformer through torch.compile in place, the LoRA linears' forwards
installed once so lora_merged's no-grad forwards reuse the graphs (models/compile.py,
models/lora.lora_static_forwards). The graphs are
traced with the "eager"/"aot_eager" backends here (dynamo and AOTAutograd, no code generation: the
same graphs, guards and recompiles as inductor, in seconds); bench/epoch.py measures inductor."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apex_fast.config import ConfigError, load_config
from apex_fast.models import add_lora, build_tiny_pipeline, lora_disabled, lora_merged, lora_static_forwards
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


def test_static_forwards_give_lora_merged_the_same_function():
    """lora_merged with the forwards installed once (lora_static_forwards) equals peft's forward and
    the patched forwards, the mixed batch (policy rows, then the base model's) included; outside it
    (and with grad) the layers run peft's own forward."""
    patched, static = lora_transformer(), lora_transformer()
    lora_static_forwards(static)
    x, c = inputs(patched)
    kw = dict(hidden_states=x, encoder_hidden_states=c.embeds, pooled_projections=c.pooled,
              timestep=torch.full((4,), 500.0), return_dict=False)
    outs = {}
    with torch.no_grad():
        for name, tr in (("patched", patched), ("static", static)):
            with lora_merged(tr) as merged:
                assert merged
                outs[name, "merged"] = tr(**kw)[0]
            with lora_merged(tr, lora_rows=2):
                outs[name, "mixed"] = tr(**kw)[0]
            outs[name, "peft"] = tr(**kw)[0]
            with lora_disabled(tr):
                outs[name, "base"] = tr(**kw)[0]
    for key in ("merged", "mixed", "peft", "base"):
        torch.testing.assert_close(outs["static", key], outs["patched", key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["static", "merged"], outs["static", "peft"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["static", "mixed"][:2], outs["static", "peft"][:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["static", "mixed"][2:], outs["static", "base"][2:], rtol=1e-4, atol=1e-5)
    assert float((outs["static", "peft"] - outs["static", "base"]).abs().max()) > 1e-3  # the LoRA matters
    y = static(**kw)[0]  # grad enabled: peft's forward, the LoRA trains
    y.square().sum().backward()
    assert all(p.grad is not None for n, p in static.named_parameters() if "lora_" in n)


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
    # no-grad: one graph for the 4N rows (policy merged, then the reference's), one for CFG's 2N rows
    assert backend.graphs == 2
    # training: v_c with grad, v_u without (merged): the grad-mode graph and the N-row no-grad graph
    v_e = predict_velocity(eager, x, torch.tensor(0.5), c, 4.5, train=True)
    v_c = predict_velocity(compiled, x, torch.tensor(0.5), c, 4.5, train=True)
    torch.testing.assert_close(v_c, v_e, rtol=1e-4, atol=1e-5)
    g_e = torch.autograd.grad(v_e.square().sum(), [p for p in eager.parameters() if p.requires_grad])
    g_c = torch.autograd.grad(v_c.square().sum(), [p for p in compiled.parameters() if p.requires_grad])
    for a, b in zip(g_e, g_c):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
    assert backend.graphs == 4
    predict_velocity(compiled, x, torch.tensor(0.25), c, 4.5, train=True)  # same shapes: no recompile
    assert backend.graphs == 4


@pytest.mark.parametrize("extra, needle", [
    (["deepspeed=configs/ds_zero2.json"], "DeepSpeed"),
    (["balance.gradients=one_backward"], "balance.gradients: proxy"),
    (["algorithm=dpo"], "algorithm: grpo"),
])
def test_compile_refuses_what_it_does_not_support(extra, needle):
    with pytest.raises(ConfigError, match="model.compile") as e:
        load_config(ROOT / "configs/tiny_cpu.yaml", ["model.compile=true", *extra])
    assert needle in str(e.value)


@pytest.mark.slow
def test_a_compiled_run_trains_the_same_weights_and_exports_the_same_lora(tmp_path, monkeypatch):
    """A whole run (sampling with the rollout's reference rows, training with the reused and the
    recomputed unconditional branch, EMA, evaluation, checkpoint, export) with model.compile equals
    the eager run up to float rounding, and its files have the same keys."""
    from safetensors.torch import load_file

    from apex_fast.models import lora_state_dict
    from apex_fast.train import Trainer

    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")  # AOTAutograd's graphs, no code generation
    fast = ["model.pretrained=tiny-random", "eval.images_per_prompt=1", "sample.num_steps=4", "sample.group_size=2",
            "sample.prompts_per_epoch=2", "sample.batch_size=4", "sample.max_sequence_length=8",
            "train.micro_batch_size=2", "train.lr=1e-2", "train.timestep_fraction=0.5", "train.kl_beta=0.04",
            "train.optimizer_steps_per_epoch=2", "train.timesteps_per_forward=2", "train.ema=true",
            "train.epochs=1", "eval.num_steps=2", "eval.num_prompts=2", "eval.every=1", "checkpoint.every=1",
            "log.progress=false", "log.tensorboard=false", "log.plot=false",
            'rewards=[{"name":"jpeg_compressibility","weight":1.0}]']
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["model.compile=true"])):
        tr = Trainer(load_config(ROOT / "configs/tiny_cpu.yaml", fast + [f"log.output_dir={tmp_path / name}", *extra]))
        tr.fit()
        assert compile_mod.is_compiled(tr.transformer) == (name == "compiled")
        assert ("torch.compile" in tr.banner()) == (name == "compiled")  # the slow first epoch is announced
        runs[name] = ({k: v.clone() for k, v in lora_state_dict(tr.transformer).items()},
                      load_file(str(tmp_path / name / "lora/pytorch_lora_weights.safetensors")),
                      tr.eval_history[1])
    (w_e, lora_e, ev_e), (w_c, lora_c, ev_c) = runs["eager"], runs["compiled"]
    assert w_e.keys() == w_c.keys() and lora_e.keys() == lora_c.keys()
    # the same updates up to rounding (Adam magnifies it where gradients are near 0, see
    # tests/test_flowgrpo_parity.py); the LoRA moved far more than that
    assert max(float((w_e[k] - w_c[k]).abs().max()) for k in w_e) < 2e-4
    assert max(float(v.abs().max()) for k, v in w_e.items() if "lora_B" in k) > 1e-3
    for k in ev_e:
        assert ev_c[k] == pytest.approx(ev_e[k], rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_compiled_training_forward_with_gradient_checkpointing_gives_the_same_gradient():
    eager, compiled = lora_transformer(), lora_transformer()
    for tr in (eager, compiled):
        tr.enable_gradient_checkpointing()
        tr.train()
    compile_mod.compile_transformer(compiled, backend="eager")
    x, c = inputs(eager)
    grads = []
    for tr in (eager, compiled):
        v = predict_velocity(tr, x, torch.tensor(0.5), c, 4.5, train=True)
        grads.append(torch.autograd.grad(v.square().sum(), [p for p in tr.parameters() if p.requires_grad]))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
    assert max(float(g.abs().max()) for g in grads[0]) > 1e-4
