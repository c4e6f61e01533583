"""The checks `kdistill validate` and `kdistill train` both make before any weight loads: one list.

`CHECKS` is that list, and `run_checks` runs it. Each check reads a `Checked`: the config, the
launch, and what can be known without weights (model configs, tokenizers, models built on the meta
device, the tokenized data). Validate runs the list and reports; train runs the same list first,
then loads the models, so a run that would be refused is refused before minutes of loading, with
the message validate gives. The on-policy checks are in `on_policy.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from kdistill.config import RunConfig
from kdistill.data import Example, build_datasets
from kdistill.errors import KdistillError
from kdistill.losses.hidden import LayerPairs, copied_layer_pairs, require_live_teacher, resolve_layer_pairs
from kdistill.models.build import (
    made_student_config,
    meta_model,
    quantization_kwargs,
    student_source,
    teacher_source,
    with_lora,
)
from kdistill.models.even_cut import check_shrinkable, keep_indices
from kdistill.models.parts import default_device, depth_and_width, text_config
from kdistill.prerun.checked import Checked, launch_of
from kdistill.prerun.disk_space import disk_space_fits
from kdistill.prerun.on_policy import (
    engine_processes,
    engine_python_exists,
    on_policy_possible,
    on_policy_vocabularies,
)
from kdistill.storage.checkpoint import check_writable
from kdistill.teacher.responses import check_responses_teacher
from kdistill.teacher.roster import teacher_kind
from kdistill.teacher.vocabularies import load_vocabularies


def hidden_teachers_live(checked: Checked) -> None:
    """loss.hidden needs every teacher live: a teacher cache, or a server, gives no hidden states."""
    if checked.cfg.loss.hidden.weight > 0:
        for name, teacher in checked.cfg.teacher_list():
            kind = teacher_kind(teacher)
            require_live_teacher(not kind.grades_samples, str(teacher.cache), name)  # a cache
            if not kind.has_hidden:  # a server
                raise KdistillError(
                    f"loss.hidden needs a live teacher, but teacher {name!r} is served "
                    f"({teacher.server[0]}): a server gives top-k log-probs, not hidden states. Remove "
                    "teacher.server so that it runs live, or set loss.hidden.weight: 0"
                )


def output_dir_usable(checked: Checked) -> None:
    """output_dir is a folder, or can become one, that this process can write into."""
    check_writable(Path(checked.cfg.output_dir))


def model_sources_resolve(checked: Checked) -> None:
    """Local folders exist, `package:` models are installed, a `gguf_file` is in its folder."""
    for _, teacher in checked.cfg.teacher_list():
        if teacher.model is not None:
            teacher_source(teacher)
    student_source(checked.cfg.student)


def quantization_supported(checked: Checked) -> None:
    """teacher.quantization needs a bitsandbytes that runs on this device (CPU or CUDA), for every
    teacher whose weights load here."""
    for _, teacher in checked.cfg.teacher_list():
        if teacher_kind(teacher).runs_here:
            quantization_kwargs(teacher, teacher_source(teacher), default_device())


def responses_teacher_live(checked: Checked) -> None:
    check_responses_teacher(checked.cfg)


def vocabularies_match(checked: Checked) -> None:
    """Tokenizers load, same-vocabulary heads are wide enough, cross-tokenizer options are possible."""
    checked.vocabs = load_vocabularies(checked.cfg, checked.config_of)


def student_from_teacher(checked: Checked) -> None:
    """A `from_teacher` student: a teacher model (cut at full precision) with at least that many layers."""
    cfg, shrink = checked.cfg, checked.cfg.student.from_teacher
    if shrink is None:
        return
    if cfg.teacher.model is None:
        raise KdistillError(
            "student.from_teacher copies the teacher's layers, but the teacher has only a cache; "
            "give teacher.model beside teacher.cache"
        )
    source = teacher_source(cfg.teacher)
    if shrink.method == "importance":
        made_student_config(checked.config_of(source), shrink)  # refuses shapes the teacher cannot give
        if cfg.student.finetune == "lora":
            raise KdistillError(
                "student.from_teacher.method: importance with finetune: lora: the adapter's base would "
                "have to be pruned again wherever it is loaded; run `kdistill prune CONFIG` once and give "
                "its folder as student.model (or use finetune: full)"
            )
        return
    teacher = meta_model(checked.config_of(source), trust_remote_code=source.trust_remote_code)
    if teacher is not None:
        check_shrinkable(teacher, shrink.num_layers)


def max_length_fits(checked: Checked) -> None:
    """data.max_length within the context (max_position_embeddings) of the student and live teachers."""
    wanted = checked.cfg.data.max_length
    models = [checked.student_config()]
    models += [
        (f"teacher '{source.spec}'", checked.config_of(source)) for _, source in checked.reading_teachers()
    ]
    for who, config in models:
        limit = getattr(text_config(config), "max_position_embeddings", None)
        if isinstance(limit, int) and wanted > limit:
            raise KdistillError(
                f"data.max_length={wanted} is beyond the context of {who} ({limit} positions, its "
                f"max_position_embeddings); set data.max_length to at most {limit}"
            )


def pruned_pairs_pending(cfg: RunConfig) -> bool:
    """loss.hidden's `auto` pairs wait for calibration: a `method: importance` student's layers are
    chosen then, and each pairs with the first teacher's layer it is pruned from."""
    made = cfg.student.from_teacher
    return cfg.loss.hidden.layers == "auto" and made is not None and made.method == "importance"


