"""Runs that survive: SIGKILL then --resume, SIGTERM/SIGINT, partial checkpoints, OOM back-off, NaN steps.

The interrupted runs are real `python -m kdistill train` processes; the runs they are compared with
are the same command run in-process. Each subprocess costs about ten seconds of imports here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.objective.batch import StudentLoss
from kdistill.run.step import Step
from kdistill.storage.checkpoint import latest_checkpoint

# 10 steps an epoch: the run crosses two epoch boundaries, so a resume must also get the epoch order right.
TRAINING = {"max_steps": 36, "save_steps": 4, "save_total_limit": 2}


def _config(tmp_path: Path, tiny: dict, name: str = "run", **sections: dict) -> tuple[Path, Path]:
    sections.setdefault("training", TRAINING)
    out = tmp_path / name
    return write_config(tmp_path / f"{name}.yaml", tiny_config(tiny, out, **sections)), out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_steps(out: Path) -> list[tuple[int, int, float, float, float]]:
    """Per step: the rows' trained-token count (the data order), loss, KD and CE."""
    return [
        (r["step"], r["trained_tokens"], r["loss"], r["loss/kd"], r["loss/ce"])
        for r in _records(out)
        if "loss" in r
    ]


def _assert_same_run(a: Path, b: Path, tol: float = 1e-5) -> None:
    steps_a, steps_b = _train_steps(a), _train_steps(b)
    assert [s[:2] for s in steps_a] == [s[:2] for s in steps_b]  # same steps, same rows in each
    for x, y in zip(steps_a, steps_b):
        assert x[2:] == pytest.approx(y[2:], rel=tol, abs=tol), x[0]
    evals = lambda out: [(r["step"], r["eval/kl"], r["eval/ppl"]) for r in _records(out) if "eval/kl" in r]  # noqa: E731
    assert [e[0] for e in evals(a)] == [e[0] for e in evals(b)]
    for x, y in zip(evals(a), evals(b)):
        assert x[1:] == pytest.approx(y[1:], rel=tol)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=tol, msg=name)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The interrupted runs are subprocesses on one thread (`_spawn`); the in-process runs they are
    compared with use one too, since a matmul's sums differ with the thread count and Adam turns such
    differences in near-zero gradients into differences of the learning rate's order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    config, out = _config(tmp_path_factory.mktemp("straight"), tiny)
    assert main(["train", str(config)]) == 0
    return out


def _spawn(config: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "kdistill", "train", str(config), *args]
    # stderr to a file: tqdm writes a line a step, and an unread pipe could fill and block the run.
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_sigkill_then_resume_gives_the_uninterrupted_run(tmp_path: Path, tiny: dict, straight: Path) -> None:
    config, out = _config(tmp_path, tiny)
    process = _spawn(config, tmp_path / "killed.log")
    _wait_for(lambda: (out / "checkpoints" / "step-0000012").is_dir(), process)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()  # it really died mid-run
    killed_at = max(r["step"] for r in _records(out) if "loss" in r)
    assert killed_at < 36

    assert main(["train", str(config), "--resume"]) == 0
    _assert_same_run(straight, out)
    # save_total_limit=2 kept the newest two; no temporary folder is left.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000028", "step-0000032"]


def test_a_student_pruned_in_process_resumes_exactly_after_a_kill(tmp_path: Path, tiny: dict) -> None:
    """The resumed run prunes the teacher again (the same calibration rows, the same units), then
    loads the checkpoint's weights into that shape."""
    student = {
        "from_teacher": {"method": "importance", "params": 0.6, "calibration_rows": 8},
        "finetune": "full",
    }
    training = {"max_steps": 12, "save_steps": 4, "save_total_limit": 2}
    straight_config, straight_out = _config(tmp_path, tiny, "straight", student=student, training=training)
    assert main(["train", str(straight_config)]) == 0
    config, out = _config(tmp_path, tiny, student=student, training=training)
    process = _spawn(config, tmp_path / "killed.log")
    _wait_for(lambda: (out / "checkpoints" / "step-0000004").is_dir(), process)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()
    assert main(["train", str(config), "--resume"]) == 0
    _assert_same_run(straight_out, out)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] < 128  # really pruned


