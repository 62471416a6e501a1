"""clip_score and hpsv2 loaded by their real code from tiny models saved and reloaded by path.

hpsv2 is checked against an independent forward of the open_clip architecture written here in
plain torch (nn.MultiheadAttention with its fused in_proj, as open_clip's ResidualAttentionBlock),
from random weights under open_clip's key names: the key mapping into transformers' CLIPModel must
reproduce that model's scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from apex_fast.rewards import RewardModelLoadError, make_scorer

transformers = pytest.importorskip("transformers")
from apex_fast.models.tiny import TINY_TOKENIZER_DIR  # noqa: E402

torch.set_num_threads(1)
D, LAYERS, HEADS, PROJ, IMG, PATCH, CTX = 32, 2, 2, 16, 32, 8, 77
PROMPTS = ["a red cat", "a blue dog on a sofa", 'a sign "open"', "x"]


def _images(n=4, size=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _clip_config(vocab, bos, eos):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=D, intermediate_size=4 * D, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, max_position_embeddings=CTX, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos, hidden_act="gelu"),
        vision_config=dict(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           image_size=IMG, patch_size=PATCH, hidden_act="gelu"),
        projection_dim=PROJ,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A CLIP folder (config + processor + random weights) like openai/clip-vit-large-patch14."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_clip_pref")
    tok = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    ip = CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG})
    torch.manual_seed(0)
    model = CLIPModel(_clip_config(len(tok.get_vocab()), tok.bos_token_id, tok.eos_token_id)).eval()
    model.save_pretrained(root)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(root)
    return root


# ------------------------------------------------------------------ clip_score


def test_clip_score_is_cosine_of_clip_embeddings(tiny):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    s = make_scorer("clip_score", model_path=tiny, device="cpu", batch_size=3)
    imgs = _images()
    r = s(imgs, PROMPTS, [{}] * 4)
    assert r.shape == (4,) and r.dtype == torch.float32
    model, proc = CLIPModel.from_pretrained(tiny).eval(), CLIPProcessor.from_pretrained(tiny)
    with torch.no_grad():
        out = model(**proc(text=PROMPTS, images=[Image.fromarray(a) for a in imgs], padding=True, return_tensors="pt"))
    ref = out.logits_per_image.diag() / model.logit_scale.exp()  # logits = scale * cos
    torch.testing.assert_close(r, ref, rtol=1e-4, atol=1e-5)
    assert (r.abs() <= 1).all()
    raw = make_scorer("clip_score", model_path=tiny, raw=True)(imgs, PROMPTS, None)
    torch.testing.assert_close(raw, out.logits_per_image.diag(), rtol=1e-4, atol=1e-4)
    # the prompt matters: the same image scores differently against different prompts
    same = make_scorer("clip_score", model_path=tiny)(np.repeat(imgs[:1], 4, 0), PROMPTS, None)
    assert same.unique().numel() == 4


def test_clip_score_missing_model_names_scorer_path_and_fix(tmp_path):
    with pytest.raises(RewardModelLoadError) as ei:
        make_scorer("clip_score", model_path=tmp_path / "no_clip")
    msg = str(ei.value)
    assert "'clip_score'" in msg and "no_clip" in msg and "processor_path" in msg
    with pytest.raises(RewardModelLoadError, match="huggingface-cli download apex-fast-test/no-clip"):
        make_scorer("clip_score", model_path="apex-fast-test/no-clip", local_files_only=True)


# ------------------------------------------------------------------ hpsv2


class _OpenClipBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (pre-LN, fused-QKV MultiheadAttention, GELU MLP)."""

    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(D, 4 * D))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * D, D))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenClip(nn.Module):
    """The open_clip CLIP layout (ViT visual tower, text transformer), parameter names as open_clip's."""

    def __init__(self, vocab):
        super().__init__()
        g = (IMG // PATCH) ** 2 + 1
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, D, PATCH, PATCH, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.randn(D) * 0.5)
        self.visual.positional_embedding = nn.Parameter(torch.randn(g, D) * 0.5)
        self.visual.ln_pre, self.visual.ln_post = nn.LayerNorm(D), nn.LayerNorm(D)
        self.visual.transformer = nn.Module()
        self.visual.transformer.resblocks = nn.ModuleList([_OpenClipBlock() for _ in range(LAYERS)])
        self.visual.proj = nn.Parameter(torch.randn(D, PROJ) * D**-0.5)
        self.token_embedding = nn.Embedding(vocab, D)
        self.positional_embedding = nn.Parameter(torch.randn(CTX, D) * 0.1)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([_OpenClipBlock() for _ in range(LAYERS)])
        self.ln_final = nn.LayerNorm(D)
        self.text_projection = nn.Parameter(torch.randn(D, PROJ) * D**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))
        for p in self.parameters():  # non-trivial LayerNorm affine parameters too
            if p.dim() == 1 and p.shape[0] == D:
                p.data.normal_(0.0 if p is not self.visual.class_embedding else 0.5, 0.3).add_(torch.ones(D) * 0.5)

    def encode_image(self, pix):
        x = self.visual.conv1(pix).flatten(2).transpose(1, 2)
        x = torch.cat([self.visual.class_embedding.expand(x.shape[0], 1, D), x], 1) + self.visual.positional_embedding
        x = self.visual.ln_pre(x)
        for b in self.visual.transformer.resblocks:
            x = b(x)
        return self.visual.ln_post(x[:, 0]) @ self.visual.proj

    def encode_text(self, ids, eos_pos):
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        mask = torch.full((n, n), float("-inf")).triu(1)
        for b in self.transformer.resblocks:
            x = b(x, mask)
        x = self.ln_final(x)
        # open_clip pools at argmax(ids), the end-of-text token of its vocabulary; here the eos position
        return x[torch.arange(x.shape[0]), eos_pos] @ self.text_projection


