"""Turn rows of the known formats into (prompt messages, response) examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdistill.errors import KdistillError

# Columns that identify each format, checked in this order.
FORMAT_COLUMNS = {
    "chat": ("messages",),
    "dolly": ("instruction", "response"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


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
    """Convert rows; a row missing a required column is an error naming its index."""
    if not rows:
        raise KdistillError(f"{source}: the dataset is empty")
    convert = {"dolly": _dolly, "alpaca": _alpaca, "chat": _chat, "text": _text}[fmt]
    examples = []
    for index, row in enumerate(rows):
        missing = [c for c in FORMAT_COLUMNS[fmt] if row.get(c) is None]
        if missing:
            raise KdistillError(f"{source}: row {index} ({fmt} format) lacks {', '.join(missing)}")
        examples.append(convert(row, f"{source}: row {index}"))
    return examples


def _user_turn(instruction: str, context: str | None) -> list[dict[str, str]]:
    content = instruction.strip()
    if context and str(context).strip():
        content = f"{content}\n\n{str(context).strip()}"
    return [{"role": "user", "content": content}]


def _dolly(row: dict[str, Any], where: str) -> Example:
    return Example(_user_turn(str(row["instruction"]), row.get("context")), str(row["response"]))


def _alpaca(row: dict[str, Any], where: str) -> Example:
    return Example(_user_turn(str(row["instruction"]), row.get("input")), str(row["output"]))


def _chat(row: dict[str, Any], where: str) -> Example:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise KdistillError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise KdistillError(f"{where}: each message needs `role` and `content`, got {message!r}"[:300])
    if messages[-1]["role"] != "assistant":
        raise KdistillError(
            f"{where}: the last message must be the assistant's (it is the response to learn)"
        )
    prompt = [{"role": m["role"], "content": str(m["content"])} for m in messages[:-1]]
    return Example(prompt, str(messages[-1]["content"]))


def _text(row: dict[str, Any], where: str) -> Example:
    return Example([], str(row["text"]))
