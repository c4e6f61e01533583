"""The sampler interface (`sampling/base.py`): the step calls every sampler the same way, the
off-policy pass-through gives the window unchanged, and `OnPolicy` alone tosses the coin and
re-collates what a sampler writes.

The samplers here are stand-ins; tests/run/test_on_policy.py and tests/sampling/test_engine.py run
the real ones through whole runs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from accelerate import Accelerator

from kdistill.data import IGNORE_INDEX, Collator
from kdistill.losses import LossSums
from kdistill.objective.batch import LossSettings
from kdistill.run.step import Step
from kdistill.sampling.base import OnPolicy, OnPolicyParts, PassThrough, Sampler, StepRows
from kdistill.sampling.generate import Sampling, is_on_policy

EOS, PAD = 2, 0


def _batch(rows: list[list[int]], prompt: int) -> dict[str, torch.Tensor]:
    """Right-padded rows whose first `prompt` tokens are the prompt (labels -100)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, prompt : len(row)] = torch.tensor(row[prompt:])
    return {"input_ids": ids, "labels": labels, "attention_mask": (ids != PAD).long()}


WINDOW = [_batch([[5, 6, 7, 8], [5, 9, 10, 11]], 2), _batch([[6, 6, 3, 3]], 2)]


class Recording(Sampler):
    """Samples on even steps (a window of its own, with generation sums); records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, int]] = []
        self.written = [_batch([[5, 6, 12, EOS]], 2)]

    def rows(self, window: list, step: int) -> StepRows:
        self.calls.append(("rows", window, step))
        if step % 2:
            return StepRows(window)
        return StepRows(self.written, True, {"gen_rows": 1, "gen_tokens": 2, "gen_sync_seconds": 0.5})

    def send_ahead(self, upcoming: list | None, step: int) -> dict[str, float]:
        self.calls.append(("send_ahead", upcoming, step))
        return {"gen_sync_seconds": 0.25}


class CountingLoss(torch.nn.Module):
    """Stands in for `StudentLoss`: a loss of one weight times the trained tokens; records batches."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen: list[tuple[list[list[int]], bool]] = []

    def forward(self, batch: dict, outputs: Any, settings: LossSettings, **_: Any) -> LossSums:
        self.seen.append((batch["input_ids"].tolist(), settings.ce))
        trained = (batch["labels"] != IGNORE_INDEX).sum()
        zero = torch.zeros(())
        return LossSums(total=self.weight * trained, kd=zero, ce=zero)


def _step(sampler: Sampler) -> tuple[Step, CountingLoss]:
    model = CountingLoss()
    step = Step(
        accelerator=Accelerator(cpu=True),
        model=model,
        teachers=[],
        settings=LossSettings(alpha=0.5, temperature=1.0),
        sampler=sampler,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    return step, model


def test_the_pass_through_gives_the_window_unchanged() -> None:
    with PassThrough() as sampler:
        rows = sampler.rows(WINDOW, 3)
        assert rows.window is WINDOW and not rows.sampled and rows.stats == {}
        assert sampler.send_ahead(WINDOW, 4) == {} and sampler.state() == {}
        sampler.restore({"step": 3})


@pytest.mark.parametrize("number", [1, 2])
def test_the_step_asks_any_sampler_for_its_rows_through_one_interface(number: int) -> None:
    sampler = Recording()
    step, model = _step(sampler)
    stats = step(WINDOW, number, WINDOW[:1])
    assert sampler.calls == [("rows", WINDOW, number), ("send_ahead", WINDOW[:1], number + 1)]
    if number % 2:  # the data window, with its CE term
        assert sorted(ids for ids, _ in model.seen) == sorted(b["input_ids"].tolist() for b in WINDOW)
        assert all(ce for _, ce in model.seen) and stats["trained"] == 6
        assert stats["gen_sync_seconds"] == 0.25  # the send alone
    else:  # the sampler's rows, without CE, and the generation's sums beside the step's
        assert model.seen == [(sampler.written[0]["input_ids"].tolist(), False)]
        assert stats["trained"] == 2 and stats["gen_rows"] == 1
        assert stats["gen_sync_seconds"] == 0.75  # this step's sync and the send
    assert model.weight.item() == pytest.approx(1 - 0.1)  # one optimizer step on the mean over tokens


class Fixed(OnPolicy):
    """Writes `[12, EOS]` for every prompt; records what it was asked."""

    asked: list = []

    def _write(self, prompts: list, seeds: list[int]) -> list:
        self.asked.append((prompts, seeds))
        return [[[12, EOS] for _ in batch] for batch in prompts]


def test_on_policy_tosses_the_coin_and_recollates_once_for_every_sampler() -> None:
    sampling = Sampling(
        lmbda=0.5, max_new_tokens=4, temperature=1.0, top_p=1.0, max_prompt_length=16,
        eos_token_id=EOS, pad_token_id=PAD, generation_batch_size=4,
    )  # fmt: skip
    sampler = Fixed(OnPolicyParts(sampling=sampling, student=None, collator=Collator(PAD), seed=3))
    for step in range(1, 9):
        rows = sampler.rows(WINDOW, step)
        assert rows.sampled == is_on_policy(0.5, 3, step)
        if not rows.sampled:
            assert rows.window is WINDOW
            continue
        written = [
            [row[: int(n)] for row, n in zip(b["input_ids"].tolist(), b["attention_mask"].sum(1))]
            for b in rows.window
        ]
        assert written == [[[5, 6, 12, EOS], [5, 9, 12, EOS]], [[6, 6, 12, EOS]]]  # the ordinary layout
        assert rows.window[0]["labels"].tolist()[0][:4] == [IGNORE_INDEX, IGNORE_INDEX, 12, EOS]
        assert rows.stats["gen_rows"] == 3 and rows.stats["gen_tokens"] == 6
    assert len(Fixed.asked) == sum(is_on_policy(0.5, 3, s) for s in range(1, 9)) > 0
    assert Fixed.asked[0][0] == [[[5, 6], [5, 9]], [[6, 6]]]  # each batch's prompts
