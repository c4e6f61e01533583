"""One teacher interface, three kinds: what each says it can do, and that live and cached agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.config import TeacherConfig, load_config
from kdistill.data import Collator
from kdistill.errors import KdistillError
from kdistill.losses import DenseHidden, Sparse
from kdistill.losses.divergences import forward_kl
from kdistill.run.components import build_components
from kdistill.teacher.base import Teacher
from kdistill.teacher.cache import CachedTeacher
from kdistill.teacher.live import LiveTeacher
from kdistill.teacher.roster import teacher_kind
from kdistill.teacher.served import ServedTeacher, ServerClient, ServerSettings

# kind -> (has_hidden, grades_samples, runs_here)
ABILITIES = {
    LiveTeacher: (True, True, True),
    CachedTeacher: (False, False, False),
    ServedTeacher: (False, True, False),
}


@pytest.mark.parametrize("kind", list(ABILITIES), ids=lambda kind: kind.__name__)
def test_each_kind_says_what_it_can_give(kind: type[Teacher]) -> None:
    assert issubclass(kind, Teacher)
    assert (kind.has_hidden, kind.grades_samples, kind.runs_here) == ABILITIES[kind]


@pytest.mark.parametrize(
    ("section", "kind"),
    [
        ({"model": "m"}, LiveTeacher),
        ({"cache": "c"}, CachedTeacher),
        ({"model": "m", "cache": "c"}, CachedTeacher),  # the model is for a from_teacher student
        ({"model": "m", "server": "http://127.0.0.1:9"}, ServedTeacher),
        (
            {"model": "m", "cache": "c", "server": "http://127.0.0.1:9"},
            CachedTeacher,
        ),  # kdistill cache asks it
    ],
)
def test_the_config_gives_the_kind_before_anything_loads(section: dict, kind: type[Teacher]) -> None:
    assert teacher_kind(TeacherConfig(**section)) is kind


def test_teachers_without_hidden_states_refuse_layers() -> None:
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)}
    client = ServerClient(ServerSettings(("http://127.0.0.1:9",), "teacher", top_k=4))
    served = ServedTeacher(name="s", weight=1.0, client=client)
    with pytest.raises(KdistillError, match="loss.hidden needs a live teacher, but teacher 's' is served"):
        served.signal(batch, "train", layers=(1,))  # refused before any request
    assert served.local_models() == []


def test_live_and_cached_give_the_same_signal(tmp_path: Path, tiny: dict) -> None:
    """A cache of the whole vocabulary at T = 1, built from the live teacher, gives what that teacher
    gives on the same batch, through the same method: the same rows, the same log-probs (to the 8-bit
    packing), and the same forward KL."""
    vocab = len(AutoTokenizer.from_pretrained(tiny["teacher"]))
    teacher = {"model": str(tiny["teacher"]), "cache": str(tmp_path / "cache")}
    config = tiny_config(
        tiny,
        tmp_path / "out",
        teacher=teacher,
        cache={"top_k": vocab, "tail_samples": 0},
        loss={"temperature": 1.0},
    )
    config["student"] = {"model": str(tiny["student"]), "finetune": "full"}
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["cache", str(path)]) == 0
    parts = build_components(load_config(path), torch.device("cpu"))
    cached = parts.teachers[0]
    assert isinstance(cached, CachedTeacher) and cached.local_models() == []
    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    live = LiveTeacher(name="teacher", weight=1.0, model=model)
    assert live.local_models() == [model]
    batch = Collator(parts.tokenizer.pad_token_id)(parts.data.train[:4])

    from_cache, from_model = cached.signal(batch, "train", vocab), live.signal(batch, "train", vocab)
    assert isinstance(from_cache.values, Sparse) and isinstance(from_model.values, DenseHidden)
    assert from_cache.rows == from_model.rows > 0 and from_cache.pairs is None and from_model.pairs is None
    logits = from_model.values.rows(0, from_model.rows)
    dense = torch.log_softmax(logits.float(), dim=-1)
    assert (from_cache.values.logprobs - dense.gather(-1, from_cache.values.ids)).abs().max() < 0.06
    student = torch.randn_like(logits)
    exact, read = forward_kl(student, logits), forward_kl(student, from_cache.values)
    assert abs(float(read) - float(exact)) < 0.01 * float(exact)
    with pytest.raises(KdistillError, match="loss.hidden needs a live teacher"):
        cached.signal(batch, "train", vocab, layers=(1,))
    assert set(live.signal(batch, "train", vocab, layers=(1,)).states) == {1}
