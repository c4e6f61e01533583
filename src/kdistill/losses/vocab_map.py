"""A mapping between two vocabularies, for tokens that stand for the same text.

Tokenizers spell the same text differently: GPT-2's byte-level BPE writes " the" as ``Ġthe`` and a
newline as ``Ċ`` (each byte shown as a printable character), SentencePiece writes it ``▁the`` and
falls back to byte tokens such as ``<0x0A>``. We turn every token into the bytes it decodes to, its
*surface*, and pair teacher and student tokens whose surfaces are equal. Special tokens have no
surface (they stand for no text) and stay unmapped, except that EOS is paired with EOS.

One mismatch is left on purpose: SentencePiece prepends ``▁`` to a text, so a text's very first
word is ``▁The`` on its side (surface " The", mapped to GPT-2's ``ĠThe``) but ``The`` on a byte-level
side. It touches only the first token of a text, which in training is part of the prompt.
The divergences on these mapped outcomes are in ``cross_vocab``.

The byte-level table is transformers' ``bytes_to_unicode``; the rest is written here because no
library exposes a per-token byte surface (``tokenizer.decode`` of one token turns a lone byte of a
multi-byte character into U+FFFD, losing it).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kdistill.errors import KdistillError
from kdistill.losses.signal import Sparse

logger = logging.getLogger("kdistill")

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _byte_level_table() -> dict[int, int]:
    """Printable stand-in character -> byte, as a ``str.translate`` table (then a latin-1 encode)."""
    # Imported here: transformers takes seconds to import, and only vocabulary mapping needs it.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ord(char): byte for byte, char in bytes_to_unicode().items()}


@dataclass(frozen=True)
class VocabMap:
    """Pairs of teacher and student token ids whose tokens decode to the same bytes.

    Attributes:
        teacher_ids: ``(M,)`` int64 teacher ids, each at most once.
        student_ids: ``(M,)`` int64 student id of each; several teacher ids may share one.
        teacher_size: teacher tokenizer size ``Vt`` (ids ``>= Vt``, e.g. a padded head, are unmapped).
        student_size: student tokenizer size ``Vs``.
    """

    teacher_ids: Tensor
    student_ids: Tensor
    teacher_size: int
    student_size: int
    _plans: dict = field(default_factory=dict, compare=False, repr=False)  # dense_plan's memo

    def __len__(self) -> int:
        return int(self.teacher_ids.numel())

    def dense_plan(self, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(teacher_ids, image, column)`` for projecting ``(N, width)`` teacher rows, memoised.

        ``teacher_ids`` ``(M,)`` are the mapped teacher ids below ``width``, ``image`` ``(M',)`` the
        distinct student ids they map to (sorted) and ``column`` ``(M,)`` each one's index in
        ``image``. Computed once per width and device: a loss calls it for every chunk.
        """
        key = (width, str(device))
        if key not in self._plans:
            table = self.lookup(width, device)
            t_ids = torch.nonzero(table >= 0).squeeze(-1)
            image, column = torch.unique(table[t_ids], return_inverse=True)
            self._plans[key] = (t_ids, image, column)
        return self._plans[key]

    def lookup(self, width: int | None = None, device: torch.device | str | None = None) -> Tensor:
        """``(width,)`` int64 student id of each teacher id, -1 where unmapped (width defaults to ``Vt``)."""
        width = self.teacher_size if width is None else width
        table = torch.full((width,), -1, dtype=torch.long)
        keep = self.teacher_ids < width
        table[self.teacher_ids[keep]] = self.student_ids[keep]
        return table.to(device)

    def lookup_for(self, ids: Tensor) -> Tensor:
        """``lookup`` wide enough for teacher ``ids`` (any shape, e.g. a padded head's), on their device."""
        width = max(self.teacher_size, int(ids.max()) + 1 if ids.numel() else 0)
        return self.lookup(width, ids.device)

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat dict for ``safetensors``; sizes ride along as 0-d tensors."""
        return {
            "teacher_ids": self.teacher_ids,
            "student_ids": self.student_ids,
            "teacher_size": torch.tensor(self.teacher_size),
            "student_size": torch.tensor(self.student_size),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> VocabMap:
        """Inverse of ``to_tensors``."""
        return cls(
            tensors["teacher_ids"].long(),
            tensors["student_ids"].long(),
            int(tensors["teacher_size"]),
            int(tensors["student_size"]),
        )


def require_fast(tokenizer: Any, role: str, why: str) -> None:
    """Refuse a slow tokenizer where character offsets or per-token surfaces are needed (`why`)."""
    if not getattr(tokenizer, "is_fast", False):
        raise KdistillError(
            f"the {role} tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer: {why}, which only "
            "fast tokenizers (tokenizer.json) provide"
        )


def _decoder_types(backend: Any) -> set[str]:
    """Types of the tokenizer's decoder, and of its parts when it is a ``Sequence``."""
    if backend.decoder is None:
        return set()
    state = json.loads(backend.decoder.__getstate__())
    parts = state.get("decoders", [state])
    types = {part["type"] for part in parts}
    # A SentencePiece-style tokenizer may spell its word marker as Replace("▁", " ") instead of Metaspace.
    if any(p["type"] == "Replace" and p.get("pattern", {}).get("String") == "▁" for p in parts):
        types.add("Metaspace")
    return types


