"""pickscore / aesthetic / deqa loaded by their real code from tiny random-weight models of the same
architecture, saved with save_pretrained and loaded back by path (offline)."""
from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch

from apex_fast.rewards import RewardModelLoadError, make_scorer, score_all

transformers = pytest.importorskip("transformers")
from apex_fast.models.tiny import TINY_TOKENIZER_DIR  # noqa: E402
torch.set_num_threads(1)


def _tiny_clip(root, projection_dim=16, vocab_size=None):
    """A CLIPProcessor (the tiny BPE tokenizer, 32 px image processor) and a tiny CLIPModel."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    # the project's own tiny CLIP tokenizer (apex_fast/models/assets), loaded the way users load one
    tok = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    vocab = tok.get_vocab()
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(root / "processor")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab_size or len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )
    model = CLIPModel(cfg).eval()
    model.save_pretrained(root / "model")
    # the aesthetic CLIP directory: model + its image processor, as openai/clip-vit-large-patch14 has
    model.save_pretrained(root / "clip_l")
    ip.save_pretrained(root / "clip_l")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def _images(n=4, size=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


PROMPTS = ["a red cat", "a blue dog on a sofa", 'a sign "open"', "x"]


# ------------------------------------------------------------------ pickscore


def test_pickscore_matches_clip_logits_and_scales(tiny):
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    s = make_scorer("pickscore", model_path=tiny / "model", processor_path=tiny / "processor", device="cpu", batch_size=3)
    imgs = _images()
    r = s(imgs, PROMPTS, [{}] * 4)
    assert r.shape == (4,) and r.dtype == torch.float32
    # independent reference: CLIPModel forward, logits_per_image = logit_scale.exp() * cos, diagonal
    proc = AutoProcessor.from_pretrained(tiny / "processor")
    model = CLIPModel.from_pretrained(tiny / "model").eval()
    with torch.no_grad():
        inp = proc(text=PROMPTS, images=[Image.fromarray(a) for a in imgs], padding=True, truncation=True,
                   max_length=77, return_tensors="pt")
        ref = model(**inp).logits_per_image.diag()
    torch.testing.assert_close(s.last_raw, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r, ref / 26, rtol=1e-4, atol=1e-5)
    assert s.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    raw = make_scorer("pickscore", model_path=tiny / "model", processor_path=tiny / "processor", raw=True, batch_size=8)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255  # float [N, 3, H, W] input
    torch.testing.assert_close(raw(x, PROMPTS, None), ref, rtol=1e-4, atol=1e-4)


def test_pickscore_dtype_option(tiny):
    s = make_scorer("pickscore", model_path=tiny / "model", processor_path=tiny / "processor", dtype="bfloat16")
    assert s.model.dtype == torch.bfloat16
    r = s(_images(2), PROMPTS[:2], None)
    assert r.dtype == torch.float32 and torch.isfinite(r).all()


def test_pickscore_missing_paths_say_which_scorer_path_and_fix(tiny, tmp_path):
    bad = tmp_path / "no_such_model"
    with pytest.raises(RewardModelLoadError) as ei:
        make_scorer("pickscore", model_path=bad, processor_path=tiny / "processor")
    msg = str(ei.value)
    assert "'pickscore'" in msg and str(bad) in msg and "model_path" in msg
    # a hub id that is not in the local cache (no network here): says how to download it
    with pytest.raises(RewardModelLoadError) as ei:
        make_scorer("pickscore", processor_path="apex-fast-test/not-cached-processor", local_files_only=True)
    msg = str(ei.value)
    assert "apex-fast-test/not-cached-processor" in msg and "huggingface-cli download" in msg
    assert "processor_path" in msg


# ------------------------------------------------------------------ aesthetic


def _save_mlp(path, dim, seed=0, prefix=""):
    from apex_fast.rewards.models import AestheticMLP

    torch.manual_seed(seed)
    mlp = AestheticMLP(dim)
    sd = {prefix + k: v for k, v in mlp.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return mlp.eval()


def test_aesthetic_mlp_has_original_layout():
    from apex_fast.rewards.models import AestheticMLP

    keys = list(AestheticMLP(768).state_dict())
    assert keys == [f"layers.{i}.{w}" for i in (0, 2, 4, 6, 7) for w in ("weight", "bias")]
    shapes = [tuple(v.shape) for k, v in AestheticMLP(768).state_dict().items() if k.endswith("weight")]
    assert shapes == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_matches_manual_pipeline(tiny, tmp_path, fmt):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    mlp = _save_mlp(tmp_path / f"mlp.{fmt}", 16, prefix="model." if fmt == "pth" else "")
    s = make_scorer("aesthetic", mlp_path=tmp_path / f"mlp.{fmt}", clip_path=tiny / "clip_l", batch_size=3)
    imgs = _images(5)
    r = s(imgs, [""] * 5, None)
    clip = CLIPModel.from_pretrained(tiny / "clip_l").eval()
    proc = CLIPImageProcessor.from_pretrained(tiny / "clip_l")
    with torch.no_grad():
        e = clip.get_image_features(**proc(images=[Image.fromarray(a) for a in imgs], return_tensors="pt"))
        e = e if isinstance(e, torch.Tensor) else e.pooler_output
        ref = mlp(e / e.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(r, ref, rtol=1e-4, atol=1e-5)


def test_aesthetic_errors(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("APEX_FAST_AESTHETIC_MLP", raising=False)
    with pytest.raises(RewardModelLoadError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        make_scorer("aesthetic", clip_path=tiny / "clip_l")
    _save_mlp(tmp_path / "mlp768.pth", 768)  # wrong input dim for the 16-dim tiny CLIP
    with pytest.raises(RewardModelLoadError, match="mlp768.pth"):
        make_scorer("aesthetic", mlp_path=tmp_path / "mlp768.pth", clip_path=tiny / "clip_l")
    _save_mlp(tmp_path / "mlp16.pth", 16)
    with pytest.raises(RewardModelLoadError) as ei:
        make_scorer("aesthetic", mlp_path=tmp_path / "mlp16.pth", clip_path=tmp_path / "missing_clip")
    assert "'aesthetic'" in str(ei.value) and "missing_clip" in str(ei.value)


# ------------------------------------------------------------------ deqa (real trust_remote_code path)

_FAKE_CONFIG = '''
from transformers import PretrainedConfig


class FakeDeqaConfig(PretrainedConfig):
    model_type = "fake_deqa"

    def __init__(self, hidden=4, **kw):
        self.hidden = hidden
        super().__init__(**kw)
'''

_FAKE_MODEL = '''
import numpy as np
import torch
from transformers import PreTrainedModel

from .configuration_fake_deqa import FakeDeqaConfig


class FakeDeqaModel(PreTrainedModel):
    """Stands in for DeQA-Score: score(list[PIL]) -> 1 + 4 * mean brightness, in [1, 5]."""
    config_class = FakeDeqaConfig
    _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hidden, 1)
        self.post_init()

    def score(self, images):
        return torch.tensor([1 + 4 * np.asarray(im, dtype=np.float64).mean() / 255 for im in images])
'''


@pytest.fixture(scope="module")
def fake_deqa(tmp_path_factory):
    d = tmp_path_factory.mktemp("fake_deqa")
    (d / "configuration_fake_deqa.py").write_text(textwrap.dedent(_FAKE_CONFIG))
    (d / "modeling_fake_deqa.py").write_text(textwrap.dedent(_FAKE_MODEL))
    from transformers import AutoConfig, AutoModelForCausalLM

    (d / "config.json").write_text(json.dumps({
        "model_type": "fake_deqa", "hidden": 4,
        "auto_map": {"AutoConfig": "configuration_fake_deqa.FakeDeqaConfig",
                     "AutoModelForCausalLM": "modeling_fake_deqa.FakeDeqaModel"},
    }))
    cfg = AutoConfig.from_pretrained(d, trust_remote_code=True)
    AutoModelForCausalLM.from_config(cfg, trust_remote_code=True).save_pretrained(d)
    return d


def test_deqa_loads_remote_code_and_divides_by_5(fake_deqa):
    s = make_scorer("deqa", model_path=fake_deqa, device="cpu", batch_size=2)
    imgs = np.stack([np.full((16, 16, 3), v, np.uint8) for v in (0, 255, 51)])
    r = s(imgs, [""] * 3, None)
    torch.testing.assert_close(r, torch.tensor([1 / 5, 1.0, (1 + 4 * 0.2) / 5]))
    raw = make_scorer("deqa", model_path=fake_deqa, raw=True)
    assert raw(imgs[:1], [""], None).tolist() == [1.0]


def test_deqa_missing_model_error(tmp_path):
    with pytest.raises(RewardModelLoadError) as ei:
        make_scorer("deqa", model_path=tmp_path / "DeQA-Score-Mix3")
    msg = str(ei.value)
    assert "'deqa'" in msg and "DeQA-Score-Mix3" in msg and "apex_fast.rewards.server" in msg


# ------------------------------------------------------------------ all together


def test_score_all_with_model_scorers(tiny, tmp_path):
    _save_mlp(tmp_path / "mlp.pth", 16)
    scorers = [
        make_scorer("pickscore", model_path=tiny / "model", processor_path=tiny / "processor"),
        make_scorer("aesthetic", mlp_path=tmp_path / "mlp.pth", clip_path=tiny / "clip_l"),
        make_scorer("ocr", engine=lambda im: ["open"]),
    ]
    timings = {}
    R = score_all(scorers, _images(4), PROMPTS, None, timings)
    assert R.shape == (4, 3)
    assert torch.isfinite(R[:, :2]).all()
    assert R[2, 2] == 1.0 and math.isnan(R[0, 2])  # only prompt 2 has a quoted target
    assert set(timings) == {"pickscore", "aesthetic", "ocr"}
