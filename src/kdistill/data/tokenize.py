"""Templates, tokenization with prompt masking, and the padding collator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill.data.formats import Example
from kdistill.errors import KdistillError

IGNORE_INDEX = -100  # label value that cross-entropy (and every kdistill loss) skips


def trained_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask `(B, T-1)` of positions whose next token trains, and those targets `(N,)`."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt; the response's own ids elsewhere
    index: int = -1  # position in its split: how a teacher cache finds this row's tokens
    # Per teacher with another tokenizer (by name): its tokens and the aligned positions (`data.alignment`).
    views: dict[str, Any] | None = None


def render(example: Example, tokenizer: Any) -> tuple[str, str]:
    """Prompt text and response text, through the chat template when the tokenizer has one."""
    if not example.prompt:
        return "", example.response + (tokenizer.eos_token or "")
    if getattr(tokenizer, "chat_template", None):
        prompt = _chat_template(tokenizer, example.prompt, add_generation_prompt=True)
        full = _chat_template(
            tokenizer, [*example.prompt, {"role": "assistant", "content": example.response}]
        )
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
        return prompt, example.response + (tokenizer.eos_token or "")
    turns = "\n\n".join(m["content"] for m in example.prompt)
    return PLAIN_PROMPT.format(instruction=turns), example.response + (tokenizer.eos_token or "")


def _chat_template(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as err:  # jinja2's TemplateError from a template's raise_exception, or its own bugs
        roles, start = ", ".join(m["role"] for m in messages), messages[0]["content"][:60]
        raise KdistillError(
            f"the tokenizer's chat template refuses the conversation starting {start!r} "
            f"(roles {roles}): {(str(err).splitlines() or [type(err).__name__])[0][:200]}"
        ) from None


def prompt_text(prompt: list[dict[str, str]], tokenizer: Any) -> str:
    """The text a model is given to generate a response to `prompt`."""
    return render(Example(prompt, ""), tokenizer)[0]


def tokenize_examples(
    examples: list[Example], tokenizer: Any, max_length: int
) -> tuple[list[Tokenized], int]:
    """Tokenize and mask prompts; return the kept examples and how many had no response token left."""
    kept, dropped = [], 0
    # The chat template writes its own special tokens into the text; the plain template needs BOS added.
    add_special = not getattr(tokenizer, "chat_template", None)
    for example in examples:
        prompt, response = render(example, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"] if prompt else []
        response_ids = tokenizer(response, add_special_tokens=not prompt and add_special)["input_ids"]
        input_ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
        # A label at position 0 can never be predicted (nothing precedes it), so it does not count.
        if sum(label != IGNORE_INDEX for label in labels[1:]) == 0:
            dropped += 1
            continue
        kept.append(Tokenized(input_ids, labels))
    return kept, dropped


@dataclass
class Collator:
    """Pad a list of `Tokenized` on the right into `input_ids`, `attention_mask`, `labels` tensors.

    Rows with teacher views (teachers of another tokenizer) also give, per teacher NAME, that
    teacher's batch (`teacher/NAME/input_ids`, `.../attention_mask`, `.../labels`, the labels marking
    the compared positions) and the alignment, `align/NAME/student_pos` and `align/NAME/one_to_one`
    `(B, S)`: each row's compared student positions in the order of the teacher's marked ones,
    padded with -1 (and False).
    """

    pad_token_id: int
    pad_to_multiple_of: int = 8
    teacher_pads: dict[str, int] = field(default_factory=dict)  # pad id of each view's teacher

    def pad(self, batch: list[Tokenized], pad_token_id: int) -> dict[str, torch.Tensor]:
        longest = max(len(item.input_ids) for item in batch)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item.input_ids)
            input_ids[row, :n] = torch.tensor(item.input_ids)
            labels[row, :n] = torch.tensor(item.labels)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def __call__(self, batch: list[Tokenized]) -> dict[str, torch.Tensor]:
        out = self.pad(batch, self.pad_token_id)
        if all(item.index >= 0 for item in batch):
            out["row"] = torch.tensor([item.index for item in batch])
        for name in batch[0].views or {}:
            views = [item.views[name] for item in batch]
            teacher = self.pad([v.as_row(-1) for v in views], self.teacher_pads.get(name, 0))
            out.update({f"teacher/{name}/{k}": v for k, v in teacher.items()})
            # Per row, padded with -1: a batch cut into micro-batches by rows keeps its alignment.
            pairs = max(len(v.student_pos) for v in views)
            student_pos = torch.full((len(views), pairs), -1, dtype=torch.long)
            one_to_one = torch.zeros((len(views), pairs), dtype=torch.bool)
            for row, view in enumerate(views):
                student_pos[row, : len(view.student_pos)] = torch.tensor(view.student_pos, dtype=torch.long)
                one_to_one[row, : len(view.one_to_one)] = torch.tensor(view.one_to_one, dtype=torch.bool)
            out[f"align/{name}/student_pos"], out[f"align/{name}/one_to_one"] = student_pos, one_to_one
        return out
