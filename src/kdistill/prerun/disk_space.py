"""Room on disk for a run's writes: one checkpoint and the final student, estimated from the student's
parameters before anything loads, against the free space at output_dir.

A checkpoint holds the trainable weights in fp32 and AdamW's two moments of each (three copies of the
trainable parameters), plus the random generators' state (small). The final student is every
parameter in its saving dtype, or a LoRA adapter (with the merged model beside it when
`student.merge`). Hidden-state projections are small beside either and are not counted.
"""

from __future__ import annotations

from pathlib import Path

from kdistill.errors import KdistillError
from kdistill.files import check_space, size_text
from kdistill.models.build import meta_model, with_lora
from kdistill.prerun.checked import Checked

FP32 = 4


def run_bytes(checked: Checked) -> tuple[int, int] | None:
    """`(one checkpoint, the final student)` in bytes; None where the student cannot be built on meta."""
    student = checked.cfg.student
    layers = student.from_teacher.num_layers if student.from_teacher is not None else None
    model = meta_model(checked.student_config()[1], layers, student.trust_remote_code)
    if model is None:
        return None
    every = sum(p.numel() for p in model.parameters())
    width = 2 if student.dtype in ("bfloat16", "float16") else FP32  # `auto` counts as fp32: the most
    if student.finetune != "lora":
        return 3 * FP32 * every, width * every
    trainable = sum(p.numel() for p in with_lora(model, student.lora).parameters() if p.requires_grad)
    return 3 * FP32 * trainable, FP32 * trainable + (width * every if student.merge else 0)


def disk_space_fits(checked: Checked) -> None:
    """output_dir's file system has room for one checkpoint and the final student: refused if it has
    not, a warning if less than twice that is free. A student whose config cannot be read here (the
    hub out of reach) is left to the checks that read it."""
    try:
        sizes = run_bytes(checked)
    except KdistillError:
        return
    if sizes is not None:
        check_space(Path(checked.cfg.output_dir), sizes[0] + sizes[1], _what(*sizes), "output_dir")


def _what(checkpoint: int, final: int) -> str:
    return f"one checkpoint ({size_text(checkpoint)}) and the final student ({size_text(final)})"
