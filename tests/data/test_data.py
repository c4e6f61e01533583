"""Sources, formats, templates, prompt masking, truncation and the collator."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import SHARED_DATA
from kdistill.config import DataConfig
from kdistill.data import IGNORE_INDEX, Collator, build_datasets, load_examples
from kdistill.data.formats import Example
from kdistill.data.sources import load_rows
from kdistill.data.tokenize import PLAIN_PROMPT, render, tokenize_examples
from kdistill.errors import KdistillError


@pytest.fixture(scope="module")
def tokenizer(tiny: dict[str, Path]):
    return AutoTokenizer.from_pretrained(tiny["teacher"])


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("row", "fmt", "user", "response"),
    [
        (
            {"instruction": "Name a fruit.", "context": "", "response": "Pear.", "category": "open_qa"},
            "dolly",
            "Name a fruit.",
            "Pear.",
        ),
        (
            {"instruction": "Summarise.", "context": "Rivers flow.", "response": "Water moves."},
            "dolly",
            "Summarise.\n\nRivers flow.",
            "Water moves.",
        ),
        ({"instruction": "Name a fruit.", "response": "Apple."}, "dolly", "Name a fruit.", "Apple."),
        ({"instruction": "Add.", "input": "1 and 2", "output": "3"}, "alpaca", "Add.\n\n1 and 2", "3"),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            "chat",
            "Hi",
            "Hello",
        ),
    ],
)
def test_formats_are_detected_and_converted(
    tmp_path: Path, row: dict, fmt: str, user: str, response: str
) -> None:
    examples, found = load_examples(str(_jsonl(tmp_path / "d.jsonl", [row])))
    assert found == fmt
    assert examples[0].prompt[-1] == {"role": "user", "content": user} and examples[0].response == response


def test_plain_text_trains_on_everything(tmp_path: Path) -> None:
    examples, fmt = load_examples(str(_jsonl(tmp_path / "t.jsonl", [{"text": "the sun"}])))
    assert fmt == "text" and examples == [Example([], "the sun")]


def test_unknown_columns_are_listed(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        KdistillError,
        match=r"odd.jsonl: none of the known column sets found. "
        r"Columns: \['answer', 'question'\]",
    ):
        load_examples(str(path))


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": "c", "response": \n')
    with pytest.raises(KdistillError, match=r"bad.jsonl:3: malformed JSON line"):
        load_rows(str(path))


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(KdistillError, match="empty.jsonl: the dataset is empty"):
        load_examples(str(tmp_path / "empty.jsonl"))
    with pytest.raises(KdistillError, match="data file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_missing_column_in_a_later_row(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "c"}])
    with pytest.raises(KdistillError, match=r"d.jsonl:2 \(dolly format\) lacks response"):
        load_examples(str(path))


def test_json_csv_and_parquet_sources(tmp_path: Path) -> None:
    rows = [{"instruction": "Name a fruit.", "input": "", "output": "Apple."}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with open(tmp_path / "a.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.json", "a.csv", "a.parquet"):
        examples, fmt = load_examples(str(tmp_path / name))
        assert fmt == "alpaca" and examples[0].response == "Apple."


def test_builtin_quickstart_set() -> None:
    examples, fmt = load_examples("builtin:quickstart")
    assert fmt == "dolly" and len(examples) >= 200
    assert all(e.response.strip() for e in examples)
    assert len({e.prompt[0]["content"] for e in examples}) == len(examples)


def test_chat_template_masks_the_prompt(tokenizer) -> None:
    example = Example([{"role": "user", "content": "name three fruits"}], "apple pear")
    prompt, response = render(example, tokenizer)
    assert prompt == "<|user|>name three fruits</s><|assistant|>" and response == "apple pear</s>"
    (item,), dropped = tokenize_examples([example], tokenizer, max_length=64)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert dropped == 0 and item.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert item.labels[n_prompt:] == item.input_ids[n_prompt:]
    assert tokenizer.decode(item.input_ids[n_prompt:]) == "apple pear</s>"


def test_plain_template_without_chat_template(tiny: dict[str, Path]) -> None:
    plain = AutoTokenizer.from_pretrained(tiny["teacher"])
    plain.chat_template = None
    prompt, response = render(Example([{"role": "user", "content": "name a fruit"}], "pear"), plain)
    assert prompt == PLAIN_PROMPT.format(instruction="name a fruit") and response == "pear</s>"


def test_truncation_and_dropped_rows(tokenizer) -> None:
    long_prompt = Example([{"role": "user", "content": "the sun " * 40}], "moon")
    short = Example([{"role": "user", "content": "sun"}], "the moon and the river " * 10)
    kept, dropped = tokenize_examples([long_prompt, short], tokenizer, max_length=16)
    assert dropped == 1 and len(kept) == 1 and len(kept[0].input_ids) == 16


def test_collator_pads_and_masks(tokenizer) -> None:
    examples = [
        Example([{"role": "user", "content": "sun"}], "moon"),
        Example([{"role": "user", "content": "the red apple"}], "a green pear and a blue car"),
    ]
    items, _ = tokenize_examples(examples, tokenizer, max_length=64)
    batch = Collator(tokenizer.pad_token_id, pad_to_multiple_of=8)(items)
    assert batch["input_ids"].shape[1] % 8 == 0
    n0 = len(items[0].input_ids)
    assert batch["attention_mask"][0].sum() == n0 and (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n0:] == tokenizer.pad_token_id).all()


def test_validation_split(tiny: dict[str, Path], tokenizer) -> None:
    splits = build_datasets(DataConfig(source=str(tiny["data"]), validation_size=0.25), tokenizer, seed=0)
    assert (len(splits.train), len(splits.validation)) == (36, 12)
    again = build_datasets(DataConfig(source=str(tiny["data"]), validation_size=12), tokenizer, seed=0)
    assert [x.input_ids for x in again.validation] == [x.input_ids for x in splits.validation]
    with pytest.raises(KdistillError, match="leaves no training rows"):
        build_datasets(DataConfig(source=str(tiny["data"]), validation_size=48), tokenizer, seed=0)


def test_every_row_too_long_is_an_error(tiny: dict[str, Path], tokenizer) -> None:
    with pytest.raises(
        KdistillError, match="no training row has a response token left within data.max_length=4"
    ):
        build_datasets(DataConfig(source=str(tiny["data"]), max_length=4), tokenizer, seed=0)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize(
    ("name", "fmt", "count"),
    [
        ("instruct/dolly-train.jsonl", "dolly", 5600),
        ("instruct/dolly-validation.jsonl", "dolly", 400),
        ("instruct/alpaca-demo.json", "alpaca", 999),
    ],
)
def test_real_instruction_files(name: str, fmt: str, count: int) -> None:
    examples, found = load_examples(str(SHARED_DATA / name))
    assert found == fmt and len(examples) == count
    assert all(e.response for e in examples[:50]) and examples[0].prompt[0]["role"] == "user"


def test_structured_text_fields_are_joined_or_refused(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]
    chat = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Hi!"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(chat) + "\n")
    examples, _ = load_examples(str(path))
    assert examples[0].prompt == [{"role": "user", "content": "Say hi."}]  # content parts joined
    path = tmp_path / "dolly.jsonl"
    rows = [{"instruction": "Add.", "response": 4}, {"instruction": {"text": "Add."}, "response": "4"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(KdistillError) as info:
        load_examples(str(path))
    assert str(info.value) == (
        f'{path}:2: column `instruction` holds a dict ({{"text": "Add."}}); expected text'
    )


def test_a_byte_order_mark_is_valid_in_every_text_format(tmp_path: Path) -> None:
    rows = [{"instruction": "Name a fruit.", "input": "", "output": "Apple."}] * 2
    bom = "\ufeff"
    (tmp_path / "a.jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "a.json").write_text(bom + json.dumps(rows), encoding="utf-8")
    (tmp_path / "a.csv").write_text(
        bom + "instruction,input,output\nName a fruit.,,Apple.\n", encoding="utf-8"
    )
    for name in ("a.jsonl", "a.json", "a.csv"):
        examples, fmt = load_examples(str(tmp_path / name))
        assert fmt == "alpaca" and examples[0].prompt[0]["content"] == "Name a fruit.", name


def test_empty_responses_are_dropped_and_counted_per_split(tiny: dict[str, Path], tokenizer) -> None:
    rows = [{"instruction": f"say {i}", "response": "an answer"} for i in range(10)]
    for i in (1, 4):
        rows[i]["response"] = " \n\t"  # would train on the end-of-turn token alone
    rows[7]["response"] = ""
    path = _jsonl(tiny["root"] / "empty.jsonl", rows)
    long_prompt = _jsonl(tiny["root"] / "held.jsonl", [{"instruction": "a " * 80, "response": "x"}, rows[1]])
    cfg = DataConfig(source=str(path), validation_source=str(long_prompt), max_length=32)
    data = build_datasets(cfg, tokenizer, seed=0)
    assert (len(data.train), data.dropped_train.empty, data.dropped_train.length) == (7, 3, 0)
    assert (len(data.validation), data.dropped_validation.empty, data.dropped_validation.length) == (0, 1, 1)
    assert data.describe() == (
        "7 training rows (3 dropped: 3 with an empty response), 0 validation rows (2 dropped: 1 with an "
        "empty response, 1 with no response token within data.max_length), format dolly; every validation "
        "row was dropped, so there will be no held-out metrics (eval/...)"
    )


def test_chat_roles_other_than_system_user_assistant_are_refused(tmp_path: Path) -> None:
    good = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    good["messages"].append({"role": "assistant", "content": "Hello"})
    odd = {"messages": [{"role": "user", "content": "Hi"}, {"role": "function", "content": "{}"}]}
    odd["messages"].append({"role": "assistant", "content": "Hello"})
    path = _jsonl(tmp_path / "chat.jsonl", [good, odd])
    with pytest.raises(KdistillError) as err:
        load_examples(str(path))
    assert str(err.value) == f"{path}:2, message 2: role 'function' is not one of system, user, assistant"


def test_a_chat_template_that_refuses_a_conversation_is_named(tiny: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    system = Example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "Hello")
    with pytest.raises(KdistillError) as err:
        tokenize_examples([system], tokenizer, max_length=64)
    assert str(err.value) == (
        "the tokenizer's chat template refuses the conversation starting 'Be brief.' (roles system, user): "
        "System role not supported"
    )


def test_a_csv_field_longer_than_the_csv_module_default_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("instruction,output\nSummarise.," + "word " * 40_000 + "\n")  # 200 KB, past 128 KiB
    assert len(load_rows(str(path))[0]["output"]) == 200_000