def test_sigterm_checkpoints_the_current_step_and_says_how_to_resume(
    tmp_path: Path, tiny: dict, straight: Path
) -> None:
    config, out = _config(tmp_path, tiny, training={**TRAINING, "save_steps": None})
    log = tmp_path / "stopped.log"
    process = _spawn(config, log, "--set", "training.seed=0")
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(_train_steps(out)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    step = _train_steps(out)[-1][0]  # logging_steps=1: the last step it finished
    assert 3 <= step < 36
    checkpoint = out / "checkpoints" / f"step-{step:07d}"
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]
    lines = log.read_text().splitlines()
    assert f"kdistill: stopped by SIGTERM after step {step}; checkpoint written to {checkpoint}" in lines
    assert f"kdistill: resume with: kdistill train {config} --set training.seed=0 --resume" in lines
    assert not (out / "model.safetensors").exists()

    assert main(["train", str(config), "--resume"]) == 0
    _assert_same_run(straight, out)


def test_sigint_finishes_the_step_then_checkpoints(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_step, calls = Step.__call__, {"n": 0}

    def ctrl_c_during_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C would, in the middle of the step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Step, "__call__", ctrl_c_during_step_5)
    config, out = _config(tmp_path, tiny)
    # Whatever was installed before (a shell ignores SIGINT in background jobs), it comes back after.
    before = signal.getsignal(signal.SIGINT)
    assert main(["train", str(config)]) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    checkpoint = out / "checkpoints" / "step-0000005"
    assert f"kdistill: stopped by SIGINT after step 5; checkpoint written to {checkpoint}" in err
    assert f"kdistill: resume with: kdistill train {config} --resume" in err
    assert latest_checkpoint(out / "checkpoints") == checkpoint
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 5
    assert signal.getsignal(signal.SIGINT) is before  # handlers are put back


