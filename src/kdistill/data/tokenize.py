"""Templates, tokenization with prompt masking, and the padding collator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdistill.data.formats import Example

IGNORE_INDEX = -100  # label value that cross-entropy (and every kdistill loss) skips

PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt; the response's own ids elsewhere
    index: int = -1  # position in its split: how a teacher cache finds this row's tokens


def render(example: Example, tokenizer: Any) -> tuple[str, str]:
    """Prompt text and response text, through the chat template when the tokenizer has one."""
    if not example.prompt:
        return "", example.response + (tokenizer.eos_token or "")
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*example.prompt, {"role": "assistant", "content": example.response}], tokenize=False
        )
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
        return prompt, example.response + (tokenizer.eos_token or "")
    turns = "\n\n".join(m["content"] for m in example.prompt)
    return PLAIN_PROMPT.format(instruction=turns), example.response + (tokenizer.eos_token or "")


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
    """Pad a list of `Tokenized` on the right into `input_ids`, `attention_mask`, `labels` tensors."""

    pad_token_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, batch: list[Tokenized]) -> dict[str, torch.Tensor]:
        longest = max(len(item.input_ids) for item in batch)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item.input_ids)
            input_ids[row, :n] = torch.tensor(item.input_ids)
            labels[row, :n] = torch.tensor(item.labels)
            attention_mask[row, :n] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if all(item.index >= 0 for item in batch):
            out["row"] = torch.tensor([item.index for item in batch])
        return out
