"""Read a run config from YAML or JSON, apply `--set a.b=c` overrides, validate it."""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kdistill.config.schema import RunConfig
from kdistill.errors import KdistillError
from kdistill.files import write_atomic

# The seed script of the KD guide behind configs/seed.yaml keeps everything in one flat dict; these are
# its keys and where they live here.
_FLAT_KEYS = {
    "teacher_model": ("teacher", "model"),
    "student_model": ("student", "model"),
    "dataset": ("data", "source"),
    "dataset_name": ("data", "source"),
    "max_length": ("data", "max_length"),
    "temperature": ("loss", "temperature"),
    "alpha": ("loss", "alpha"),
}
# Sections that a plain string stands for (`teacher: NAME`), and the key that string fills.
_SHORTHANDS = {"teacher": "model", "student": "model", "engine": "kind"}
_TRAINING_KEYS = set(RunConfig.model_fields["training"].annotation.model_fields) - {"temperature", "alpha"}


def load_config(path: str | Path | dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Load (a file, or a dict as a file would hold it), override and validate a run config; raise
    `KdistillError` naming every problem."""
    raw = copy.deepcopy(path) if isinstance(path, dict) else _read_file(Path(path))
    raw = _nest_flat_keys(raw)
    for item in overrides or []:
        _apply_override(raw, item)
    return validate_config(raw, source="config" if isinstance(path, dict) else str(path))


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(e) for e in err.errors()]
        raise KdistillError(f"{source}: invalid config\n" + "\n".join(f"  - {p}" for p in problems)) from None


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML, atomically."""
    path = Path(path)
    write_atomic(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KdistillError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # "-sig": a byte-order mark is allowed
    except UnicodeDecodeError:
        raise KdistillError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except OSError as err:
        raise KdistillError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise KdistillError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}"
        ) from None
    if not isinstance(data, dict):
        raise KdistillError(
            f"{path}: expected a mapping of sections (teacher, student, ...), got {type(data).__name__}"
        )
    return data


def _nest_flat_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Move the seed script's flat top-level keys into their sections."""
    nested = {k: v for k, v in raw.items() if k not in _FLAT_KEYS and k not in _TRAINING_KEYS}
    for key, value in raw.items():
        if key in _FLAT_KEYS:
            section, field = _FLAT_KEYS[key]
        elif key in _TRAINING_KEYS and key not in RunConfig.model_fields:
            section, field = "training", key
        else:
            continue
        target = nested.setdefault(section, {})
        if isinstance(target, str):  # `teacher: some/id` shorthand
            target = nested[section] = {"model": target}
        target[field] = value
    for section in ("teacher", "student"):
        if isinstance(nested.get(section), str):
            nested[section] = {"model": nested[section]}
    return nested


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise KdistillError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.learning_rate=1e-5")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise KdistillError(
            f"--set {item!r}: the value {text!r} is not valid YAML ({problem}); "
            f"quote it to give it as text, e.g. --set '{key}=\"{text}\"'"
        ) from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part in _SHORTHANDS:  # `teacher: NAME`, `engine: vllm`
            child = {_SHORTHANDS[part]: child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def _describe(error: dict[str, Any]) -> str:
    path, _ = _walk(error["loc"])
    loc = ".".join(path)
    if error["type"] == "extra_forbidden":
        return f"unknown key '{loc}'{_suggest(error['loc'])}"
    if error["type"] == "missing":
        return f"missing required key '{loc}'"
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):  # a section picked by its `kind`
        kinds = " or ".join(repr(t) for t in _kinds(error["loc"]))
        got = error.get("input", {}).get("kind") if isinstance(error.get("input"), dict) else None
        return f"{loc}.kind: expected {kinds}" + (f" (got {got!r})" if got is not None else "")
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "literal_error" and isinstance(value, str):
        choices = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        message += f"; did you mean '{close[0]}'?" if close else ""
    return f"{loc}: {message}{shown}" if loc else f"{message}"


def _suggest(loc: tuple[Any, ...]) -> str:
    """Nearest valid key name for an unknown key, found by walking the schema along `loc`."""
    _, model = _walk(loc[:-1])
    if model is None:
        return ""
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{close[0]}'?"
    kinds = [_tag(m) for m in _variants(loc[:-2]) if str(loc[-1]) in m.model_fields] if _tag(model) else []
    if kinds:  # a key of another variant of a section picked by its `kind`
        return f"; it is a key of kind '{kinds[0]}' (this one is kind '{_tag(model)}')"
    return f"; valid keys: {', '.join(names)}"


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """The key path of `loc` without the tags pydantic adds inside a section picked by its `kind`
    (`engine.vllm.sync_steps` is the key `engine.sync_steps`), and the model the path ends in."""
    path: list[str] = []
    model: type[BaseModel] | None = RunConfig
    variants: dict[str, type[BaseModel]] = {}
    for part in map(str, loc):
        if part in variants:  # the tag of the variant pydantic picked
            model, variants = variants[part], {}
            continue
        path.append(part)
        field = model.model_fields.get(part) if model else None
        annotation = getattr(field, "annotation", None)
        variants = {_tag(m): m for m in _models_of(annotation) if _tag(m)}
        model = _model_of(annotation)
    return path, model


def _kinds(loc: tuple[Any, ...]) -> list[str]:
    """The `kind`s the section at `loc` accepts."""
    return [t for t in map(_tag, _variants(loc)) if t]


def _variants(loc: tuple[Any, ...]) -> list[type[BaseModel]]:
    """The models the section at `loc` may be (one, or each variant of a union)."""
    _, parent = _walk(loc[:-1])
    field = parent.model_fields.get(str(loc[-1])) if parent and loc else None
    return _models_of(getattr(field, "annotation", None))


def _tag(model: type[BaseModel]) -> str | None:
    kind = model.model_fields.get("kind")
    return kind.default if kind is not None and isinstance(kind.default, str) else None


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_of(arg)]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    models = _models_of(annotation)
    return models[0] if models else None
