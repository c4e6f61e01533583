"""Benchmark task readers on the real files of ../shared/data/eval, their lm-eval prompts, and bad input."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from kdistill.errors import KdistillError
from kdistill.eval.tasks import (
    TASK_NAMES,
    read_hellaswag,
    read_mmlu,
    read_multiple_choice,
    read_winogrande,
    task_configs,
)

EVAL = SHARED_DATA / "eval"
needs_data = pytest.mark.skipif(not EVAL.is_dir(), reason=f"benchmark data not found at {EVAL}")


@needs_data
@pytest.mark.parametrize(
    ("file", "rows", "choices"),
    [
        ("arc_easy.jsonl", 2376, 4),
        ("piqa.jsonl", 1838, 2),
        ("commonsense_qa.jsonl", 1221, 4),
        ("boolq.jsonl", 3270, 2),
        ("openbook_qa.jsonl", 500, 4),
        ("copa.jsonl", 100, 2),
    ],
)
def test_multiple_choice_files(file: str, rows: int, choices: int) -> None:
    read = read_multiple_choice(EVAL / file)
    assert len(read) == rows and all(len(r["choices"]) == choices for r in read[:50])
    first = json.loads((EVAL / file).open().readline())
    assert read[0] == {"query": first["query"], "choices": first["choices"], "gold": first["gold"]}


@needs_data
def test_known_rows_of_arc_copa_and_winogrande() -> None:
    arc = read_multiple_choice(EVAL / "arc_easy.jsonl")[0]
    assert arc["query"].startswith("Question: Which statement best explains why photosynthesis")
    assert arc["choices"][arc["gold"]] == "Sunlight is the source of energy for nearly all ecosystems."
    copa = read_multiple_choice(EVAL / "copa.jsonl")[0]
    assert copa["choices"][copa["gold"]] == "water flowed from the spout."
    wino = read_winogrande(EVAL / "winogrande.jsonl")
    assert len(wino) == 1267
    assert wino[0] == {
        "context_options": [
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ],
        "continuation": "always got the easier cases.",
        "gold": 1,
    }


@needs_data
def test_hellaswag_six_line_tasks() -> None:
    rows = read_hellaswag(EVAL / "hellaswag_val.txt.bz2")
    assert len(rows) == 10042
    assert rows[0]["query"] == "Roof shingle removal: A man is sitting on a roof. he"
    assert rows[0]["gold"] == 3 and rows[0]["choices"][3] == "starts pulling up roofing on a roof."
    assert all(len(r["choices"]) == 4 and "[" not in r["query"] for r in rows[:500])


@needs_data
def test_mmlu_subjects_interleaved() -> None:
    test, dev = read_mmlu(EVAL / "mmlu", "test"), read_mmlu(EVAL / "mmlu", "dev")
    assert len(test) == 14042 and len(dev) == 285
    assert [r["subject"] for r in test[:3]] == ["abstract algebra", "anatomy", "astronomy"]
    assert len({r["subject"] for r in test[:57]}) == 57  # --limit 57 sees every subject once
    assert test[0]["question"].startswith("Find the degree for the given field extension")
    assert test[0]["choices"] == ["0", "4", "2", "6"] and test[0]["gold"] == 1


@needs_data
def test_lm_eval_builds_the_prompts_of_its_own_tasks() -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'kdistill[eval]')")
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_defaults=False).load(task_configs(list(TASK_NAMES), EVAL))
    first = {}
    for name, task in loaded["tasks"].items():
        task.build_all_requests(limit=1, rank=0, world_size=1)
        first[name.removeprefix("kdistill_")] = [i.arguments for i in task.instances]
    assert first["arc_easy"][0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
        "\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
    )
    assert (
        first["piqa"][0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    # Winogrande scores one continuation under each context (partial scoring).
    assert [a[0][-5:] for a in first["winogrande"]] == ["Sarah", "Maria"]
    assert {a[1] for a in first["winogrande"]} == {" always got the easier cases."}
    assert first["hellaswag"][3] == (
        "Roof shingle removal: A man is sitting on a roof. he",
        " starts pulling up roofing on a roof.",
    )
    mmlu = first["mmlu"][0][0]
    assert mmlu.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra."
    )
    assert mmlu.endswith("\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert [a[1] for a in first["mmlu"]] == [" A", " B", " C", " D"]
    assert len(first["boolq"]) == 2 and first["boolq"][1][1] == " yes"


def test_bad_rows_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "arc_easy.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 1}\n{"query": "q", "choices": ["a"]}\n')
    with pytest.raises(KdistillError, match=r"arc_easy.jsonl:2: key 'gold' is missing; expected int"):
        read_multiple_choice(path)
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(KdistillError, match=r":1: gold 2 is not an index of the 2 choices"):
        read_multiple_choice(path)
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\nnot json\n')
    with pytest.raises(KdistillError, match=r":2: not valid JSON"):
        read_multiple_choice(path)
    wino = tmp_path / "winogrande.jsonl"
    wino.write_text('{"context_options": ["a", "b"], "continuation": 3, "gold": 0}\n')
    with pytest.raises(KdistillError, match=r"winogrande.jsonl:1: key 'continuation' is int 3; expected str"):
        read_winogrande(wino)


def test_bad_hellaswag_and_mmlu(tmp_path: Path) -> None:
    path = tmp_path / "hellaswag_val.txt.bz2"
    path.write_bytes(bz2.compress(b"ctx\n3\na\nb\nc\n"))
    with pytest.raises(KdistillError, match="5 lines; expected 6 a task"):
        read_hellaswag(path)
    path.write_bytes(bz2.compress(b"ctx\nx\na\nb\nc\nd\n"))
    with pytest.raises(KdistillError, match=r"hellaswag_val.txt.bz2:2: gold 'x'"):
        read_hellaswag(path)
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "law_test.csv").write_text("q,a,b,c,d,answer\n")
    with pytest.raises(KdistillError, match=r"law_test.csv:1: header"):
        read_mmlu(tmp_path / "mmlu", "test")
    with pytest.raises(KdistillError, match=r"no \*_dev.csv files"):
        read_mmlu(tmp_path / "mmlu", "dev")


def test_unknown_task_and_missing_files(tmp_path: Path) -> None:
    message = r"unknown task\(s\) \['arc'\]; did you mean 'arc_easy' for 'arc'\?; known tasks: arc_easy, piqa"
    with pytest.raises(KdistillError, match=message):
        task_configs(["arc"], tmp_path)
    with pytest.raises(KdistillError, match="no such folder"):
        task_configs(["piqa"], tmp_path / "nowhere")
    with pytest.raises(KdistillError, match="benchmark file not found: .*piqa.jsonl"):
        task_configs(["piqa"], tmp_path)


def test_every_task_name_must_resolve() -> None:
    from kdistill.eval.tasks import parse_tasks

    message = r"unknown task\(s\) \['arcc'\]; did you mean 'arc_easy' for 'arcc'\?; known tasks: "
    with pytest.raises(KdistillError, match=message):
        parse_tasks("piqa,arcc,mmlu")  # piqa and mmlu resolve; arcc must not be dropped silently
    with pytest.raises(KdistillError, match="--tasks ',' names no task"):
        parse_tasks(",")
    assert parse_tasks("none") == [] and parse_tasks("piqa, mmlu") == ["piqa", "mmlu"]
