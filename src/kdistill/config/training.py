"""Pydantic models of a run's `training` section, with their help text and ranges (its `on_policy`
section is in `on_policy`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdistill.config.on_policy import OnPolicyConfig
from kdistill.config.strict import Strict


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
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Stop after this many minutes of training (wall clock inside the training loop: "
        "steps with their teacher forwards and generation, in-loop evaluation and checkpoints), or at "
        "max_steps / num_epochs if sooner. Checkpointed: --resume continues with the minutes left. The "
        "cosine schedule then decays over whichever limit is nearer (see docs/config.md).",
    )
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
