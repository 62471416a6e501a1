"""apex_fast.models: tiny pipeline, loading, text encoding, LoRA (all offline, CPU, 1 thread)."""

import importlib.util
import json

import pytest
import torch

torch.set_num_threads(1)

from apex_fast.models import (  # noqa: E402
    PROMPTS_DIR,
    TINY_IMAGE_SIZE,
    ModelLoadError,
    add_lora,
    build_tiny_pipeline,
    encode_negative,
    encode_prompts,
    load_lora_state_dict,
    load_pipeline,
    lora_disabled,
    lora_parameters,
    lora_state_dict,
    resolve_dtype,
    save_lora_diffusers,
)
from apex_fast.models.tiny import TINY_TOKENIZER_DIR, TINY_VAE_DIR, count_parameters, tiny_clip_tokenizer  # noqa: E402

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
# measured on the committed asset (scripts/train_tiny_vae.py defaults); thresholds with margin
VAE_MIN_PSNR_SEEN = 17.0  # dB; measured 18.1 (mean-colour baseline 12.9)
VAE_MIN_PSNR_UNSEEN = 14.0  # measured 15.1 (mean-colour baseline 13.2)
DECODED_COLORFULNESS_MIN_STD = 5.0  # measured 8.5; random VAE: 2.5
DECODED_CONTRAST_MIN_STD = 0.006  # measured 0.0087; random VAE: 0.004
CONTRAST_SCALE_MIN_GAIN = 0.06  # latents x2 vs x0.25; measured 0.099; random VAE: 0.000
JPEG_SCALE_MIN_GAIN_KB = 0.5  # measured 0.69; random VAE: 0.40


def _state(pipe, name):
    return getattr(pipe, name).state_dict()


def _same_weights(a, b, name) -> bool:
    sa, sb = _state(a, name), _state(b, name)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _velocity(transformer, seed=0, n=2):
    """One transformer call on fixed random inputs with the tiny shapes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, 8, 8, generator=g)
    ctx = torch.randn(n, 77 + 16, 64, generator=g)
    pooled = torch.randn(n, 48, generator=g)
    t = torch.tensor([900.0, 300.0][:n])
    dtype = transformer.dtype
    with torch.no_grad():
        out = transformer(hidden_states=x.to(dtype), encoder_hidden_states=ctx.to(dtype),
                          pooled_projections=pooled.to(dtype), timestep=t, return_dict=False)[0]
    return out.float()


def _perturb_lora(transformer, seed=123, std=0.2):
    """lora_B starts at zero (gaussian init): give it values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _sample(pipe, steps=4, seed=0):
    return pipe(["a red apple on a table"], num_inference_steps=steps, guidance_scale=4.5,
                generator=torch.Generator().manual_seed(seed), output_type="pt",
                max_sequence_length=16).images


# ---------------------------------------------------------------- tiny build


def test_build_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_tiny_pipeline(0), build_tiny_pipeline(0)
    assert torch.equal(torch.get_rng_state(), state)
    for name in COMPONENTS:
        assert _same_weights(a, b, name), name
    c = build_tiny_pipeline(1)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        assert not _same_weights(a, c, name), name
    assert _same_weights(a, c, "vae")  # the trained asset, whatever the seed


def test_build_is_fast():
    import time

    build_tiny_pipeline(0)  # imports, file cache
    t0 = time.perf_counter()
    build_tiny_pipeline(0)
    assert time.perf_counter() - t0 < 1.0  # ~0.2 s on an idle core; margin for a loaded machine


def test_tiny_sizes_and_shapes():
    pipe = build_tiny_pipeline(0)
    assert 80_000 <= count_parameters(pipe.transformer) <= 300_000
    assert pipe.vae_scale_factor == 8
    assert pipe.default_sample_size * pipe.vae_scale_factor == TINY_IMAGE_SIZE == 64
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == 16
    stored = json.loads((TINY_VAE_DIR / "config.json").read_text())
    assert pipe.vae.config.scaling_factor == stored["scaling_factor"] != pytest.approx(1.5305)  # measured, not SD3's
    assert pipe.vae.config.shift_factor == stored["shift_factor"]
    assert count_parameters(pipe.vae) <= 300_000
    assert (TINY_VAE_DIR / "diffusion_pytorch_model.safetensors").stat().st_size < 2_000_000
    assert pipe.scheduler.config.shift == 3.0
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None


def test_pipeline_call_gives_64px_images_deterministically():
    pipe = build_tiny_pipeline(0)
    img = _sample(pipe)
    assert img.shape == (1, 3, 64, 64)
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert img.std() > 0  # not a constant image
    assert torch.equal(img, _sample(pipe))
    assert not torch.equal(img, _sample(pipe, seed=1))


