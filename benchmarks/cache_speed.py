"""Online against cached distillation: three epochs of the quickstart recipe on Dolly training rows.

Both runs start from the same config (SmolLM2-135M-Instruct teacher, a 10-layer `from_teacher`
student, data.max_length 256); the cached one first runs `kdistill cache` (timed, included in its
total) and then trains from the cache without loading a teacher. Each step is its own process, run
one after the other in this one invocation. Afterwards both students are evaluated in this process
against the live teacher (dense KL at T = 1, not the cache's estimate) on the same held-out rows.

    python benchmarks/cache_speed.py            # about 20 minutes on 2 cores
    python benchmarks/cache_speed.py --quick    # a one-minute smoke run on tiny settings
    python benchmarks/cache_speed.py --json     # rows as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "instruct"


def run_config(work: Path, args: argparse.Namespace, cached: bool) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["data"] = {
        "source": str(DOLLY / "dolly-train.jsonl"),
        "max_rows": args.rows,
        "validation_size": args.validation,
        "max_length": args.max_length,
    }
    config["training"].update(num_epochs=args.epochs, logging_steps=10)
    config["student"]["from_teacher"]["num_layers"] = args.layers
    name = "cached" if cached else "online"
    if cached:
        config["teacher"]["cache"] = str(work / "teacher-cache")
    config["output_dir"] = str(work / name)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def timed(*command: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdistill", *command], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def evaluate(online_cfg: Path, students: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Held-out KL (dense, live teacher, T = 1) and perplexity of each student, on the same rows."""
    from transformers import AutoModelForCausalLM

    from kdistill.config import load_config
    from kdistill.data import Collator
    from kdistill.models.build import load_teacher
    from kdistill.objective.batch import StudentLoss
    from kdistill.objective.quality import held_out_quality
    from kdistill.teacher.live import LiveTeacher
    from kdistill.teacher.responses import load_data
    from kdistill.teacher.vocabularies import load_vocabularies

    cfg = load_config(online_cfg)
    vocabs = load_vocabularies(cfg)
    tokenizer, vocab = vocabs.tokenizer, vocabs.width
    teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    data = load_data(cfg, tokenizer, teacher)
    rows = sorted(data.validation, key=lambda x: len(x.input_ids))
    collate = Collator(tokenizer.pad_token_id)
    batches = [collate(rows[i : i + 8]) for i in range(0, len(rows), 8)]
    memo: dict[int, object] = {}
    results = {}
    for name, folder in students.items():
        student = StudentLoss(AutoModelForCausalLM.from_pretrained(folder).float())
        results[name] = held_out_quality(
            student, [LiveTeacher(name="teacher", weight=1.0, model=teacher)], batches, 512, vocab, memo
        )
    return results


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    model = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0].strip(": \t")
    return f"{model or cpu}, {os.cpu_count()} cores, torch {torch.__version__} CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=251, help="Dolly training rows (quickstart size)")
    parser.add_argument("--validation", type=int, default=40, help="rows of them held out")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--layers", type=int, default=10, help="student layers (of 30)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, a smoke run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="keep runs here (default: a temp folder)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.validation, args.epochs, args.max_length, args.layers = 24, 8, 1.0, 96, 4
    if not DOLLY.is_dir():
        sys.exit(f"{DOLLY} is absent: this benchmark needs ../shared/data")
    work = args.work or Path(tempfile.mkdtemp(prefix="kdistill-cache-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    online_cfg, cached_cfg = run_config(work, args, False), run_config(work, args, True)
    timed("validate", str(online_cfg))  # the one-off GGUF conversion, outside both timings

    online = timed("train", str(online_cfg), "--overwrite")
    build = timed("cache", str(cached_cfg))
    cached_train = timed("train", str(cached_cfg), "--overwrite")
    quality = evaluate(online_cfg, {"online": work / "online", "cached": work / "cached"})
    manifest = json.loads((work / "teacher-cache" / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    size = sum(sh["bytes"] for s in manifest["splits"].values() for sh in s["shards"])
    rows = [
        {
            "run": "online",
            "wall_s": round(online, 1),
            "cache_build_s": 0.0,
            "train_s": round(online, 1),
            "held_out_kl": round(quality["online"]["kl"], 4),
            "held_out_ppl": round(quality["online"]["ppl"], 2),
        },
        {
            "run": "cached",
            "wall_s": round(build + cached_train, 1),
            "cache_build_s": round(build, 1),
            "train_s": round(cached_train, 1),
            "held_out_kl": round(quality["cached"]["kl"], 4),
            "held_out_ppl": round(quality["cached"]["ppl"], 2),
        },
    ]
    summary = {
        "wall_ratio_cached_to_online": round((build + cached_train) / online, 3),
        "kl_ratio_cached_to_online": round(quality["cached"]["kl"] / quality["online"]["kl"], 4),
        "cache_bytes_per_token": round(size / tokens, 1),
        "cache_tokens": tokens,
        "settings": {k: getattr(args, k) for k in ("rows", "validation", "epochs", "max_length", "layers")},
        "machine": machine(),
    }
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=1))
        return
    print(f"| {' | '.join(rows[0])} |\n|{'---|' * len(rows[0])}")
    for row in rows:
        print(f"| {' | '.join(str(v) for v in row.values())} |")
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
