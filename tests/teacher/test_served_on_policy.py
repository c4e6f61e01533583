"""On-policy steps scored by a served teacher: both modes train, and `sampled`, which reads only each
sampled token's log-prob from the server, gives the same loss and gradient as the in-process teacher.

The server is tests/fake_vllm (vLLM's `prompt_logprobs` answers, computed by transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_served import _batch, start_fake
from transformers import AutoModelForCausalLM

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.data.tokenize import trained_rows
from kdistill.losses.policy import sampled_reverse_kl
from kdistill.teacher.served import ServerClient, ServerSettings

ON = {"lmbda": 1.0, "max_new_tokens": 12, "max_prompt_length": 48}
LOSS = {"divergence": "reverse_kl", "temperature": 1.0, "alpha": 1.0}


@pytest.fixture
def url(tiny: dict, tmp_path: Path):
    with start_fake(tiny["teacher"], tmp_path) as server:
        yield server.url


def test_served_sampled_loss_is_the_in_process_one(tiny: dict, url: str) -> None:
    batch = _batch(tiny)
    mask, labels = trained_rows(batch["labels"])
    signal = ServerClient(ServerSettings((url,), "teacher", top_k=4)).signal(batch)
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny["student"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        dense = teacher(**inputs).logits[:, :-1][mask]
    # The server's log-prob of each row's own token, in or outside its top 4.
    want = torch.log_softmax(dense, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(signal.label_logprobs, want, rtol=0, atol=1e-5)
    assert bool((signal.ids[:, :4] != labels[:, None]).all(dim=-1).any())  # some lie outside the top 4

    def loss_and_grad(target) -> tuple[torch.Tensor, list[torch.Tensor]]:
        student.zero_grad()
        loss = sampled_reverse_kl(student(**inputs).logits[:, :-1][mask], target, labels=labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]

    (served_loss, served_grads), (live_loss, live_grads) = loss_and_grad(signal), loss_and_grad(dense)
    torch.testing.assert_close(served_loss, live_loss, rtol=0, atol=1e-4)
    for a, b in zip(served_grads, live_grads):  # float32 sums in another order: 1.5e-5 apart on an AMD EPYC
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _train(tiny: dict, folder: Path, teacher: dict, mode: str) -> list[dict]:
    training = {"max_steps": 2, "on_policy": {**ON, "mode": mode}}
    run = tiny_config(tiny, folder, teacher=teacher, cache={"top_k": 8}, training=training, loss=LOSS)
    assert main(["train", str(write_config(folder.with_suffix(".yaml"), run))]) == 0
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.parametrize("mode", ["divergence", "sampled"])
def test_on_policy_steps_with_a_served_teacher(tiny: dict, tmp_path: Path, url: str, mode: str) -> None:
    served_teacher = {"model": str(tiny["teacher"]), "server": url, "name": "teacher"}
    remote = _train(tiny, tmp_path / "served", served_teacher, mode)
    assert len(remote) == 2 and all(r["gen/rows"] == 4 and r["gen/mean_length"] > 0 for r in remote)
    if mode == "sampled":  # the same samples (same seed) and the same per-token log-probs as in process
        local = _train(tiny, tmp_path / "live", {"model": str(tiny["teacher"])}, mode)
        for a, b in zip(remote, local):
            assert a["gen/mean_length"] == b["gen/mean_length"]
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_sampled_mode_at_another_temperature_is_refused(
    tiny: dict,
    tmp_path: Path,
    url: str,
    capsys: pytest.CaptureFixture,
) -> None:
    teacher = {"model": str(tiny["teacher"]), "server": url, "name": "teacher"}
    training = {"on_policy": {**ON, "mode": "sampled"}}
    run = tiny_config(
        tiny, tmp_path / "run", teacher=teacher, training=training, loss={**LOSS, "temperature": 2.0}
    )
    assert main(["validate", str(write_config(tmp_path / "run.yaml", run))]) == 2
    err = capsys.readouterr().err
    assert "mode=sampled with the served teacher(s) teacher needs loss.temperature: 1 (got 2)" in err
    assert "Traceback" not in err