def test_with_t5_keeps_other_weights_and_uses_t5():
    plain, t5 = build_tiny_pipeline(0), build_tiny_pipeline(0, with_t5=True)
    for name in COMPONENTS:
        assert _same_weights(plain, t5, name), name
    assert t5.text_encoder_3 is not None
    tok = t5.tokenizer_3
    ids = tok("a red apple").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a red apple"
    emb, pooled = encode_prompts(t5, ["a red apple"], "cpu", max_sequence_length=16)
    emb0, _ = encode_prompts(plain, ["a red apple"], "cpu", max_sequence_length=16)
    assert emb.shape == emb0.shape == (1, 77 + 16, 64)
    assert emb0[:, 77:].abs().max() == 0  # no T5: zeros
    assert emb[:, 77:].abs().max() > 0
    assert torch.equal(emb[:, :77], emb0[:, :77])
    assert _sample(t5, steps=2).shape == (1, 3, 64, 64)


def _script(name):
    import importlib.util as iu
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = iu.spec_from_file_location(name, path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_vae_is_trained_reconstructs_and_follows_latents():
    import numpy as np

    from apex_fast.rl.rollout import decode_latents

    vae = build_tiny_pipeline(0).vae
    gen = _script("train_tiny_vae")
    seen = gen.batch(np.random.default_rng(0), 96)[:32]  # the script's fixed training set (seed 0)
    unseen = gen.batch(np.random.default_rng(1234), 32)
    for x, min_psnr in ((seen, VAE_MIN_PSNR_SEEN), (unseen, VAE_MIN_PSNR_UNSEEN)):
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
            rec = vae.decode(z).sample
        flat = x.mean((2, 3), keepdim=True).expand_as(x)
        assert gen.psnr(rec, x) > min_psnr
        assert gen.psnr(rec, x) > gen.psnr(flat, x) + 1  # better than each image's mean colour
    # the stored scaling/shift give ~unit-std latents, the transformer's noise scale
    zs = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert 0.6 < float(zs.std()) < 1.6 and abs(float(zs.mean())) < 0.3
    # different N(0, 1) latents decode to clearly different images
    noise = torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        imgs = decode_latents(vae, noise)
    assert float((imgs[:4] - imgs[4:]).abs().mean()) > 0.03


def test_tiny_vae_rewards_respond_to_latents():
    """What RL needs: the reward features of decoded N(0, 1) latents vary across samples and
    follow the latents' scale (a random VAE: colorfulness std ~2.5, contrast flat at ~0.085)."""
    sens = _script("train_tiny_vae").sensitivity(build_tiny_pipeline(0).vae)  # colorfulness, contrast, jpeg kB
    f = sens["x1"]
    assert f[:, 0].std() > DECODED_COLORFULNESS_MIN_STD
    assert f[:, 1].std() > DECODED_CONTRAST_MIN_STD
    assert sens["x2"][:, 1].mean() - sens["x0.25"][:, 1].mean() > CONTRAST_SCALE_MIN_GAIN
    assert abs(sens["x2"][:, 2].mean() - sens["x0.25"][:, 2].mean()) > JPEG_SCALE_MIN_GAIN_KB


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_loads_and_round_trips():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    assert len(tok) == 1000 and tok.model_max_length == 77
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id]) == ["<|startoftext|>", "<|endoftext|>"]
    prompt = "A Red apple on a wooden Table"
    ids = tok(prompt).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "red</w>", "apple</w>", "on</w>", "a</w>", "wooden</w>", "table</w>"]
    assert tok.decode(ids, skip_special_tokens=True) == prompt.lower()
    unseen = "zebra x7 under 42 moons!"  # byte-level: anything is encodable, nothing is unknown
    ids = tok(unseen).input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == unseen.replace(" ", "")


def test_train_tokenizer_script_reproduces_committed_asset(tmp_path):
    import importlib.util as iu
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_tokenizer.py"
    spec = iu.spec_from_file_location("train_tokenizer", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path)])
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name


def test_prompt_files():
    def read(name):
        return [line for line in (PROMPTS_DIR / name).read_text().splitlines() if line.strip()]

    sets = {n: read(n) for n in ("tiny_train.txt", "tiny_eval.txt", "ocr_train.txt", "ocr_eval.txt")}
    assert len(sets["tiny_train.txt"]) >= 50 and len(sets["ocr_train.txt"]) >= 50
    assert len(sets["tiny_eval.txt"]) >= 16 and len(sets["ocr_eval.txt"]) >= 16
    for n in ("ocr_train.txt", "ocr_eval.txt"):
        assert all(p.count('"') == 2 for p in sets[n]), n
    assert not set(sets["tiny_train.txt"]) & set(sets["tiny_eval.txt"])
    assert not set(sets["ocr_train.txt"]) & set(sets["ocr_eval.txt"])
    tok = tiny_clip_tokenizer()
    assert max(len(tok(p).input_ids) for ps in sets.values() for p in ps) <= 77


