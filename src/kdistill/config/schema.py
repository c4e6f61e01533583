"""Pydantic models of a whole kdistill run.

Every field carries its help text and checks its range at construction, so a bad value
fails when the config is loaded, not an hour into training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as `learnig_rate` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(_Strict):
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
        description="Load the frozen teacher through bitsandbytes (4bit = NF4 with double quantization).",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository.")
    compact: bool = Field(
        True,
        description="Keep frozen fp32 linear weights that are exactly 4-bit GGUF blocks or bf16 values in "
        "that form and expand them as each layer runs: the same numbers in about 1/6 or 1/2 of the memory.",
    )

    @model_validator(mode="after")
    def _model_or_cache(self) -> TeacherConfig:
        if self.model is None and self.cache is None:
            raise ValueError("give the teacher's `model`, its `cache` folder, or both")
        return self


class CacheConfig(_Strict):
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


class FromTeacher(_Strict):
    num_layers: int = Field(
        gt=0, description="Decoder layers kept from the teacher, evenly spaced, first and last included."
    )


class LoraSettings(_Strict):
    r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt; `all-linear` is every linear layer except the output head.",
    )


class StudentConfig(_Strict):
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


class GenerationSettings(_Strict):
    max_new_tokens: int = Field(256, gt=0, description="Longest teacher response, in tokens.")
    batch_size: int = Field(8, gt=0, description="Prompts generated together.")


class DataConfig(_Strict):
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


DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


class HiddenConfig(_Strict):
    weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the hidden-state term (each live teacher's share is its `weight` times this); "
        "0 turns it off. Needs live teachers: a teacher cache holds no hidden states.",
    )
    layers: Literal["auto"] | list[tuple[int, int]] = Field(
        "auto",
        description="`auto`, or `[[teacher_layer, student_layer], ...]` numbered as `output_hidden_states` "
        "numbers them (0 = embeddings, L = the last layer, after the final norm). `auto` pairs every student "
        "layer with the teacher layer at the same relative depth; a `from_teacher` student's layers pair "
        "with the teacher layers they were copied from.",
    )
    distance: Literal["mse", "cosine"] = Field(
        "mse",
        description="Per-token distance between the student's (projected) and the teacher's states: mean "
        "squared error over the hidden size, or 1 - cosine similarity.",
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _pairs(cls, value: object) -> object:
        # Checked here, so that a bad value gives one message instead of one per member of the union.
        if isinstance(value, str):
            if value != "auto":
                raise ValueError("expected 'auto' or a list of [teacher_layer, student_layer] pairs")
            return value
        if not isinstance(value, list | tuple) or not value:
            raise ValueError("expected 'auto' or a non-empty list of [teacher_layer, student_layer] pairs")
        for item in value:
            ok = isinstance(item, list | tuple) and len(item) == 2
            if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item):
                raise ValueError(f"a pair is [teacher_layer, student_layer], integers >= 0; got {item}")
        return value


class LossConfig(_Strict):
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"] = Field(
        "forward_kl", description="Divergence between the teacher's and the student's softened distributions."
    )
    temperature: float = Field(2.0, gt=0, description="Softmax temperature T; the KD term is scaled by T^2.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KD term; 1 - alpha weighs the CE term.")
    beta: float = Field(
        0.5, ge=0, le=1, description="Generalized JSD interpolation (0 = forward, 1 = reverse KL)."
    )
    skew: float = Field(0.1, ge=0, le=1, description="Skew KL mixing weight (DistiLLM).")
    chunk_size: int | None = Field(
        512, gt=0, description="Tokens per chunk of the output projection; null computes full logits."
    )
    multi_teacher: Literal["sum", "mixture"] = Field(
        "sum",
        description="Several teachers: `sum` of weighted per-teacher divergences, or one divergence to "
        "their weighted `mixture` distribution.",
    )
    alignment: Literal["span", "uld"] = Field(
        "span",
        description="A teacher whose tokenizer differs from the student's: `span` aligns both tokenizations "
        "of each text through character offsets and compares next-token distributions through a map of "
        "tokens with the same text (unmapped mass in an explicit 'other' bucket), falling back to ULD "
        "where an aligned segment is not one token on each side; `uld` uses Universal Logit Distillation's "
        "sorted-probability distance at every aligned position.",
    )
    hidden: HiddenConfig = Field(
        default_factory=HiddenConfig,
        description="Layer-wise hidden-state distillation: `weight` x distance between paired layers, summed "
        "over trained tokens (off while weight is 0).",
    )


class HealthConfig(_Strict):
    window: int | None = Field(
        200,
        ge=2,
        description="Warn when the mean loss of the last `window` steps is not below that of the `window` "
        "steps before (a loss that is not decreasing); null disables.",
    )
    explode_factor: float | None = Field(
        10.0,
        gt=1,
        description="Warn when a step's loss exceeds this multiple of the recent mean; null disables.",
    )
    max_bad_steps: int = Field(
        5, gt=0, description="Steps with a NaN or infinite loss in a row (each skipped) that stop the run."
    )
    kd_ce_ratio: float | None = Field(
        100.0,
        gt=1,
        description="Warn when the KD part (T^2 x divergence) and the CE part differ by more than this "
        "factor, so that alpha barely acts; null disables.",
    )
    min_quality_gain: float | None = Field(
        0.05,
        ge=0,
        lt=1,
        description="Warn after training when the held-out KL to the teacher (perplexity without one) "
        "fell by less than this share; null disables.",
    )


class TrainingConfig(_Strict):
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    batch_size: int = Field(4, gt=0, description="Rows per micro-batch on each process.")
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows per forward pass (default batch_size): a smaller value saves memory without "
        "changing the data order or the effective batch. Out-of-memory back-off halves it by itself.",
    )
    eval_batch_size: int | None = Field(
        None, gt=0, description="Rows per evaluation batch (default batch_size)."
    )
    learning_rate: float = Field(5e-5, gt=0, description="Peak AdamW learning rate.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before cosine decay.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (not applied to norms and biases)."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables it.")
    seed: int = Field(42, description="Seed for data order, dropout and initialisation.")
    save_steps: int | None = Field(
        None, gt=0, description="Checkpoint every N optimizer steps (and at the end)."
    )
    save_total_limit: int | None = Field(2, gt=0, description="Keep only the newest N checkpoints.")
    eval_steps: int | None = Field(
        None, gt=0, description="Validation every N optimizer steps (and at the end)."
    )
    logging_steps: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="`auto` is bf16 on GPUs that support it and fp32 on CPU (bf16 is slow on CPU)."
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Trackers besides metrics.jsonl."
    )
    health: HealthConfig = Field(
        default_factory=HealthConfig, description="Loss health checks and the NaN guard."
    )
    # The guide's flat keys: accepted here and moved to `loss` by the loader.
    temperature: float | None = Field(None, gt=0, description="Alias of loss.temperature (the guide's key).")
    alpha: float | None = Field(None, ge=0, le=1, description="Alias of loss.alpha (the guide's key).")

    @model_validator(mode="after")
    def _micro_fits(self) -> TrainingConfig:
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"training.micro_batch_size={self.micro_batch_size} is larger than "
                f"training.batch_size={self.batch_size}; it splits a batch, so it must not exceed it"
            )
        return self


class RunConfig(_Strict):
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
        """Every teacher with a unique name for its logs."""
        named, seen = [], set()
        for i, teacher in enumerate(self.teachers or [self.teacher]):
            base = teacher.name or (teacher.model or teacher.cache).rstrip("/").split("/")[-1].split(":")[-1]
            name = base if base not in seen else f"{base}_{i}"
            seen.add(name)
            named.append((name, teacher))
        return named

    @model_validator(mode="after")
    def _move_guide_aliases(self) -> RunConfig:
        # The guide writes temperature and alpha under `training`; one value lives in `loss`.
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
