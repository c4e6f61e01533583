"""Read a teacher cache back: a verified cache in memory, and the teacher that serves it to training.

With a live teacher every epoch pays a teacher forward pass and the teacher sits in memory beside
the student. `kdistill cache` pays it once (``cache_build``); training then reads a ``Sparse`` signal
per batch from here and loads no teacher. The format is in ``packing``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from kdistill.data import trained_rows
from kdistill.errors import KdistillError
from kdistill.losses import Sparse, VocabMap
from kdistill.losses.hidden import require_live_teacher
from kdistill.teacher import packing as fmt
from kdistill.teacher.base import Teacher, TeacherSignal


class TeacherCache:
    """A complete, verified cache held in memory; ``signal`` gives a batch's ``Sparse`` teacher."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder, self.manifest = folder, manifest
        header = manifest["header"]
        self.top_k, self.temperatures = header["top_k"], header["temperature_by_split"]
        self.splits = {name: self._load(split) for name, split in manifest["splits"].items()}

    @classmethod
    def open(cls, folder: str | Path, wanted: dict[str, Any], how_to_build: str) -> TeacherCache:
        """Open and check a cache against the config's ``wanted`` header; one clear error otherwise."""
        folder = Path(folder)
        manifest = fmt.load_manifest(folder)
        if manifest is None:
            raise KdistillError(f"teacher cache {folder} does not exist; build it with `{how_to_build}`")
        if not manifest["complete"]:
            done = fmt.shards_written(manifest)
            raise KdistillError(
                f"teacher cache {folder} is incomplete ({done} shards written); run `{how_to_build}` "
                "again to finish it"
            )
        problem = fmt.header_mismatch(folder, manifest["header"], wanted)
        if problem:
            raise KdistillError(
                f"{problem}; rebuild it with `{how_to_build}` or point teacher.cache elsewhere"
            )
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                problem = fmt.shard_problem(folder, shard)
                if problem:
                    raise KdistillError(
                        f"teacher cache {folder}: {problem}; run `{how_to_build}` to rebuild it"
                    )
        return cls(folder, manifest)

    def _load(self, split: dict[str, Any]) -> dict[str, Tensor]:
        parts = []
        for shard in split["shards"]:
            try:
                parts.append(load_file(str(self.folder / shard["file"])))
            except (SafetensorError, OSError) as err:
                raise KdistillError(
                    f"teacher cache {self.folder}: cannot read {shard['file']} ({err})"
                ) from None
        data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        data["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), data.pop("lengths").long().cumsum(0)])
        return data

    @property
    def aligned(self) -> bool:
        """Whether the cache is of a teacher with another tokenizer (it then stores the alignment)."""
        return self.manifest["header"].get("teacher_tokenizer") is not None

    def vocab_map(self) -> VocabMap:
        """The teacher-to-student vocabulary map stored with an aligned cache."""
        try:
            return VocabMap.from_tensors(load_file(str(self.folder / fmt.VOCAB_MAP_FILE)))
        except (SafetensorError, OSError) as err:
            raise KdistillError(
                f"teacher cache {self.folder}: cannot read {fmt.VOCAB_MAP_FILE} ({err})"
            ) from None

    def alignment(self, split: str, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(example, student_pos, one_to_one)`` of each stored pair of these rows, in `signal`'s order."""
        data = self.splits[split]
        if "student_pos" not in data:
            raise KdistillError(f"teacher cache {self.folder} holds no alignment (same-tokenizer cache)")
        pieces = self._entries(split, rows)
        index = torch.cat(pieces)
        example = torch.cat([torch.full((len(p),), j, dtype=torch.long) for j, p in enumerate(pieces)])
        return example, data["student_pos"][index].long(), data["one_to_one"][index].bool()

    def _entries(self, split: str, rows: Tensor) -> list[Tensor]:
        """Per dataset row, the indices of its stored entries (one per trained token or aligned pair)."""
        offsets = self.splits[split]["offsets"]
        return [torch.arange(offsets[r], offsets[r + 1]) for r in rows.tolist()]

    def signal(self, split: str, rows: Tensor) -> Sparse:
        """The teacher's ``Sparse`` signal for these dataset rows' trained tokens, in the loss's order."""
        data = self.splits[split]
        index = torch.cat(self._entries(split, rows))
        logprobs = fmt.decode_logprobs(data["q"][index], data["top1"][index], data["step"][index])
        return Sparse(
            ids=data["ids"][index].long(),
            logprobs=logprobs,
            num_top=self.top_k,
            tail=data["tail"][index].float(),
            temperature=self.temperatures[split],
        )


@dataclass
class CachedTeacher(Teacher):
    """A teacher read from its cache: the dataset's rows only, and no hidden states."""

    cache: TeacherCache

    has_hidden: ClassVar[bool] = False
    grades_samples: ClassVar[bool] = False  # it holds only the sequences it was built from
    runs_here: ClassVar[bool] = False

    def signal(
        self, batch: dict[str, Any], split: str, vocab: int | None = None, layers: Sequence[int] = ()
    ) -> TeacherSignal:
        require_live_teacher(bool(layers), str(self.cache.folder), self.name)  # setup refuses this first
        if "row" not in batch:
            raise KdistillError("a cached teacher needs each batch's dataset row indices (batch['row'])")
        rows, device = batch["row"].cpu(), batch["input_ids"].device
        values = self.cache.signal(split, rows).to(device)
        if self.mapping is not None:  # another tokenizer: the cache stores where its rows meet the student's
            pairs = tuple(t.to(device) for t in self.cache.alignment(split, rows))
            return TeacherSignal(values, pairs=pairs)
        trained = int(trained_rows(batch["labels"])[0].sum())
        if values.ids.shape[0] != trained:
            raise KdistillError(
                f"teacher cache {self.cache.folder} holds {values.ids.shape[0]} tokens for this "
                f"batch, the batch trains {trained}; rebuild it with `kdistill cache`"
            )
        return TeacherSignal(values)
