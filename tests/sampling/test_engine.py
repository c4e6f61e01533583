"""The student's generation engine (`training.on_policy.engine: vllm`) on tiny models: config errors,
the weights the engine holds after a sync (full and LoRA students), the sync cadence and the logged
staleness, and no server left behind on exit, on an error or on a signal.

The engine is tests/fake_vllm, a stand-in with vLLM's command line and endpoints that samples with
transformers; tests/test_real_vllm.py runs the real vLLM.
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
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.models.build import with_lora
from kdistill.sampling.engine import EngineSettings, VllmEngine
from kdistill.sampling.generate import Sampling, left_padded, responses

FAKE = Path(__file__).parents[1] / "fake_vllm"
SRC = Path(__file__).parents[2] / "src"
ON = {"lmbda": 1.0, "max_new_tokens": 8, "max_prompt_length": 32, "engine": "vllm"}


@pytest.fixture
def fake_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in is what `python -m vllm.entrypoints.openai.api_server` runs."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE), str(SRC)]))


def _on(**engine: object) -> dict:
    return {**ON, "engine": {"kind": "vllm", "python": sys.executable, **engine}}


def _vllm(**engine: object) -> dict:
    return {**ON, "engine": {"kind": "vllm", **engine}}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _servers_in(folder: Path) -> list[int]:
    """Pids of engine processes started on a model under `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"vllm.entrypoints.openai.api_server" in cmdline and str(folder).encode() in cmdline:
                found.append(int(proc.name))
    return found


@pytest.mark.parametrize(
    ("on_policy", "message"),
    [
        ({"engine": "vllm"}, "engine=vllm with lmbda=0"),
        ({"engine": {"kind": "vllm"}}, "engine=vllm with lmbda=0"),
        (_vllm(sync_steps=0), "training.on_policy.engine.sync_steps"),
        (_vllm(sync_step=2), "unknown key 'training.on_policy.engine.sync_step'; did you mean 'sync_steps'?"),
        (
            {"lmbda": 0.5, "engine": {"kind": "hf", "sync_steps": 2}},
            "key 'training.on_policy.engine.sync_steps'",
        ),
        (
            {"lmbda": 0.5, "engine": {"kind": "hf", "memory": 0.5}},
            "unknown key 'training.on_policy.engine.memory'; it is a key of kind 'vllm'",
        ),
        (_vllm(generation_batch_size=4), "unknown key 'training.on_policy.engine.generation_batch_size'"),
        (
            {"lmbda": 0.5, "engine": {"kind": "hf", "overlap": True}},
            "key 'training.on_policy.engine.overlap'",
        ),
        (
            {"lmbda": 0.5, "engine": "sglang"},
            "training.on_policy.engine.kind: expected 'hf' or 'vllm' (got 'sglang')",
        ),
        (
            {"lmbda": 0.5, "engine": {"memory": 0.5}},  # no kind: the default, hf
            "engine.memory'; it is a key of kind 'vllm' (this one is kind 'hf')",
        ),
        (_vllm(devices="gpu1"), "training.on_policy.engine.devices"),
        (_vllm(devices=True), "training.on_policy.engine.devices"),
        (_vllm(devices="1", server="http://127.0.0.1:8100"), "engine.devices='1' places an"),
        (_vllm(server="localhost:8000"), "expected a URL such as http://127.0.0.1:8100"),
        (_vllm(python="/nowhere/bin/python"), "training.on_policy.engine.python='/nowhere"),
    ],
)
def test_bad_engine_configs_get_one_message(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture, on_policy: dict, message: str
) -> None:
    config = tiny_config(tiny, tmp_path / "out", training={"on_policy": on_policy})
    code = main(["train", str(write_config(tmp_path / "run.yaml", config))])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("devices", "ids"), [(1, [1]), ("2,3", [2, 3]), ("0,4-6", [0, 4, 5, 6])])
def test_engine_devices_are_read_as_device_numbers(devices: object, ids: list[int]) -> None:
    from kdistill.config.on_policy import OnPolicyConfig
    from kdistill.sampling.engine import _device_ids

    o = OnPolicyConfig.model_validate(_vllm(devices=devices))
    assert _device_ids(o.engine.devices) == ids


def _greedy(model: torch.nn.Module, prompts: list[list[int]], eos: int) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(
            **left_padded(prompts, eos, torch.device("cpu")), do_sample=False, max_new_tokens=8,
            eos_token_id=eos, pad_token_id=eos,
        )  # fmt: skip
    return responses(out[:, max(map(len, prompts)) :], eos)


def _engine_greedy(engine: VllmEngine, prompts: list[list[int]], eos: int) -> list[list[int]]:
    body = {
        "model": engine.model,
        "max_tokens": 8,
        "temperature": 0,
        "stop_token_ids": [eos],
        "return_token_ids": True,
    }
    answers = [engine._post("/v1/completions", {**body, "prompt": p}) for p in prompts]
    return [a["choices"][0]["token_ids"] for a in answers]


@pytest.mark.parametrize("lora", [False, True])
def test_after_a_sync_the_engine_holds_the_students_weights(
    tiny: dict, tmp_path: Path, fake_on_path: None, lora: bool
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    student = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32)
    if lora:
        from kdistill.config.student import LoraSettings

        student = with_lora(student, LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0))
    eos = tokenizer.eos_token_id
    prompts = [tokenizer("the sun and the moon")["input_ids"], tokenizer("write three")["input_ids"]]
    settings = EngineSettings(sys.executable, None, "student", 0.2, 120, 1, 64)
    folder = tmp_path / "engine"
    with VllmEngine(settings, folder, student, tokenizer, step=0) as engine:
        assert _engine_greedy(engine, prompts, eos) == _greedy(student, prompts, eos)
        with torch.no_grad():  # what an optimizer step does: new trainable weights
            torch.manual_seed(0)
            for p in student.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
        before = _engine_greedy(engine, prompts, eos)
        engine.maybe_sync(student, step=2)  # the weights of step 1: one step ahead, sync_steps 1
        assert engine.synced == 1 and engine.staleness(2) == 0
        after = _engine_greedy(engine, prompts, eos)
        assert after == _greedy(student, prompts, eos) and after != before
        server = engine.server.process
    assert server.poll() is not None and not _servers_in(folder)
    assert not (folder / "student").exists()  # the engine's copy of the weights is removed


def test_the_engine_runs_on_the_cpus_it_is_given(tiny: dict, tmp_path: Path, fake_on_path: None) -> None:
    """`engine.devices` on a machine without CUDA: the server is pinned to those cores, and vLLM is told
    to bind its threads there."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    student = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32)
    before = os.sched_getaffinity(0)
    core = max(before)
    settings = EngineSettings(sys.executable, None, "student", 0.2, 120, 1, 64, devices=str(core))
    with VllmEngine(settings, tmp_path / "engine", student, tokenizer, step=0) as engine:
        proc = Path(f"/proc/{engine.server.process.pid}")
        allowed = (proc / "status").read_text().split("Cpus_allowed_list:")[1].split()[0]
        environ = (proc / "environ").read_bytes().split(b"\0")
    assert allowed == str(core)
    assert f"VLLM_CPU_OMP_THREADS_BIND={core}".encode() in environ
    assert os.sched_getaffinity(0) == before  # the training process keeps its own cores


def test_engine_samples_are_seeded_per_row(tiny: dict, tmp_path: Path, fake_on_path: None) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    student = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32)
    prompt = tokenizer("the sun and the moon")["input_ids"]
    sampling = Sampling(1.0, 8, 1.0, 1.0, 32, tokenizer.eos_token_id, tokenizer.pad_token_id, 8)
    settings = EngineSettings(sys.executable, None, "student", 0.2, 120, 1, 64)
    with VllmEngine(settings, tmp_path / "engine", student, tokenizer, step=0) as engine:
        first = engine.sample([[prompt] * 4], sampling, [5])
        assert engine.sample([[prompt] * 4], sampling, [5]) == first  # the same seed: the same samples
        assert len({tuple(r) for r in first[0]}) > 1  # each row its own seed
        assert engine.sample([[prompt] * 4], sampling, [6]) != first


def test_sync_cadence_and_staleness_are_logged(tmp_path: Path, tiny: dict, fake_on_path: None) -> None:
    config = tiny_config(tiny, tmp_path / "out", training={"max_steps": 5, "on_policy": _on(sync_steps=2)})
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    steps = [r for r in _metrics(tmp_path / "out") if "loss" in r]
    assert [r["gen/staleness"] for r in steps] == [0, 1, 0, 1, 0]
    assert all(r["gen/rows"] == 4 and 0 < r["gen/mean_length"] <= 8 for r in steps)
    log = (tmp_path / "out" / "engine" / "server.log").read_text()
    reloads = [line for line in log.splitlines() if line.startswith("fake vLLM: reload_weights")]
    assert len(reloads) == 2  # before steps 3 and 5, from the weights of steps 2 and 4
    assert not _servers_in(tmp_path / "out")


def test_overlap_samples_the_next_step_while_this_one_trains(
    tmp_path: Path, tiny: dict, fake_on_path: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step's rows after the first are sampled on the engine during the step before, from the
    weights of two steps before (synced every step)."""
    import threading

    from kdistill.run.step import Step
    from kdistill.sampling.engine_sampler import OverlapSampler

    sampled, trained, real_sample, real_step = [], [], VllmEngine.sample, Step.__call__
    rows, real_rows = [], OverlapSampler.rows

    def recorded_sample(self, batches, sampling, seeds):  # which weights, which thread, when
        began = time.perf_counter()
        answer = real_sample(self, batches, sampling, seeds)
        sampled.append((self.synced, threading.current_thread().name, began, answer))
        return answer

    def recorded_rows(self, window, step):  # the rows the step trains on
        out = real_rows(self, window, step)
        rows.append(
            [
                b["input_ids"][i][b["labels"][i] != -100].tolist()
                for b in out.window
                for i in range(len(b["labels"]))
            ]
        )
        return out

    def recorded_step(self, *args):
        began = time.perf_counter()
        stats = real_step(self, *args)
        trained.append((began, time.perf_counter(), rows[-1]))
        return stats

    monkeypatch.setattr(VllmEngine, "sample", recorded_sample)
    monkeypatch.setattr(OverlapSampler, "rows", recorded_rows)
    monkeypatch.setattr(Step, "__call__", recorded_step)
    config = tiny_config(tiny, tmp_path / "out", training={"max_steps": 5, "on_policy": _on(overlap=True)})
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    steps = [r for r in _metrics(tmp_path / "out") if "loss" in r]
    assert [r["gen/staleness"] for r in steps] == [0, 1, 1, 1, 1]
    assert all(0 < r["gen/hidden_share"] <= 1 for r in steps[1:])
    assert [weights for weights, *_ in sampled] == [0, 0, 1, 2, 3]  # step n's rows: weights of n - 2
    assert sampled[0][1] == "MainThread" and all(t.startswith("kdistill-overlap") for _, t, *_ in sampled[1:])
    for (_, _, began, _), (_, step_ended, _) in zip(sampled[1:], trained):
        assert began < step_ended  # step n + 1's rows went out before step n had trained
    for (*_, answer), (_, _, ids) in zip(sampled, trained):
        assert ids == [row for batch in answer for row in batch]  # each step trains on its own rows
    log = (tmp_path / "out" / "engine" / "server.log").read_text()
    assert len([line for line in log.splitlines() if line.startswith("fake vLLM: reload_weights")]) == 3
    assert not _servers_in(tmp_path / "out")


def test_lora_student_syncs_through_adapters(tmp_path: Path, tiny: dict, fake_on_path: None) -> None:
    student = {"model": str(tiny["student"]), "from_teacher": None, "finetune": "lora", "lora": {"r": 4}}
    training = {"max_steps": 3, "on_policy": _on()}
    config = tiny_config(tiny, tmp_path / "out", student=student, training=training)
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    assert [r["gen/staleness"] for r in _metrics(tmp_path / "out") if "loss" in r] == [0, 0, 0]
    events = [
        line.split(": ", 1)[1]
        for line in (tmp_path / "out" / "engine" / "server.log").read_text().splitlines()
        if line.startswith("fake vLLM: ")
    ]
    assert events == [
        "load_lora_adapter student-0",
        "load_lora_adapter student-1",
        "unload_lora_adapter student-0",
        "load_lora_adapter student-2",
        "unload_lora_adapter student-1",
    ]
    assert not _servers_in(tmp_path / "out")


def test_an_error_mid_run_stops_the_engine(
    tmp_path: Path, tiny: dict, fake_on_path: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdistill.run.step import Step

    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a step that fails")

    monkeypatch.setattr(Step, "__call__", fails)
    config = tiny_config(tiny, tmp_path / "out", training={"max_steps": 3, "on_policy": _on()})
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 1
    assert not _servers_in(tmp_path / "out")


@pytest.mark.parametrize("when", ["starting", "training"])
def test_sigterm_stops_the_engine(tmp_path: Path, tiny: dict, fake_on_path: None, when: str) -> None:
    training = {"max_steps": 400, "save_steps": 1000, "on_policy": _on()}
    path = write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out", training=training))
    run = subprocess.Popen(
        [sys.executable, "-m", "kdistill.cli", "train", str(path)], stderr=subprocess.PIPE, text=True
    )
    log, metrics = tmp_path / "out" / "engine" / "server.log", tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    ready = (lambda: log.exists()) if when == "starting" else (lambda: '"gen/rows"' in _text(metrics))
    while not ready() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.poll() is None, run.stderr.read()
    run.send_signal(signal.SIGTERM)
    code = run.wait(timeout=120)
    assert code == (130 if when == "starting" else 128 + signal.SIGTERM), run.stderr.read()
    assert not _servers_in(tmp_path / "out")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_run_takes_its_engine_with_it(tmp_path: Path, tiny: dict, fake_on_path: None) -> None:
    """SIGKILL leaves kdistill no chance to stop the engine: the kernel's parent-death signal does."""
    training = {"max_steps": 400, "save_steps": 1000, "on_policy": _on()}
    path = write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out", training=training))
    run = subprocess.Popen(
        [sys.executable, "-m", "kdistill.cli", "train", str(path)], stderr=subprocess.PIPE, text=True
    )
    metrics, deadline = tmp_path / "out" / "metrics.jsonl", time.monotonic() + 300
    while '"gen/rows"' not in _text(metrics) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.poll() is None, run.stderr.read()
    assert len(_servers_in(tmp_path / "out")) == 1
    run.kill()
    run.wait(timeout=30)
    deadline = time.monotonic() + 60
    while _servers_in(tmp_path / "out") and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _servers_in(tmp_path / "out")
    for pid in left:  # a failing test still leaves nothing behind
        os.kill(pid, signal.SIGKILL)
    assert not left


def test_a_server_already_running_is_synced_and_left_running(
    tmp_path: Path, tiny: dict, fake_on_path: None, capsys: pytest.CaptureFixture
) -> None:
    """`engine.server`: kdistill starts nothing, brings the server to the student's weights at the start and
    before every step, and leaves it running; a wrong `served_name` is one message."""
    from kdistill.sampling.engine import _free_port
    from kdistill.serving.process import ServerProcess, vllm_command

    url = f"http://127.0.0.1:{_free_port()}"
    command = vllm_command(sys.executable, str(tiny["student"]), "mine", int(url.rsplit(":", 1)[1]), 1)
    log = tmp_path / "server.log"
    with ServerProcess(command, url, log, 120, {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}) as server:
        on = _on(server=url, served_name="mine")
        config = tiny_config(tiny, tmp_path / "out", training={"max_steps": 3, "on_policy": on})
        assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
        assert server.process.poll() is None  # not kdistill's to stop
        steps = [r for r in _metrics(tmp_path / "out") if "loss" in r]
        assert [r["gen/staleness"] for r in steps] == [0, 0, 0] and all(r["gen/rows"] == 4 for r in steps)
        reloads = [line for line in log.read_text().splitlines() if "reload_weights" in line]
        folder = str((tmp_path / "out" / "engine" / "student").resolve())
        assert len(reloads) == 3 and all(line.endswith(folder) for line in reloads)  # start, steps 2, 3
        assert len(_servers_in(tiny["student"])) == 1  # only the server the test started
        on = _on(server=url, served_name="student")
        config = tiny_config(tiny, tmp_path / "wrong", training={"max_steps": 1, "on_policy": on})
        assert main(["train", str(write_config(tmp_path / "wrong.yaml", config))]) == 2
        err = capsys.readouterr().err
        assert f"the student's engine at {url} does not serve a model named 'student'" in err
        assert "it serves ['mine']" in err and "Traceback" not in err
    assert server.process.poll() is not None


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_the_shipped_engine_config_loads() -> None:
    from kdistill.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "on-policy-vllm.yaml")
    o = cfg.training.on_policy
    e = o.engine
    assert (e.kind, e.sync_steps, o.lmbda, e.python) == ("vllm", 1, 1.0, ".venv-vllm/bin/python")


def test_validate_names_the_engine(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture) -> None:
    on_policy = _vllm(sync_steps=3, server="http://127.0.0.1:8100")
    config = tiny_config(tiny, tmp_path / "out", training={"on_policy": on_policy})
    assert main(["validate", str(write_config(tmp_path / "run.yaml", config))]) == 0
    assert "sampled on http://127.0.0.1:8100, synced every 3 step(s))" in capsys.readouterr().out


def test_a_server_that_fails_to_start_says_why(tmp_path: Path) -> None:
    from kdistill.errors import KdistillError
    from kdistill.serving.process import ServerProcess

    script = (
        "import sys; print('WARNING errors like `OSError: [Errno 24]` may follow', file=sys.stderr); "
        "print('(Worker) ERROR [x.py:1] ValueError: too little memory for the KV cache', file=sys.stderr); "
        "print('RuntimeError: Engine core initialization failed', file=sys.stderr); sys.exit(1)"
    )
    server = ServerProcess([sys.executable, "-c", script], "http://127.0.0.1:9", tmp_path / "server.log", 60)
    cause = r"while starting: ValueError: too little memory for the KV cache;"
    with pytest.raises(KdistillError, match=cause):
        server.__enter__()


@pytest.mark.parametrize(("kind", "stage"), [("FSDP", None), ("DEEPSPEED", 3)])
def test_sharded_student_weights_are_refused_with_the_engine(
    tiny: dict, tmp_path: Path, kind: str, stage: int | None
) -> None:
    """The engine is synced from the main process's whole copy of the student; FSDP and ZeRO-3 have none."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from kdistill.config import load_config
    from kdistill.errors import KdistillError
    from kdistill.prerun.checked import Checked, launch_of
    from kdistill.prerun.on_policy import engine_processes

    plugin = SimpleNamespace(zero_stage=stage) if stage else None
    accelerator = SimpleNamespace(
        num_processes=2,
        distributed_type=DistributedType[kind],
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )
    path = write_config(
        tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out", training={"on_policy": _on()})
    )
    with pytest.raises(
        KdistillError, match=f"engine=vllm with 2 processes under {DistributedType[kind].value}"
    ):
        engine_processes(Checked(load_config(path), launch_of(accelerator)))
    accelerator.distributed_type, accelerator.state.deepspeed_plugin = DistributedType.MULTI_CPU, None
    # DDP: every process holds the whole student
    engine_processes(Checked(load_config(path), launch_of(accelerator)))


@pytest.mark.parametrize("overlap", [False, True])
def test_resume_on_the_engine_reproduces_samples_and_weights(
    tmp_path: Path, tiny: dict, fake_on_path: None, monkeypatch: pytest.MonkeyPatch, overlap: bool
) -> None:
    """Killed after step 4 and resumed from step 3's checkpoint: the new engine starts on the checkpoint's
    weights and the rows keep their seeds, so the run equals the uninterrupted one (sync_steps 1). With
    `overlap`, step 4's rows (from step 2's weights) were in flight at the checkpoint, which keeps them."""
    from safetensors.torch import load_file

    from kdistill.run.step import Step

    training = {"max_steps": 6, "save_steps": 3, "on_policy": _on(overlap=overlap)}

    def run(folder: str, *args: str) -> int:
        config = tiny_config(tiny, tmp_path / folder, training=training)
        return main(["train", str(write_config(tmp_path / f"{folder}.yaml", config)), *args])

    assert run("straight") == 0
    real_step, calls = Step.__call__, {"n": 0}

    def dies_at_5(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if the process were stopped mid-run
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Step, "__call__", dies_at_5)
    assert run("resumed") == 130
    assert not _servers_in(tmp_path / "resumed")
    monkeypatch.setattr(Step, "__call__", real_step)
    assert run("resumed", "--resume") == 0
    a, b = (
        load_file(tmp_path / "straight" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    keys = ("step", "loss", "trained_tokens", "gen/rows", "gen/mean_length", "gen/staleness")
    records = lambda out: [tuple(r.get(k) for k in keys) for r in _metrics(out) if "loss" in r]  # noqa: E731
    assert records(tmp_path / "straight") == records(tmp_path / "resumed")
    assert [r[-1] for r in records(tmp_path / "straight")] == ([0, 1, 1, 1, 1, 1] if overlap else [0] * 6)


def test_the_engine_is_given_a_kv_cache_for_the_steps_rows(
    tiny: dict, tmp_path: Path, fake_on_path: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without `memory`: `--kv-cache-memory-bytes` for the step's rows (a user's VLLM_CPU_KVCACHE_SPACE,
    which vLLM would let win, is left out); with it: vLLM's share of the device, and no cache size."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    student = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32)
    c = student.config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * c.num_hidden_layers
    for memory, expected in [(None, 5 * 2 * 128 * kv * 4), (0.2, None)]:  # 4 rows x 1 block x 1.25
        settings = EngineSettings(sys.executable, None, "student", memory, 120, 1, 64, rows=4)
        with VllmEngine(settings, tmp_path / "engine", student, tokenizer, step=0) as engine:
            proc = Path(f"/proc/{engine.server.process.pid}")
            command = (proc / "cmdline").read_bytes().decode().split("\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        given = command[command.index("--kv-cache-memory-bytes") + 1] if expected else None
        assert given == (str(expected) if expected else None)
        assert ("--gpu-memory-utilization" in command) == (memory is not None)
        assert (b"VLLM_CPU_KVCACHE_SPACE=4" in environ) == (memory is not None)
