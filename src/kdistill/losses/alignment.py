"""Cross-tokenizer span alignment: which teacher and student positions predict the same text.

Two tokenizers cut one text differently. Walking both tokens' character offsets, we cut the text
wherever *both* tokenizers have a token boundary; the pieces between consecutive cuts form the
minimal common segmentation. Each piece (a *segment*) is a span of teacher tokens and a span of
student tokens that cover the same characters.

Which positions are compared. A causal LM's logits at position ``i`` predict token ``i + 1``. For a
segment whose first teacher token is ``a`` and first student token is ``c``, the teacher's logits at
``a - 1`` and the student's at ``c - 1`` have both read exactly the text before the segment, and both
predict how it goes on. That pair is what a loss compares (``teacher_pos``, ``student_pos``). When a
side's segment starts at token 0 (nothing before it, not even BOS) it has no predicting position:
its ``*_pos`` is -1 and ``usable`` is False.

Details that real tokenizers bring:
- Special tokens added by the tokenizer (BOS, EOS) have empty offsets ``(0, 0)``: they belong to no
  segment, but a BOS is the predicting position of the first segment.
- Byte-level BPE splits a multi-byte character over several tokens that share its offsets, and
  SentencePiece's byte fallback (``<0xE2>``) does the same: no cut can fall between such tokens.
- SentencePiece prepends ``▁`` to the text, and its ``▁`` token overlaps the next token's offsets.
- Characters a tokenizer skips (whitespace dropped by a pre-tokenizer) leave gaps; a cut may sit
  anywhere in a gap, so gaps never prevent alignment.
- Where one tokenizer has boundaries the other cannot match (a gap on one side holding tokens on
  the other), a segment would be empty on one side; the cut before it is dropped, so the extra
  tokens join the previous segment (or, at the start of the text, stay unaligned).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.errors import KdistillError

_FAR = np.iinfo(np.int64).max // 2  # the last cut may sit anywhere after the text


@dataclass(frozen=True)
class SpanAlignment:
    """Aligned segments of one text: ``S`` segments, each a teacher and a student token span.

    All fields are ``(S,)`` int64 tensors; token indices refer to each tokenizer's full ``input_ids``
    (special tokens included), ends are exclusive. Segments are in text order and do not overlap.

    Attributes:
        teacher_start, teacher_end: teacher token span ``[teacher_start, teacher_end)``.
        student_start, student_end: student token span.
        char_start, char_end: the characters ``[char_start, char_end)`` both spans lie in.
    """

    teacher_start: Tensor
    teacher_end: Tensor
    student_start: Tensor
    student_end: Tensor
    char_start: Tensor
    char_end: Tensor

    def __len__(self) -> int:
        return int(self.teacher_start.numel())

    @property
    def teacher_pos(self) -> Tensor:
        """``(S,)`` teacher position whose logits predict the segment's first token; -1 if none."""
        return self.teacher_start - 1

    @property
    def student_pos(self) -> Tensor:
        """``(S,)`` student position whose logits predict the segment's first token; -1 if none."""
        return self.student_start - 1

    @property
    def usable(self) -> Tensor:
        """``(S,)`` bool: both sides have a predicting position, so the segment can enter a loss."""
        return (self.teacher_start > 0) & (self.student_start > 0)

    @property
    def one_to_one(self) -> Tensor:
        """``(S,)`` bool: the segment is exactly one teacher token and one student token."""
        return (self.teacher_end - self.teacher_start == 1) & (self.student_end - self.student_start == 1)

    def select(self, keep: Tensor) -> SpanAlignment:
        """The segments where the ``(S,)`` bool ``keep`` is True."""
        return SpanAlignment(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})

    def within(self, char_start: int, char_end: int | None = None) -> SpanAlignment:
        """The segments lying entirely in characters ``[char_start, char_end)``, e.g. the response."""
        keep = self.char_start >= char_start
        if char_end is not None:
            keep &= self.char_end <= char_end
        return self.select(keep)

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat ``name -> tensor`` dict, for ``safetensors`` or a teacher cache shard."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> SpanAlignment:
        """Inverse of ``to_tensors``."""
        missing = [f.name for f in fields(cls) if f.name not in tensors]
        if missing:
            raise KdistillError(f"stored span alignment lacks {', '.join(missing)}")
        return cls(**{f.name: tensors[f.name].long() for f in fields(cls)})


