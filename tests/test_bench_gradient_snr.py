"""bench/gradient_snr.py: the signal / noise estimates on gradients with a known mean and noise, and one
small run on the embedded testbed."""
import json

import pytest
import torch

from bench import gradient_snr


def chunk_gradients(mu: torch.Tensor, noise_std: float, chunks: int, chunk: int, seed: int = 0) -> torch.Tensor:
    """Chunk means of `chunk` samples x_i = mu + noise_std * N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    x = mu + noise_std * torch.randn(chunks, chunk, mu.numel(), generator=g, dtype=torch.float64)
    return x.mean(1)


def test_snr_recovers_signal_noise_and_samples_for_cosine_one_half():
    P, c, M = 4000, 50, 64
    mu = torch.full((P,), 0.1, dtype=torch.float64)  # |mu|^2 = 40
    g = chunk_gradients(mu, 2.0, M, c)  # tr Sigma = 4 * 4000 = 16000
    out = gradient_snr.snr(g, c)
    assert out["signal"] == pytest.approx(40.0, rel=0.1)
    assert out["signal_se"] < 4.0
    assert out["noise_per_sample"] == pytest.approx(16000.0, rel=0.05)
    assert out["n_half"] == pytest.approx(400.0, rel=0.15)
    # the cosine between two independent 128-sample means, as predicted
    assert out["cos_at_128"] == pytest.approx(40 / (40 + 16000 / 128), rel=0.15)


def test_snr_without_a_mean_gives_only_a_lower_bound():
    g = chunk_gradients(torch.zeros(2000, dtype=torch.float64), 1.0, 16, 20, seed=3)
    out = gradient_snr.snr(g, 20)
    assert "n_half" not in out
    assert out["n_half_at_least"] > 0
    # a bound, not an estimate: far above what a real signal of this noise would need
    assert out["n_half_at_least"] > 50


def test_mean_gradient_cosines_see_through_the_noise():
    P, c, M = 3000, 40, 48
    g = torch.Generator().manual_seed(5)
    a = torch.randn(P, generator=g, dtype=torch.float64)
    b = torch.randn(P, generator=g, dtype=torch.float64)
    mu1, mu2 = 0.1 * a, 0.1 * (0.6 * a + 0.8 * b)  # unit-norm mixing: cosine ~0.6
    true_cos = float(mu1 @ mu2 / (mu1.norm() * mu2.norm()))
    chunks = torch.stack([chunk_gradients(mu1, 1.0, M, c, seed=1), chunk_gradients(mu2, 1.0, M, c, seed=2)], 1)
    naive = torch.nn.functional.cosine_similarity(chunks[:, 0], chunks[:, 1], dim=1).mean()
    cos = gradient_snr.mean_gradient_cosines(chunks)
    assert cos[0][1] == pytest.approx(true_cos, abs=0.1)
    assert cos[0][1] == pytest.approx(cos[1][0])
    assert abs(float(naive)) < 0.4 * true_cos  # per-chunk cosines are drowned by the noise


def test_small_run_on_the_testbed(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text('a red circle on a blue background with the word "DOG"\n'
                       'a green square on a white background with the word "SUN"\n')
    res = gradient_snr.main(["--repeats", "2", "--chunks", "2", "--results", str(tmp_path), "--name", "g",
                             "--set", f"data.train_prompts={prompts}", "--set", "sample.group_size=4",
                             "--set", "sample.batch_size=16", "--set", "sample.num_steps=3"])
    assert res["samples"] == 16 and res["chunk_samples"] == 8 and res["trained_steps"] == [0, 1]
    stored = json.loads((tmp_path / "g.json").read_text())
    assert stored["objectives"] == ["ocr", "prompt_alignment", "jpeg_compressibility", "contrast"]
    for metric in ("param", "adam"):
        row = stored["metrics"][metric]["all trained steps"]
        for name in ("prompt_alignment", "jpeg_compressibility", "contrast", "weighted sum"):
            assert row[name]["noise_per_sample"] > 0  # a real gradient reached the LoRA (dense rewards)
    assert "| all trained steps |" in (tmp_path / "g.md").read_text()
