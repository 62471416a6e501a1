"""All K per-objective gradients from one backward (apex_fast/grad/capture.py) against K separate
backward passes, on the tiny SD3 transformer with peft LoRA on every target module: fp64 and fp32,
K = 1, 2, 4, accumulation over timesteps and micro-batches, gradient checkpointing, an extra KL
backward that must not be attributed to any objective, and the combined update c^T J."""
import pytest
import torch

from apex_fast import ops
from apex_fast.grad.capture import ObjectiveGradients, lora_linears, weighted_products
from apex_fast.models import add_lora
from apex_fast.models.tiny import _transformer

torch.set_num_threads(1)
N_SAMPLES = 3


def lora_model(dtype=torch.float32, seed=0, rank=4, checkpointing=False):
    """The tiny SD3 transformer with LoRA on every target module. In fp64 without the RMS qk-norm:
    diffusers computes RMSNorm's variance in fp32 whatever the model dtype, which would round the
    gradients to fp32 precision and hide what fp64 shows (that the products are exact)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _transformer()
        if dtype == torch.float64:
            model = type(model).from_config({**model.config, "qk_norm": None})
    add_lora(model, rank=rank, alpha=2 * rank, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # lora_B starts at 0: give every LoRA weight a value so every gradient is non-trivial
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.to(dtype)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def inputs(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, 8, 8, generator=g)
    emb = torch.randn(n, 5, 64, generator=g)
    pooled = torch.randn(n, 48, generator=g)
    t = torch.rand(n, generator=g) * 1000
    target = torch.randn(n, 16, 8, 8, generator=g)
    return [v.to(dtype) for v in (x, emb, pooled, t, target)]


def forward(model, batch):
    x, emb, pooled, t, _ = batch
    return model(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t,
                 return_dict=False)[0]


def per_sample_loss(model, batch, out=None):
    """u [n]: a nonlinear per-sample function of the transformer output (stands in for -ratio)."""
    out = forward(model, batch) if out is None else out
    return torch.exp(-((out - batch[-1]) ** 2).mean((1, 2, 3)))


def kl_term(out):
    """Not linear in the advantages: a different cotangent (stands in for the KL to the reference)."""
    return (out**2).mean()


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_one_backward_equals_k_backward_passes(dtype, tol, K):
    model, params = lora_model(dtype)
    assert len(lora_linears(model)) == len(params) == 2 * 8 * 2 - 2  # all targets (block 1 has no context out)
    cap = ObjectiveGradients(model, params, K)
    gen = torch.Generator().manual_seed(K)
    ref = [torch.zeros(K, *p.shape, dtype=dtype) for p in params]
    ref_update = [torch.zeros_like(p) for p in params]
    # two micro-batches x two timesteps, accumulated in the buffers and in .grad
    for mb in range(2):
        W = torch.randn(N_SAMPLES, K, generator=gen, dtype=dtype)
        W[1] = 0  # a masked sample (advantage 0 / clipped)
        A = torch.randn(N_SAMPLES, generator=gen, dtype=dtype)
        for step in range(2):
            batch = inputs(N_SAMPLES, dtype, seed=10 * mb + step)
            u = per_sample_loss(model, batch)
            with cap.capture(W, update=A):
                u.sum().backward()
            # reference: K + 1 separate backward passes of the weighted losses, plain F.linear path
            cap.remove()
            u = per_sample_loss(model, batch)
            for k in range(K):
                gk = torch.autograd.grad((W[:, k] * u).sum(), params, retain_graph=True)
                for r, g in zip(ref, gk):
                    r[k] += g
            for r, g in zip(ref_update, torch.autograd.grad((A * u).sum(), params)):
                r += g
            for slot in cap.slots:
                cap._install(slot)
    J = cap.jacobian()
    for i, (j, r) in enumerate(zip(J, ref)):
        for k in range(K):
            assert rel(j[k], r[k]) < tol or float(r[k].abs().max()) == float(j[k].abs().max()) == 0, (i, k)
    # the last block's context query feeds nothing (SD3 drops the context after the last block)
    assert sum(float(r.abs().max()) > 0 for r in ref) == len(ref) - 2
    for p, r in zip(params, ref_update):  # the update column arrived in .grad, as a normal backward's
        assert rel(p.grad, r) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_kl_backward_is_exact_and_unattributed_and_combine_is_the_gradient_of_ahat_c(dtype, tol):
    K = 4
    model, params = lora_model(dtype, checkpointing=True)  # gradient checkpointing: forwards re-run in backward
    cap = ObjectiveGradients(model, params, K)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(N_SAMPLES, K, generator=gen, dtype=dtype)
    A = torch.randn(N_SAMPLES, generator=gen, dtype=dtype)
    c = torch.tensor([0.5, -0.2, 1.5, 0.3], dtype=dtype)
    batch = inputs(N_SAMPLES, dtype, seed=3)
    out = forward(model, batch)  # one forward shared by both backward passes, as in the learner
    u, kl = per_sample_loss(model, batch, out), kl_term(out)
    with cap.capture(W, update=A):
        u.sum().backward(retain_graph=True)
    J_before_kl = [j.clone() for j in cap.jacobian()]
    kl.backward()  # outside capture: an ordinary backward, into .grad only
    assert all(torch.equal(a, b) for a, b in zip(J_before_kl, cap.jacobian()))
    got_grad = [p.grad.clone() for p in params]
    d = ops.combine(cap.jacobian(), c)
    cap.remove()
    model.disable_gradient_checkpointing()
    for p in params:
        p.grad = None
    out = forward(model, batch)
    u = per_sample_loss(model, batch, out)
    want_grad = torch.autograd.grad((A * u).sum() + kl_term(out), params, retain_graph=True)
    want_d = torch.autograd.grad(((W @ c) * u).sum(), params)
    for g, w in zip(got_grad, want_grad):
        assert rel(g, w) < tol
    for g, w in zip(d, want_d):
        assert rel(g, w) < tol


def test_gradient_checkpointing_gives_the_same_products():
    out = []
    for ckpt in (False, True):
        model, params = lora_model(torch.float64, checkpointing=ckpt)
        cap = ObjectiveGradients(model, params, 2)
        W = torch.tensor([[1.0, 0.5], [-2.0, 0.0], [0.3, 1.0]], dtype=torch.float64)
        with cap.capture(W):
            per_sample_loss(model, inputs(N_SAMPLES, torch.float64, seed=5)).sum().backward()
        assert all(p.grad is None for p in params)  # no update column: .grad untouched
        out.append([j.clone() for j in cap.jacobian()])
    for a, b in zip(*out):
        assert rel(a, b) < 1e-12


def test_no_grad_forwards_are_untouched_and_gram_layers_select_blocks():
    model, params = lora_model()
    batch = inputs(2, torch.float32, seed=1)
    with torch.no_grad():
        before = per_sample_loss(model, batch)
    cap = ObjectiveGradients(model, params, 2, gram_layers=["transformer_blocks.1.*"], collect_all=False)
    with torch.no_grad():
        assert torch.equal(per_sample_loss(model, batch), before)
    assert all(s.J is None for s in cap.slots)
    with cap.capture(torch.ones(2, 2), update=torch.ones(2)):
        per_sample_loss(model, batch).sum().backward()
    gram_blocks = cap.jacobian(gram=True)
    assert 0 < len(gram_blocks) < len(params)
    assert all(s.J is None for s in cap.slots if not s.in_gram)  # outside the Gram: update column only
    assert all(p.grad is not None for p in params)
    with pytest.raises(ValueError, match="gram_layers"):
        ObjectiveGradients(model, params, 2, gram_layers=["nothing_matches"])


@pytest.mark.parametrize("L", [1, 2, 7])
def test_weighted_products_both_paths_match_the_definition(L):
    g = torch.Generator().manual_seed(L)
    n, out_f, in_f, C = 4, 5, 6, 3
    delta = torch.randn(n * L, out_f, generator=g, dtype=torch.float64)
    a = torch.randn(n * L, in_f, generator=g, dtype=torch.float64)
    W = torch.randn(n, C, generator=g, dtype=torch.float64)
    want = torch.stack([sum(W[i, c] * delta[i * L:(i + 1) * L].T @ a[i * L:(i + 1) * L] for i in range(n))
                        for c in range(C)])
    assert torch.allclose(weighted_products(delta, a, W), want, atol=1e-12)
    # half precision: products accumulated in fp32
    got = weighted_products(delta.bfloat16(), a.bfloat16(), W.float())
    assert got.dtype == torch.float32
    assert rel(got.double(), want) < 2e-2