@dataclass(frozen=True)
class AlignedText:
    """One text tokenized by both tokenizers, with its span alignment.

    Attributes:
        teacher_ids: ``(Lt,)`` int64 teacher ``input_ids``.
        student_ids: ``(Ls,)`` int64 student ``input_ids``.
        spans: the aligned segments.
    """

    teacher_ids: Tensor
    student_ids: Tensor
    spans: SpanAlignment

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat dict of tensors (``teacher_ids``, ``student_ids``, ``spans.*``), for caching."""
        spans = {f"spans.{k}": v for k, v in self.spans.to_tensors().items()}
        return {"teacher_ids": self.teacher_ids, "student_ids": self.student_ids, **spans}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> AlignedText:
        """Inverse of ``to_tensors``."""
        spans = {k.removeprefix("spans."): v for k, v in tensors.items() if k.startswith("spans.")}
        return cls(
            tensors["teacher_ids"].long(), tensors["student_ids"].long(), SpanAlignment.from_tensors(spans)
        )


def _cut_intervals(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where one tokenizer allows a cut, for its ``n`` tokens of non-empty ``offsets`` ``(n, 2)``.

    A cut before token ``k`` (``0 <= k <= n``) is possible when every earlier token ends at or
    before every later token starts; it may then sit at any character in ``[lo, hi]``. Returns the
    possible ``k`` and their ``lo``, ``hi``; tokens sharing a character (a split multi-byte
    character, SentencePiece's prepended ``▁``) make ``lo > hi`` and so allow no cut between them.
    As tokens have non-empty offsets, the intervals are disjoint and increasing.
    """
    lo = np.concatenate([[0], np.maximum.accumulate(offsets[:, 1])])
    hi = np.concatenate([np.minimum.accumulate(offsets[::-1, 0])[::-1], [_FAR]])
    ok = lo <= hi
    return np.flatnonzero(ok), lo[ok], hi[ok]


def _empty_alignment() -> SpanAlignment:
    empty = torch.zeros(0, dtype=torch.long)
    return SpanAlignment(*(empty for _ in range(6)))


