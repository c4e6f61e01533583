"""`kdistill export`: a run's student (a LoRA adapter merged into its base) as a GGUF file."""

from __future__ import annotations

import logging
from pathlib import Path

from kdistill.config import load_config
from kdistill.errors import KdistillError
from kdistill.eval.load import load_run_student, run_folder
from kdistill.files import RunFiles
from kdistill.models.build import load_teacher, pick_dtype
from kdistill.models.gguf_export import write_gguf
from kdistill.models.loading import ModelSource, load_model, load_tokenizer, resolve
from kdistill.models.parts import default_device

log = logging.getLogger("kdistill")


def export_gguf(target: str | Path, kind: str = "f32", output: str | Path | None = None) -> Path:
    """Write the student of `target` (a run folder, or any model folder) as a GGUF file of `kind`
    (`f32`, `f16`, `q8_0`); by default `student-KIND.gguf` inside the run folder. Returns its path."""
    device = default_device()
    run_dir = run_folder(target)
    if run_dir is not None:
        cfg = load_config(run_dir / RunFiles.CONFIG)
        needs_teacher = cfg.student.from_teacher is not None and not (run_dir / "config.json").is_file()
        log.info("export: loading the student of %s", run_dir)
        teacher = load_teacher(cfg.teacher, device) if needs_teacher and cfg.teacher.model else None
        student = load_run_student(run_dir, cfg, teacher, device)
        tokenizer = load_tokenizer(ModelSource(str(run_dir), str(run_dir)))
    elif Path(target).is_dir():
        source = resolve(str(target))
        student, tokenizer = load_model(source, pick_dtype("float32", device), device), load_tokenizer(source)
    else:
        raise KdistillError(f"{target}: not a run folder (no {RunFiles.CONFIG}) nor a model folder")
    path = Path(output) if output else (run_dir or Path(target)) / f"student-{kind}.gguf"
    write_gguf(student.float().eval(), tokenizer, path, kind)
    return path
