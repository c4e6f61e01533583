"""The one registry of losses: each divergence once, with its parameters and whether it reads labels.

Everything else is built from ``LOSSES``: the config's choices for ``loss.divergence`` and its
parameter fields with their ranges (``config/loss.py``), the divergence keyword arguments of the loss
settings (``objective/settings.py``), the checks of ``distill_loss_sums`` and ``mapped_divergence``,
and the table in docs/loss.md (a test checks it lists every name).

Adding a divergence is one pure function (see ``divergences.py`` for its call) and one entry here;
docs/loss.md shows a worked example.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from kdistill.errors import KdistillError
from kdistill.losses.divergences import (
    Divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)
from kdistill.losses.policy import sampled_reverse_kl


@dataclass(frozen=True)
class Param:
    """A loss's numeric parameter: its default, its range and the help text of its config field.

    The range runs from ``low`` to ``high``; an open end excludes that bound. A parameter of several
    losses (``skew``) is one ``Param`` object shared by their entries, so it is one config field.
    """

    default: float
    low: float
    high: float
    help: str
    low_open: bool = False
    high_open: bool = False

    def interval(self) -> str:
        """The range as written in maths: ``[0, 1)`` excludes 1."""
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def refusal(self, value: float) -> str | None:
        """Why ``value`` is out of range (``"must be in [0, 1)"``), or None when it is in range."""
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return None if above and below else f"must be in {self.interval()}"


@dataclass(frozen=True)
class Loss:
    """One registered loss.

    - ``fn``: the formula, called as ``fn(student_logits, teacher, *, temperature, **params)`` plus
      ``labels=`` when ``needs_labels``; it returns a sum over rows.
    - ``help``: one line for the docs' table and the config's help text.
    - ``params``: keyword name -> ``Param``; the config gives each one a field of ``loss``.
    - ``needs_labels``: the chunked head passes each row's label (the token that row predicts).
    - ``user_choice``: offered as a value of ``loss.divergence``.
    - ``aliases``: names people type for it elsewhere (DistiLLM's ``fkl``, plain ``kl``); a config that
      uses one is refused with "did you mean" this loss. They are never accepted, so that a divergence
      has one spelling in configs, logs and saved runs.
    """

    fn: Divergence
    help: str
    params: dict[str, Param] = field(default_factory=dict)
    needs_labels: bool = False
    user_choice: bool = True
    aliases: tuple[str, ...] = ()


_BETA = Param(0.5, 0.0, 1.0, "Generalized JSD interpolation (0 = forward, 1 = reverse KL).")
_SKEW = Param(0.1, 0.0, 1.0, "Skew KL mixing weight (DistiLLM); 0 is the plain KL.", high_open=True)

LOSSES: dict[str, Loss] = {
    "forward_kl": Loss(
        forward_kl, "KL(teacher ‖ student), the guide's (Hinton et al. 2015)", aliases=("kl", "fkl", "kld")
    ),
    "reverse_kl": Loss(reverse_kl, "KL(student ‖ teacher), mode-seeking (MiniLLM)", aliases=("rkl",)),
    "jsd": Loss(
        generalized_jsd,
        "generalized JSD of GKD; `loss.beta` 0 and 1 give forward and reverse KL",
        {"beta": _BETA},
        aliases=("js", "gjsd"),
    ),
    "skew_kl": Loss(skew_kl, "skew KL (DistiLLM), with `loss.skew`", {"skew": _SKEW}, aliases=("skl",)),
    "skew_reverse_kl": Loss(
        skew_reverse_kl, "skew reverse KL (DistiLLM), with `loss.skew`", {"skew": _SKEW}, aliases=("srkl",)
    ),
    "tvd": Loss(tvd, "total variation distance", aliases=("tv",)),
    # Not a user choice: the policy-gradient estimate is unbiased only on tokens the student sampled
    # itself, so it is the loss of on-policy steps in `sampled` mode (training.on_policy.mode), which
    # swap it in for those steps; on dataset rows it would train toward the wrong gradient.
    "sampled_reverse_kl": Loss(
        sampled_reverse_kl,
        "the policy-gradient estimate of reverse KL on the student's own sampled tokens, which on-policy "
        "steps use when `training.on_policy.mode` is `sampled`",
        needs_labels=True,
        user_choice=False,
    ),
}


def divergence_choices() -> tuple[str, ...]:
    """The names a config may give as ``loss.divergence``, in registry order."""
    return tuple(name for name, loss in LOSSES.items() if loss.user_choice)


def shared_params() -> dict[str, Param]:
    """Every parameter of a user-facing loss, once: the config's parameter fields."""
    params: dict[str, Param] = {}
    for name in divergence_choices():
        for key, param in LOSSES[name].params.items():
            if params.setdefault(key, param) is not param:
                raise AssertionError(f"two different parameters are both named {key!r}; share one Param")
    return params


def suggest(name: str) -> str | None:
    """The user-facing loss meant by an unknown ``name``: by alias first, then by spelling."""
    for key in divergence_choices():
        if name.lower() in LOSSES[key].aliases:
            return key
    close = difflib.get_close_matches(name, divergence_choices(), n=1, cutoff=0.5)
    return close[0] if close else None


def check_loss(name: str, params: dict[str, float] | None = None) -> tuple[Loss, dict[str, float]]:
    """The registered loss and its full keyword arguments (defaults filled in), or a `KdistillError`.

    Unknown names, unknown parameters and values out of range are caller mistakes: the message says
    which, and what is accepted.
    """
    if name not in LOSSES:
        hint = suggest(name)
        raise KdistillError(
            f"unknown divergence {name!r}"
            + (f"; did you mean {hint!r}?" if hint else f"; expected one of {', '.join(LOSSES)}")
        )
    loss, params = LOSSES[name], dict(params or {})
    unknown = sorted(set(params) - set(loss.params))
    if unknown:
        takes = f"it takes {list(loss.params)}" if loss.params else "it takes none"
        raise KdistillError(f"divergence {name!r} takes no parameter {unknown[0]!r}; {takes}")
    for key, param in loss.params.items():
        value = params.setdefault(key, param.default)
        refusal = param.refusal(value)
        if refusal:
            raise KdistillError(f"divergence {name!r}: {key} {refusal}, got {value}")
    return loss, params