# ---------------------------------------------------------------- text encoding


def test_encode_prompts_and_negative_match_pipeline():
    pipe = build_tiny_pipeline(0)
    prompts = ["a red apple", 'a sign that says "OPEN"']
    emb, pooled = encode_prompts(pipe, prompts, "cpu", max_sequence_length=16)
    assert emb.shape == (2, 77 + 16, 64) and pooled.shape == (2, 48)
    assert not emb.requires_grad
    assert not torch.equal(emb[0], emb[1])
    ref = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=16)
    assert torch.equal(emb, ref[0]) and torch.equal(pooled, ref[2])
    neg, neg_pooled = encode_negative(pipe, 2, "cpu", max_sequence_length=16)
    assert neg.shape == (2, 77 + 16, 64) and neg_pooled.shape == (2, 48)
    # encoded once, expanded: equal up to batch-size-dependent BLAS rounding
    torch.testing.assert_close(neg, ref[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(neg_pooled, ref[3], rtol=0, atol=1e-6)
    assert not torch.allclose(neg[0], emb[0], atol=1e-3)


# ---------------------------------------------------------------- loading


def test_load_tiny_random_is_frozen():
    pipe = load_pipeline("tiny-random", seed=3)
    assert _same_weights(pipe, build_tiny_pipeline(3), "transformer")
    for name in COMPONENTS:
        assert not any(p.requires_grad for p in getattr(pipe, name).parameters()), name
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert not getattr(pipe, name).training


def test_save_pretrained_round_trip(tmp_path):
    pipe = load_pipeline("tiny-random", seed=5)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    for name in COMPONENTS:
        assert _same_weights(pipe, loaded, name), name
    assert loaded.text_encoder_3 is None
    assert loaded.scheduler.config.shift == 3.0
    a, b = _sample(pipe), _sample(loaded)
    # equal weights; BLAS may round differently on differently aligned (mmapped) buffers
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.allclose(a, _sample(load_pipeline("tiny-random", seed=6)), atol=1e-3)


@pytest.mark.parametrize("bad", ["/nonexistent/sd35", "./no/such/model"])
def test_missing_local_path_error_names_field(bad):
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(bad)
    msg = str(e.value)
    assert "model.pretrained" in msg and repr(bad) in msg
    assert "huggingface-cli download" in msg and "tiny" in msg


def test_unreachable_hub_id_error_names_field():
    with pytest.raises(ModelLoadError) as e:
        load_pipeline("apex-fast-test/no-such-model", local_files_only=True)
    msg = str(e.value)
    assert "model.pretrained" in msg and "'apex-fast-test/no-such-model'" in msg
    assert "huggingface-cli download apex-fast-test/no-such-model" in msg


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_bf16_load():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="model.dtype"):
        resolve_dtype("int8")
    pipe = load_pipeline("tiny-random", dtype="bf16")
    for name in COMPONENTS:
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}, name
    ref = build_tiny_pipeline(0)
    w16 = pipe.transformer.state_dict()["proj_out.weight"]
    assert torch.equal(w16, ref.transformer.state_dict()["proj_out.weight"].to(torch.bfloat16))
    img = _sample(pipe, steps=2)
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


def test_bf16_round_trip(tmp_path):
    build_tiny_pipeline(0).save_pretrained(tmp_path)
    pipe = load_pipeline(str(tmp_path), dtype="bf16")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16


def test_gradient_checkpointing_flag_and_backward():
    off = load_pipeline("tiny-random")
    on = load_pipeline("tiny-random", gradient_checkpointing=True)
    assert not off.transformer.gradient_checkpointing
    assert on.transformer.gradient_checkpointing
    grads = []
    for pipe in (off, on):
        tr = pipe.transformer
        add_lora(tr, rank=4, alpha=8, seed=0)
        _perturb_lora(tr)
        tr.train()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 8, 8, generator=g)
        out = tr(hidden_states=x, encoder_hidden_states=torch.randn(2, 20, 64, generator=g),
                 pooled_projections=torch.randn(2, 48, generator=g), timestep=torch.tensor([500.0, 100.0]),
                 return_dict=False)[0]
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora_parameters(tr)]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_attention_backends():
    base = _velocity(load_pipeline("tiny-random").transformer)
    eager = _velocity(load_pipeline("tiny-random", attention_backend="eager").transformer)
    torch.testing.assert_close(base, eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="model.attention_backend"):
        load_pipeline("tiny-random", attention_backend="flash9")


