"""A write that fails for want of space: real `kdistill train` and `kdistill cache` processes under a
file-size limit (RLIMIT_FSIZE), which makes a write fail with EFBIG as a full disk fails with ENOSPC.

Each child ignores SIGXFSZ, so the kernel fails the write instead of killing the process.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, write_config
from kdistill.cli import main


def _limited(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def _run_limited(command: str, config: Path, limit: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kdistill", command, str(config), *args],
        capture_output=True, text=True, env=env, preexec_fn=_limited(limit), timeout=600,
    )  # fmt: skip


def _errors(stderr: str) -> list[str]:
    """The error lines; each must start a line of its own (a progress bar ends its line first)."""
    return [line for line in stderr.split("\n") if line.startswith("kdistill: error:")]


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.suffix]


LORA = {"finetune": "lora", "merge": True, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
TRAINING = {"max_steps": 10, "save_steps": 4, "save_total_limit": 2}


def test_a_failed_final_write_keeps_the_checkpoint_and_resume_finishes(tmp_path: Path, tiny: dict) -> None:
    """LoRA with merge: the checkpoints (adapter and its optimizer) are small, the merged model is not."""
    straight = tmp_path / "straight"
    write_config(tmp_path / "s.yaml", tiny_config(tiny, straight, student=LORA, training=TRAINING))
    assert main(["train", str(tmp_path / "s.yaml")]) == 0
    merged = (straight / "merged" / "model.safetensors").stat().st_size
    biggest = max(p.stat().st_size for p in (straight / "checkpoints").rglob("*") if p.is_file())
    assert biggest < merged // 2
    out = tmp_path / "run"
    config = write_config(tmp_path / "r.yaml", tiny_config(tiny, out, student=LORA, training=TRAINING))

    done = _run_limited("train", config, merged // 2)

    assert done.returncode == 2, done.stderr
    (line,) = _errors(done.stderr)
    checkpoint = out / "checkpoints" / "step-0000008"
    assert f"could not write the trained student to {out / '.student.tmp'}: File too large [EFBIG]" in line
    assert "free there when it failed" in line and "(ulimit -f)" in line
    assert f"The previous checkpoint {checkpoint} is intact" in line and "--resume" in line
    assert not _leftovers(out) and not (out / "merged").exists()

    assert main(["train", str(config), "--resume"]) == 0
    a, b = (
        load_file(straight / "merged" / "model.safetensors"),
        load_file(out / "merged" / "model.safetensors"),
    )
    # The limited run used one thread, this process two: Adam turns the summation-order noise in the
    # LoRA gradients (B starts at zero) into differences of about 3e-5 in the merged weights.
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4, msg=name)


def test_a_failed_checkpoint_write_leaves_no_partial_folder(tmp_path: Path, tiny: dict) -> None:
    """The first checkpoint does not fit (its optimizer file is twice the weights): no step is kept."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "r.yaml", tiny_config(tiny, out, training=TRAINING))

    done = _run_limited("train", config, 600_000)

    assert done.returncode == 2, done.stderr
    (line,) = _errors(done.stderr)
    tmp = out / "checkpoints" / "step-0000004.tmp"
    assert f"could not write checkpoint step 4 to {tmp}: File too large [EFBIG]" in line
    assert "No checkpoint was saved before it" in line and "`kdistill train` command again" in line
    assert not _leftovers(out) and "Traceback" not in done.stderr
    assert main(["train", str(config)]) == 0  # no step was saved: the same command takes the folder over


