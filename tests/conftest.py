"""Tiny random models and data, built from configs: nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

WORDS = (
    "the a of to and in is it for on with as was at by an be this from or are which not have one had "
    "but all were when we there can your more if out so what up about who how why where name list write "
    "give three fruits water sun moon river city book music red blue green apple pear car dog cat"
).split()


def _build_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def _build_model(
    folder: Path, vocab: int, layers: int, seed: int, init_range: float = 0.02, hidden: int = 64
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=init_range,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def dolly_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        instruction = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        response = " ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(4, 12)))
        row = {"instruction": f"{instruction} {i}", "response": response}
        if i % 3 == 0:
            row["context"] = " ".join(rng.choice(WORDS) for _ in range(5))
            row["category"] = "closed_qa"
        rows.append(row)
    return rows


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-layer teacher, a 2-layer student of the same tokenizer, and 48 Dolly-style rows."""
    root = tmp_path_factory.mktemp("tiny")
    teacher, student = root / "teacher", root / "student"
    _build_tokenizer(teacher)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(teacher))
    # A wider initialisation gives the teacher peaked, non-uniform next-token distributions.
    _build_model(teacher, vocab, layers=4, seed=0, init_range=0.2)
    _build_tokenizer(student)
    _build_model(student, vocab, layers=2, seed=1)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in dolly_rows(48)))
    return {"root": root, "teacher": teacher, "student": student, "data": data}


@pytest.fixture(scope="session")
def _converted_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's GGUF conversions: a real teacher is converted once (about 40 s), not in every test."""
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, _converted_models: Path
) -> None:
    # Keep converted models and generated responses out of the user's cache (and out of the test's
    # tmp_path, which tests look into). Each test has its own responses; the conversions, keyed by the
    # GGUF file's path, size and time, are the session's.
    if "KDISTILL_TEST_KEEP_CACHE" not in os.environ:
        cache = kdistill_cache(tmp_path_factory.mktemp("kdistill-cache"), _converted_models)
        monkeypatch.setenv("KDISTILL_CACHE", str(cache))


def kdistill_cache(folder: Path, converted: Path) -> Path:
    """A kdistill cache folder (`KDISTILL_CACHE`) of its own that shares the session's conversions."""
    folder.mkdir(exist_ok=True)
    (folder / "gguf").symlink_to(converted)
    return folder


def tiny_config(tiny: dict[str, Path], out: Path, **sections: dict) -> dict:
    """A run config on the tiny models; keyword sections are merged over the defaults."""
    config = {
        "teacher": {"model": str(tiny["teacher"])},
        "student": {"from_teacher": {"num_layers": 2}, "finetune": "full"},
        "data": {"source": str(tiny["data"]), "max_length": 64, "validation_size": 8},
        "loss": {"temperature": 2.0, "alpha": 0.5, "chunk_size": 16},
        "training": {"num_epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "seed": 0},
        "output_dir": str(out),
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def write_config(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path
