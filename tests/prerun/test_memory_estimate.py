"""`kdistill validate --memory`: the estimate's parts, its verdict and advice, offline for the seed."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PhiConfig

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import build_datasets
from kdistill.data.batches import length_grouped_batches
from kdistill.errors import KdistillError
from kdistill.models.parts import base_model
from kdistill.prerun.memory import (
    GB,
    PHASES,
    Model,
    Plan,
    calibration_bytes,
    layer_activations,
    parts,
    peak,
    phase_totals,
)
from kdistill.prerun.memory_advice import suggestions
from kdistill.prerun.memory_plan import _teacher_bits, memory_plan
from kdistill.prerun.memory_shapes import KNOWN_ARCHITECTURES, device_bytes, padded, shape_of, widest_batch
from kdistill.run.lean import lean_gated_mlps
from kdistill.sampling.engine_memory import ENGINE_PROCESS_BYTES


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


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub: the seed's models come from kdistill's table of known models.

    huggingface_hub reads HF_HUB_OFFLINE once, when it is imported; another test module may have
    imported it already, and then the variable alone leaves every download retrying for seconds.
    """
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("offline")
def test_seed_recipe_estimate_and_advice() -> None:
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


@pytest.mark.usefixtures("offline")
def test_validate_memory_prints_a_verdict(capsys) -> None:
    assert main(["validate", "configs/seed.yaml", "--memory", "--device-memory", "L4"]) == 0
    out = capsys.readouterr().out
    assert "teacher weights" in out and "verdict:" in out
    assert main(["validate", "configs/seed.yaml", "--memory", "--device-memory", "8GB"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["validate", "configs/seed.yaml", "--memory", "--device-memory", "lots"]) == 2


def _saved_bytes(model: torch.nn.Module, rows: int, length: int) -> int:
    """Bytes autograd saves for backward in the decoder's forward pass over a padded batch."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # a padded row, as in a training batch
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        base_model(model)(input_ids=ids, attention_mask=mask)
    return sum(storages.values())


def _saved_per_token_layer(config, rows: int, length: int, lora_rank: int = 0, lean: bool = False) -> float:
    """Values autograd saves per token and decoder layer: three layers less one."""
    saved = []
    for layers in (1, 3):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            type(config)(**{**config.to_dict(), "num_hidden_layers": layers})
        )
        if lora_rank:
            lora = LoraConfig(r=lora_rank, lora_dropout=0.0, target_modules="all-linear")
            model = get_peft_model(model, lora).base_model.model
        if lean:
            lean_gated_mlps(model)
        saved.append(_saved_bytes(model, rows, length))
    return (saved[1] - saved[0]) / 2 / (rows * length * 4)


def _plan(config, rows: int, length: int, lora_rank: int = 0, lean: bool = False) -> Plan:
    shape = shape_of(config)
    student = Model(
        shape.layers, shape.layer_params(), shape.embedding_params(), shape.hidden, shape.intermediate,
        shape.vocab, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.gated,
        shape.mlp_saved(), shape.parallel,
    )  # fmt: skip
    return Plan(
        student, None, 0.0, 0, False, 4, lora_rank, rows, length, False, 4, lean, 16, shape.vocab,
        lora_rank=lora_rank,
    )  # fmt: skip


LLAMA = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2)
PHI = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, partial_rotary_factor=0.5)


@pytest.mark.parametrize(
    "family, lora_rank, lean",
    [("llama", 0, False), ("llama", 0, True), ("llama", 8, False), ("phi", 0, False), ("phi", 8, False)],
)
def test_activations_are_what_autograd_saves(family: str, lora_rank: int, lean: bool) -> None:
    if family == "llama":  # gated MLP, two RMSNorms, grouped key-value heads
        config = LlamaConfig(**LLAMA, vocab_size=128)
    else:  # one LayerNorm, ungated MLP with gelu_new written out in Python
        config = PhiConfig(**PHI, vocab_size=128, hidden_act="gelu_new")
    config._attn_implementation = "sdpa"
    for rows, length in ((2, 32), (4, 96)):
        counted = _saved_per_token_layer(config, rows, length, lora_rank, lean)
        estimated = layer_activations(_plan(config, rows, length, lora_rank, lean))
        assert estimated == pytest.approx(counted, rel=0.03)


@pytest.mark.usefixtures("offline")
def test_on_policy_steps_count_the_generation_kv_cache() -> None:
    assert parts(memory_plan(load_config("configs/seed.yaml"), 24 * GB))["generation KV cache"] == 0
    sets = ["training.on_policy.lmbda=0.5", "training.on_policy.max_new_tokens=128"]
    sets.append("training.on_policy.max_prompt_length=256")
    plan = memory_plan(load_config("configs/seed.yaml", sets), 24 * GB)
    split = parts(plan)
    # Phi-2: 32 layers of 32 key-value heads of 80; one generate call for the step's 4 x 2 rows, of 256
    # prompt and 128 new tokens, in bf16
    assert split["generation KV cache"] == 2 * 32 * 32 * 80 * 8 * (256 + 128) * 2
    assert split["prompt pass and logits"] > 6 * 8 * 51200 * 4  # the sampling logits, and more
    calls = memory_plan(
        load_config("configs/seed.yaml", [*sets, "training.on_policy.engine.generation_batch_size=2"]),
        24 * GB,
    )
    assert parts(calls)["generation KV cache"] == split["generation KV cache"] // 4
    assert plan.length == 512  # half the steps train on 512-token data rows, longer than 256 + 128
    totals = phase_totals(plan)
    assert totals["generation"] == split["generation KV cache"] + split["prompt pass and logits"]
    assert peak(plan) == totals["resident"] + max(totals[phase] for phase in PHASES)
    only = memory_plan(load_config("configs/seed.yaml", [*sets, "training.on_policy.lmbda=1"]), 24 * GB)
    assert only.length == 384 and only.trained == 4 * 128  # every step trains on generated rows
    # On a vLLM engine kdistill starts, the cache lives in the engine, which reserves its share of the GPU
    engine = [*sets, "training.on_policy.engine=vllm", "training.on_policy.engine.memory=0.25"]
    on_vllm = parts(memory_plan(load_config("configs/seed.yaml", engine), 24 * GB))
    assert on_vllm["generation KV cache"] == 0 and on_vllm["vLLM engine's share"] == 6 * GB
    served = [*engine, "training.on_policy.engine.server=http://127.0.0.1:8100"]
    assert parts(memory_plan(load_config("configs/seed.yaml", served), 24 * GB))["vLLM engine's share"] == 0


def test_an_engine_kdistill_starts_is_sized_for_the_steps_rows() -> None:
    """Without engine.memory: the engine's weights and a KV cache for the step's 4 x 2 rows of 256 + 128
    tokens (Phi-2: 32 layers of 32 KV heads of 80, bf16 on a GPU, 128-token blocks); on CPU also its
    processes, in fp32."""
    sets = ["training.on_policy.lmbda=1", "training.on_policy.max_new_tokens=128"]
    sets += ["training.on_policy.max_prompt_length=256", "training.on_policy.engine=vllm"]
    gpu = parts(memory_plan(load_config("configs/seed.yaml", sets), 24 * GB))
    block = 2 * 128 * 32 * 32 * 80 * 2
    assert gpu["vLLM engine KV cache"] == 30 * block  # 8 rows x 3 blocks x 1.25
    assert gpu["vLLM engine's share"] == 0 and gpu["vLLM engine processes"] == 0
    phi2 = 32 * 78_643_200 + 2 * 51200 * 2560  # its 32 layers (2.52 G), the embedding and the head
    assert gpu["vLLM engine weights"] == phi2 * 2
    cpu = parts(memory_plan(load_config("configs/seed.yaml", sets), None))
    assert cpu["vLLM engine KV cache"] == 2 * gpu["vLLM engine KV cache"]
    assert cpu["vLLM engine processes"] == 2 * ENGINE_PROCESS_BYTES
    two = parts(memory_plan(load_config("configs/seed.yaml", sets), 24 * GB, processes=2))
    assert two["vLLM engine KV cache"] == 60 * block  # one engine holds both processes' rows


def test_the_widest_batch_is_among_those_the_run_sees(tiny: dict, tmp_path) -> None:
    config = load_config(write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out")))
    data = build_datasets(config.data, AutoTokenizer.from_pretrained(tiny["teacher"]), 0, None)
    lengths = [len(row.input_ids) for row in data.train]
    first = length_grouped_batches(lengths, 4, 0)[0]
    one_step = config.model_copy(update={"training": config.training.model_copy(update={"max_steps": 1})})
    assert widest_batch(one_step).width == padded(max(lengths[i] for i in first))
    whole = widest_batch(config)
    assert whole.width == padded(max(lengths)) and whole.width % 8 == 0


@pytest.mark.parametrize(
    "file, bits", [("m.Q4_1.gguf", 5.0), ("m.Q4_0.gguf", 5.0), ("m-q4_k_m.gguf", 32.0), ("m-BF16.gguf", 16.0)]
)
def test_teacher_weights_on_cpu_by_form(tmp_path, file: str, bits: float) -> None:
    (tmp_path / file).write_bytes(b"")
    sections = {"teacher": {"model": str(tmp_path), "gguf_file": file}, "output_dir": str(tmp_path)}
    sections |= {"student": {"from_teacher": {"num_layers": 1}}, "data": {"source": "builtin:quickstart"}}
    cfg = load_config(write_config(tmp_path / "run.yaml", sections))
    # teacher.compact keeps exactly only Q4_0/Q4_1 blocks (and bf16 values); the rest stays fp32
    assert _teacher_bits(cfg, cpu=True) == (bits, 4, False, True)
    quantized = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"quantization": "4bit"})})
    # NF4 layers, and the fp32 checkpoint bitsandbytes quantized from stays mapped
    assert _teacher_bits(quantized, cpu=True) == (4.13, 0, True, False)
    assert _teacher_bits(quantized, cpu=False) == (4.13, 2, False, False)


def test_a_pruned_students_calibration_is_in_the_loading_peak(tiny: dict, tmp_path) -> None:
    made = {"method": "importance", "params": 0.5, "calibration_batch_size": 4}
    sections = {"student": {"from_teacher": made, "finetune": "full"}}
    cfg = load_config(write_config(tmp_path / "a.yaml", tiny_config(tiny, tmp_path / "a", **sections)))
    plan = memory_plan(cfg, None)
    tokens = 4 * padded(cfg.data.max_length)
    t = plan.teacher
    assert (plan.calibration_tokens, plan.removal_scores) == (tokens, False)
    assert calibration_bytes(plan) == tokens * (4 * t.hidden + 2 * t.q_width + 3 * t.intermediate) * 4
    removal = {**made, "depth_score": "removal_kl", "num_layers": 2, "params": None}
    sections = {"student": {"from_teacher": removal, "finetune": "full"}}
    cfg = load_config(write_config(tmp_path / "b.yaml", tiny_config(tiny, tmp_path / "b", **sections)))
    with_removal = memory_plan(cfg, None)
    assert with_removal.removal_scores
    # two fp64 log-prob tables of every calibration token over the vocabulary, and a temporary
    extra = calibration_bytes(with_removal) - calibration_bytes(plan)
    assert extra == 3 * tokens * t.vocab * 8
    refit = {**made, "mlp_refit": True}
    sections = {"student": {"from_teacher": refit, "finetune": "full"}}
    cfg = load_config(write_config(tmp_path / "d.yaml", tiny_config(tiny, tmp_path / "d", **sections)))
    # every layer's fp32 Gram matrix of its MLP activations, and two fp64 ones while refitting
    assert calibration_bytes(memory_plan(cfg, None)) - calibration_bytes(plan) == (
        (t.layers * 4 + 16) * t.intermediate**2
    )
    even = load_config(write_config(tmp_path / "c.yaml", tiny_config(tiny, tmp_path / "c")))
    assert calibration_bytes(memory_plan(even, None)) == 0
