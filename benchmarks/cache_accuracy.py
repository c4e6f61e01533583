"""How closely a teacher cache reproduces the dense KL, and what it costs on disk.

Builds real caches (`kdistill cache`'s own code) of the SmolLM2-135M-Instruct teacher over Dolly
training rows for several (top_k, tail_samples) settings, then for every row compares the KL at the
training temperature computed from the cache with the dense KL computed live on the same tokens,
for a `from_teacher` student as initialised and, with `--student`, a trained one.

    python benchmarks/cache_accuracy.py [--rows 40] [--student runs/quickstart] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cache_speed import DOLLY, machine  # noqa: E402

SETTINGS = [(64, 0), (48, 16), (64, 16), (64, 32)]


def config(work: Path, rows: int, temperature: float, top_k: int, samples: int) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["data"] = {
        "source": str(DOLLY / "dolly-train.jsonl"),
        "max_rows": rows + 4,
        "validation_size": 4,
        "max_length": 256,
    }
    cfg["loss"]["temperature"] = temperature
    cfg["teacher"]["cache"] = str(work / f"k{top_k}-s{samples}")
    cfg["cache"] = {"top_k": top_k, "tail_samples": samples}
    path = work / f"k{top_k}-s{samples}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    from transformers import AutoModelForCausalLM

    from kdistill.config import load_config
    from kdistill.data import Collator, trained_rows
    from kdistill.losses.divergences import forward_kl
    from kdistill.models.build import build_student, load_teacher
    from kdistill.teacher.cache import TeacherCache
    from kdistill.teacher.precompute import cache_teachers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--student", type=Path, default=None, help="a trained student folder as well")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="keep the caches here (reused if complete)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kdistill-cache-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    caches, sizes = {}, {}
    for k, s in SETTINGS:
        cfg = load_config(config(work, args.rows, args.temperature, k, s))
        (_, manifest), *_ = cache_teachers(cfg, cpu)
        tokens = sum(x["tokens"] for x in manifest["splits"].values())
        sizes[(k, s)] = sum(sh["bytes"] for x in manifest["splits"].values() for sh in x["shards"]) / tokens
        caches[(k, s)] = TeacherCache(Path(cfg.teacher.cache), manifest)
    teacher = load_teacher(cfg.teacher, cpu)
    students = {"from_teacher (untrained)": build_student(cfg.student, teacher, cpu)}
    if args.student:
        students[f"trained ({args.student})"] = AutoModelForCausalLM.from_pretrained(args.student).float()
    from kdistill.teacher.responses import load_data
    from kdistill.teacher.vocabularies import load_vocabularies

    tokenizer = load_vocabularies(cfg).tokenizer
    data = load_data(cfg, tokenizer, teacher)
    collate = Collator(tokenizer.pad_token_id)
    errors = {(name, key): [] for name in students for key in SETTINGS}
    T = args.temperature
    for row in data.train[: args.rows]:
        batch = collate([row])
        mask, _ = trained_rows(batch["labels"])
        with torch.no_grad():
            live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for name, student in students.items():
                out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                s_logits = out[:, :-1][mask]
                dense = float(forward_kl(s_logits, live[:, :-1][mask], temperature=T))
                for key, cache in caches.items():
                    sparse = float(forward_kl(s_logits, cache.signal("train", batch["row"]), temperature=T))
                    errors[(name, key)].append((sparse - dense) / dense)
    rows = []
    for (name, (k, s)), errs in errors.items():
        rows.append(
            {
                "student": name,
                "top_k": k,
                "tail_samples": s,
                "bytes_per_token": round(sizes[(k, s)], 1),
                "median_rel_error": round(statistics.median(errs), 4),
                "worst_row_rel_error": round(max(errs, key=abs), 4),
                "rows_within_2pct": f"{sum(abs(e) <= 0.02 for e in errs)}/{len(errs)}",
            }
        )
    if args.json:
        print(json.dumps({"rows": rows, "temperature": T, "machine": machine()}, indent=1))
        return
    print(f"| {' | '.join(rows[0])} |\n|{'---|' * len(rows[0])}")
    for row in rows:
        print(f"| {' | '.join(str(v) for v in row.values())} |")
    print(f"KL at T = {T} on {args.rows} Dolly training rows; machine: {machine()}")


if __name__ == "__main__":
    main()
