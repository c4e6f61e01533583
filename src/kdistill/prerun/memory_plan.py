"""`kdistill validate --memory`: a run's config read into a memory `Plan` (its verdict and advice:
`memory_advice`)."""

from __future__ import annotations

import os
from typing import Any

import torch

from kdistill.config import RunConfig
from kdistill.errors import KdistillError
from kdistill.losses.chunked import chunk_rows
from kdistill.models.build import made_student_config, student_source, teacher_source
from kdistill.models.loading import gguf_type, load_config_only
from kdistill.prerun.memory import (
    STRATEGIES,
    Model,
    Plan,
)
from kdistill.prerun.memory_shapes import KNOWN_ARCHITECTURES, Shape, Widest, padded, shape_of
from kdistill.sampling.engine_memory import EngineShape, engine_bytes
from kdistill.sampling.generate import rows_per_call
from kdistill.sampling.settings import generation_batch_size, step_rows
from kdistill.teacher.roster import teacher_kind


def _shape(spec: str, source: Any) -> Shape:
    """A model's shape from its config.json, else from kdistill's table of known models."""
    try:
        return shape_of(load_config_only(source))
    except KdistillError as err:
        if spec in KNOWN_ARCHITECTURES:
            return shape_of(KNOWN_ARCHITECTURES[spec])
        raise KdistillError(
            f"the memory estimate needs {spec!r}'s config.json (its layers, hidden and vocabulary sizes), "
            f"and it could not be read: {err}. Make the hub reachable or give a local folder"
        ) from err


def _model(shape: Shape, layers: int | None = None) -> Model:
    n = shape.layers if layers is None else layers
    return Model(
        n, shape.layer_params(), shape.embedding_params(), shape.hidden, shape.intermediate, shape.vocab,
        q_width=shape.heads * shape.head_dim, kv_width=shape.kv_heads * shape.head_dim, gated=shape.gated,
        mlp_saved=shape.mlp_saved(), parallel=shape.parallel,
    )  # fmt: skip


def _teacher_bits(cfg: RunConfig, cpu: bool) -> tuple[float, float, bool, bool]:
    """(bits per decoder-layer weight, bytes per embedding weight, the fp32 checkpoint stays mapped,
    the teacher is in fp32 while loading)."""
    t = cfg.teacher
    compute = 4 if cpu else 2
    if not teacher_kind(t).runs_here:  # a cache or a server: no weights in this process
        return 0.0, 0, False, False
    gguf = gguf_type(teacher_source(t)) if cpu else None
    if t.quantization != "none":  # NF4 with double quantization: 4.13 bits; LLM.int8: 8 and a scale
        bits = 4.13 if t.quantization == "4bit" else 8.1
        # On CPU bitsandbytes quantizes from transformers' mapping of the fp32 checkpoint, and the
        # unquantized embeddings keep pointing into it: every page it read stays resident.
        return bits, (0 if cpu else compute), cpu, False
    if gguf:  # converted to fp32; `teacher.compact` keeps exact Q4_0/Q4_1 blocks at 5 bits, BF16 at 16
        compact = {"Q4_0": 5.0, "Q4_1": 5.0, "BF16": 16.0}.get(gguf, 32.0) if t.compact else 32.0
        return compact, 4, False, True
    if t.dtype in ("bfloat16", "float16") or (t.dtype == "auto" and not cpu):
        return 16.0, 2, False, False
    return 32.0, 4, False, False


def _lora_params(cfg: RunConfig, shape: Shape, layers: int) -> int:
    if cfg.student.finetune == "full":
        return 0
    r, linears = cfg.student.lora.r, shape.linear_shapes()
    targets = cfg.student.lora.target_modules
    share = 1.0 if targets == "all-linear" else min(1.0, len(targets) / len(linears))
    return int(share * layers * sum(r * (i + o) for i, o in linears))


def on_policy_widths(cfg: RunConfig, widest: Widest) -> tuple[int, int, int, int]:
    """(tokens per row and trained tokens of the widest batch trained on, prompt tokens and new tokens
    per row while the student writes; both 0 without on-policy steps)."""
    op, rows = cfg.training.on_policy, cfg.training.batch_size
    if op.lmbda <= 0:
        return widest.width, widest.trained, 0, 0
    prompt = min(op.max_prompt_length, widest.prompt)
    generated = padded(prompt + op.max_new_tokens)  # may exceed max_length: a prompt's tail and a response
    if op.lmbda >= 1:
        return generated, rows * op.max_new_tokens, prompt, op.max_new_tokens
    trained = max(widest.trained, rows * op.max_new_tokens)
    return max(widest.width, generated), trained, prompt, op.max_new_tokens


def _generation_rows(cfg: RunConfig, micro: int) -> int:
    """Rows the student samples in one generate call (engine hf); 0 without on-policy steps."""
    if cfg.training.on_policy.lmbda <= 0:
        return 0
    return rows_per_call(generation_batch_size(cfg), cfg.training.batch_size, micro)


