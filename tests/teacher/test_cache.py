"""The teacher cache on tiny models: build, read back, train from it, continue, and refuse mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import _build_model, tiny_config, write_config
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import Collator, trained_rows
from kdistill.losses.divergences import forward_kl
from kdistill.run.components import build_components
from kdistill.teacher import cache_build
from kdistill.teacher.packing import bytes_per_token, decode_logprobs, encode


def _config(tmp_path: Path, tiny: dict, name: str = "run.yaml", **sections: dict) -> Path:
    teacher = {"model": str(tiny["teacher"]), "cache": str(tmp_path / "cache"), **sections.pop("teacher", {})}
    config = tiny_config(tiny, tmp_path / "out", teacher=teacher, **sections)
    config["student"] = {"model": str(tiny["student"]), "finetune": "full"}
    return write_config(tmp_path / name, config)


def _vocab(tiny: dict) -> int:
    return len(AutoTokenizer.from_pretrained(tiny["teacher"]))


def test_packing_round_trip_is_within_half_a_step() -> None:
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(50, 1000) * 3, dim=-1).topk(80).values
    packed = encode(torch.arange(80).expand(50, -1), lp, torch.zeros(50), 1000)
    back = decode_logprobs(packed["q"], packed["top1"], packed["step"])
    step = packed["step"].float()[:, None]
    assert packed["ids"].dtype == torch.uint16 and packed["q"].dtype == torch.uint8
    assert ((back - lp).abs() <= step / 2 + 1e-2).all()
    assert (back[:, 0] - lp[:, 0]).abs().max() < 1e-2  # the best token is nearly exact
    assert bytes_per_token(64, 49_152) == 198 and bytes_per_token(80, 49_152) == 246
    assert bytes_per_token(64, 262_144) == 326  # ids need 4 bytes past 65,536 tokens


def test_cached_signal_matches_the_live_teacher(tmp_path: Path, tiny: dict) -> None:
    vocab = _vocab(tiny)
    config = _config(tmp_path, tiny, cache={"top_k": vocab, "tail_samples": 0}, loss={"temperature": 1.0})
    assert main(["cache", str(config)]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["header"]["top_k"] == vocab
    cfg = load_config(config)
    parts = build_components(cfg, torch.device("cpu"))
    # training from a cache loads no teacher model
    assert not [m for t in parts.teachers for m in t.local_models()]
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    batch = Collator(parts.tokenizer.pad_token_id)(parts.data.train[:4])
    mask, _ = trained_rows(batch["labels"])
    signal = parts.teachers[0].cache.signal("train", batch["row"])
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][
            mask
        ]
    assert signal.ids.shape == (int(mask.sum()), vocab)
    dense = torch.log_softmax(live, dim=-1)
    assert (signal.logprobs - dense.gather(-1, signal.ids)).abs().max() < 0.06  # 8-bit packing
    student = torch.randn_like(live)
    exact, cached = forward_kl(student, live), forward_kl(student, signal)
    assert abs(float(cached) - float(exact)) < 0.01 * float(exact)


def test_tail_samples_estimate_the_tempered_kl(tmp_path: Path, tiny: dict) -> None:
    config = _config(tmp_path, tiny, cache={"top_k": 8, "tail_samples": 64}, loss={"temperature": 2.0})
    assert main(["cache", str(config)]) == 0
    parts = build_components(load_config(config), torch.device("cpu"))
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    batch = Collator(parts.tokenizer.pad_token_id)(parts.data.train[:16])
    mask, _ = trained_rows(batch["labels"])
    signal = parts.teachers[0].cache.signal("train", batch["row"])
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][
            mask
        ]
    torch.manual_seed(0)
    student = live + torch.randn_like(live)
    exact = float(forward_kl(student, live, temperature=2.0))
    estimate = float(forward_kl(student, signal, temperature=2.0))
    bucket_only = float(forward_kl(student, signal.top(), temperature=2.0))
    assert abs(estimate - exact) < 0.05 * exact
    assert abs(bucket_only - exact) > 3 * abs(estimate - exact)  # the samples are what makes it close


def test_train_from_cache_without_loading_a_teacher(tmp_path: Path, tiny: dict, monkeypatch) -> None:
    config = _config(tmp_path, tiny, loss={"alpha": 1.0}, training={"num_epochs": 3, "learning_rate": 3e-3})
    assert main(["cache", str(config)]) == 0

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher model was loaded")

    monkeypatch.setattr("kdistill.run.components.load_teacher", no_teacher)
    monkeypatch.setattr("kdistill.teacher.roster.load_teacher", no_teacher)
    assert main(["train", str(config)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["after"]["kl"] < summary["before"]["kl"]


def test_an_interrupted_build_continues_where_it_stopped(tmp_path: Path, tiny: dict, monkeypatch) -> None:
    config = _config(tmp_path, tiny, cache={"rows_per_shard": 8})
    real, calls = cache_build._shard, []

    def failing(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_build, "_shard", failing)
    assert main(["cache", str(config)]) == 130
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["splits"]["train"]["shards"]) == 2
    assert not list((tmp_path / "cache").glob("*.tmp*"))
    assert main(["train", str(config)]) == 2  # an incomplete cache is refused
    assert main(["cache", str(config)]) == 0
    assert calls[3] == 16  # the third shard was the first one computed again
    first = {p.name: p.read_bytes() for p in (tmp_path / "cache").glob("*.safetensors")}
    monkeypatch.setattr(cache_build, "_shard", real)
    (tmp_path / "again").mkdir()
    fresh = _config(tmp_path / "again", tiny, cache={"rows_per_shard": 8})
    assert main(["cache", str(fresh)]) == 0
    again = {p.name: p.read_bytes() for p in (tmp_path / "again" / "cache").glob("*.safetensors")}
    assert first == again  # deterministic: the continued cache equals an uninterrupted one


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cache": {"top_k": 32}}, "was built with top_k 48; the config has 32"),
        ({"cache": {"tail_samples": 4}}, "was built with tail_samples 16; the config has 4"),
        (
            {"loss": {"temperature": 3.0}},
            "was built with temperature (loss.temperature) 2.0; the config has 3.0",
        ),
        ({"data": {"max_length": 48}}, "was built with data.max_length 64; the config has 48"),
        ({"data": {"max_rows": 30}}, "was built from other data (data.max_rows: None -> 30)"),
        ({"training": {"seed": 1}}, "was built from other data (data.seed: 0 -> 1)"),
    ],
)
def test_a_cache_for_another_config_is_refused(
    tmp_path: Path, tiny: dict, capsys, change: dict, message: str
) -> None:
    assert main(["cache", str(_config(tmp_path, tiny))]) == 0
    assert main(["validate", str(_config(tmp_path, tiny))]) == 0
    assert "matches this config" in capsys.readouterr().out
    assert main(["validate", str(_config(tmp_path, tiny, "changed.yaml", **change))]) == 0
    assert message in capsys.readouterr().out  # validate reports it, train refuses it
    assert main(["train", str(_config(tmp_path, tiny, "changed.yaml", **change))]) == 2
    err = capsys.readouterr().err
    assert message in err and "kdistill cache" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_another_teacher_or_a_damaged_shard_is_refused(tmp_path: Path, tiny: dict, capsys) -> None:
    config = _config(tmp_path, tiny, cache={"rows_per_shard": 16})
    assert main(["cache", str(config)]) == 0
    other = tmp_path / "other-teacher"
    _build_model(other, _vocab(tiny), layers=2, seed=5)
    AutoTokenizer.from_pretrained(tiny["teacher"]).save_pretrained(other)
    swapped = _config(tmp_path, tiny, "swapped.yaml", teacher={"model": str(other)})
    capsys.readouterr()
    assert main(["train", str(swapped)]) == 2
    assert "was built with teacher" in capsys.readouterr().err

    shard = tmp_path / "cache" / "train-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["train", str(config)]) == 2
    assert "train-00001.safetensors does not match its checksum (corrupt)" in capsys.readouterr().err
    shard.write_bytes(bytes(data[:-100]))
    assert main(["train", str(config)]) == 2
    assert "(truncated?)" in capsys.readouterr().err
    shard.unlink()
    assert main(["train", str(config)]) == 2
    assert "train-00001.safetensors is missing" in capsys.readouterr().err
    assert main(["cache", str(config)]) == 0  # the damaged shard is rebuilt, the others kept
    assert main(["train", str(config), "--overwrite"]) == 0


def test_missing_cache_says_how_to_build_it(tmp_path: Path, tiny: dict, capsys) -> None:
    config = _config(tmp_path, tiny)
    assert main(["validate", str(config)]) == 0
    assert "not built yet; run `kdistill cache`" in capsys.readouterr().out
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert (
        f"teacher cache {tmp_path / 'cache'} does not exist; build it with `kdistill cache {config}`" in err
    )


def test_a_signal_while_caching_keeps_the_shards_and_says_how_to_resume(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import os
    import signal

    config = tiny_config(tiny, tmp_path / "run", cache={"rows_per_shard": 8})
    config["teacher"]["cache"] = str(tmp_path / "cache")
    path = write_config(tmp_path / "run.yaml", config)
    real, shards = cache_build.save_atomic, {"n": 0}

    def term_after_two(*args, **kwargs):
        real(*args, **kwargs)
        shards["n"] += 1
        if shards["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's notice mid-build

    monkeypatch.setattr(cache_build, "save_atomic", term_after_two)
    assert main(["cache", str(path)]) == 130
    err = capsys.readouterr().err
    assert "kdistill: cache: interrupted; every shard written so far is kept" in err
    assert f"kdistill: resume with: kdistill cache {path}" in err
    monkeypatch.setattr(cache_build, "save_atomic", real)
    assert main(["cache", str(path)]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["splits"].values()) == 48  # 40 training + 8 validation rows
