"""Load what `kdistill eval` and `kdistill bench` compare: a student (a run folder or any model),
its teacher, the tokenizer and the held-out examples.

A run folder is one with `kdistill_config.yaml` in it; that config names the teacher, how the student
was built and which rows were held out. A LoRA run folder holds an adapter, which is merged into its
base here (the logits are the same, and evaluation runs faster without the adapter's extra matmuls);
a `full` or `from_teacher` run holds the whole model. These are the only functions of the package
that read the run config; everything after them takes plain values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdistill.config import RunConfig, TeacherConfig, load_config
from kdistill.data import Example, load_examples, split_examples, with_response
from kdistill.errors import KdistillError
from kdistill.eval.fidelity import Compared
from kdistill.files import RunFiles
from kdistill.losses import DEFAULT_CHUNK_SIZE, VocabMap, build_vocab_map
from kdistill.models.build import (
    build_student,
    full_precision,
    load_teacher,
    pick_dtype,
    quantization_config,
    teacher_source,
)
from kdistill.models.loading import (
    ModelSource,
    gguf_type,
    load_config_only,
    load_model,
    load_tokenizer,
    resolve,
)
from kdistill.models.parts import default_device, for_inference, logit_width
from kdistill.teacher.roster import compact_teacher
from kdistill.teacher.vocabularies import same_vocabulary, shared_vocab_size

log = logging.getLogger("kdistill")


@dataclass
class EvalModels:
    """Everything evaluation needs, as plain objects."""

    student: Any  # a PreTrainedModel in eval mode, LoRA merged
    teacher: Any | None
    tokenizer: Any
    student_name: str
    teacher_name: str | None
    run_dir: Path | None  # the run folder, where eval.json / bench.json go
    vocab_size: int | None = None  # logit width the two heads share
    validation: list[Example] = field(default_factory=list)
    validation_source: str | None = None
    max_length: int = 512
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    teacher_tokenizer: Any | None = None  # the teacher's own; the student's when they share a vocabulary
    mapping: VocabMap | None = None  # teacher -> student vocabulary map when they do not (loss.alignment)
    alignment: str = "span"


def run_folder(target: str | Path) -> Path | None:
    """`target` as a run folder, or None when it is a plain model (folder or hub id)."""
    path = Path(target).expanduser()
    return path if (path / RunFiles.CONFIG).is_file() else None


def load_eval_models(
    target: str,
    teacher: str | None = None,
    validation: str | None = None,
    device: torch.device | None = None,
) -> EvalModels:
    """Load the student `target`, the teacher (`teacher`, else the run's), tokenizer and held-out rows.

    `validation` is a data file (any format kdistill trains on); without it a run folder's own
    held-out rows are used, and a plain model gets none.
    """
    device = device or default_device()
    run_dir = run_folder(target)
    cfg = load_config(run_dir / RunFiles.CONFIG) if run_dir else None
    teacher_cfg = TeacherConfig(model=teacher) if teacher else (cfg.teacher if cfg else None)
    teacher_model = load_teacher(teacher_cfg, device) if teacher_cfg else None
    if run_dir is not None:
        student = load_run_student(run_dir, cfg, teacher_model, device)
    else:
        student = load_model(resolve(target), pick_dtype("auto", device), device)
    if teacher_model is not None:  # once the student has copied its layers
        compact_teacher(teacher_cfg.model, teacher_cfg, teacher_model)
    for_inference(student, generate=True)
    # A run folder holds the student's tokenizer even when it holds only an adapter (no config.json).
    tokenizer = load_tokenizer(ModelSource(str(run_dir), str(run_dir)) if run_dir else resolve(target))
    vocab, t_tok, mapping = None, None, None
    if teacher_model is not None:
        t_source = resolve(teacher_cfg.model, teacher_cfg.gguf_file, teacher_cfg.revision)
        t_tok = load_tokenizer(t_source)
        if same_vocabulary(t_tok, tokenizer):
            vocab = shared_vocab_size(
                teacher_cfg.model,
                t_tok,
                logit_width(load_config_only(t_source)),
                str(target),
                tokenizer,
                logit_width(student.config),
            )
        else:  # another tokenizer: compared through the alignment, as in training
            mapping = build_vocab_map(t_tok, tokenizer)
    examples, source = _validation_examples(cfg, validation)
    return EvalModels(
        student=student,
        teacher=teacher_model,
        tokenizer=tokenizer,
        student_name=str(target),
        teacher_name=teacher_cfg.model if teacher_cfg else None,
        run_dir=run_dir,
        vocab_size=vocab,
        validation=examples,
        validation_source=source,
        max_length=cfg.data.max_length if cfg else 512,
        chunk_size=cfg.loss.chunk_size if cfg else DEFAULT_CHUNK_SIZE,
        teacher_tokenizer=t_tok,
        mapping=mapping,
        alignment=cfg.loss.alignment if cfg else "span",
    )


def load_run_student(run_dir: Path, cfg: RunConfig, teacher: Any | None, device: torch.device) -> Any:
    """The trained student of a run folder: the full model, or the LoRA adapter merged into its base."""
    if (run_dir / "config.json").is_file():
        return load_model(resolve(str(run_dir)), pick_dtype(cfg.student.dtype, device), device)
    if not (run_dir / "adapter_config.json").is_file():
        raise KdistillError(
            f"{run_dir}: no trained student in it (neither config.json nor adapter_config.json); "
            "did its training finish?"
        )
    from peft import PeftModel

    if cfg.student.from_teacher is not None and (teacher is None or cfg.teacher.quantization != "none"):
        # The base is cut from the run's own teacher, in full precision as training cut it.
        teacher = load_teacher(full_precision(cfg.teacher), device)
    base = build_student(cfg.student.model_copy(update={"finetune": "full"}), teacher, device)
    return PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload()


def load_bench_teacher(teacher: TeacherConfig, device: torch.device) -> Any:
    return for_inference(load_teacher(teacher, device), generate=True)


def _validation_examples(cfg: RunConfig | None, validation: str | None) -> tuple[list[Example], str | None]:
    """The held-out examples, as training holds them out: rows with an empty response are left out."""
    examples, source = _held_out_rows(cfg, validation)
    kept, empty = with_response(examples)
    if empty:
        log.info("held-out rows: %d of %d have an empty response and are left out", empty, len(examples))
    return kept, source


def _held_out_rows(cfg: RunConfig | None, validation: str | None) -> tuple[list[Example], str | None]:
    if validation:
        return load_examples(validation, "validation")[0], validation
    if cfg is None:
        return [], None
    data = cfg.data
    if data.validation_source:
        return load_examples(data.validation_source, "validation", data.format)[0], data.validation_source
    rows, _ = load_examples(data.source, data.split, data.format)
    rows = rows[: data.max_rows] if data.max_rows else rows
    # The very draw `build_datasets` made for this run, so these are the rows it held out.
    _, held_out = split_examples(rows, data.validation_size, cfg.training.seed, data.source)
    return held_out, f"{data.source} (the run's held-out rows)"


@dataclass
class FidelityInputs:
    """What `kdistill fidelity` compares: the reference, the models compared with it, the held-out rows."""

    reference: Compared
    others: list[Compared]
    tokenizer: Any
    validation: list[Example]
    validation_source: str | None
    max_length: int


_QUANTIZED = {
    "4bit": ("NF4", "bitsandbytes NF4 of the reference (double quantization)"),
    "8bit": ("LLM.int8", "bitsandbytes LLM.int8 of the reference"),
}


def load_fidelity_inputs(
    target: str, against: list[str], validation: str | None = None, device: torch.device | None = None
) -> FidelityInputs:
    """The reference teacher `target`, the models of `against`, its tokenizer and held-out rows.

    `target` is a run config (YAML/JSON), a run folder (its first teacher, in full precision, and its
    held-out rows) or a model. Each of `against` is `4bit` or `8bit` (the reference quantized by
    bitsandbytes) or another model of the same tokenizer. Nothing is loaded here but tokenizers: each
    `Compared` loads its model when it is run.
    """
    device = device or default_device()
    run_dir = run_folder(target)
    config = run_dir / RunFiles.CONFIG if run_dir else None
    if config is None and Path(target).suffix in (".yaml", ".yml", ".json"):
        config = Path(target)
    cfg = load_config(config) if config else None
    reference = full_precision(cfg.teacher_list()[0][1]) if cfg else TeacherConfig(model=target)
    if reference.model is None:
        raise KdistillError(f"{target}: its first teacher has only a cache; fidelity needs teacher.model")
    source = teacher_source(reference)
    tokenizer = load_tokenizer(source)
    described = _weights(source, pick_dtype(reference.dtype, device))
    loaded = Compared(reference.model, described, lambda: load_teacher(reference, device))
    others = [_compared(spec, reference, tokenizer, device) for spec in against]
    examples, where = _validation_examples(cfg, validation)
    if not examples:
        raise KdistillError(
            f"{target}: no held-out rows to compare on; "
            "give --validation FILE (any format kdistill trains on)"
        )
    length = cfg.data.max_length if cfg else 512
    return FidelityInputs(loaded, others, tokenizer, examples, where, length)


def _compared(spec: str, reference: TeacherConfig, tokenizer: Any, device: torch.device) -> Compared:
    if spec in _QUANTIZED:
        quantization_config(spec, device)  # a clear error now, before any model loads
        quantized = reference.model_copy(update={"quantization": spec})
        return Compared(*_QUANTIZED[spec], lambda: load_teacher(quantized, device))
    other = TeacherConfig(model=spec)
    source = teacher_source(other)
    if not same_vocabulary(load_tokenizer(source), tokenizer):
        raise KdistillError(
            f"--against {spec}: its tokenizer differs from {reference.model}'s; fidelity compares "
            "models of one vocabulary"
        )
    described = _weights(source, pick_dtype(other.dtype, device))
    return Compared(spec, described, lambda: load_teacher(other, device))


def _weights(source: ModelSource, dtype: torch.dtype) -> str:
    kind = gguf_type(source)
    name = str(dtype).removeprefix("torch.")
    return f"GGUF {kind} weights, dequantized to {name}" if kind else f"{name} weights"