def align_offsets(
    teacher_offsets: Sequence[Sequence[int]] | np.ndarray | Tensor,
    student_offsets: Sequence[Sequence[int]] | np.ndarray | Tensor,
) -> SpanAlignment:
    """Align two tokenizations of one text through their character offsets.

    Args:
        teacher_offsets: ``(Lt, 2)`` character ``(start, end)`` of each teacher token, as a fast
            tokenizer's ``return_offsets_mapping`` gives them; empty ones (special tokens) are skipped.
        student_offsets: ``(Ls, 2)`` the same for the student's tokens.

    Returns:
        The minimal common segmentation (see the module docstring).
    """
    t_all = np.asarray(teacher_offsets, dtype=np.int64).reshape(-1, 2)
    s_all = np.asarray(student_offsets, dtype=np.int64).reshape(-1, 2)
    t_keep = np.flatnonzero(t_all[:, 1] > t_all[:, 0])
    s_keep = np.flatnonzero(s_all[:, 1] > s_all[:, 0])
    if t_keep.size == 0 or s_keep.size == 0:
        return _empty_alignment()
    kt, lo_t, hi_t = _cut_intervals(t_all[t_keep])
    ks, lo_s, hi_s = _cut_intervals(s_all[s_keep])
    # For each teacher cut interval, the last student interval that overlaps it (if any).
    j = np.searchsorted(lo_s, hi_t, side="right") - 1
    ok = (j >= 0) & (hi_s[j.clip(0)] >= lo_t)
    ti, j = kt[ok], j[ok]
    si, char = ks[j], np.maximum(lo_t[ok], lo_s[j])
    # A student cut shared by several teacher cuts would leave empty teacher segments: keep the last.
    last = np.append(si[1:] != si[:-1], True)
    ti, si, char = ti[last], si[last], char[last]
    # Back to indices in the full token lists: a cut before the k-th kept token sits before its
    # index there; the cut after the last kept token sits just after it.
    t_index = np.append(t_keep, t_keep[-1] + 1)[ti]
    s_index = np.append(s_keep, s_keep[-1] + 1)[si]
    as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a)).long()  # noqa: E731
    return SpanAlignment(
        teacher_start=as_long(t_index[:-1]),
        teacher_end=as_long(t_index[1:]),
        student_start=as_long(s_index[:-1]),
        student_end=as_long(s_index[1:]),
        char_start=as_long(char[:-1]),
        char_end=as_long(char[1:]),
    )


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, role: str) -> tuple[list[int], list]:
    if not getattr(tokenizer, "is_fast", False):
        raise KdistillError(
            f"the {role} tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer: aligning "
            "tokenizers needs character offsets, which only fast tokenizers (tokenizer.json) provide"
        )
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def align_text(
    text: str, teacher_tokenizer: Any, student_tokenizer: Any, add_special_tokens: bool = True
) -> AlignedText:
    """Tokenize ``text`` with both fast tokenizers and align the two token lists.

    Compute this once per example and cache it (``AlignedText.to_tensors``), not once per step.
    """
    t_ids, t_off = _encode(teacher_tokenizer, text, add_special_tokens, "teacher")
    s_ids, s_off = _encode(student_tokenizer, text, add_special_tokens, "student")
    spans = align_offsets(t_off, s_off)
    return AlignedText(torch.tensor(t_ids, dtype=torch.long), torch.tensor(s_ids, dtype=torch.long), spans)


def stack_positions(alignments: Sequence[SpanAlignment]) -> tuple[Tensor, Tensor, Tensor]:
    """Usable compared positions of a batch, flattened: ``(example, teacher_pos, student_pos)``.

    Each is ``(N,)`` int64 with N the number of usable segments over the batch, so
    ``teacher_logits[example, teacher_pos]`` and ``student_logits[example, student_pos]`` are the
    ``(N, V)`` rows a cross-vocabulary divergence compares (right padding assumed: positions are
    those of the unpadded sequence).
    """
    parts = []
    for index, spans in enumerate(alignments):
        keep = spans.usable
        pos_t, pos_s = spans.teacher_pos[keep], spans.student_pos[keep]
        parts.append((torch.full_like(pos_t, index), pos_t, pos_s))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    example, pos_t, pos_s = (torch.cat(p) for p in zip(*parts))
    return example, pos_t, pos_s


def aligned_share(
    spans: SpanAlignment, teacher_offsets: Sequence[Sequence[int]] | np.ndarray
) -> tuple[float, float]:
    """Shares of the teacher's non-special tokens that lie in a segment, and in a one-to-one segment."""
    offsets = np.asarray(teacher_offsets, dtype=np.int64).reshape(-1, 2)
    real = offsets[:, 1] > offsets[:, 0]
    if not real.any():
        return 0.0, 0.0
    covered = np.zeros(len(offsets), dtype=bool)
    exact = np.zeros(len(offsets), dtype=bool)
    for start, end, single in zip(
        spans.teacher_start.tolist(), spans.teacher_end.tolist(), spans.one_to_one.tolist()
    ):
        covered[start:end] = True
        exact[start:end] = single
    return float((covered & real).sum() / real.sum()), float((exact & real).sum() / real.sum())
