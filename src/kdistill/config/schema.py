"""Pydantic models of a whole kdistill run: teachers, student, data and the run itself (the `student`
section is in `student`, `loss` in `loss`, `training` in `training`).

Every field carries its help text and checks its range at construction, so a bad value
fails when the config is loaded, not an hour into training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdistill.config.loss import LossConfig
from kdistill.config.strict import Strict
from kdistill.config.student import StudentConfig
from kdistill.config.training import TrainingConfig


class TeacherConfig(Strict):
    model: str | None = Field(
        None,
        description="Hub id, local folder, or `package:NAME` for a model inside an installed Python package.",
    )
    cache: str | None = Field(
        None,
        description="Folder of this teacher's top-k cache: `kdistill cache` writes it, training then reads "
        "it instead of running the model (no teacher is loaded).",
    )
    name: str | None = Field(
        None, description="Name in logs (`loss/kd/NAME`); default: the model's or cache's last path part."
    )
    weight: float = Field(1.0, gt=0, description="Weight among several `teachers` (normalised to sum to 1).")
    gguf_file: str | None = Field(
        None, description="GGUF file inside `model` (auto-detected when the folder holds exactly one)."
    )
    tokenizer: str | None = Field(None, description="Tokenizer location when it differs from `model`.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; `auto` is float32 on CPU and bfloat16 on GPUs that support it."
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none",
        description="Load the frozen teacher through bitsandbytes, on CUDA or the CPU (4bit = NF4 with "
        "double quantization, computing in fp32 on CPU; 8bit = LLM.int8). A from_teacher student is cut "
        "from the full-precision weights first.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository.")
    compact: bool = Field(
        True,
        description="Keep frozen fp32 linear weights that are exactly 4-bit GGUF blocks or bf16 values in "
        "that form and expand them as each layer runs: the same numbers in about 1/6 or 1/2 of the memory.",
    )
    server: list[str] | None = Field(
        None,
        description="URL, or list of URLs, of OpenAI-compatible completions servers that serve this teacher "
        "(vLLM; `kdistill serve CONFIG` starts one): its top-k log-probs at every position then come from "
        "the server (`prompt_logprobs`, k = cache.top_k), load-balanced over the URLs, and its weights are "
        "never loaded for training. `model` still names where its tokenizer and config are read from.",
    )
    served_name: str | None = Field(
        None, description="The model's name on the server (vLLM's --served-model-name); default: `name`."
    )
    retries: int = Field(
        4,
        ge=0,
        description="A served teacher's request that gets no answer or a 5xx answer is tried again this many "
        "times, each on the next URL, the start-up check's too; waits start at `retry_backoff` seconds and "
        "double, to at most 30 s (12 retries ride out about 3.5 minutes, a vLLM restart on a CPU).",
    )
    retry_backoff: float = Field(
        0.5, gt=0, description="Seconds a served teacher's first retry waits (doubled for each next one)."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_url(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("server"), str):
            return {**data, "server": [data["server"]]}
        return data

    @model_validator(mode="after")
    def _model_or_cache(self) -> TeacherConfig:
        if self.model is None and self.cache is None:
            raise ValueError("give the teacher's `model`, its `cache` folder, or both")
        if self.server is not None and (self.model is None or not self.server):
            raise ValueError(
                "a served teacher needs `model` (where its tokenizer is read) and at least one URL"
            )
        return self


class CacheConfig(Strict):
    top_k: int = Field(
        48,
        gt=0,
        description="Teacher tokens stored per trained token (its k most likely); with the 16 tail samples "
        "that is 64 entries, 198 bytes a token for vocabularies up to 65,536.",
    )
    tail_samples: int = Field(
        16,
        ge=0,
        description="Extra tokens per trained token drawn from the teacher's distribution outside its top "
        "k, which make forward KL unbiased at any temperature (0: top k and the tail's mass only).",
    )
    rows_per_shard: int = Field(256, gt=0, description="Data rows per shard file.")
    batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows per teacher forward pass (default: training.eval_batch_size or batch_size).",
    )


class GenerationSettings(Strict):
    max_new_tokens: int = Field(256, gt=0, description="Longest teacher response, in tokens.")
    batch_size: int = Field(8, gt=0, description="Prompts generated together.")


class DataConfig(Strict):
    source: str = Field(
        "builtin:quickstart",
        description="Hub dataset id, a .jsonl/.json/.csv/.parquet file, or `builtin:quickstart`.",
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    format: Literal["auto", "dolly", "alpaca", "chat", "text"] = Field(
        "auto", description="Row format; `auto` detects it from the columns."
    )
    validation_source: str | None = Field(None, description="Separate held-out file or hub id.")
    validation_size: float = Field(
        0.05,
        gt=0,
        description="Held-out share (< 1) or row count (>= 1) taken when there is no validation source.",
    )
    max_length: int = Field(512, gt=1, description="Prompt plus response tokens; longer rows are truncated.")
    max_rows: int | None = Field(None, gt=0, description="Use only the first N training rows.")
    responses: Literal["dataset", "teacher"] = Field(
        "dataset", description="`teacher`: replace responses by the teacher's own (sequence-level KD)."
    )
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings,
        description="Teacher generation settings for `responses: teacher`.",
    )


class RunConfig(Strict):
    teacher: TeacherConfig | None = Field(
        None,
        description="The teacher; with `teachers`, the first of them (it builds `from_teacher` students).",
    )
    teachers: list[TeacherConfig] | None = Field(
        None, min_length=1, description="Several teachers, each with a `weight` (see loss.multi_teacher)."
    )
    cache: CacheConfig = Field(
        default_factory=CacheConfig, description="Teacher cache format (`kdistill cache`)."
    )
    student: StudentConfig
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output_dir: str = Field("runs/kdistill", description="Folder for the student, checkpoints and metrics.")

    @model_validator(mode="before")
    @classmethod
    def _first_teacher(cls, data: object) -> object:
        # `teacher` always names the first teacher, so single-teacher code reads one place.
        if not isinstance(data, dict) or not data.get("teachers"):
            return data
        first = data["teachers"][0]
        if data.get("teacher") is not None and data["teacher"] != first:
            raise ValueError("give `teacher` or a `teachers` list, not both")
        return {**data, "teacher": first}

    @model_validator(mode="after")
    def _some_teacher(self) -> RunConfig:
        if self.teacher is None:
            raise ValueError("give a `teacher` (or a `teachers` list)")
        return self

    def teacher_list(self) -> list[tuple[str, TeacherConfig]]:
        """Every teacher with its name in logs and metrics (unique: `_unique_teachers` refuses others)."""
        return [(_teacher_name(t), t) for t in self.teachers or [self.teacher]]

    @model_validator(mode="after")
    def _unique_teachers(self) -> RunConfig:
        names = [_teacher_name(t) for t in self.teachers or []]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"teachers: several teachers are named {', '.join(map(repr, twice))} (their `name`, or the "
                "last part of their model or cache); give each a distinct `name`"
            )
        return self

    @model_validator(mode="after")
    def _move_guide_aliases(self) -> RunConfig:
        # The KD guide behind configs/seed.yaml writes temperature and alpha under `training`; one value
        # lives in `loss`.
        for key in ("temperature", "alpha"):
            value = getattr(self.training, key)
            if value is None:
                continue
            if key in self.loss.model_fields_set and getattr(self.loss, key) != value:
                raise ValueError(
                    f"training.{key}={value} conflicts with loss.{key}={getattr(self.loss, key)}; give one"
                )
            setattr(self.loss, key, value)
            setattr(self.training, key, None)
        return self


def _teacher_name(teacher: TeacherConfig) -> str:
    """A teacher's `name`, by default the last part of its model's or cache's path (or package)."""
    return teacher.name or (teacher.model or teacher.cache).rstrip("/").split("/")[-1].split(":")[-1]