def _shapes(cfg: RunConfig) -> tuple[Shape | None, Shape, int]:
    """The teacher's shape (None without its model), the student's, and the student's layers."""
    t, s = cfg.teacher, cfg.student
    t_shape = _shape(t.model, teacher_source(t)) if t.model else None
    if s.from_teacher is None:
        s_shape = _shape(s.model, student_source(s))
        return t_shape, s_shape, s_shape.layers
    if t_shape is None:
        raise KdistillError("student.from_teacher needs the teacher's model; give teacher.model")
    if s.from_teacher.method == "importance":
        made = shape_of(made_student_config(load_config_only(teacher_source(t)), s.from_teacher))
        return t_shape, made, made.layers
    return t_shape, t_shape, s.from_teacher.num_layers


def _engine(
    cfg: RunConfig, device: int | None, shape: Shape, layers: int, processes: int
) -> tuple[bool, int, tuple[int, int, int]]:
    """(on-policy steps sample on a vLLM engine, the share of the device `engine.memory` gives it, else
    its processes, weights and KV cache for every process's rows): an engine kdistill starts runs
    beside training on the same device (its processes in host memory, counted on CPU); one the user
    started runs elsewhere."""
    op = cfg.training.on_policy
    engine = op.lmbda > 0 and op.engine.kind == "vllm"
    if not engine or op.engine.server:
        return engine, 0, (0, 0, 0)
    if op.engine.memory is not None:
        return engine, int(op.engine.memory * (device or machine_memory())), (0, 0, 0)
    params = layers * shape.layer_params() + shape.vocab * shape.hidden * 2  # the engine unties the head
    sized = EngineShape(layers, shape.kv_heads, shape.head_dim, params, 4 if device is None else 2)
    rows = step_rows(cfg) * processes  # every process's rows in flight on the one engine
    size = engine_bytes(sized, rows, op.max_prompt_length + op.max_new_tokens)
    return engine, 0, (size["processes"] if device is None else 0, size["weights"], size["KV cache"])


def memory_plan(
    cfg: RunConfig,
    device: int | None,
    processes: int = 1,
    strategy: str = "ddp",
    widest: Widest | None = None,
) -> Plan:
    """The estimate's inputs from `cfg`: on a GPU of `device` bytes, or on this CPU when None.
    `widest`: the widest batch the run trains on, if known (`widest_batch`); else every row of
    data.max_length tokens, all of them trained."""
    if strategy not in STRATEGIES:
        raise KdistillError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    cpu, t, s, tr, d = device is None, cfg.teacher, cfg.student, cfg.training, cfg.data
    t_shape, s_shape, layers = _shapes(cfg)
    engine, share, engine_parts = _engine(cfg, device, s_shape, layers, processes)
    bits, embed, mapped, expand = _teacher_bits(cfg, cpu)
    rows = tr.micro_batch_size or tr.batch_size
    most = padded(cfg.data.max_length)
    widest = widest or Widest(most, cfg.data.max_length, tr.batch_size * most)
    length, trained, prompt, new_tokens = on_policy_widths(cfg, widest)
    where = torch.device("cpu" if cpu else "cuda")  # on CPU a chunk's logits stay under 24 MB
    chunk = chunk_rows(cfg.loss.chunk_size or rows * length, s_shape.vocab, where)
    live = t_shape if teacher_kind(t).runs_here else None
    cross = live is not None and live.vocab != s_shape.vocab
    hidden = cfg.loss.hidden.weight > 0 and live is not None
    lora = _lora_params(cfg, s_shape, layers)
    return Plan(
        student=_model(s_shape, layers),
        teacher=_model(live) if live else None,
        teacher_bits=bits,
        teacher_embedding_bytes=embed,
        teacher_mapped=mapped,
        student_bytes=4 if cpu else 2,
        lora_params=lora,
        rows=rows,
        length=length,
        checkpointing=tr.gradient_checkpointing,
        act_bytes=4 if cpu or tr.mixed_precision == "no" else 2,
        lean_mlp=cpu and processes == 1 and s.finetune == "full" and s_shape.gated,
        chunk_rows=chunk,
        loss_vocab=s_shape.vocab,
        cross_vocab=live.vocab if cross else 0,
        hidden_pairs=layers if hidden else 0,
        teacher_hidden=live.hidden if hidden else 0,
        cpu=cpu,
        # a from_teacher student is cut from the full-precision teacher before bitsandbytes loads it
        load_fp32_teacher=live is not None and (expand or (cpu and s.from_teacher is not None)),
        lora_rank=s.lora.r if lora else 0,
        accumulating=tr.gradient_accumulation_steps > 1 or rows < tr.batch_size,
        trained=trained * rows // tr.batch_size,
        eval_rows=(tr.eval_batch_size or tr.batch_size) if d.validation_source or d.validation_size else 0,
        prompt=prompt,
        new_tokens=new_tokens,
        gen_rows=_generation_rows(cfg, rows),
        engine=engine,
        engine_bytes=share,
        engine_parts=engine_parts,
        processes=processes,
        strategy=strategy,
        **_calibration(cfg),
    )


def _calibration(cfg: RunConfig) -> dict[str, Any]:
    """A pruned student's calibration batch, and whether removal scores are computed on it."""
    made = cfg.student.from_teacher
    if made is None or made.method != "importance":
        return {}
    return {
        "calibration_tokens": made.calibration_batch_size * padded(cfg.data.max_length),
        "removal_scores": made.depth_score != "block_influence",
        "mlp_refit": made.mlp_refit,
    }


def machine_memory() -> int:
    """This machine's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
