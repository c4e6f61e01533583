"""`kdistill validate --memory`: a run's config read into a memory `Plan`, its verdict and advice."""

from __future__ import annotations

import os
from typing import Any

from kdistill.config import RunConfig
from kdistill.errors import KdistillError
from kdistill.models.build import student_source, teacher_source
from kdistill.models.loading import load_config_only
from kdistill.run.memory import (
    CPU_CHUNK_BYTES,
    GB,
    STRATEGIES,
    Model,
    Plan,
    load_peak,
    parts,
    peak,
    suggestions,
)
from kdistill.run.memory_shapes import KNOWN_ARCHITECTURES, Shape, shape_of


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
    args = (shape.layer_params(), shape.embedding_params(), shape.hidden, shape.intermediate, shape.vocab)
    return Model(n, *args, gated=shape.gated)


def _teacher_bits(cfg: RunConfig, cpu: bool) -> tuple[float, float, bool]:
    """(bits per decoder-layer weight, bytes per embedding weight, expanded to fp32 while loading)."""
    t = cfg.teacher
    compute = 4 if cpu else 2
    if t.model is None or t.cache:  # a teacher cache: no weights
        return 0.0, 0, False
    if t.quantization == "4bit":  # NF4: 4 bits and a 32-bit absmax per 64 (8 bits per 256 on GPU)
        return (4.5 if cpu else 4.13), compute, False
    if t.quantization == "8bit":
        return 8.1, compute, False
    gguf = teacher_source(t).gguf_file
    if gguf and cpu:  # converted to fp32; compact keeps exactly-4-bit weights at 5 bits
        return (5.0 if t.compact and "q4" in gguf.lower() else 32.0), 4, True
    if t.dtype in ("bfloat16", "float16") or (t.dtype == "auto" and not cpu):
        return 16.0, 2, False
    return 32.0, 4, False


def _lora_params(cfg: RunConfig, shape: Shape, layers: int) -> int:
    if cfg.student.finetune == "full":
        return 0
    r, linears = cfg.student.lora.r, shape.linear_shapes()
    targets = cfg.student.lora.target_modules
    share = 1.0 if targets == "all-linear" else min(1.0, len(targets) / len(linears))
    return int(share * layers * sum(r * (i + o) for i, o in linears))


def on_policy_tokens(cfg: RunConfig) -> int | None:
    """Hook for on-policy distillation: tokens a row grows to while the student generates; None
    while the config has no on-policy settings (then no generation KV cache is counted)."""
    settings = getattr(cfg.training, "on_policy", None) or getattr(cfg, "on_policy", None)
    new = getattr(settings, "max_new_tokens", None)
    return None if new is None else cfg.data.max_length + int(new)


def memory_plan(
    cfg: RunConfig, device: int | None, processes: int = 1, strategy: str = "ddp", length: int | None = None
) -> Plan:
    """The estimate's inputs from `cfg`: on a GPU of `device` bytes, or on this CPU when None.
    `length`: the longest row of the data, if known (else data.max_length)."""
    if strategy not in STRATEGIES:
        raise KdistillError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    cpu, t, s, tr = device is None, cfg.teacher, cfg.student, cfg.training
    t_shape = _shape(t.model, teacher_source(t)) if t.model else None
    if s.from_teacher is not None:
        if t_shape is None:
            raise KdistillError("student.from_teacher needs the teacher's model; give teacher.model")
        s_shape, layers = t_shape, s.from_teacher.num_layers
    else:
        s_shape = _shape(s.model, student_source(s))
        layers = s_shape.layers
    bits, embed, expand = _teacher_bits(cfg, cpu)
    rows = tr.micro_batch_size or tr.batch_size
    length = min(length or cfg.data.max_length, cfg.data.max_length)
    chunk = cfg.loss.chunk_size or rows * length
    if cpu:
        chunk = min(chunk, max(1, CPU_CHUNK_BYTES // (4 * s_shape.vocab)))
    live = t_shape if not t.cache else None
    cross = live is not None and live.vocab != s_shape.vocab
    grown = on_policy_tokens(cfg)
    kv = (
        0
        if grown is None
        else 2 * layers * s_shape.kv_heads * s_shape.head_dim * rows * grown * (4 if cpu else 2)
    )
    hidden = cfg.loss.hidden.weight > 0 and live is not None
    return Plan(
        student=_model(s_shape, layers),
        teacher=_model(live) if live else None,
        teacher_bits=bits,
        teacher_embedding_bytes=embed,
        student_bytes=4 if cpu else 2,
        lora_params=_lora_params(cfg, s_shape, layers),
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
        load_fp32_teacher=expand and live is not None,
        generation_kv=kv,
        processes=processes,
        strategy=strategy,
    )


def longest_row(cfg: RunConfig) -> int | None:
    """Tokens in the data's longest training row (what the widest padded batch holds), or None when
    the tokenizer or the data cannot be read here (the estimate then assumes data.max_length)."""
    from kdistill.data import build_datasets
    from kdistill.teacher.vocabularies import load_vocabularies

    try:
        vocabs = load_vocabularies(cfg)
        data = build_datasets(
            cfg.data.model_copy(update={"responses": "dataset"}), vocabs.tokenizer, cfg.training.seed, None,
            vocabs.cross,
        )  # fmt: skip
    except (KdistillError, OSError):
        return None
    return max((len(row.input_ids) for row in data.train), default=None)


def machine_memory() -> int:
    """This machine's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_lines(cfg: RunConfig, plan: Plan, budget: int, device_name: str) -> list[str]:
    """The breakdown, the verdict on `device_name` (`budget` bytes per process) and the advice."""
    where = "per process" if plan.processes > 1 else "one process"
    lines = [
        f"memory ({where}, {plan.processes} x {plan.strategy}; micro-batch {plan.rows} x {plan.length} "
        f"tokens, checkpointing {'on' if plan.checkpointing else 'off'}):"
    ]
    lines += [f"  {name:<20} {size / GB:7.2f} GB" for name, size in parts(plan).items() if size]
    total, loading = sum(parts(plan).values()), load_peak(plan)
    lines.append(f"  {'training peak':<20} {total / GB:7.2f} GB")
    if loading > total:
        lines.append(f"  {'loading peak':<20} {loading / GB:7.2f} GB (the GGUF teacher expanded to fp32)")
    fits = peak(plan) <= budget
    lines.append(
        f"verdict: {'fits' if fits else 'does NOT fit'} on {device_name} ({budget / GB:.1f} GB): "
        f"estimated peak {peak(plan) / GB:.2f} GB"
    )
    if fits:
        return lines
    cacheable = plan.teacher is not None and cfg.data.responses == "dataset"
    quantizable = not plan.cpu or plan.teacher_bits > 8
    steps = suggestions(plan, budget, quantizable, cacheable)
    if not steps or peak_after(steps) > budget:
        lines.append(
            "no change below makes it fit; use more processes with --strategy fsdp or zero3, or a smaller "
            "student"
        )
    lines += [f"  then {text}: {size / GB:.2f} GB" for text, size in steps]
    return lines


def peak_after(steps: list[tuple[str, int]]) -> int:
    return steps[-1][1] if steps else 0
