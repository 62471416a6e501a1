"""Distributed semantics without processes: the sample layout, the one all-gather of rewards and
group ids, the DeepSpeed JSON our config owns, and engine errors. The multi-process runs are in
tests/test_distributed_multiproc.py."""
import json
from types import SimpleNamespace as NS

import pytest
import torch

from apex_fast.config import ConfigError
from apex_fast.distributed import Runtime, SampleLayout, TorchEngine, deepspeed_config


def global_batches(total, m, world, epoch, inner, seed=7):
    """Global micro-batches (sets of global sample indices) of `world` ranks with `m` samples each."""
    ranks = [SampleLayout(total, m, world, r, seed=seed) for r in range(world)]
    n_mb = len(ranks[0].micro_batches(epoch, inner))
    assert all(len(L.micro_batches(epoch, inner)) == n_mb for L in ranks)
    out = []
    for b in range(n_mb):
        ids = []
        for L in ranks:
            ids += L.rollout_indices(epoch)[L.micro_batches(epoch, inner)[b]].tolist()
        out.append(sorted(ids))
    return out


@pytest.mark.parametrize("total,global_mb,worlds", [(4, 2, (1, 2)), (48, 8, (1, 2, 4, 8)), (24, 6, (1, 2, 3, 6)),
                                                     (32, 32, (1, 2, 4))])
