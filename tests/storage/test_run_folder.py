"""One run folder, one run (the folder lock, with real processes), and checkpoints that run no code.

The running runs are real `python -m kdistill train` processes (about ten seconds of imports each);
every test that starts one kills it in a `finally`, so none is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import kdistill.run.start as start
from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.errors import KdistillError
from kdistill.files import RunFiles
from kdistill.storage.checkpoint import latest_checkpoint
from kdistill.storage.folder_lock import lock_run_folder

# Far more steps than the test waits for: the run is stopped by a signal.
ENDLESS = {"max_steps": 100_000, "save_steps": 3, "save_total_limit": 2}


def _config(tmp_path: Path, tiny: dict, training: dict) -> tuple[Path, Path]:
    out = tmp_path / "run"
    return write_config(tmp_path / "run.yaml", tiny_config(tiny, out, training=training)), out


def _spawn(command: list[str], log: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # stderr to a file: tqdm writes a line a step, and an unread pipe could fill and block the run.
    return subprocess.Popen(command, stderr=open(log, "w"), env=env, **kwargs)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=60)


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _train_steps(out: Path) -> list[int]:
    path = out / RunFiles.METRICS
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def test_a_second_run_on_a_running_folder_stops_at_once_naming_it(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config, out = _config(tmp_path, tiny, ENDLESS)
    log = tmp_path / "first.log"
    first = _spawn([sys.executable, "-m", "kdistill", "train", str(config)], log, stdout=subprocess.DEVNULL)
    try:
        _wait_for(lambda: latest_checkpoint(out / "checkpoints") is not None, first, log)
        # Refused before any model loads: loading would take minutes on a real teacher.
        monkeypatch.setattr(start, "build_components", lambda *a, **k: pytest.fail("loaded models"))
        for flags in ([], ["--overwrite"], ["--resume"]):
            began = time.monotonic()
            assert main(["train", str(config), *flags]) == 2
            assert time.monotonic() - began < 30
            err = capsys.readouterr().err
            assert (
                f"kdistill: error: output_dir {out} is in use by another kdistill run, process {first.pid}"
                in err
            )
            assert f"(kill {first.pid})" in err and "Traceback" not in err
        # Nothing of the first run was deleted, and it goes on.
        assert (out / RunFiles.CONFIG).is_file() and latest_checkpoint(out / "checkpoints") is not None
        steps = len(_train_steps(out))
        _wait_for(lambda: len(_train_steps(out)) > steps + 2, first, log)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        _stop(first)
    steps = _train_steps(out)
    assert steps == list(range(1, len(steps) + 1))  # one run wrote metrics.jsonl, in order
    assert not (out / RunFiles.LOCK).exists()  # released as the run stopped
    lock_run_folder(out).release()  # free at once


def test_a_killed_runs_lock_never_blocks(tmp_path: Path, tiny: dict) -> None:
    out = tmp_path / "run"
    holder = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from kdistill.storage.folder_lock import lock_run_folder
        lock = lock_run_folder(Path({str(out)!r}))
        print("locked", flush=True)
        time.sleep(600)
    """)
    log = tmp_path / "holder.log"
    process = _spawn([sys.executable, "-c", holder], log, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked", log.read_text()
        with pytest.raises(KdistillError, match=f"process {process.pid} on "):
            lock_run_folder(out)
        process.kill()
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        _stop(process)
    # Its lock file stays behind, naming a dead process; the kernel released its lock.
    assert json.loads((out / RunFiles.LOCK).read_text())["pid"] == process.pid
    began = time.monotonic()
    lock = lock_run_folder(out)
    assert time.monotonic() - began < 1
    assert json.loads((out / RunFiles.LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    # A folder holding only a dead run's lock file is empty: a new run needs no --overwrite.
    (out / RunFiles.LOCK).write_text(json.dumps({"pid": process.pid}))
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, out, training={"max_steps": 1}))
    assert main(["train", str(config)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / RunFiles.LOCK).exists()


def test_a_lock_is_one_runs_until_released(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    lock = lock_run_folder(out)
    with pytest.raises(KdistillError, match=f"process {os.getpid()} on .*; nothing was changed"):
        lock_run_folder(out)
    assert not lock_run_folder(out, main=False).held  # other processes under accelerate take none
    lock.release()
    assert not out.exists()  # it created the folder and nothing was written: nothing is left
    with lock_run_folder(out):
        (out / "kept").write_text("x")
    assert [p.name for p in out.iterdir()] == ["kept"]


def test_a_run_refused_on_bad_input_leaves_no_folder(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    config = tiny_config(tiny, out, data={"source": str(tmp_path / "missing.jsonl")})
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not out.exists()


class _Payload:
    """A pickle that creates `marker` when it is loaded: what a crafted checkpoint file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["rng.pt", "optim.pt"])
def test_resume_runs_no_code_from_a_crafted_checkpoint_file(
    tmp_path: Path, tiny: dict, name: str, capsys: pytest.CaptureFixture
) -> None:
    config, out = _config(tmp_path, tiny, {"max_steps": 3, "save_steps": 2})
    assert main(["train", str(config)]) == 0
    checkpoint = latest_checkpoint(out / "checkpoints")
    marker = tmp_path / "code-ran"
    torch.save({"state": _Payload(marker)}, checkpoint / name)
    torch.load(checkpoint / name, weights_only=False)  # the file really runs code when unpickled
    assert marker.exists()
    marker.unlink()
    capsys.readouterr()

    assert main(["train", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert f"kdistill: error: --resume: {checkpoint / name} is not a checkpoint file kdistill wrote" in err
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("kdistill:")]) == 1
