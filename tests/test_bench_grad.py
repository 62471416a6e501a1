"""`python -m bench grad` runs end to end on the tiny model and writes the keys the README and
bench/gpu_suite.sh read (a smoke run: one repeat, no timing is asserted)."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_grad_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_grad", ROOT / "bench" / "grad.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "grad.json"
    mod.main(["--device", "cpu", "--repeats", "1", "--warmup", "1", "--no-memory", "--batch", "2", "--timesteps", "1",
              "--modes", "single,single_kl,one_backward,one_backward_kl,one_backward_gram_every4,k_backward",
              "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("ratio_one_backward", "ratio_k_backward", "ratio_one_backward_kl", "ratio_one_backward_gram_every4"):
        assert res[key] > 0, key
    assert res["meta"]["model"] == "tiny" and res["meta"]["K"] == 4 and res["meta"]["lora_params"] > 0