def test_global_micro_batches_do_not_depend_on_the_process_count(total, global_mb, worlds):
    for epoch in (0, 5):
        for inner in (0, 1, 2):
            ref = global_batches(total, global_mb, 1, epoch, inner)
            assert sorted(i for mb in ref for i in mb) == list(range(total))  # every sample trains once per inner epoch
            for w in worlds[1:]:
                assert global_batches(total, global_mb // w, w, epoch, inner) == ref, (w, epoch, inner)


def test_layout_shuffles_and_partitions():
    L = [SampleLayout(16, 2, 2, r, seed=1) for r in range(2)]
    a, b = L[0].rollout_indices(0), L[1].rollout_indices(0)
    assert sorted(torch.cat([a, b]).tolist()) == list(range(16))  # the ranks split the batch
    assert torch.equal(L[0].all_rollout_indices(0), torch.cat([a, b]))
    assert not torch.equal(L[0].rollout_indices(0), L[0].rollout_indices(1))  # a new placement per epoch
    assert global_batches(16, 2, 2, 0, 1) != global_batches(16, 2, 2, 0, 2)  # inner epochs reshuffle
    # each rank's micro-batches cover its local positions exactly once
    for inner in (0, 1):
        pos = torch.cat(L[1].micro_batches(0, inner)).sort().values
        assert torch.equal(pos, torch.arange(8))


def test_single_process_keeps_a_partial_last_micro_batch():
    L = SampleLayout(10, 4, 1, 0, seed=3)
    for inner in (0, 1):
        sizes = [len(mb) for mb in L.micro_batches(2, inner)]
        assert sizes == [4, 4, 2]
        assert sorted(torch.cat(L.micro_batches(2, inner)).tolist()) == list(range(10))


def test_layout_errors_name_the_fields():
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        SampleLayout(10, 2, 3, 0)
    with pytest.raises(ConfigError, match="train.micro_batch_size = 4 must divide the 6 samples"):
        SampleLayout(12, 4, 2, 0)


def test_gather_samples_orders_rows_by_global_index():
    rt = Runtime()  # one process: the gather is the identity, the reorder is what is tested
    R = torch.tensor([[1.0, 10.0], [2.0, float("nan")], [3.0, 30.0]])
    idx = torch.tensor([2, 0, 1])
    groups = torch.tensor([1, 0, 0])
    Rg, gg = rt.gather_samples(R, groups, idx)
    assert torch.equal(Rg[:, 0], torch.tensor([2.0, 3.0, 1.0])) and torch.isnan(Rg[0, 1])
    assert torch.equal(gg, torch.tensor([0, 0, 1]))
    with pytest.raises(RuntimeError, match="exactly once"):
        rt.gather_samples(R, groups, torch.tensor([0, 0, 1]))


def test_all_reduce_mean_is_identity_in_one_process():
    xs = [torch.ones(2, 3), torch.arange(4.0)]
    assert Runtime().all_reduce_mean_(xs) is xs and torch.equal(xs[1], torch.arange(4.0))


def _cfg(tmp_path, ds: dict | None, **train):
    path = None
    if ds is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
    t = {"lr": 1e-3, "adam_betas": (0.9, 0.999), "adam_eps": 1e-8, "weight_decay": 0.0, "micro_batch_size": 4,
         "max_grad_norm": 1.0, "gradient_accumulation": 1, "optimizer_steps_per_epoch": 0}
    t.update(train)
    return NS(deepspeed=str(path) if path else None, train=NS(**t), sample=NS(prompts_per_epoch=4, group_size=8))


@pytest.mark.parametrize("name", ["ds_zero1.json", "ds_zero2.json", "ds_zero3.json"])
def test_shipped_deepspeed_configs_take_our_hyperparameters(tmp_path, name):
    from pathlib import Path

    cfg = _cfg(tmp_path, None, micro_batch_size=3, max_grad_norm=0.5)
    cfg.deepspeed = str(Path(__file__).resolve().parent.parent / "configs" / name)
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["train_batch_size"] == 12
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["managed_gradient_accumulation"] is False and ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_optimization"]["stage"] == int(name[len("ds_zero")])
    assert "optimizer" not in ds and "bf16" not in ds and "fp16" not in ds


@pytest.mark.parametrize("ds,match", [
    ({"gradient_clipping": 2.0}, "gradient_clipping=2.0 but the run uses 1.0 \\(train.max_grad_norm\\)"),
    ({"train_micro_batch_size_per_gpu": 8}, "train.micro_batch_size"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4"),
    ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
    ({"bf16": {"enabled": True}}, "model.dtype=bf16"),
    ({"zero_optimization": {"stage": 5}}, "stage in .* must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "CPUAdam"),
])
def test_deepspeed_json_conflicts_are_config_errors(tmp_path, ds, match):
    with pytest.raises(ConfigError, match=match):
        deepspeed_config(_cfg(tmp_path, ds), world_size=2)


def test_deepspeed_json_missing_or_invalid(tmp_path):
    cfg = _cfg(tmp_path, None)
    cfg.deepspeed = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="does not exist"):
        deepspeed_config(cfg, 1)
    (tmp_path / "bad.json").write_text("{not json")
    cfg.deepspeed = str(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(cfg, 1)


def test_torch_engine_refuses_a_deepspeed_checkpoint_state(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    eng = TorchEngine(_cfg(tmp_path, None), [p], Runtime())
    with pytest.raises(ConfigError, match="resume it with --deepspeed"):
        eng.load_optimizer_state({})


def test_torch_engine_step_clips_to_the_global_norm(tmp_path):
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    eng = TorchEngine(_cfg(tmp_path, None, max_grad_norm=1.0, lr=0.1), [p, q], Runtime())
    eng.backward((p * torch.tensor([3.0, 0.0])).sum() + (q * 4.0).sum())
    assert eng.step(1.0) == pytest.approx(5.0)
    assert p.grad is None  # zeroed after the step


@pytest.mark.parametrize("yaml_name,ds_name,gpus", [("sd35m_lora_zero2.yaml", "ds_zero2.json", 8),
                                                   ("sd35l_full_zero3.yaml", "ds_zero3.json", 8)])
def test_shipped_sd35_configs_are_valid_with_their_deepspeed_json(yaml_name, ds_name, gpus):
    from pathlib import Path

    from apex_fast.config import load_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / yaml_name, [f"deepspeed={root / 'configs' / ds_name}"])
    assert cfg.model.pretrained.startswith("stabilityai/stable-diffusion-3.5-") and cfg.model.dtype == "bf16"
    assert cfg.model.gradient_checkpointing and cfg.balance.method == "apex" and len(cfg.rewards) == 4
    ds = deepspeed_config(cfg, world_size=gpus)
    assert ds["gradient_clipping"] == cfg.train.max_grad_norm
    # the epoch splits evenly over the GPUs and every GPU holds whole micro-batches
    layout = SampleLayout(cfg.sample.prompts_per_epoch * cfg.sample.group_size, cfg.train.micro_batch_size, gpus)
    assert layout.local_n % cfg.train.micro_batch_size == 0
    if not cfg.lora.enabled:
        assert ds["zero_optimization"]["stage"] == 3 and not cfg.train.ema and cfg.train.kl_beta == 0