def _surface(token: str, kinds: set[str]) -> bytes:
    """The bytes one token decodes to, given the decoder types of its tokenizer."""
    if "ByteLevel" in kinds:
        try:
            return token.translate(_byte_level_table()).encode("latin-1")
        except UnicodeEncodeError:  # an added token written as plain text, not in byte-level spelling
            return token.encode("utf-8")
    if "ByteFallback" in kinds and (match := _BYTE_TOKEN.match(token)):
        return bytes([int(match.group(1), 16)])
    if "Metaspace" in kinds:
        token = token.replace("▁", " ")
    elif "WordPiece" in kinds:
        # Approximate: "##ing" continues a word; a word-initial piece's preceding space is unknown.
        token = token.removeprefix("##")
    return token.encode("utf-8")


def _byte_level_surfaces(tokens: list[str]) -> list[bytes]:
    """``_surface`` of many byte-level tokens at once: one translate and encode over their concatenation.

    Each stand-in character is one byte, so byte offsets equal character offsets. Per token only
    when some token is not in byte-level spelling (then the joined encode fails).
    """
    try:
        joined = "".join(tokens).translate(_byte_level_table()).encode("latin-1")
    except UnicodeEncodeError:
        return [_surface(token, {"ByteLevel"}) for token in tokens]
    ends = list(itertools.accumulate(len(token) for token in tokens))
    return [joined[end - len(token) : end] for token, end in zip(tokens, ends)]


def token_surfaces(tokenizer: Any) -> list[bytes | None]:
    """The decoded bytes of every token id ``0..len(tokenizer)-1``; ``None`` for special tokens and holes."""
    require_fast(tokenizer, "teacher or student", "mapping vocabularies needs each token's surface")
    backend = tokenizer.backend_tokenizer
    kinds = _decoder_types(backend)
    size = max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))
    special = set(tokenizer.all_special_ids)
    special |= {i for i, added in tokenizer.added_tokens_decoder.items() if added.special}
    # id_to_token in a loop is faster than get_vocab(), which builds a Python dict of the whole vocabulary.
    ids = [i for i in range(size) if i not in special]
    tokens = [backend.id_to_token(i) for i in ids]
    ids, tokens = [i for i, t in zip(ids, tokens) if t is not None], [t for t in tokens if t is not None]
    if "ByteLevel" in kinds:
        values = _byte_level_surfaces(tokens)
    else:
        values = [_surface(token, kinds) for token in tokens]
    surfaces: list[bytes | None] = [None] * size
    for index, value in zip(ids, values):
        surfaces[index] = value
    return surfaces


def build_vocab_map(teacher_tokenizer: Any, student_tokenizer: Any, pair_eos: bool = True) -> VocabMap:
    """Map every teacher token to the student token with the same surface (the lowest id if several).

    Also pairs the two EOS tokens when ``pair_eos`` and both tokenizers have one, so the end of a
    response can be distilled. A dict join over both vocabularies: under 0.5 s for Llama-3's 128k
    tokens against GPT-2's 50k on 2 CPU cores, so it is rebuilt per run rather than cached on disk.
    """
    t_surfaces, s_surfaces = token_surfaces(teacher_tokenizer), token_surfaces(student_tokenizer)
    by_surface: dict[bytes, int] = {}
    for index, surface in enumerate(s_surfaces):
        if surface:  # an empty surface (a lone "▁"-less marker) matches nothing meaningful
            by_surface.setdefault(surface, index)
    pairs = {t: by_surface[s] for t, s in enumerate(t_surfaces) if s and s in by_surface}
    t_eos, s_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if pair_eos and t_eos is not None and s_eos is not None:
        pairs[t_eos] = s_eos
    ids = sorted(pairs)
    mapping = VocabMap(
        teacher_ids=torch.tensor(ids, dtype=torch.long),
        student_ids=torch.tensor([pairs[i] for i in ids], dtype=torch.long),
        teacher_size=len(t_surfaces),
        student_size=len(s_surfaces),
    )
    logger.info(
        "vocabulary map: %d of %d teacher tokens map to the student's %d",
        len(mapping),
        len(t_surfaces),
        len(s_surfaces),
    )
    return mapping


def mapped_mass_share(teacher: Tensor | Sparse, mapping: VocabMap) -> Tensor:
    """``(N,)`` share of each row's teacher mass (T = 1) on tokens that map into the student's vocabulary.

    For a ``Sparse`` teacher the share is of its top-k mass: ``sum_mapped p_i / sum_k p_i``.
    """
    if isinstance(teacher, Sparse):
        probs, ids = teacher.logprobs.float().exp(), teacher.ids.long()
        return (probs * (mapping.lookup_for(ids)[ids] >= 0)).sum(-1) / probs.sum(-1)
    probs = torch.softmax(teacher.float(), dim=-1)
    return (probs * (mapping.lookup(teacher.shape[-1], teacher.device) >= 0)).sum(-1)
