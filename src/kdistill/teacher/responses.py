"""Sequence-level distillation (Kim & Rush 2016): the teacher writes the responses.

The teacher generates greedily, in batches, once; the responses are cached on disk under a
key made of the teacher's identity, the prompts and the generation settings, so a second run
(or a second epoch) reads them back instead of generating again. While they are generated, each
batch is appended to a partial file beside the cache file, so a run stopped by Ctrl-C or a crash
keeps them, and the next run generates only the rest. `load_data` builds a run's tokenized
splits, with the teacher's responses when the config asks for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kdistill.config import RunConfig
from kdistill.data import DataSplits, Example, build_datasets
from kdistill.data.tokenize import prompt_text
from kdistill.errors import KdistillError, ResumableInterrupt
from kdistill.files import cache_root, write_atomic
from kdistill.models.build import teacher_source
from kdistill.models.compact import expanded_weights

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
                label=f"teacher responses: {cfg.teacher.model}",
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
    label: str = "teacher responses",
) -> list[Example]:
    """Replace each example's response by the teacher's greedy generation (cached on disk).

    `label` names the progress bar. Responses generated before an interruption are kept in
    `KEY.partial.jsonl` beside the cache file `KEY.json`, which is written once all are there.
    """
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
        partial = path.with_suffix(".partial.jsonl")
        prompts = [e.prompt for e in examples]
        texts = generate_kept(model, tokenizer, prompts, partial, max_new_tokens, batch_size, label)
        write_atomic(path, json.dumps(texts))  # a crash never leaves a half-written cache
        partial.unlink(missing_ok=True)
    return [replace(e, response=t) for e, t in zip(examples, texts)]


def generate_kept(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    partial: Path,
    max_new_tokens: int,
    batch_size: int,
    label: str,
) -> list[str]:
    """`generate`, keeping each batch in `partial` as it comes and skipping the prompts already there.

    Each batch is one JSON line `[[index, text], ...]`, flushed to disk before the next batch starts.
    Ctrl-C raises `ResumableInterrupt`, saying how many responses were kept.
    """
    done = read_partial(partial, len(prompts))
    if done:
        log.info(
            "%s: %d of %d kept from an interrupted run (%s); generating the other %d",
            label, len(done), len(prompts), partial, len(prompts) - len(done),
        )  # fmt: skip
        # Rewritten without a line cut by a crash, so that the lines appended next start afresh.
        write_atomic(partial, "".join(json.dumps([[i, t]]) + "\n" for i, t in done.items()))
    rest = [i for i in range(len(prompts)) if i not in done]
    bar = tqdm(total=len(prompts), initial=len(done), desc=label, unit="response")
    try:
        with bar, partial.open("a") as handle:
            batches = generate_batches(
                model, tokenizer, [prompts[i] for i in rest], max_new_tokens, batch_size
            )
            for index, texts in batches:
                batch = [[rest[j], text] for j, text in zip(index, texts)]
                handle.write(json.dumps(batch) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                done.update(batch)
                bar.update(len(batch))
    except KeyboardInterrupt:
        raise ResumableInterrupt(
            f"{label}: interrupted after {len(done)} of {len(prompts)}; they are kept in {partial}, "
            "and the next run generates only the rest"
        ) from None
    return [done[i] for i in range(len(prompts))]


def read_partial(path: Path, count: int) -> dict[int, str]:
    """The responses a partial file holds, by prompt index; a line cut by a crash is skipped."""
    if not path.is_file():
        return {}
    found: dict[int, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            pairs = json.loads(line)
            batch = {int(i): str(t) for i, t in pairs if 0 <= int(i) < count}
        except (ValueError, TypeError):
            continue
        found.update(batch)
    return found


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    label: str = "teacher responses",
) -> list[str]:
    """Greedy generations for chat prompts, in their order, with a progress bar named `label`."""
    outputs: dict[int, str] = {}
    with tqdm(total=len(prompts), desc=label, unit="response") as bar:
        for index, texts in generate_batches(model, tokenizer, prompts, max_new_tokens, batch_size):
            outputs.update(zip(index, texts))
            bar.update(len(index))
    return [outputs[i] for i in range(len(prompts))]


@torch.inference_mode()
def generate_batches(
    model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int
) -> Iterator[tuple[list[int], list[str]]]:
    """Greedy generations for chat prompts, batched with left padding: `(indices, texts)` per batch.

    Shortest prompts first, which keeps each batch's padding small; `indices` are into `prompts`.
    """
    texts = [prompt_text(p, tokenizer) for p in prompts]
    add_special = not getattr(tokenizer, "chat_template", None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        encoded = [tokenizer(texts[i], add_special_tokens=add_special)["input_ids"] for i in index]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        with expanded_weights(model):  # a compact teacher expands once a batch, not once a token
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        yield index, [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in generated]