def test_partial_checkpoints_are_never_resumed_from(
    tmp_path: Path, tiny: dict, straight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step, calls = Step.__call__, {"n": 0}

    def dies_at_10(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt  # a crash without a checkpoint: the newest one is step 8
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Step, "__call__", dies_at_10)
    config, out = _config(tmp_path, tiny)
    assert main(["train", str(config)]) == 130
    monkeypatch.setattr(Step, "__call__", real_step)
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000004", "step-0000008"]
    # A run killed while writing step 9 leaves step-0000009.tmp, complete but for the rename.
    (folder / "step-0000008").rename(folder / "step-0000009.tmp")
    (folder / "step-0000007").mkdir()  # and a folder without state.json is not a checkpoint either
    assert latest_checkpoint(folder) == folder / "step-0000004"
    assert main(["train", str(config), "--resume"]) == 0
    assert not (folder / "step-0000009.tmp").exists()
    _assert_same_run(straight, out)


def test_resume_without_a_checkpoint_starts_over_cleanly(tmp_path: Path, tiny: dict) -> None:
    config, out = _config(tmp_path, tiny, training={"max_steps": 3})
    assert main(["train", str(config)]) == 0
    first = _train_steps(out)
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 2, "lo')  # cut line
    assert main(["train", str(config), "--resume"]) == 0
    assert _train_steps(out) == first  # written once, not appended to the old records


def _oom_after(calls: int, rows_over: int, error: Exception, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Make the training step's batch loss fail on micro-batches of more than `rows_over` rows from
    call `calls` on (held-out passes, which run without gradients, are not counted)."""
    real, seen = StudentLoss.forward, {"n": 0, "failed": 0}

    def batch_loss(self, batch, teachers, settings, **kwargs):
        if torch.is_grad_enabled():
            seen["n"] += 1
            if seen["n"] >= calls and len(batch["input_ids"]) > rows_over:
                seen["failed"] += 1
                raise error
        return real(self, batch, teachers, settings, **kwargs)

    monkeypatch.setattr(StudentLoss, "forward", batch_loss)
    return seen


OOM_TRAINING = {"max_steps": 6, "gradient_accumulation_steps": 2, "save_steps": 5}


def test_out_of_memory_halves_the_micro_batch_and_retries_the_step(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config, smaller = _config(tmp_path, tiny, "smaller", training={**OOM_TRAINING, "micro_batch_size": 2})
    assert main(["train", str(config)]) == 0
    config, full = _config(tmp_path, tiny, "full", training=OOM_TRAINING)
    assert main(["train", str(config)]) == 0

    real_batch_loss = StudentLoss.forward
    # Step 3's second micro-batch fails after the first one's backward: its gradient must not count twice.
    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    seen = _oom_after(6, 2, error, monkeypatch)
    config, backed_off = _config(tmp_path, tiny, "backed_off", training=OOM_TRAINING)
    assert main(["train", str(config)]) == 0
    assert seen["failed"] == 1
    assert (
        "out of memory at step 3 with a micro-batch of 4 rows: retrying the step with 2 rows a micro-batch "
        "(4 micro-batches for its 8 rows; effective batch unchanged)" in caplog.messages
    )
    state = json.loads((backed_off / "checkpoints" / "step-0000005" / "state.json").read_text())
    assert state["micro_batch_size"] == 2  # a resumed run keeps the smaller micro-batch
    _assert_same_run(smaller, backed_off)
    _assert_same_run(full, backed_off)

    # Resumed from step 5, the run keeps the micro-batch it backed off to (no OOM is injected now).
    rows = []

    def counting(self, batch, teachers, settings, **kwargs):
        if torch.is_grad_enabled():
            rows.append(len(batch["input_ids"]))
        return real_batch_loss(self, batch, teachers, settings, **kwargs)

    monkeypatch.setattr(StudentLoss, "forward", counting)
    assert main(["train", str(config), "--resume"]) == 0
    assert rows and max(rows) == 2
    _assert_same_run(full, backed_off)


def test_out_of_memory_at_one_row_stops_with_the_advice(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    error = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    seen = _oom_after(1, 0, error, monkeypatch)
    config, out = _config(tmp_path, tiny, training=OOM_TRAINING)
    assert main(["train", str(config)]) == 3
    assert seen["failed"] == 3  # 4 rows, 2, 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "kdistill: error: out of memory at step 1 even with a micro-batch of 1 row. To fit: shorten "
        "data.max_length (now 64); on a GPU train in bf16 (training.mixed_precision: bf16); load the "
        "teacher in 4 bits (teacher.quantization: 4bit); run the teacher once with `kdistill cache` and "
        "train from it (teacher: {cache: PATH}); or use a smaller loss chunk (loss.chunk_size, now 16)"
    )


def test_other_errors_are_not_mistaken_for_out_of_memory(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    seen = _oom_after(1, 0, RuntimeError("shape mismatch"), monkeypatch)
    config, _ = _config(tmp_path, tiny, training=OOM_TRAINING)
    assert main(["train", str(config)]) == 1  # raised as it is: one line, not an out-of-memory retry
    assert "kdistill: error: RuntimeError: shape mismatch; run with --debug" in capsys.readouterr().err
    assert seen["failed"] == 1


def _nan_loss_on_steps(steps: set[int], monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """NaN losses on the given steps (one micro-batch a step); returns what each step saw."""
    real_loss, real_step, seen = StudentLoss.forward, Step.__call__, []

    def batch_loss(*args, **kwargs):
        sums = real_loss(*args, **kwargs)
        if torch.is_grad_enabled() and len(seen) in steps:
            sums.total, sums.kd = sums.total * float("nan"), sums.kd * float("nan")
        return sums

    def optimizer_step(self, *args):
        student, optimizer = self.model, self.optimizer
        seen.append({"before": [p.detach().clone() for p in student.parameters()]})
        stats = real_step(self, *args)
        adam = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
        seen[-1].update(after=[p.detach().clone() for p in student.parameters()], adam=adam, stats=stats)
        seen[-1]["grads"] = [p.grad for p in student.parameters()]
        return stats

    monkeypatch.setattr(StudentLoss, "forward", batch_loss)
    monkeypatch.setattr(Step, "__call__", optimizer_step)
    return seen


def test_a_nan_step_is_skipped(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen = _nan_loss_on_steps({3}, monkeypatch)
    config, out = _config(tmp_path, tiny, training={"max_steps": 5})
    assert main(["train", str(config)]) == 0
    assert "step 3: the loss is nan; the step was skipped (no update, gradients zeroed)" in caplog.messages
    third = seen[2]
    assert all(torch.equal(a, b) for a, b in zip(third["before"], third["after"]))  # no update at all
    assert all(g is None for g in third["grads"])
    assert third["adam"] == {2.0}  # AdamW did not count the step either
    assert not any(torch.equal(a, b) for a, b in zip(seen[3]["before"], seen[3]["after"]))
    records = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 4, 5]  # the skipped step is not averaged in
    assert [r.get("health/skipped_steps") for r in records] == [None, None, 1.0, 1.0]
    assert all(torch.isfinite(w).all() for w in load_file(out / "model.safetensors").values())


def test_nan_steps_in_a_row_stop_the_run(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _nan_loss_on_steps(set(range(2, 100)), monkeypatch)
    health = {"max_bad_steps": 3}
    config, out = _config(tmp_path, tiny, training={"max_steps": 8, "health": health})
    assert main(["train", str(config)]) == 3
    assert capsys.readouterr().err.splitlines()[-1] == (
        "kdistill: error: stopped at step 4: the loss is nan, 3 steps in a row "
        "(training.health.max_bad_steps=3). Lower training.learning_rate (to 1e-5), raise "
        "training.warmup_steps, and check the data format (`kdistill validate CONFIG` shows the format "
        "that was detected and how many rows were read); then run again with --overwrite"
    )
    assert not (out / "model.safetensors").exists()
