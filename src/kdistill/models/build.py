"""Build the frozen teacher and the trainable student from the run config."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Sequence
from typing import Any

import torch
from packaging.version import Version
from torch import nn

from kdistill.config import StudentConfig, TeacherConfig
from kdistill.config.student import FromTeacher, LoraSettings
from kdistill.errors import KdistillError
from kdistill.models.even_cut import fewer_layers, keep_indices, shrink
from kdistill.models.loading import ModelSource, load_model, resolve
from kdistill.models.parts import for_inference
from kdistill.models.prune import build_pruned, build_shape
from kdistill.models.prune.shape import student_config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPUs that support it and fp32 elsewhere: bf16 matmul is very slow on CPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def teacher_source(cfg: TeacherConfig) -> ModelSource:
    return resolve(cfg.model, cfg.gguf_file, cfg.revision, cfg.trust_remote_code)


def student_source(cfg: StudentConfig) -> ModelSource | None:
    return None if cfg.model is None else resolve(cfg.model, None, cfg.revision, cfg.trust_remote_code)


def load_teacher(cfg: TeacherConfig, device: torch.device) -> Any:
    """The teacher: frozen, in eval mode, optionally 4/8-bit through bitsandbytes.

    A GGUF teacher is quantized from its fp32 conversion (`models.loading`): bitsandbytes then
    re-quantizes weights that GGUF had already dequantized.
    """
    source = teacher_source(cfg)
    kwargs = quantization_kwargs(cfg, source, device)
    return for_inference(load_model(source, pick_dtype(cfg.dtype, device), device, **kwargs))


def full_precision(cfg: TeacherConfig) -> TeacherConfig:
    """The same teacher without bitsandbytes: what a `from_teacher` student copies its layers from."""
    return cfg.model_copy(update={"quantization": "none"})


# transformers accepts bitsandbytes from this version on; 4-bit and 8-bit layers run on CPU with every
# release from it to BNB_TESTED (checked on a tiny Llama, NF4 with and without double quantization).
BNB_MINIMUM, BNB_TESTED = "0.46.1", "0.50.2"


def quantization_kwargs(cfg: TeacherConfig, source: ModelSource, device: torch.device) -> dict[str, Any]:
    """`from_pretrained`'s arguments for `teacher.quantization`, or a clear error where it cannot run."""
    if cfg.quantization == "none":
        return {}
    kwargs = {
        "quantization_config": quantization_config(cfg.quantization, device),
        "device_map": {"": device},
    }
    return kwargs


