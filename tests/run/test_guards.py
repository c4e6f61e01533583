"""The guards one by one: OOM predicate and window splitting, the NaN-skipping optimizer, health checks."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.objective.quality import shard_batches
from kdistill.run.guards import SkipNonFinite, is_out_of_memory, split_window
from kdistill.run.health import HealthMonitor
from kdistill.run.stop_signals import StopSignals


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:116] DefaultCPUAllocator: can't allocate memory"),
            True,
        ),
        (RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"), True),
        (MemoryError(), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)"), False),
        (ValueError("out of memory"), False),  # only allocator errors, not any message
    ],
)
def test_out_of_memory_predicate(error: BaseException, expected: bool) -> None:
    assert is_out_of_memory(error) is expected


def test_split_window_keeps_every_row_in_order() -> None:
    batch = {"input_ids": torch.arange(20).view(5, 4), "labels": torch.arange(20).view(5, 4) + 100}
    parts = split_window([batch, {k: v[:2] for k, v in batch.items()}], 2)
    assert [len(p["input_ids"]) for p in parts] == [2, 2, 1, 2]
    assert torch.equal(torch.cat([p["labels"] for p in parts[:3]]), batch["labels"])


def test_oom_backoff_under_several_processes_says_what_to_resume_with() -> None:
    from kdistill.run.guards import GuardStop, OomBackoff

    resets = []
    backoff = OomBackoff(4, processes=2, advice="ADVICE", reset=lambda: resets.append(1))

    def step(window: list, *_: object) -> dict:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(GuardStop) as stop:
        backoff.run(step, [{"input_ids": torch.zeros(4, 3)}], step=7)
    assert str(stop.value) == (
        "out of memory at step 7 with a micro-batch of 4 rows on one of 2 processes, which cannot change "
        "their micro-batch together mid-step. Resume with --resume --set training.micro_batch_size=2. ADVICE"
    )
    assert resets == [1] and stop.value.exit_code == 3


def _model_with_grads(value: float) -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    model.bias.grad[0] = value
    return model, optimizer


def test_skip_non_finite_steps_only_on_finite_gradients() -> None:
    model, optimizer = _model_with_grads(float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    guarded = SkipNonFinite(optimizer)
    guarded.step()
    assert guarded.skipped and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert guarded.param_groups is optimizer.param_groups  # everything else passes through
    model, optimizer = _model_with_grads(1.0)
    guarded = SkipNonFinite(optimizer, reduce=lambda t: t * 2)  # as if summed over two processes
    guarded.step()
    assert not guarded.skipped and optimizer.state


def _monitor(**kwargs) -> HealthMonitor:
    settings = dict(
        window=4, explode_factor=5.0, max_bad_steps=3, ratio_limit=100.0, min_quality_gain=0.05, kd_scale=4.0
    )
    return HealthMonitor(**{**settings, **kwargs})


def _feed(monitor: HealthMonitor, losses: list[float]) -> None:
    for step, loss in enumerate(losses, start=1):
        monitor.after_step(step, {"loss": loss * 10, "trained": 10}, skipped=False)


def test_a_loss_that_stops_falling_is_reported_once_a_window(caplog: pytest.LogCaptureFixture) -> None:
    _feed(_monitor(), [3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 0.9, 0.8])  # falling: nothing to say
    assert not caplog.messages
    _feed(_monitor(), [2.0, 1.9, 2.1, 2.0, 2.1, 2.0, 2.0, 2.0, 2.0, 2.0, 2.1])
    plateau = [m for m in caplog.messages if "has not decreased" in m]
    assert plateau == [
        "step 8: the loss has not decreased over the last 4 steps (mean 2.025, against 2 over the 4 steps "
        "before); lower training.learning_rate (to 1e-5), raise training.warmup_steps, and check the data "
        "format (`kdistill validate CONFIG` shows the format that was detected and how many rows were read)"
    ]


def test_an_exploding_loss_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    _feed(_monitor(window=20), [2.0] * 12 + [30.0, 2.0, 40.0])
    assert len(caplog.messages) == 1  # the second jump falls within the quiet period
    assert caplog.messages[0].startswith(
        "step 13: the loss exploded to 30, 15x the mean of the last 12 steps"
    )


def test_kd_ce_ratio_is_logged_and_a_lopsided_one_warned(caplog: pytest.LogCaptureFixture) -> None:
    monitor = _monitor()
    assert monitor.on_log({"loss/kd": 0.5, "loss/ce": 4.0}) == {"loss/kd_ce_ratio": 0.5}
    assert not caplog.messages
    assert monitor.on_log({"loss/kd": 0.0005, "loss/ce": 4.0})["loss/kd_ce_ratio"] == pytest.approx(5e-4)
    monitor.on_log({"loss/kd": 0.0005, "loss/ce": 4.0})
    assert caplog.messages == [
        "the KD part of the loss is 2000x smaller than the other (T^2 x KD = 0.002, CE = 4), so alpha barely "
        "changes the balance between them; change loss.temperature (the KD part scales with it) or move "
        "loss.alpha towards the smaller part"
    ]
    assert _monitor(kd_scale=None).on_log({"loss/kd": 0.0, "loss/ce": 4.0}) == {}  # alpha 0 or 1: no ratio


def test_poor_quality_gets_the_guides_advice(caplog: pytest.LogCaptureFixture) -> None:
    _monitor().check_quality({"kl": 2.0, "ppl": 30.0}, {"kl": 1.0, "ppl": 20.0})
    assert not caplog.messages
    _monitor().check_quality({"kl": 2.0, "ppl": 30.0}, {"kl": 1.95, "ppl": 20.0})
    assert caplog.messages == [
        "held-out KL to the teacher went from 2 to 1.95 (-2.5%); to keep more of the teacher: train "
        "longer (training.num_epochs or training.max_steps), raise loss.temperature to 4-5, and use more "
        "or better data"
    ]


def test_the_ratio_is_in_the_metrics_of_a_run(tmp_path: Path, tiny: dict) -> None:
    config = tiny_config(tiny, tmp_path / "out", loss={"temperature": 2.0}, training={"max_steps": 2})
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]
    for r in records:
        assert r["loss/kd_ce_ratio"] == pytest.approx(4 * r["loss/kd"] / r["loss/ce"])


def test_shard_batches_gives_equal_counts_and_counts_each_batch_once() -> None:
    batches = list(range(7))
    shards = [shard_batches(batches, rank, 3) for rank in range(3)]
    assert shards == [([0, 3, 6], 3), ([1, 4, 0], 2), ([2, 5, 0], 2)]
    assert sorted(b for mine, counted in shards for b in mine[:counted]) == batches
    assert shard_batches(batches, 0, 1) == (batches, 7)


def test_stop_signals_are_recorded_then_a_second_one_stops_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with StopSignals() as stop:
        assert stop.requested() is None
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM
        assert stop.requested(lambda t: t.max()) == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert caplog.messages[0].startswith("SIGTERM received: finishing the current step, then writing")