def test_a_failed_cache_shard_keeps_the_shards_before_it(tmp_path: Path, tiny: dict) -> None:
    whole = tmp_path / "whole"
    section = {"top_k": 8, "tail_samples": 0, "rows_per_shard": 4}

    def config(name: str, cache: Path) -> Path:
        values = tiny_config(tiny, tmp_path / f"out-{name}", cache=section)
        values["teacher"]["cache"] = str(cache)
        return write_config(tmp_path / f"{name}.yaml", values)

    assert main(["cache", str(config("whole", whole))]) == 0
    shards = json.loads((whole / "manifest.json").read_text())["splits"]["train"]["shards"]
    sizes = [s["bytes"] for s in shards]
    # The limit lets the first shard through and stops at the first one larger than it.
    failing = next(i for i, size in enumerate(sizes) if size > sizes[0])
    limited = tmp_path / "cache"

    done = _run_limited("cache", config("limited", limited), sizes[0] + 1)

    assert done.returncode == 2, done.stderr
    (line,) = _errors(done.stderr) or [done.stderr[-3000:]]
    name = f"train-{failing:05d}.safetensors"
    assert f"could not write cache shard {name} to {limited / name}: File too large [EFBIG]" in line
    assert f"The {failing} shards before it are intact" in line
    assert not [p for p in limited.iterdir() if ".tmp" in p.name]
    assert main(["cache", str(config("limited", limited))]) == 0
    for shard in shards:
        a, b = load_file(whole / shard["file"]), load_file(limited / shard["file"])
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_gguf_export_leaves_no_partial_file(tmp_path: Path, tiny: dict) -> None:
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'kdistill[gguf]')")
    out = tmp_path / "student.gguf"

    done = _run_limited("export", tiny["student"], 100_000, "--gguf", "--output", str(out))

    assert done.returncode == 2, done.stderr
    (line,) = _errors(done.stderr) or [done.stderr[-3000:]]
    # gguf writes with numpy, whose error gives no errno: "the write failed (4096 requested and N written)"
    assert f"could not write the GGUF export (f32) to {out}: the write failed (" in line
    assert "(ulimit -f). The student it was made from is unchanged" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", ["ENOSPC", "EFBIG"])
def test_the_message_names_the_errno(tmp_path: Path, code: str) -> None:
    import errno

    from kdistill.errors import KdistillError
    from kdistill.files import write_atomic

    def full(*args: object) -> None:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    target = tmp_path / "x.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "write_bytes", full)
        with pytest.raises(
            KdistillError, match=rf"could not write x.json to {target}: .* \[{code}\]; .* free"
        ):
            write_atomic(target, "{}")
    assert list(tmp_path.iterdir()) == []


def test_cache_is_refused_where_it_cannot_fit(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    values = tiny_config(tiny, tmp_path / "out", cache={"top_k": 8, "tail_samples": 0})
    values["teacher"]["cache"] = str(tmp_path / "cache")
    config = write_config(tmp_path / "c.yaml", values)
    monkeypatch.setattr("kdistill.files.free_bytes", lambda path: 1000)

    assert main(["cache", str(config)]) == 2

    err = capsys.readouterr().err
    assert f"kdistill: error: teacher.cache {tmp_path / 'cache'}: 1.0 kB free, but the cache (" in err
    assert " trained tokens, 8 entries each) need " in err and "choose another teacher.cache" in err
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_a_tight_disk_warns_with_both_figures(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from kdistill.api import load_config
    from kdistill.prerun.disk_space import disk_space_fits
    from kdistill.prerun.preflight import Checked

    monkeypatch.setattr("kdistill.files.free_bytes", lambda path: 2_000_000)  # the need is 1.5 MB
    disk_space_fits(Checked(load_config(tiny_config(tiny, tmp_path / "out"))))
    assert (
        "2.0 MB free, and one checkpoint (1.1 MB) and the final student (378.1 kB) need 1.5 MB" in caplog.text
    )


def test_a_failed_metrics_line_names_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import errno
    from types import SimpleNamespace

    from kdistill.errors import KdistillError
    from kdistill.run.metrics import MetricsFile

    (tmp_path / "checkpoints" / "step-0000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000004" / "state.json").write_text("{}")
    real_open = builtins.open

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    metrics = MetricsFile(
        tmp_path / "metrics.jsonl", SimpleNamespace(log=lambda *a, **k: None, is_main_process=True)
    )
    with pytest.raises(KdistillError) as raised:
        metrics.write(5, {"loss": 1.0})
    message = str(raised.value)
    assert message.startswith(f"could not write step 5's metrics to {tmp_path / 'metrics.jsonl'}: ")
    assert "[ENOSPC]" in message
    assert f"The previous checkpoint {tmp_path / 'checkpoints' / 'step-0000004'} is intact" in message


@pytest.mark.slow  # two fresh processes under `accelerate launch` (gloo, CPU): about 30 s on 2 busy cores
def test_two_processes_both_stop_when_the_main_one_cannot_write(tmp_path: Path, tiny: dict) -> None:
    """The main process writes the checkpoint; the other learns of its failure instead of waiting."""
    import shutil
    import socket

    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the `accelerate` command is not installed next to this Python")
    out = tmp_path / "pair"
    config = write_config(tmp_path / "pair.yaml", tiny_config(tiny, out, training=TRAINING))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    command += ["-m", "kdistill", "train", str(config)]

    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limited(600_000)
    )

    assert done.returncode != 0
    assert f"could not write checkpoint step 4 to {out / 'checkpoints' / 'step-0000004.tmp'}" in done.stderr
    assert not _leftovers(out)
