"""Pydantic models of a run's `loss` section: the divergence, its weights and the hidden-state term.

The choices of `loss.divergence`, the divergences' parameter fields and their ranges are built from
the loss registry (`losses/registry.py`); nothing here names a divergence.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, create_model, field_validator

from kdistill.config.strict import Strict
from kdistill.losses.registry import LOSSES, Param, divergence_choices, shared_params, suggest


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


# The names `loss.divergence` accepts, in the registry's order.
_CHOICES = divergence_choices()


def _param_field(name: str, param: Param) -> tuple[object, object]:
    """A `loss` field for one registered parameter: its default, help text and range check."""

    def check(value: float) -> float:
        refusal = param.refusal(value)
        if refusal:
            raise ValueError(refusal)
        return value

    users = " and ".join(n for n in _CHOICES if name in LOSSES[n].params)
    help_text = f"{param.help} In {param.interval()}; read by {users}."
    return Annotated[float, AfterValidator(check)], Field(param.default, description=help_text)


class _Divergence(Strict):
    divergence: Literal[_CHOICES] = Field(  # the registry's user-facing names
        "forward_kl",
        description="Divergence between the teacher's and the student's softened distributions: "
        + "; ".join(f"`{n}`, {LOSSES[n].help}" for n in _CHOICES)
        + ".",
    )
    temperature: float = Field(2.0, gt=0, description="Softmax temperature T; the KD term is scaled by T^2.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KD term; 1 - alpha weighs the CE term.")

    @field_validator("divergence", mode="before")
    @classmethod
    def _registered(cls, value: object) -> object:
        # Checked before the Literal, so that a misspelt name gets one message with a suggestion.
        if not isinstance(value, str) or value in _CHOICES:
            return value
        if value in LOSSES:  # registered, but not a user choice (see its comment in the registry)
            raise ValueError(f"{value!r} is not a user choice: it is {LOSSES[value].help}")
        hint = suggest(value)
        raise ValueError(
            f"Input should be {', '.join(repr(c) for c in _CHOICES[:-1])} or {_CHOICES[-1]!r}"
            + (f"; did you mean {hint!r}?" if hint else "")
        )


# The parameters of the registered divergences (`beta`, `skew`, ...) are fields of `loss` itself, made
# from the registry by pydantic's `create_model`: a new parameter needs no edit here, and its range is
# refused when the config loads, not at the first step.
_WithParams = create_model(
    "_WithParams",
    __base__=_Divergence,
    __module__=__name__,
    **{name: _param_field(name, param) for name, param in shared_params().items()},
)


class LossConfig(_WithParams):
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


# A registered parameter named like another `loss` key would silently replace that key's field: a
# developer's mistake, refused as soon as the config is imported.
_CLASHES = set(shared_params()) & (set(_Divergence.model_fields) | set(LossConfig.__annotations__))
if _CLASHES:
    raise TypeError(f"divergence parameter(s) {sorted(_CLASHES)} reuse the name of a `loss` key; rename them")