def test_xformers_missing_gives_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "xformers" else real(name, *a, **k))
    with pytest.raises(ImportError) as e:
        load_pipeline("tiny-random", attention_backend="xformers")
    assert "xformers" in str(e.value) and "pip install xformers" in str(e.value) and "sdpa" in str(e.value)


# ---------------------------------------------------------------- LoRA


def test_add_lora_targets_trainable_and_determinism():
    state = torch.get_rng_state()
    a = load_pipeline("tiny-random").transformer
    add_lora(a, rank=8, alpha=16, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].split("transformer_blocks.")[1].split(".", 1)[1] for n in trainable}
    # the last SD3 block is context_pre_only: it has no to_add_out
    assert targets == {"attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                       "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"}
    assert all(p.dtype == torch.float32 for p in lora_parameters(a))
    assert a.peft_config["default"].r == 8 and a.peft_config["default"].lora_alpha == 16
    b = load_pipeline("tiny-random").transformer
    add_lora(b, rank=8, alpha=16, seed=7)
    c = load_pipeline("tiny-random").transformer
    add_lora(c, rank=8, alpha=16, seed=8)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if "lora_A" in k)
    assert all(v.abs().max() == 0 for k, v in sa.items() if "lora_B" in k)  # gaussian init: starts at the base
    base = _velocity(load_pipeline("tiny-random").transformer)
    assert torch.equal(_velocity(a), base)


def test_add_lora_on_bf16_base_keeps_lora_fp32():
    tr = load_pipeline("tiny-random", dtype="bf16").transformer
    add_lora(tr, rank=4, alpha=8)
    assert {p.dtype for p in lora_parameters(tr)} == {torch.float32}
    _perturb_lora(tr)
    assert torch.isfinite(_velocity(tr)).all()


def test_lora_disabled_gives_base_and_restores():
    tr = load_pipeline("tiny-random").transformer
    base = _velocity(tr)
    add_lora(tr, rank=4, alpha=8)
    _perturb_lora(tr)
    adapted = _velocity(tr)
    assert (adapted - base).abs().max() > 1e-2
    with lora_disabled(tr):
        torch.testing.assert_close(_velocity(tr), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(_velocity(tr), adapted, rtol=0, atol=0)
    assert all(p.requires_grad for p in lora_parameters(tr)) and lora_parameters(tr)


def test_lora_state_dict_exact_restore():
    src = load_pipeline("tiny-random").transformer
    add_lora(src, rank=4, alpha=8, seed=0)
    _perturb_lora(src)
    sd = lora_state_dict(src)
    dst = load_pipeline("tiny-random").transformer
    add_lora(dst, rank=4, alpha=8, seed=99)
    assert not torch.equal(_velocity(dst), _velocity(src))
    load_lora_state_dict(dst, sd)
    assert torch.equal(_velocity(dst), _velocity(src))
    wrong = load_pipeline("tiny-random").transformer
    add_lora(wrong, rank=4, alpha=8, target_modules=["attn.to_q"])
    with pytest.raises(KeyError, match="missing|unexpected"):
        load_lora_state_dict(wrong, sd)


def test_save_lora_diffusers_loads_into_fresh_pipeline(tmp_path):
    pipe = load_pipeline("tiny-random")
    add_lora(pipe.transformer, rank=4, alpha=16, seed=0)  # alpha != rank: the scale must survive the file
    _perturb_lora(pipe.transformer)
    trained = _velocity(pipe.transformer)
    path = save_lora_diffusers(pipe.transformer, tmp_path)
    assert path.endswith("pytorch_lora_weights.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    adapter_meta = json.loads(meta["lora_adapter_metadata"])
    assert adapter_meta["transformer.lora_alpha"] == 16 and adapter_meta["transformer.r"] == 4
    fresh = load_pipeline("tiny-random")
    base = _velocity(fresh.transformer)
    assert (trained - base).abs().max() > 1e-2
    fresh.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(_velocity(fresh.transformer), trained, rtol=0, atol=1e-6)
    torch.testing.assert_close(_sample(fresh), _sample(pipe), rtol=0, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None or not torch.cuda.is_available(),
                    reason="needs xformers and CUDA")
def test_xformers_backend_runs():  # pragma: no cover - GPU only
    pipe = load_pipeline("tiny-random", attention_backend="xformers", device="cuda")
    assert _sample(pipe, steps=2).shape == (1, 3, 64, 64)
