"""Run the teacher once: write its top-k outputs for every trained token to disk, shard by shard.

A build is resumable: the manifest is rewritten after each whole shard, and an interrupted or damaged
cache continues from its last whole one. The format is in ``packing``; ``cache`` reads it back.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from kdistill.data import trained_rows
from kdistill.errors import KdistillError, ServerUnreachable
from kdistill.files import save_atomic
from kdistill.losses import Sparse, VocabMap
from kdistill.teacher import packing as fmt

log = logging.getLogger("kdistill")


def save_vocab_map(folder: Path, mapping: VocabMap) -> None:
    """Store the vocabulary map an aligned cache is read with (training then needs no teacher tokenizer)."""
    tensors = {k: torch.as_tensor(v) for k, v in mapping.to_tensors().items()}
    save_atomic(folder / fmt.VOCAB_MAP_FILE, lambda tmp: save_file(tensors, str(tmp)))


@dataclass(frozen=True)
class CacheSpec:
    """How to build a cache: plain values from the config (`roster.cache_spec`)."""

    top_k: int
    tail_samples: int
    temperatures: dict[str, float]  # per split: the training temperature, and 1 for validation
    rows_per_shard: int
    batch_size: int
    seed: int


def build_cache(
    folder: Path,
    teacher_forward: Any,
    splits: dict[str, list[Any]],
    header: dict[str, Any],
    spec: CacheSpec,
    collate: Any,
    vocab_size: int,
    extras: Any = None,
    status: Any = dict,
) -> dict[str, Any]:
    """Write (or finish) the cache in `folder` and return its manifest.

    ``teacher_forward(batch, mask) -> (N, V)`` gives teacher logits at a batch's trained rows;
    ``extras(row) -> {name: (n,) tensor}``, if given, adds per-entry values stored beside them (the
    student side of a cross-tokenizer alignment); ``status() -> {name: value}`` is shown on the
    progress bar after each shard (a served teacher's retries). An
    existing complete cache for the same header is kept; an incomplete one is continued from its
    last whole shard; one built for something else is refused, not overwritten.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest = fmt.load_manifest(folder)
    if manifest is not None:
        problem = fmt.header_mismatch(folder, manifest["header"], header)
        if problem:
            raise KdistillError(f"{problem}; delete {folder} or set another teacher.cache folder")
        # A complete cache is checked too: a missing or damaged shard (and those after it) is rebuilt.
        log.info("teacher cache %s exists: keeping its whole shards", folder)
    else:
        manifest = {"format_version": fmt.FORMAT_VERSION, "header": header, "complete": False, "splits": {}}
    for split, rows in splits.items():
        shards = manifest["splits"].setdefault(split, {"rows": len(rows), "tokens": 0, "shards": []})
        if _keep_whole_shards(folder, shards):
            manifest["complete"] = False
            fmt.save_manifest(folder, manifest)  # so an interruption now cannot leave it marked complete
        count = math.ceil(len(rows) / spec.rows_per_shard)
        # The bar is closed however the loop ends, so an error starts on a line of its own.
        with tqdm(total=count, initial=len(shards["shards"]), desc=f"cache {split}", unit="shard") as bar:
            for index in range(len(shards["shards"]), count):
                start, end = index * spec.rows_per_shard, min(len(rows), (index + 1) * spec.rows_per_shard)
                try:  # a served teacher that failed every retry: the message says what is kept
                    args = (split, spec, collate, vocab_size, extras)
                    tensors = _shard(teacher_forward, rows, start, end, *args)
                except ServerUnreachable as err:
                    raise ServerUnreachable(f"{err}. {_kept(manifest)}") from None
                _add_shard(folder, manifest, split, (start, end), tensors)
                bar.update(1)
                bar.set_postfix(status())
    if not manifest["complete"]:
        manifest["complete"] = True
        fmt.save_manifest(folder, manifest)
    return manifest


def _kept(manifest: dict[str, Any]) -> str:
    done = fmt.shards_written(manifest)
    return (
        f"The {done} shards written before it are kept: make sure the teacher's server answers, then run "
        "the same `kdistill cache` command to write the rest"
    )


def _add_shard(
    folder: Path, manifest: dict[str, Any], split: str, rows: tuple[int, int], tensors: dict[str, Tensor]
) -> None:
    """Write one shard of `split` (its `rows`), then record it in the manifest: it is part of the cache."""
    shards = manifest["splits"][split]
    name = f"{split}-{len(shards['shards']):05d}.safetensors"
    done = fmt.shards_written(manifest)
    kept = (
        f"The {done} shards before it are intact: free some space, then run the same `kdistill cache` "
        "command to write the rest"
    )
    save_atomic(folder / name, lambda tmp: save_file(tensors, str(tmp)), f"cache shard {name}", kept)
    path, tokens = folder / name, int(tensors["lengths"].sum())
    size, digest = path.stat().st_size, fmt.sha256_file(path)
    shards["shards"].append(
        {"file": name, "rows": list(rows), "tokens": tokens, "bytes": size, "sha256": digest}
    )
    shards["tokens"] += tokens
    fmt.save_manifest(folder, manifest)


def _keep_whole_shards(folder: Path, shards: dict[str, Any]) -> bool:
    """Drop recorded shards from the first one that is missing or damaged on (they are rebuilt)."""
    for i, shard in enumerate(shards["shards"]):
        problem = fmt.shard_problem(folder, shard)
        if problem is not None:
            log.warning("teacher cache %s: %s; rebuilding it and the shards after it", folder, problem)
            del shards["shards"][i:]
            shards["tokens"] = sum(s["tokens"] for s in shards["shards"])
            return True
    return False


@torch.no_grad()
def _shard(
    teacher_forward, rows, start, end, split, spec: CacheSpec, collate, vocab_size, extras=None
) -> dict[str, Tensor]:
    """Encode rows ``start:end``, teacher batches grouped by length, stored back in row order."""
    order = sorted(range(start, end), key=lambda i: len(rows[i].input_ids))
    per_row: dict[int, dict[str, Tensor]] = {}
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + start)
    for b in range(0, len(order), spec.batch_size):
        members = order[b : b + spec.batch_size]
        batch = collate([rows[i] for i in members])
        mask = trained_rows(batch["labels"])[0]
        out = teacher_forward(batch, mask)
        temperature = spec.temperatures[split]
        if isinstance(out, Sparse):  # a served teacher's top k
            packed = fmt.encode_top_k(out, temperature, vocab_size)
        else:
            packed = fmt.encode_rows(out, spec.top_k, spec.tail_samples, temperature, vocab_size, generator)
        counts = mask.sum(dim=1).tolist()
        offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
        for j, i in enumerate(members):
            per_row[i] = {k: v[offsets[j] : offsets[j + 1]] for k, v in packed.items()}
            per_row[i].update(extras(rows[i]) if extras is not None else {})
    ordered = [per_row[i] for i in range(start, end)]
    tensors = {k: torch.cat([r[k] for r in ordered]).contiguous() for k in ordered[0]}
    tensors["lengths"] = torch.tensor([len(r["tail"]) for r in ordered], dtype=torch.int32)
    return tensors
