"""Pydantic models of a run's `loss` and `training` sections, with their help text and ranges."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from kdistill.config.strict import Strict


class HiddenConfig(Strict):
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


class LossConfig(Strict):
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


class HealthConfig(Strict):
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


class EngineSettings(Strict):
    python: str = Field(
        ".venv-vllm/bin/python",
        description="The Python of vLLM's own environment (`make vllm-env`) that kdistill starts the "
        "student's engine with.",
    )
    server: str | None = Field(
        None,
        description="URL of a vLLM server that already serves the student (started as docs/on-policy.md "
        "shows, on a machine that reads this run's folder); kdistill then starts none.",
    )
    served_name: str = Field("student", description="The student's model name on the engine.")
    memory: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Share of the device's memory vLLM reserves (--gpu-memory-utilization; on its CPU "
        "backend, of RAM).",
    )
    start_timeout: float = Field(
        900.0, gt=0, description="Seconds the engine may take to start before the run stops."
    )
    devices: str | None = Field(
        None,
        pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$",
        description="Devices of the engine kdistill starts, such as '1', '2,3' or '4-7'. With CUDA: its "
        "CUDA_VISIBLE_DEVICES, tensor-parallel over them; on vLLM's CPU build: CPU cores, its processes "
        "pinned and its threads bound there (VLLM_CPU_OMP_THREADS_BIND). Default: the training process's.",
    )

    @field_validator("server")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port is None:
            raise ValueError(f"expected a URL such as http://127.0.0.1:8100, got {value!r}")
        return value.rstrip("/")

    @field_validator("devices", mode="before")
    @classmethod
    def _device_number(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # devices: 1

    @model_validator(mode="after")
    def _placed(self) -> EngineSettings:
        if self.devices is not None and self.server is not None:
            raise ValueError(
                f"training.on_policy.vllm.devices={self.devices!r} places an engine kdistill starts; the "
                f"server at {self.server} runs where it was started"
            )
        return self


class OnPolicyConfig(Strict):
    lmbda: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability that an optimizer step trains on responses the student writes itself "
        "(GKD's lambda); otherwise the step trains on the configured responses (data.responses). "
        "0 is off-policy training exactly; 1 is on-policy only.",
    )
    mode: Literal["divergence", "sampled"] = Field(
        "divergence",
        description="Loss on a generated batch: `divergence` applies loss.divergence at every generated "
        "position (alpha weighs it; no CE term); `sampled` uses only the teacher's log-probability of each "
        "sampled token, the reward log p - log q in a policy gradient (what a served teacher can give).",
    )
    max_new_tokens: int = Field(128, gt=0, description="Most tokens the student writes per response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the student's responses.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the tokens of this mass.")
    max_prompt_length: int = Field(
        256, gt=0, description="Prompt tokens kept (the last ones) when the student writes a response."
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="What the student samples with: `hf` is transformers' generate in the training "
        "process, always with the current weights; `vllm` is a vLLM server that kdistill starts on the "
        "student's weights and updates every `sync_steps` optimizer steps.",
    )
    generation_batch_size: int | None = Field(
        None,
        gt=0,
        description="engine hf: rows the student samples in one generate call; default every row of the "
        "optimizer step on this process (batch_size x gradient_accumulation_steps). Decoding reads every "
        "weight once per token for all rows of a call, so fewer, larger calls are faster while memory "
        "lasts. Scaled down with micro_batch_size and the out-of-memory back-off. Each row samples from "
        "its own seed, so the samples do not depend on it.",
    )
    sync_steps: int = Field(
        1,
        ge=1,
        description="engine vllm: optimizer steps between two updates of the engine's weights (LoRA: a new "
        "adapter; full: a weight reload). Samples between two updates come from weights up to "
        "sync_steps - 1 steps old (logged as gen/staleness).",
    )
    overlap: bool = Field(
        False,
        description="engine vllm: the engine samples the next step's rows while this step trains, so an "
        "engine on a device of its own keeps working. Every step then samples at least one step behind "
        "(gen/staleness from 1 to sync_steps, against 0 to sync_steps - 1 without).",
    )
    vllm: EngineSettings = Field(
        default_factory=EngineSettings, description="engine vllm: where and how the engine runs."
    )

    @model_validator(mode="after")
    def _engine(self) -> OnPolicyConfig:
        if self.engine == "hf":
            if self.overlap:
                raise ValueError(
                    "training.on_policy.overlap applies to engine: vllm only; the hf engine samples in the "
                    "training process, which cannot train at the same time"
                )
            if self.sync_steps != 1:
                raise ValueError(
                    f"training.on_policy.sync_steps={self.sync_steps} applies to engine: vllm only; the hf "
                    "engine always samples with the current weights"
                )
            if self.vllm != EngineSettings():  # a resolved config writes the defaults out: those pass
                raise ValueError("training.on_policy.vllm is set, but training.on_policy.engine is hf")
        elif self.generation_batch_size is not None:
            raise ValueError(
                f"training.on_policy.generation_batch_size={self.generation_batch_size} applies to engine: "
                "hf only; the vLLM engine has every row of a step in flight at once"
            )
        elif self.lmbda == 0:
            raise ValueError(
                "training.on_policy.engine=vllm with lmbda=0: no step generates, so the engine would "
                "never be used; set lmbda > 0 or engine: hf"
            )
        return self


class TrainingConfig(Strict):
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    batch_size: int = Field(4, gt=0, description="Rows per micro-batch on each process.")
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows per forward pass (default batch_size): a smaller value saves memory without "
        "changing the data order or the effective batch. Out-of-memory back-off halves it by itself.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Keep only each student decoder layer's input during the forward pass and recompute "
        "the layer in backward: activation memory falls to about one layer's worth, for about a third "
        "more student compute (see docs/memory.md).",
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
    on_policy: OnPolicyConfig = Field(
        default_factory=OnPolicyConfig,
        description="On-policy distillation: how often the student trains on its own sampled responses, "
        "and how it samples them (see docs/on-policy.md).",
    )
    # The flat keys of the KD guide behind configs/seed.yaml: accepted here and moved to `loss` by the loader.
    temperature: float | None = Field(
        None, gt=0, description="Alias of loss.temperature (the seed guide's key)."
    )
    alpha: float | None = Field(None, ge=0, le=1, description="Alias of loss.alpha (the seed guide's key).")

    @model_validator(mode="after")
    def _micro_fits(self) -> TrainingConfig:
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"training.micro_batch_size={self.micro_batch_size} is larger than "
                f"training.batch_size={self.batch_size}; it splits a batch, so it must not exceed it"
            )
        return self
