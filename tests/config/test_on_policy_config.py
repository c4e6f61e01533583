"""`training.on_policy.engine` (config/on_policy.py): a section pydantic picks by its `kind`, with the
shorthand `engine: hf` / `engine: vllm` and `--set` reaching into it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdistill.config import load_config
from kdistill.config.on_policy import HfConfig, OnPolicyConfig, VllmConfig
from kdistill.errors import KdistillError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("engine", "kind"),
    [
        (None, HfConfig),
        ("hf", HfConfig),
        ("vllm", VllmConfig),
        ({"kind": "vllm", "sync_steps": 2}, VllmConfig),
    ],
)
def test_engine_is_picked_by_its_kind(engine: object, kind: type) -> None:
    given = {} if engine is None else {"engine": engine}
    o = OnPolicyConfig.model_validate({"lmbda": 0.5, **given})
    assert type(o.engine) is kind
    assert OnPolicyConfig.model_validate(o.model_dump(mode="json")) == o  # the resolved config reads back


def test_set_reaches_into_the_engine_and_keeps_its_kind(tmp_path: Path) -> None:
    sets = [
        "training.on_policy.lmbda=1",
        "training.on_policy.engine=vllm",
        "training.on_policy.engine.memory=0.3",
    ]
    e = load_config(ROOT / "configs" / "on-policy.yaml", sets).training.on_policy.engine
    assert (e.kind, e.memory, e.sync_steps) == ("vllm", 0.3, 1)


def test_a_key_of_the_other_kind_is_named(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "configs" / "on-policy.yaml").read_text())
    raw["training"]["on_policy"]["engine"] = {"kind": "hf", "overlap": True}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(KdistillError) as err:
        load_config(path)
    assert (
        "unknown key 'training.on_policy.engine.overlap'; it is a key of kind 'vllm' (this one is kind 'hf')"
        in str(err.value)
    )
