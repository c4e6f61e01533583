"""What the pre-run checks read: the config, how the run is launched, and what loads without weights.

`Checked` is filled as the checks run (`preflight.CHECKS`); training then reuses what they loaded.
`Launch` says how many processes train and whether their weights are sharded: `train` reads it from
its accelerator, `validate` from the environment `accelerate launch` sets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kdistill.config import RunConfig
from kdistill.data import DataSplits
from kdistill.models.build import student_source, teacher_source
from kdistill.models.loading import ModelSource, load_config_only
from kdistill.teacher.roster import teacher_kind
from kdistill.teacher.vocabularies import Vocabularies


@dataclass(frozen=True)
class Launch:
    """How the run is launched: its processes, accelerate's distributed type, and whether FSDP or
    DeepSpeed ZeRO-3 shard the weights (no process then holds the whole student between steps)."""

    processes: int = 1
    kind: str = "NO"  # accelerate's `DistributedType` value: NO, MULTI_GPU, FSDP, DEEPSPEED, ...
    sharded: bool = False


def launch_of(accelerator: Any = None) -> Launch:
    """The launch of `accelerator` (train); without one, the launch this process's environment
    describes (validate under `accelerate launch` reads the same settings as train would)."""
    if accelerator is not None:
        plugin = accelerator.state.deepspeed_plugin
        kind = accelerator.distributed_type.value
        sharded = kind == "FSDP" or (plugin is not None and plugin.zero_stage == 3)
        return Launch(accelerator.num_processes, kind, sharded)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return Launch(processes, "FSDP", True)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return Launch(processes, "DEEPSPEED", os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")
    return Launch(processes, "MULTI_GPU" if processes > 1 else "NO")


@dataclass
class Checked:
    """What the checks read, each loaded once and without weights."""

    cfg: RunConfig
    launch: Launch = field(default_factory=Launch)
    vocabs: Vocabularies | None = None  # set by `vocabularies_match`
    data: DataSplits | None = None  # the dataset's own responses, tokenized; set by `data_reads`
    _configs: dict[str, Any] = field(default_factory=dict)

    def config_of(self, source: ModelSource) -> Any:
        if source.identity not in self._configs:
            self._configs[source.identity] = load_config_only(source)
        return self._configs[source.identity]

    def reading_teachers(self) -> list[tuple[str, ModelSource]]:
        """Every teacher that reads this run's rows as they come (not a cache), with its source."""
        return [
            (name, teacher_source(t)) for name, t in self.cfg.teacher_list() if teacher_kind(t).grades_samples
        ]

    def student_config(self) -> tuple[str, Any]:
        """The student's name in messages and its config (a `from_teacher` student's: the teacher's)."""
        if self.cfg.student.from_teacher is None:
            return f"student '{self.cfg.student.model}'", self.config_of(student_source(self.cfg.student))
        return "the teacher copied by student.from_teacher", self.config_of(teacher_source(self.cfg.teacher))