def quantization_config(kind: str, device: torch.device) -> Any:
    """A bitsandbytes config for `kind` on `device`, or a clear error where bitsandbytes cannot run.

    On CUDA, 4-bit layers compute in bf16 (fp16 without it). On CPU they compute in fp32: bf16
    matmuls are several hundred times slower there. 8-bit (LLM.int8) has no compute dtype to set.
    """
    installed = bitsandbytes_version()
    if installed is None or Version(installed) < Version(BNB_MINIMUM):
        found = "is not installed" if installed is None else f"{installed} is installed"
        raise KdistillError(
            f"teacher.quantization={kind} needs bitsandbytes>={BNB_MINIMUM} ({found}; {BNB_MINIMUM} to "
            f"{BNB_TESTED} run 4-bit and 8-bit teachers on CPU): pip install 'kdistill[quant]', "
            "or set teacher.quantization: none"
        )
    if device.type not in ("cuda", "cpu"):
        raise KdistillError(
            f"teacher.quantization={kind} runs on CUDA GPUs and on the CPU, and this run is on "
            f"{device.type}; set teacher.quantization: none"
        )
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        # LLM.int8 casts activations to fp16 to quantize them, and logs so at every matmul.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float32
    if device.type == "cuda":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes version, None without it."""
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def build_student(
    cfg: StudentConfig,
    teacher: Any | None,
    device: torch.device,
    calibration: list[dict[str, torch.Tensor]] | None = None,
) -> Any:
    """The student: a pretrained model or one cut from the teacher, then LoRA-wrapped or fully trainable.

    A `method: importance` student is pruned from the teacher by its activations on the `calibration`
    batches (`models.prune.calibration.load_calibration`).
    """
    # Fully trained weights stay fp32 under `auto` (mixed precision computes in bf16 on GPUs); a LoRA
    # student's frozen base may be bf16 there, which halves its memory without touching the optimizer.
    dtype = pick_dtype(cfg.dtype, device) if cfg.finetune == "lora" or cfg.dtype != "auto" else torch.float32
    if cfg.from_teacher is not None:
        if teacher is None:
            raise KdistillError("student.from_teacher needs a live teacher model to copy layers from")
        if cfg.from_teacher.method == "importance":
            pruned = build_pruned(teacher, cfg.from_teacher, calibration or [])
            model, copied = pruned.model, pruned.kept.layers
        else:
            model = shrink(teacher, cfg.from_teacher.num_layers)
            copied = keep_indices(teacher.config.num_hidden_layers, cfg.from_teacher.num_layers)
        model = model.to(device=device, dtype=dtype)
        model.kdistill_copied_layers = copied  # loss.hidden pairs each layer with its original
    else:
        model = load_model(student_source(cfg), dtype, device)
    model.config.use_cache = False
    if cfg.finetune == "full":
        model.requires_grad_(True)
        return model
    return with_lora(model, cfg.lora)


def with_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """`model` wrapped by peft with LoRA adapters; target modules that match nothing are named.

    peft refuses a list only when none of its entries matches; every entry must match here, or a typo
    in one would leave that module silently untrained.
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(settings.target_modules, str):  # a string is peft's regex or "all-linear"
        _every_target_matches(model, settings.target_modules)
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:  # peft's NoMatchingPeftModuleError and unsupported module types
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise KdistillError(
            f"student.lora.target_modules={settings.target_modules!r}: {str(err).splitlines()[0][:200]} "
            f"The student's linear layers are named {', '.join(linear)}"
        ) from None


def _every_target_matches(model: nn.Module, targets: Sequence[str]) -> None:
    """Each of `targets` names a module of `model` as peft matches a list: the whole name or its end."""
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise KdistillError(
            f"student.lora.target_modules: {', '.join(map(repr, unmatched))} names no module of the student "
            f"(of {list(targets)!r}); the student's linear layers are named {', '.join(linear)}"
        )


def meta_model(
    config: Any, num_layers: int | None = None, trust_remote_code: bool = False
) -> nn.Module | None:
    """A model of `config`'s architecture on the meta device: its modules, no weights, no memory.

    `num_layers` keeps that many decoder layers, as a `from_teacher` student does. None where the
    architecture cannot be built so (custom code that computes on its weights while it builds):
    checks on its modules are then left to the real load.
    """
    from transformers import AutoModelForCausalLM

    if num_layers is not None:
        config = fewer_layers(config, keep_indices(config.num_hidden_layers, num_layers))
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # any architecture's own code may fail on meta tensors; the real load still checks
        return None


def made_student_config(teacher_config: Any, settings: FromTeacher) -> Any:
    """The config.json of a `from_teacher` student, from the teacher's alone (no weights).

    An `even` student keeps evenly spaced layers; an `importance` one has the pruned shape, whose
    layers are known only after calibration (per-layer settings such as Gemma's `layer_types` are
    then the first ones').
    """
    if settings.method == "importance":
        return student_config(teacher_config, build_shape(teacher_config, settings))
    return fewer_layers(teacher_config, keep_indices(teacher_config.num_hidden_layers, settings.num_layers))


def checkpoint_student(model: Any) -> None:
    """Gradient checkpointing of the student's decoder layers, through transformers.

    Non-reentrant checkpointing recomputes each layer in backward wherever the decoder is called
    from (the loss calls it directly), and gives the same gradients. A LoRA student's frozen
    embeddings still get an output that requires grad, so the recomputed layers see one.
    transformers checkpoints a layer only in training mode, so the student is put in it (the run
    trains in it anyway: held-out evaluation restores the wrapper's training mode).
    """
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "peft_config"):
        model.enable_input_require_grads()
