"""Turn rows of the known formats into (prompt messages, response) examples."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kdistill.data.sources import where
from kdistill.errors import KdistillError

# Columns that identify each format, checked in this order.
FORMAT_COLUMNS = {
    "chat": ("messages",),
    "dolly": ("instruction", "response"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}

CHAT_ROLES = ("system", "user", "assistant")  # what every chat template renders


@dataclass(frozen=True)
class Example:
    """One training example: the conversation so far and the response to learn.

    `prompt` is a list of chat messages (`{"role", "content"}`); it is empty for plain text,
    where the whole text is the response.
    """

    prompt: list[dict[str, str]]
    response: str


def detect_format(rows: list[dict[str, Any]], source: str) -> str:
    if not rows:
        raise KdistillError(f"{source}: the dataset is empty")
    columns = set(rows[0])
    for name, needed in FORMAT_COLUMNS.items():
        if set(needed) <= columns:
            return name
    known = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMAT_COLUMNS.items())
    raise KdistillError(
        f"{source}: none of the known column sets found. Columns: {sorted(columns)}. Expected {known}"
    )


def to_examples(rows: list[dict[str, Any]], fmt: str, source: str) -> list[Example]:
    """Convert rows; a row missing a required column is an error naming its line (JSONL) or 1-based row."""
    if not rows:
        raise KdistillError(f"{source}: the dataset is empty")
    convert = {"dolly": _dolly, "alpaca": _alpaca, "chat": _chat, "text": _text}[fmt]
    examples = []
    for index, row in enumerate(rows):
        missing = [c for c in FORMAT_COLUMNS[fmt] if row.get(c) is None]
        if missing:
            raise KdistillError(f"{where(source, rows, index)} ({fmt} format) lacks {', '.join(missing)}")
        examples.append(convert(row, where(source, rows, index)))
    return examples


def _user_turn(instruction: str, context: str | None) -> list[dict[str, str]]:
    content = instruction.strip()
    if context and str(context).strip():
        content = f"{content}\n\n{str(context).strip()}"
    return [{"role": "user", "content": content}]


def _text_of(row: dict[str, Any], column: str, where: str) -> str:
    """A text column's value. A number is its decimal text, OpenAI-style content parts
    (`[{"type": "text", "text": ...}]`) are their texts joined, and any other structure is refused:
    its Python repr must never be trained on."""
    value = row.get(column)
    if value is None or isinstance(value, str):
        return "" if value is None else value
    if isinstance(value, int | float):
        return str(value)
    parts = value if isinstance(value, list) else []
    if parts and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts
    ):
        return "".join(p["text"] for p in parts)
    shown = json.dumps(value, default=str)[:80]
    raise KdistillError(f"{where}: column `{column}` holds a {type(value).__name__} ({shown}); expected text")


def _dolly(row: dict[str, Any], where: str) -> Example:
    prompt = _user_turn(_text_of(row, "instruction", where), _text_of(row, "context", where))
    return Example(prompt, _text_of(row, "response", where))


def _alpaca(row: dict[str, Any], where: str) -> Example:
    prompt = _user_turn(_text_of(row, "instruction", where), _text_of(row, "input", where))
    return Example(prompt, _text_of(row, "output", where))


def _chat(row: dict[str, Any], where: str) -> Example:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise KdistillError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise KdistillError(f"{where}: each message needs `role` and `content`, got {message!r}"[:300])
        if message["role"] not in CHAT_ROLES:
            role, roles = message["role"], ", ".join(CHAT_ROLES)
            raise KdistillError(f"{where}, message {i + 1}: role {role!r} is not one of {roles}"[:300])
    if messages[-1]["role"] != "assistant":
        raise KdistillError(
            f"{where}: the last message must be the assistant's (it is the response to learn)"
        )
    prompt = [
        {"role": m["role"], "content": _text_of(m, "content", f"{where}, message {i + 1}")}
        for i, m in enumerate(messages[:-1])
    ]
    return Example(prompt, _text_of(messages[-1], "content", f"{where}, last message"))


def _text(row: dict[str, Any], where: str) -> Example:
    return Example([], _text_of(row, "text", where))
