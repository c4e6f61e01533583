"""Pydantic models of a run's `student` section: a model, or one made from the teacher (evenly spaced
layers, or pruned by importance), trained in full or with LoRA."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdistill.config.strict import Strict

_WIDTHS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


DepthScore = Literal["block_influence", "removal_kl", "removal_loss", "contiguous_kl", "contiguous_loss"]


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
    depth_score: DepthScore = Field(
        "block_influence",
        description="How layers are ranked (method: importance): `block_influence` (ShortGPT: 1 - "
        "cosine between a layer's input and output), `removal_kl` (KL from the full teacher with that "
        "one layer removed), `removal_loss` (the teacher's loss on the rows with that layer removed), "
        "or `contiguous_kl` / `contiguous_loss` (the same with a contiguous block of all the layers to "
        "drop removed; the cheapest block goes, as Minitron found near the end); one forward pass per "
        "layer or block for all but the first.",
    )
    mlp_refit: bool = Field(
        False,
        description="Refit each pruned MLP's down projection by least squares, so that the kept neurons "
        "reproduce the full MLP's output on the calibration rows (method: importance). Calibration then "
        "keeps one intermediate x intermediate fp32 Gram matrix per teacher layer (docs/pruning.md).",
    )
    calibration_rows: int = Field(
        64, gt=0, description="Training rows whose activations score the units (method: importance)."
    )
    calibration_batch_size: int = Field(4, gt=0, description="Calibration rows per forward pass.")

    @model_validator(mode="after")
    def _targets(self) -> FromTeacher:
        widths = [k for k in _WIDTHS if getattr(self, k) is not None]
        if self.method == "even":
            others = [
                *(["params"] if self.params is not None else []),
                *(["mlp_refit"] if self.mlp_refit else []),
            ]
            if widths or others:
                keys = ", ".join([*widths, *others])
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
