"""The on-disk format of a teacher cache: how one token's top-k is packed, and the manifest.

One trained token costs ``e * (id bytes + 1) + 6`` bytes for ``e = top_k + tail_samples`` entries:
- ``ids`` ``(n, e)``: uint16 when the vocabulary fits in 16 bits (SmolLM2, Llama-2, Mistral), else int32;
- ``q`` ``(n, e)`` uint8 and ``top1``, ``step`` ``(n,)`` fp16: the T = 1 log-probs, quantised per
  token on a linear scale from the token's best log-prob down to its lowest stored one,
  ``logprob = top1 - q * step``. 255 steps over that range (typically 10-20 nats) is an error of at
  most ``step / 2``, a few hundredths of a nat, far below what the divergences resolve;
- ``tail`` ``(n,)`` fp16: the log of the teacher's mass outside its top k at the split's temperature.
At k = 64 with a 49,152-token vocabulary that is 198 bytes a token.

A shard holds whole rows: ``lengths`` ``(rows,)`` gives each row's number of trained tokens, in
the order the loss sees them. The manifest records what the cache was built from and a sha256 for
every shard; it is rewritten atomically after each shard, which is also how an interrupted build
knows where to continue.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdistill.errors import KdistillError
from kdistill.files import write_atomic
from kdistill.losses import Sparse
from kdistill.losses.signal import log1mexp

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB_MAP_FILE = "vocab_map.safetensors"  # beside the shards of a teacher with another tokenizer


def encode(ids: Tensor, logprobs: Tensor, tail: Tensor, vocab_size: int) -> dict[str, Tensor]:
    """Pack ``(n, e)`` ids and T = 1 log-probs (best first) and ``(n,)`` log tail mass for a shard."""
    lp = logprobs.float()
    top1 = lp[:, 0].to(torch.float16)
    low = lp.min(dim=-1).values
    step = ((top1.float() - low) / 255.0).clamp(min=1e-4).to(torch.float16)
    q = ((top1.float()[:, None] - lp) / step.float()[:, None]).round().clamp(0, 255).to(torch.uint8)
    id_dtype = torch.uint16 if vocab_size <= 2**16 else torch.int32
    return {"ids": ids.to(id_dtype), "q": q, "top1": top1, "step": step, "tail": tail.to(torch.float16)}


def decode_logprobs(q: Tensor, top1: Tensor, step: Tensor) -> Tensor:
    """fp32 ``(n, e)`` log-probs from their packed form."""
    return top1.float()[:, None] - q.float() * step.float()[:, None]


def bytes_per_token(entries: int, vocab_size: int) -> int:
    return entries * ((2 if vocab_size <= 2**16 else 4) + 1) + 6


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))


def load_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KdistillError(
            f"teacher cache {path}: unreadable manifest ({err}); delete {folder} and rebuild"
        ) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise KdistillError(
            f"teacher cache {folder}: format version {manifest.get('format_version')}, this kdistill reads "
            f"version {FORMAT_VERSION}; rebuild it with `kdistill cache`"
        )
    return manifest


def rows_fingerprint(rows: list[Any]) -> str:
    """sha256 of every row's token ids and labels, in order: any change to the data, template,
    tokenizer, max_length or split shows up here."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(torch.tensor(row.input_ids, dtype=torch.int32).numpy().tobytes())
        digest.update(torch.tensor(row.labels, dtype=torch.int32).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256(json.dumps([vocab, template]).encode()).hexdigest()[:16]


# What `describe` names when a cache and a config disagree, in the order they are checked.
_HEADER_KEYS = (
    ("teacher", "teacher"),
    ("tokenizer", "tokenizer (vocabulary and chat template)"),
    ("teacher_tokenizer", "teacher tokenizer (another than the student's)"),
    ("top_k", "top_k"),
    ("tail_samples", "tail_samples"),
    ("temperature", "temperature (loss.temperature)"),
    ("max_length", "data.max_length"),
    ("data_settings", "data settings"),
    ("fingerprints", "tokenized data"),
)


def header_mismatch(folder: Path, built: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """One message naming the first thing that differs between a cache's header and the config's."""
    for key, label in _HEADER_KEYS:
        if key not in wanted or wanted[key] is None or built.get(key) == wanted[key]:
            continue
        if key == "data_settings":
            diff = [k for k in wanted[key] if built[key].get(k) != wanted[key][k]]
            changes = ", ".join(f"data.{k}: {built[key].get(k)!r} -> {wanted[key][k]!r}" for k in diff)
            return f"teacher cache {folder} was built from other data ({changes})"
        if key == "fingerprints":
            split = next(s for s in wanted[key] if built[key].get(s) != wanted[key][s])
            return (
                f"teacher cache {folder} was built from other {split} rows (same settings, different "
                "tokens: the data file, the tokenizer's chat template or the seed changed)"
            )
        have, want = built.get(key), wanted[key]
        return f"teacher cache {folder} was built with {label} {have!r}; the config has {want!r}"
    return None


def encode_rows(
    logits: Tensor,
    top_k: int,
    tail_samples: int,
    temperature: float,
    vocab_size: int,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Pack ``(N, V)`` teacher logits: top k, the log tail mass at T, and tail samples drawn at T."""
    out = []
    for start in range(0, logits.shape[0], 256):  # a few (256, V) fp32 temporaries at a time
        lp = torch.log_softmax(logits[start : start + 256].float(), dim=-1)
        top, ids = lp.topk(top_k, dim=-1)
        tempered = lp / temperature
        kept = torch.logsumexp(top / temperature, dim=-1) - torch.logsumexp(tempered, dim=-1)
        tail = log1mexp(kept)
        if tail_samples:
            weights = torch.softmax(tempered, dim=-1).scatter_(-1, ids, 0.0).clamp_(min=1e-30)
            draws = torch.multinomial(weights, tail_samples, replacement=True, generator=generator)
            ids, top = torch.cat([ids, draws], dim=-1), torch.cat([top, lp.gather(-1, draws)], dim=-1)
        out.append(encode(ids, top, tail, vocab_size))
    return {k: torch.cat([o[k] for o in out]) for k in out[0]}


def encode_top_k(signal: Sparse, temperature: float, vocab_size: int) -> dict[str, Tensor]:
    """Pack a teacher's top k (T = 1 log-probs, best first) with its tail mass at `temperature`.

    Exact at T = 1; at another temperature the tail's shape is unknown and it is `Sparse`'s stated
    approximation, stored so that reading the cache gives exactly what the live signal gives.
    """
    tail = signal.bucket_log_probs(vocab_size, temperature)[:, -1]
    return encode(signal.ids, signal.logprobs, tail, vocab_size)


def shards_written(manifest: dict[str, Any]) -> int:
    """How many shards the manifest records, over every split."""
    return sum(len(split["shards"]) for split in manifest["splits"].values())


def shard_problem(folder: Path, shard: dict[str, Any]) -> str | None:
    """Why a recorded shard cannot be used (missing, truncated, corrupt), or None."""
    path = folder / shard["file"]
    if not path.is_file():
        return f"shard {shard['file']} is missing"
    size = path.stat().st_size
    if size != shard["bytes"]:
        return f"shard {shard['file']} is {size} bytes, the manifest says {shard['bytes']} (truncated?)"
    if sha256_file(path) != shard["sha256"]:
        return f"shard {shard['file']} does not match its checksum (corrupt)"
    return None
