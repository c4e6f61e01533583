"""`kdistill prune --search`: candidate shapes ranked by short runs of the run's own training."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from conftest import tiny_config, write_config
from kdistill.cli import main


def test_search_trains_the_finalists_and_writes_the_best_untrained(
    tiny: dict[str, Path], tmp_path: Path, capsys
) -> None:
    made = {"method": "importance", "params": 0.6, "calibration_rows": 8}
    student = {"from_teacher": made, "finetune": "full"}
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "run", student=student))
    out = tmp_path / "pruned"
    args = ["prune", str(config), "--output", str(out), "--eval-rows", "8"]
    args += ["--search", "2", "--search-steps", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    search = json.loads((out / "prune.json").read_text())["search"]
    candidates = search["candidates"]
    trained = [c for c in candidates if c["trained"]]
    assert len(trained) == 2 and len(candidates) > 2 and (search["steps"], search["finalists"]) == (2, 2)
    # the finalists are the two lowest untrained KLs, and the chosen one has the lowest KL after training
    untrained = sorted(c["untrained"]["kl"] for c in candidates)
    assert sorted(c["untrained"]["kl"] for c in trained) == untrained[:2]
    chosen = [c for c in candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["trained"]["kl"] == min(c["trained"]["kl"] for c in trained)
    assert all(c["trained"]["kl"] > 0 and c["trained"]["ppl"] > 1 for c in trained)
    # the folder holds the chosen shape, untrained: its held-out KL is the untrained one's
    model = AutoModelForCausalLM.from_pretrained(out)
    s = chosen[0]["shape"]
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_key_value_heads) == (
        s["layers"], s["hidden"], s["intermediate"], s["kv_heads"]
    )  # fmt: skip
    assert "chosen" in printed and "trained 2 steps each" in printed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".search-")] == []  # work folders removed
    assert (out / "importance.json").exists() and not (tmp_path / "run").exists()
    # a run that trains the folder shows the candidates in its report
    run = tiny_config(tiny, tmp_path / "trained")
    run["student"] = {"model": str(out), "finetune": "full"}
    run["training"]["max_steps"] = 1
    assert main(["train", str(write_config(tmp_path / "trained.yaml", run))]) == 0
    report = (tmp_path / "trained" / "report.md").read_text()
    assert "## The pruned student" in report and "`--search 2`" in report and "| kept |" in report
