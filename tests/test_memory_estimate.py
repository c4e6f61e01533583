"""`kdistill validate --memory`: the estimate's parts, its verdict and advice, offline for the seed."""

from __future__ import annotations

import pytest

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.errors import KdistillError
from kdistill.run.memory import GB, parts, peak, suggestions
from kdistill.run.memory_plan import memory_plan
from kdistill.run.memory_shapes import KNOWN_ARCHITECTURES, device_bytes, shape_of


def test_known_architectures_give_the_published_parameter_counts() -> None:
    mistral, phi = (
        shape_of(KNOWN_ARCHITECTURES[m]) for m in ("mistralai/Mistral-7B-v0.1", "microsoft/phi-2")
    )
    assert 7.2e9 < mistral.params() < 7.3e9
    assert 2.7e9 < phi.params() < 2.8e9


def test_device_sizes_and_gpu_names() -> None:
    assert device_bytes("24GB") == 24 * 10**9
    assert device_bytes("80 GiB") == 80 * 2**30
    assert device_bytes("a100-40gb") == 40 * 10**9
    assert device_bytes("RTX4090") == 24 * 10**9
    with pytest.raises(KdistillError, match="expected a size such as 24GB"):
        device_bytes("big")


def test_seed_recipe_estimate_and_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config("configs/seed.yaml")
    plan = memory_plan(cfg, 24 * GB)
    split = parts(plan)
    assert 3.5 * GB < split["teacher weights"] < 4.5 * GB  # 7B weights at about 4 bits
    assert split["gradients"] < 0.2 * GB  # only LoRA trains
    steps = suggestions(plan, 12 * GB, quantizable=True, cacheable=True)
    assert steps[0][0] == "training.micro_batch_size=2" and steps[-1][1] <= 12 * GB
    checkpointed = memory_plan(
        load_config("configs/seed.yaml", ["training.gradient_checkpointing=true"]), 24 * GB
    )
    assert parts(checkpointed)["activations"] < split["activations"] / 4
    sharded = memory_plan(cfg, 24 * GB, processes=4, strategy="zero3")
    assert parts(sharded)["student weights"] == split["student weights"] // 4
    assert peak(sharded) < peak(plan)


def test_validate_memory_prints_a_verdict(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["validate", "configs/seed.yaml", "--memory", "--device-memory", "L4"]) == 0
    out = capsys.readouterr().out
    assert "teacher weights" in out and "verdict:" in out
    assert main(["validate", "configs/seed.yaml", "--memory", "--device-memory", "8GB"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["validate", "configs/seed.yaml", "--memory", "--device-memory", "lots"]) == 2