def lora_targets_match(checked: Checked) -> None:
    """student.lora.target_modules name modules the student has (peft runs on a meta-device copy)."""
    student = checked.cfg.student
    if student.finetune == "lora":
        model = meta_model(made_config(checked), trust_remote_code=student.trust_remote_code)
        if model is not None:
            with_lora(model, student.lora)


def hidden_layers_resolve(checked: Checked) -> None:
    """loss.hidden.layers name layers both models have."""
    if checked.cfg.loss.hidden.weight > 0:
        hidden_pairs(checked.cfg, *model_shapes(checked))


def data_reads(checked: Checked) -> None:
    """The data reads, converts and tokenizes (with the dataset's responses), with training rows left.

    Where the teacher writes the responses, the dataset's own may be empty: they stand in as text.
    """
    cfg, vocabs = checked.cfg, checked.vocabs
    data = cfg.data.model_copy(update={"responses": "dataset"})
    stand_in = None if cfg.data.responses == "dataset" else _stand_in_responses
    checked.data = build_datasets(data, vocabs.tokenizer, cfg.training.seed, stand_in, vocabs.cross)


def _stand_in_responses(examples: list[Example]) -> list[Example]:
    return [e if e.response.strip() else replace(e, response="(the teacher's response)") for e in examples]


Check = Callable[[Checked], None]

# Checks that read no model file; those that depend on the machine rather than the config (validate
# reports them: a config checked on a laptop may be meant for a GPU); those that read model configs,
# tokenizers and the data (never weights).
LOCAL_CHECKS: tuple[Check, ...] = (
    on_policy_possible,
    hidden_teachers_live,
    output_dir_usable,
    model_sources_resolve,
    responses_teacher_live,
)
MACHINE_CHECKS: tuple[Check, ...] = (
    quantization_supported,
    engine_python_exists,
    engine_processes,
    disk_space_fits,
)
MODEL_CHECKS: tuple[Check, ...] = (
    vocabularies_match,
    student_from_teacher,
    max_length_fits,
    lora_targets_match,
    hidden_layers_resolve,
    data_reads,
    on_policy_vocabularies,
)
CHECKS = LOCAL_CHECKS + MACHINE_CHECKS + MODEL_CHECKS


def run_checks(
    cfg: RunConfig,
    checks: tuple[Check, ...] = CHECKS,
    checked: Checked | None = None,
    accelerator: Any = None,
) -> Checked:
    """Run `checks` in order on what `checked` holds (a new `Checked` of `cfg`, launched as
    `accelerator` is, or as this process's environment says without one); the first that fails raises
    its `KdistillError`."""
    checked = checked or Checked(cfg, launch_of(accelerator))
    for check in checks:
        check(checked)
    return checked


def model_shapes(checked: Checked) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
    """Each live teacher's `(layers, hidden size)` by name, and the student's, from their configs."""
    shapes = {name: depth_and_width(checked.config_of(source)) for name, source in checked.reading_teachers()}
    return shapes, depth_and_width(made_config(checked))


def made_config(checked: Checked) -> Any:
    """The student's config: its own, or the one a `from_teacher` student gets (`made_student_config`)."""
    settings = checked.cfg.student.from_teacher
    config = checked.student_config()[1]
    return config if settings is None else made_student_config(text_config(config), settings)


def hidden_pairs(
    cfg: RunConfig,
    teachers: dict[str, tuple[int, int]],
    student: tuple[int, int],
    copied: list[int] | None = None,
) -> list[tuple[str, LayerPairs]]:
    """Each teacher's `(teacher_layer, student_layer)` pairs for loss.hidden.

    `teachers` maps each teacher's name to its `(layers, hidden size)`, `student` is the student's.
    `auto` pairs layers at the same relative depth (`auto_layer_pairs`), except that a `from_teacher`
    student's layers pair with the layers of the first teacher they were copied from: each student
    layer starts as a copy of the teacher layer it is paired with. `copied` lists those layers once the
    student is made; before, they are known for `method: even` (spread evenly, first and last
    included), and `method: importance` pairs by relative depth until calibration chooses its layers
    (`pruned_pairs_pending` says when).
    """
    layers, several = cfg.loss.hidden.layers, len(teachers) > 1
    found = []
    made = cfg.student.from_teacher
    for index, (name, _) in enumerate(cfg.teacher_list()):
        depth = teachers[name][0]
        kept = copied
        if kept is None and made is not None and made.method == "even":
            kept = keep_indices(depth, student[0])
        if layers == "auto" and index == 0 and made is not None and kept is not None:
            pairs = copied_layer_pairs(kept)
        else:
            key = f"loss.hidden.layers (teacher {name!r})" if several else "loss.hidden.layers"
            pairs = resolve_layer_pairs(layers, depth, student[0], key)
        found.append((name, pairs))
    return found
