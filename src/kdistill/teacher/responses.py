"""Sequence-level distillation (Kim & Rush 2016): the teacher writes the responses.

The teacher generates greedily, in batches, once; the responses are cached on disk under a
key made of the teacher's identity, the prompts and the generation settings, so a second run
(or a second epoch) reads them back instead of generating again. `load_data` builds a run's
tokenized splits, with the teacher's responses when the config asks for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from kdistill.config import RunConfig
from kdistill.data import DataSplits, Example, build_datasets
from kdistill.data.tokenize import prompt_text
from kdistill.errors import KdistillError
from kdistill.files import cache_root, write_atomic
from kdistill.models.build import teacher_source

log = logging.getLogger("kdistill")


def check_responses_teacher(cfg: RunConfig) -> None:
    """`data.responses: teacher` needs the first teacher to run as a model."""
    if cfg.data.responses == "teacher" and cfg.teacher.cache is not None:
        raise KdistillError(
            "data.responses: teacher needs a live teacher; give teacher.model without a cache"
        )


def load_data(
    cfg: RunConfig,
    tokenizer: Any,
    teacher: Any | None,
    cross: dict[str, Any] | None = None,
    ready: DataSplits | None = None,
) -> DataSplits:
    """The tokenized splits; with `data.responses: teacher` the (live) `teacher` writes the responses.

    `cross` names the teachers with another tokenizer (name -> tokenizer): rows get their views.
    `ready` is the same data with the dataset's responses, already built (by the checks before
    training): it is used as it is unless the teacher writes the responses.
    """
    respond = None
    if cfg.data.responses == "teacher":
        check_responses_teacher(cfg)

        def respond(examples: list[Example]) -> list[Example]:
            return with_teacher_responses(
                examples,
                teacher,
                tokenizer,
                teacher_id=teacher_source(cfg.teacher).identity,
                max_new_tokens=cfg.data.generation.max_new_tokens,
                batch_size=cfg.data.generation.batch_size,
            )

    if respond is None and ready is not None:
        data = ready
    else:
        data = build_datasets(cfg.data, tokenizer, cfg.training.seed, respond, cross)
    say = log.info if data.validation else log.warning  # an empty held-out split is said before training
    say("data: %s", data.describe())
    return data


def responses_key(teacher_id: str, examples: list[Example], max_new_tokens: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([teacher_id, max_new_tokens]).encode())
    for example in examples:
        digest.update(json.dumps(example.prompt, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def with_teacher_responses(
    examples: list[Example],
    model: Any,
    tokenizer: Any,
    *,
    teacher_id: str,
    max_new_tokens: int,
    batch_size: int,
) -> list[Example]:
    """Replace each example's response by the teacher's greedy generation (cached on disk)."""
    path = cache_root() / "responses" / f"{responses_key(teacher_id, examples, max_new_tokens)}.json"
    if path.is_file():
        texts = json.loads(path.read_text())
    else:
        try:  # before generating, which can take hours, not after
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise KdistillError(
                f"cannot create the cache folder {path.parent} ({err.strerror}); "
                "set KDISTILL_CACHE to a writable folder"
            ) from None
        texts = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size)
        write_atomic(path, json.dumps(texts))  # a crash never leaves a half-written cache
    return [replace(e, response=t) for e, t in zip(examples, texts)]


@torch.inference_mode()
def generate(
    model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy generations for chat prompts, batched with left padding."""
    texts = [prompt_text(p, tokenizer) for p in prompts]
    add_special = not getattr(tokenizer, "chat_template", None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    # Sorting by length keeps each batch's padding small; the order is restored at the end.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="teacher responses", unit="batch"):
        index = order[start : start + batch_size]
        encoded = [tokenizer(texts[i], add_special_tokens=add_special)["input_ids"] for i in index]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        for row, i in enumerate(index):
            outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return [outputs[i] for i in range(len(texts))]
