"""Pydantic models of a whole kdistill run: teachers, student, data and the run itself (the `loss`
section is in `loss`, `training` in `training`).

Every field carries its help text and checks its range at construction, so a bad value
fails when the config is loaded, not an hour into training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdistill.config.loss import LossConfig
from kdistill.config.strict import Strict
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


_WIDTHS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


class FromTeacher(Strict):
    method: Literal["even", "importance"] = Field(
        "even",
        description="`even`: keep `num_layers` evenly spaced layers, first and last included (DistilBERT). "
        "`importance`: prune layers, MLP neurons, attention head groups and embedding channels by their "
        "importance on `calibration_rows` training rows (Minitron); see docs/pruning.md.",
    )
    num_layers: int | None = Field(
        None, gt=0, description="Decoder layers kept (default: the teacher's, or what `params` leaves)."
    )
    hidden_size: int | None = Field(
        None, gt=0, description="Embedding channels kept, by importance (method: importance)."
    )
    intermediate_size: int | None = Field(
        None, gt=0, description="MLP neurons kept in every layer, by importance (method: importance)."
    )
    num_attention_heads: int | None = Field(
        None,
        gt=0,
        description="Query heads kept in every layer (method: importance); whole key/value groups go, so "
        "this is num_key_value_heads times the teacher's query heads per group.",
    )
    num_key_value_heads: int | None = Field(
        None,
        gt=0,
        description="Key/value head groups kept in every layer, by importance (method: importance).",
    )
    params: float | None = Field(
        None,
        gt=0,
        description="Parameter budget (method: importance): a share of the teacher's parameters (<= 1) or a "
        "count (> 1). The shape keys not given are chosen for it: MLP width down to a floor of a third of "
        "the teacher's, then depth, then MLP width back up to fill the budget (docs/pruning.md).",
    )
    depth_score: Literal["block_influence", "removal_kl", "removal_loss"] = Field(
        "block_influence",
        description="How layers are ranked (method: importance): `block_influence` (ShortGPT: 1 - cosine "
        "between a layer's input and output), `removal_kl` (KL from the full teacher with that one layer "
        "removed) or `removal_loss` (the teacher's loss on the rows with that layer removed); one forward "
        "pass per layer for the last two.",
    )
    calibration_rows: int = Field(
        64, gt=0, description="Training rows whose activations score the units (method: importance)."
    )
    calibration_batch_size: int = Field(4, gt=0, description="Calibration rows per forward pass.")

    @model_validator(mode="after")
    def _targets(self) -> FromTeacher:
        widths = [k for k in _WIDTHS if getattr(self, k) is not None]
        if self.method == "even":
            if widths or self.params is not None:
                keys = ", ".join([*widths, *(["params"] if self.params is not None else [])])
                raise ValueError(
                    f"student.from_teacher: {keys} need method: importance (even cuts layers only)"
                )
            if self.num_layers is None:
                raise ValueError("student.from_teacher: method even needs num_layers")
        elif self.num_layers is None and not widths and self.params is None:
            raise ValueError(
                "student.from_teacher: method importance needs a target: num_layers, a width "
                f"({', '.join(_WIDTHS)}) or params"
            )
        return self


class LoraSettings(Strict):
    r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt; `all-linear` is every linear layer except the output head.",
    )


class StudentConfig(Strict):
    model: str | None = Field(
        None, description="Hub id or local folder of the student; omit when `from_teacher` builds it."
    )
    from_teacher: FromTeacher | None = Field(
        None, description="Build the student from the teacher's own layers (DistilBERT's initialisation)."
    )
    finetune: Literal["lora", "full"] = Field("lora", description="Train LoRA adapters or every weight.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (finetune: lora).")
    merge: bool = Field(
        False, description="Also save the student with its LoRA adapter merged in (`merged/`)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype; `auto` is float32, or bf16 for a LoRA student's frozen base on GPU.",
    )
    revision: str | None = Field(None, description="Hub revision of the student.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository.")

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if self.model is None and self.from_teacher is None:
            raise ValueError("give `student.model` or `student.from_teacher: {num_layers: N}`")
        if self.model is not None and self.from_teacher is not None:
            raise ValueError("give either `student.model` or `student.from_teacher`, not both")
        return self


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