@pytest.fixture(scope="module")
def open_clip_ckpt(tiny, tmp_path_factory):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny)
    torch.manual_seed(1)
    oc = _OpenClip(len(tok.get_vocab())).eval()
    d = tmp_path_factory.mktemp("hps")
    sd = {k: v.detach().clone() for k, v in oc.state_dict().items()}
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, d / "HPS_v2_compressed.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "hps.safetensors"))
    return oc, d


def _reference_hps(oc, tiny, imgs, prompts):
    from PIL import Image
    from transformers import CLIPProcessor

    proc = CLIPProcessor.from_pretrained(tiny)
    pix = proc(images=[Image.fromarray(a) for a in imgs], return_tensors="pt")["pixel_values"]
    out = []
    with torch.no_grad():
        ie = oc.encode_image(pix)
        for i, p in enumerate(prompts):  # one prompt at a time: no padding at all
            ids = proc(text=[p], return_tensors="pt")["input_ids"]
            eos = (ids[0] == proc.tokenizer.eos_token_id).nonzero()[0]
            te = oc.encode_text(ids, eos)
            out.append(float((ie[i] / ie[i].norm()) @ (te[0] / te[0].norm())))
    return torch.tensor(out)


@pytest.mark.parametrize("fmt", ["HPS_v2_compressed.pt", "hps.safetensors"])
def test_hpsv2_open_clip_checkpoint_matches_open_clip_forward(tiny, open_clip_ckpt, fmt):
    oc, d = open_clip_ckpt
    s = make_scorer("hpsv2", checkpoint_path=d / fmt, clip_path=tiny, device="cpu", batch_size=3)
    imgs = _images(4, seed=3)
    r = s(imgs, PROMPTS, None)
    ref = _reference_hps(oc, tiny, imgs, PROMPTS)
    torch.testing.assert_close(r, ref, rtol=1e-4, atol=1e-5)
    assert float(s.model.logit_scale) == pytest.approx(2.5)
    # a different checkpoint gives different scores: the weights really come from the file
    plain = make_scorer("clip_score", model_path=tiny)(imgs, PROMPTS, None)
    assert not torch.allclose(r, plain, atol=1e-3)


def test_open_clip_to_hf_covers_every_clip_weight(open_clip_ckpt, tiny):
    from transformers import CLIPModel

    from apex_fast.rewards.preference import open_clip_to_hf

    oc, _ = open_clip_ckpt
    hf = open_clip_to_hf(oc.state_dict())
    want = {k for k in CLIPModel.from_pretrained(tiny).state_dict() if not k.endswith("position_ids")}
    assert set(hf) == want
    with pytest.raises(KeyError, match="visual.attnpool"):
        open_clip_to_hf({"visual.attnpool.k_proj.weight": torch.zeros(1)})


def test_hpsv2_errors_name_scorer_file_and_fix(tiny, open_clip_ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv("APEX_FAST_HPSV2_CHECKPOINT", raising=False)
    with pytest.raises(RewardModelLoadError) as ei:  # no file given, hub not reachable offline
        make_scorer("hpsv2", clip_path=tiny, local_files_only=True)
    assert "xswu/HPSv2" in str(ei.value) and "checkpoint_path" in str(ei.value)
    with pytest.raises(RewardModelLoadError, match="missing.pt"):
        make_scorer("hpsv2", checkpoint_path=tmp_path / "missing.pt", clip_path=tiny)
    # a checkpoint of another architecture: a clear error, not a silent half-load
    oc, d = open_clip_ckpt
    sd = {k: v for k, v in oc.state_dict().items() if "resblocks.1." not in k}
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(RewardModelLoadError, match="missing keys"):
        make_scorer("hpsv2", checkpoint_path=tmp_path / "short.pt", clip_path=tiny)
    with pytest.raises(RewardModelLoadError, match="'hpsv2'.*no_clip"):
        make_scorer("hpsv2", checkpoint_path=d / "hps.safetensors", clip_path=tmp_path / "no_clip")
