"""The `loss` section is built from the loss registry: its choices, its parameter fields and their ranges."""

from __future__ import annotations

import importlib

import pytest

from kdistill.config import LossConfig, validate_config
from kdistill.errors import KdistillError
from kdistill.losses import LOSSES, Loss, Param
from kdistill.losses.divergences import forward_kl
from kdistill.losses.registry import divergence_choices, shared_params
from kdistill.objective.settings import loss_settings

BASE = {"teacher": {"model": "t"}, "student": {"model": "s"}}


def _error(loss: dict) -> str:
    with pytest.raises(KdistillError) as info:
        validate_config({**BASE, "loss": loss}, source="run.yaml")
    return str(info.value)


@pytest.mark.parametrize("name", divergence_choices())
def test_every_user_facing_name_is_accepted(name: str) -> None:
    assert validate_config({**BASE, "loss": {"divergence": name}}).loss.divergence == name


@pytest.mark.parametrize("name", ["kl", "KL", "forward-kl", "sampled_reverse_kl", "", "ForwardKL"])
def test_every_other_name_is_refused_with_one_message(name: str) -> None:
    message = _error({"divergence": name})
    assert message.count("\n  - ") == 1 and "  - loss.divergence: " in message


def test_the_schema_offers_exactly_the_registered_choices() -> None:
    schema = LossConfig.model_json_schema()["properties"]["divergence"]
    assert tuple(schema["enum"]) == divergence_choices()
    assert [n for n in LOSSES if n not in divergence_choices()] == ["sampled_reverse_kl"]


def test_the_policy_loss_says_why_it_is_no_choice() -> None:
    assert "'sampled_reverse_kl' is not a user choice: it is the policy-gradient estimate" in _error(
        {"divergence": "sampled_reverse_kl"}
    )


def _edges(param: Param) -> list[tuple[float, bool]]:
    """Values at and just beyond both ends of the range, each with whether it is allowed."""
    return [
        (param.low, not param.low_open),
        (param.high, not param.high_open),
        (param.low - 0.01, False),
        (param.high + 0.01, False),
        ((param.low + param.high) / 2, True),
    ]


@pytest.mark.parametrize(("name", "param"), list(shared_params().items()))
def test_each_registered_range_is_enforced_when_the_config_loads(name: str, param: Param) -> None:
    assert getattr(LossConfig(), name) == param.default
    for value, allowed in _edges(param):
        if allowed:
            assert getattr(validate_config({**BASE, "loss": {name: value}}).loss, name) == value
        else:
            expected = f"  - loss.{name}: must be in {param.interval()} (got {value})"
            assert _error({name: value}).endswith(expected)


def test_skew_one_is_refused_when_the_config_loads() -> None:
    assert _error({"divergence": "skew_kl", "skew": 1}) == (
        "run.yaml: invalid config\n  - loss.skew: must be in [0, 1) (got 1)"
    )


@pytest.mark.parametrize("name", divergence_choices())
def test_settings_carry_exactly_the_divergences_parameters(name: str) -> None:
    cfg = validate_config({**BASE, "loss": {"divergence": name, "beta": 0.25, "skew": 0.3}})
    values = {"beta": 0.25, "skew": 0.3}
    assert loss_settings(cfg, None).divergence_kwargs == {k: values[k] for k in LOSSES[name].params}


def test_a_registered_divergence_becomes_a_choice_with_its_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdistill.config.loss as module

    entry = Loss(forward_kl, "a test entry", {"gamma": Param(2.0, 0.0, 5.0, "Test.", low_open=True)})
    saved = dict(vars(module))  # the classes the rest of the package already holds
    try:
        monkeypatch.setitem(LOSSES, "gamma_kl", entry)
        rebuilt = importlib.reload(module).LossConfig
        assert rebuilt(divergence="gamma_kl").gamma == 2.0
        assert "gamma" not in LossConfig.model_fields
        with pytest.raises(ValueError, match=r"must be in \(0, 5\]"):
            rebuilt(divergence="gamma_kl", gamma=0)
    finally:
        vars(module).update(saved)
