"""Distillation across tokenizers, end to end on tiny models.

The teacher here has a SentencePiece-style tokenizer (``▁`` word markers, byte fallback, no chat
template, so it reads the plain template) and its own vocabulary; the student is the byte-level BPE
tiny student with a chat template. Every row is aligned once, when the data is built.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import WORDS, _build_model, tiny_config, write_config
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import IGNORE_INDEX, Collator
from kdistill.teacher.responses import load_data
from kdistill.teacher.vocabularies import load_vocabularies


def _build_sp_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    # Fewer merges than the student's tokenizer: words split differently on the two sides.
    tok.train_from_iterator([" ".join(WORDS[::2])] * 5 + [" ".join(WORDS)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def sp_teacher(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("sp_teacher")
    _build_sp_tokenizer(folder)
    _build_model(folder, len(AutoTokenizer.from_pretrained(folder)), layers=4, seed=3, init_range=0.2)
    return folder


def _config(tiny: dict, sp_teacher: Path, out: Path, **sections: dict) -> dict:
    student = {"model": str(tiny["student"]), "from_teacher": None, "finetune": "full"}
    config = tiny_config(tiny, out, student=student, teacher={"model": str(sp_teacher), "name": "teacher"})
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def test_views_pair_positions_that_predict_the_same_text(
    tiny: dict, sp_teacher: Path, tmp_path: Path
) -> None:
    data = {"max_length": 160}  # room for the teacher's longer tokenization: nothing is cut here
    config = _config(tiny, sp_teacher, tmp_path / "out", data=data)
    cfg = load_config(write_config(tmp_path / "run.yaml", config))
    vocabs = load_vocabularies(cfg)
    assert list(vocabs.cross) == ["teacher"]
    data = load_data(cfg, vocabs.tokenizer, None, vocabs.cross)
    t_tok, s_tok = vocabs.cross["teacher"], vocabs.tokenizer
    pairs = single = 0
    for row in data.train:
        view = row.views["teacher"]
        assert view.student_pos == sorted(view.student_pos) and view.teacher_pos == sorted(view.teacher_pos)
        for t_pos, s_pos, one in zip(view.teacher_pos, view.student_pos, view.one_to_one, strict=True):
            assert row.labels[s_pos + 1] != IGNORE_INDEX  # the student's side is a trained position
            if one:  # the two next tokens are the same text (SentencePiece's ▁ is a space)
                t_text = t_tok.convert_ids_to_tokens(view.input_ids[t_pos + 1]).replace("▁", " ")
                s_text = s_tok.decode([row.input_ids[s_pos + 1]])
                assert t_text == s_text
        # Both tokenizers cut at every space: each response word starts an aligned segment of its own.
        words = s_tok.decode([t for t in row.labels if t != IGNORE_INDEX], skip_special_tokens=True).split()
        assert len(view.student_pos) >= len(words)
        pairs, single = pairs + len(view.student_pos), single + sum(view.one_to_one)
    assert 0 < single < pairs

    batch = Collator(s_tok.pad_token_id, teacher_pads={"teacher": t_tok.pad_token_id})(data.train[:4])
    marked = batch["teacher/teacher/labels"][:, 1:] != IGNORE_INDEX
    padded = batch["align/teacher/student_pos"]
    assert (
        int(marked.sum())
        == int((padded >= 0).sum())
        == sum(len(r.views["teacher"].student_pos) for r in data.train[:4])
    )
    assert (
        padded[0, : len(data.train[0].views["teacher"].student_pos)].tolist()
        == data.train[0].views["teacher"].student_pos
    )


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cross_tokenizer_training_lowers_the_aligned_kl(tiny: dict, sp_teacher: Path, tmp_path: Path) -> None:
    training = {"max_steps": 30, "batch_size": 4, "learning_rate": 3e-3}
    config = _config(tiny, sp_teacher, tmp_path / "out", training=training, loss={"alpha": 0.9})
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["validate", str(path)]) == 0
    assert main(["train", str(path)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    before, after = summary["before"]["kl"], summary["after"]["kl"]
    assert after < 0.8 * before, (before, after)
    assert all(r["loss/kd"] > 0 for r in _records(tmp_path / "out") if "loss/kd" in r)


def test_uld_only_alignment_trains_too(tiny: dict, sp_teacher: Path, tmp_path: Path) -> None:
    training = {"max_steps": 20, "batch_size": 4, "learning_rate": 3e-3}
    loss = {"alpha": 0.9, "alignment": "uld"}
    config = _config(tiny, sp_teacher, tmp_path / "out", training=training, loss=loss)
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["after"]["kl"] < summary["before"]["kl"]


def test_cached_cross_teacher_matches_live_and_loads_no_model(
    tiny: dict, sp_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(sp_teacher))
    training = {"max_steps": 3, "batch_size": 4}
    cache = {"top_k": vocab, "tail_samples": 0}  # the whole vocabulary: only 8-bit rounding differs
    live = _config(tiny, sp_teacher, tmp_path / "live", training=training, cache=cache)
    assert main(["train", str(write_config(tmp_path / "live.yaml", live))]) == 0

    folder = tmp_path / "teacher-cache"
    build = _config(tiny, sp_teacher, tmp_path / "unused", training=training, cache=cache)
    build["teacher"]["cache"] = str(folder)
    assert main(["cache", str(write_config(tmp_path / "build.yaml", build))]) == 0
    assert (folder / "vocab_map.safetensors").exists()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["header"]["teacher_tokenizer"] is not None

    import kdistill.teacher.roster as teachers_module

    def no_teacher(*args, **kwargs):
        raise AssertionError("a cached teacher must not be loaded")

    monkeypatch.setattr(teachers_module, "load_teacher", no_teacher)
    cached = _config(tiny, sp_teacher, tmp_path / "cached", training=training, cache=cache)
    cached["teacher"] = {"cache": str(folder)}
    assert main(["train", str(write_config(tmp_path / "cached.yaml", cached))]) == 0
    live_kd = [r["loss/kd"] for r in _records(tmp_path / "live") if "loss/kd" in r]
    cached_kd = [r["loss/kd"] for r in _records(tmp_path / "cached") if "loss/kd" in r]
    assert len(live_kd) == len(cached_kd) == 3
    assert cached_kd == pytest.approx(live_kd, rel=2e-2)


def test_same_and_cross_tokenizer_teachers_together(tiny: dict, sp_teacher: Path, tmp_path: Path) -> None:
    teachers = [
        {"model": str(tiny["teacher"]), "name": "same", "weight": 1.0},
        {"model": str(sp_teacher), "name": "cross", "weight": 1.0},
    ]
    training = {"max_steps": 4, "batch_size": 4}
    config = _config(tiny, sp_teacher, tmp_path / "out", training=training)
    del config["teacher"]
    config["teachers"] = teachers
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["train", str(path)]) == 0
    record = next(r for r in _records(tmp_path / "out") if "loss/kd/same" in r)
    # Equal weights: the KD term is the mean of the two teachers' own terms.
    assert record["loss/kd/cross"] > 0 and record["loss/kd/same"] > 0
    assert record["loss/kd"] == pytest.approx(
        0.5 * (record["loss/kd/same"] + record["loss/kd/cross"]), rel=1e-4
    )

    config["loss"] = {**config["loss"], "multi_teacher": "mixture"}
    assert main(["validate", str(write_config(tmp_path / "mixture.yaml", config))]) == 2


def test_aligned_loss_gradient_matches_unchunked(tiny: dict, sp_teacher: Path) -> None:
    from kdistill.losses import DenseHidden
    from kdistill.losses.cross_vocab import aligned_kd_sum
    from kdistill.losses.vocab_map import VocabMap

    torch.manual_seed(0)
    n, hs, ht, vs, vt = 37, 8, 6, 30, 25
    rows = torch.randn(n, hs, requires_grad=True)
    head = torch.randn(vs, hs)
    teacher = DenseHidden(torch.randn(n, ht), torch.randn(vt, ht))
    mapping = VocabMap(torch.arange(0, 20), torch.arange(5, 25), vt, vs)
    one = torch.rand(n) < 0.7
    chunked = aligned_kd_sum(rows, head, teacher, one, mapping, temperature=2.0, chunk_size=8)
    (grad,) = torch.autograd.grad(chunked, rows)
    whole = aligned_kd_sum(rows, head, teacher, one, mapping, temperature=2.0, chunk_size=n)
    (grad_whole,) = torch.autograd.grad(whole, rows)
    assert float(chunked.detach()) == pytest.approx(float(whole.detach()), rel=1e-5)
    assert torch.allclose(grad, grad_whole, atol=1e-6)


def test_eval_of_a_cross_tokenizer_run_uses_the_aligned_kl(
    tiny: dict, sp_teacher: Path, tmp_path: Path
) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'kdistill[eval]')")
    training = {"max_steps": 4, "batch_size": 4}
    config = _config(tiny, sp_teacher, tmp_path / "run", training=training)
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    run = tmp_path / "run"
    args = ["--tasks", "none", "--rouge-rows", "2", "--max-new-tokens", "4", "--batch-size", "4"]
    assert main(["eval", str(run), *args]) == 0
    result = json.loads((run / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    held = result["held_out"]
    # The same held-out rows and the same aligned loss as the training run's last evaluation.
    assert held["student"]["kl"] == pytest.approx(summary["after"]["kl"], rel=1e-4)
    assert held["student"]["ppl"] == pytest.approx(summary["after"]["ppl"], rel=1e-4)
    assert "top1" not in held["student"] and held["teacher"]["ppl"] > 1  # the teacher on its own tokens
    assert "ppl" not in result["kept"] and "rouge_l" in result["kept"]
    assert held["tokenizers"].startswith("different")
