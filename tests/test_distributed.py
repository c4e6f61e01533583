"""Two processes under `accelerate launch` (gloo, CPU) against one process with twice the accumulation.

Each process of the pair sees every other batch of the same order, so one optimizer step of the pair
trains on exactly the rows of one step of the single process with twice the gradient accumulation;
the token counts are summed over processes, so the losses and the weights must agree.

accelerate 1.x starts a single process for `accelerate launch --cpu --num_processes 2` unless MPI is
set up (its CPU launcher is mpirun); `--multi_gpu` with `ACCELERATE_USE_CPU=true` starts two torchrun
processes that use gloo on the CPU, which is what a test needs. The token counts checked below
would be halved if only one process ran.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, write_config
from kdistill.cli import main

# 40 training rows in 10 batches of 4: each process gets 5, so no batch is repeated to even them out.
# 8 validation rows in batches of 3: one process has a batch less, padded with a repeat not counted.
TRAINING = {"max_steps": 8, "eval_steps": 4, "eval_batch_size": 3, "batch_size": 4, "save_steps": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two fresh processes importing torch and transformers: about 30 s on 2 busy cores
def test_two_processes_match_one_with_twice_the_accumulation(tmp_path: Path, tiny: dict) -> None:
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the `accelerate` command is not installed next to this Python")
    pair = write_config(tmp_path / "pair.yaml", tiny_config(tiny, tmp_path / "pair", training=TRAINING))
    single = tiny_config(tiny, tmp_path / "single", training={**TRAINING, "gradient_accumulation_steps": 2})
    assert main(["train", str(write_config(tmp_path / "single.yaml", single))]) == 0

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    command += ["-m", "kdistill", "train", str(pair)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = _records(tmp_path / "single"), _records(tmp_path / "pair")
    assert [(r["step"], r.get("trained_tokens")) for r in one] == [
        (r["step"], r.get("trained_tokens")) for r in two
    ]
    for a, b in zip(one, two):
        for key in ("loss", "loss/kd", "loss/ce", "grad_norm", "eval/kl", "eval/ppl", "eval/tokens"):
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), (a["step"], key)
    weights_one, weights_two = (
        load_file(tmp_path / "single" / "model.safetensors"),
        load_file(tmp_path / "pair" / "model.safetensors"),
    )
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=0, atol=1e-4, msg=name)

    # Only the main process writes files and logs.
    def listing(out: Path) -> list[str]:
        return sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    assert listing(tmp_path / "pair") == listing(tmp_path / "single")
    assert done.stderr.count("data: 40 training and 8 validation rows") == 1
    assert done.stderr.count("before training: held-out KL") == 1
    assert "student written to" in done.stdout and done.stdout.count("held-out") == 1


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("ddp", {}),
        (
            "fsdp",
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"},
        ),
        ("deepspeed-zero2", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
        ("deepspeed-zero3", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}),
    ],
)
def test_accelerate_configs_load_into_their_plugins(name: str, env: dict[str, str]) -> None:
    """Each multi-GPU config goes through `accelerate launch`'s own checks and builds its plugin.

    Without GPUs nothing is launched: the test stops at the environment `accelerate launch` would
    hand every process, and at the FSDP or DeepSpeed plugin accelerate builds from it.
    """
    from unittest import mock

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "-m", "kdistill", "train", "x.yaml"]
    )
    args, defaults, _ = _validate_launch_command(args)
    assert args.num_processes == 8 and args.module
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch does
        _, launched = prepare_deepspeed_cmd_env(args)
    else:
        assert args.use_fsdp or args.multi_gpu
        launched = prepare_multi_gpu_env(args)
    assert env.items() <= launched.items()
    with mock.patch.dict(os.environ, launched):
        if args.use_fsdp:
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
        elif args.use_deepspeed:
            plugin = DeepSpeedPlugin()
            # kdistill accumulates itself: DeepSpeed must take one micro-batch a step, and clip.
            assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1
            assert plugin.deepspeed_config["gradient_clipping"] == 1.0
