"""Rows for a teacher with another tokenizer: its own tokens, and which of its positions and the
student's predict the same text. Computed once, when the data is built, never per step; a teacher
cache stores it with the teacher's outputs.

Each model reads the example through its own template (a teacher without a chat template gets the
plain one), so the prompts differ; the response text is the same on both sides. Both response
token lists are aligned through their character offsets within that text, and each aligned segment
becomes one compared pair of positions. Template tokens after the response (EOS, `<|im_end|>`) lie
outside the shared text and take part in the student's cross-entropy only.

Span alignment. Two tokenizers cut one text differently. Walking both tokens' character offsets,
we cut the text wherever *both* tokenizers have a token boundary; the pieces between consecutive
cuts form the minimal common segmentation. Each piece (a *segment*) is a span of teacher tokens and a span of
student tokens that cover the same characters.

Which positions are compared. A causal LM's logits at position ``i`` predict token ``i + 1``. For a
segment whose first teacher token is ``a`` and first student token is ``c``, the teacher's logits at
``a - 1`` and the student's at ``c - 1`` have both read exactly the text before the segment, and both
predict how it goes on. That pair is what a loss compares. When a side's segment starts at token 0
(nothing before it, not even BOS) it has no predicting position, and the segment is not compared.

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.data.formats import Example
from kdistill.data.tokenize import IGNORE_INDEX, Tokenized, render

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
    def one_to_one(self) -> Tensor:
        """``(S,)`` bool: the segment is exactly one teacher token and one student token."""
        return (self.teacher_end - self.teacher_start == 1) & (self.student_end - self.student_start == 1)


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


@dataclass(frozen=True)
class TeacherView:
    """One row as a teacher with another tokenizer reads it, and the pairs of positions compared.

    Attributes:
        input_ids: the teacher's tokens for the row (its template, truncated to ``max_length``).
        teacher_pos: ``(S,)`` ascending teacher positions whose logits predict each aligned segment.
        student_pos: ``(S,)`` ascending student positions predicting the same segments.
        one_to_one: ``(S,)`` whether the segment is one token on each side (then its next-token
            distributions compare through the vocabulary map; otherwise through ULD).
    """

    input_ids: list[int]
    teacher_pos: list[int]
    student_pos: list[int]
    one_to_one: list[bool]
    prompt: list[dict[str, str]] | None = None  # the example's prompt, for responses written later

    def as_row(self, index: int) -> Tokenized:
        """The view as a `Tokenized` row whose trained positions are exactly ``teacher_pos``.

        Labels mark position ``p + 1`` for each compared ``p``, so the ordinary collator and the
        teacher cache (which both read trained positions off the labels) pick these rows.
        """
        labels = [IGNORE_INDEX] * len(self.input_ids)
        for p in self.teacher_pos:
            labels[p + 1] = self.input_ids[p + 1]
        return Tokenized(self.input_ids, labels, index)


def _response_offsets(
    tokenizer: Any, response: str, content: str, add_special: bool
) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of ``response`` and each token's characters within ``content`` (``(0, 0)`` outside it)."""
    enc = tokenizer(response, add_special_tokens=add_special, return_offsets_mapping=True)
    start = response.find(content)
    if start < 0:  # a template that rewrites the response: nothing can be aligned in this row
        return enc["input_ids"], [(0, 0)] * len(enc["input_ids"])
    end = start + len(content)
    offsets = [
        (a - start, b - start) if start <= a and b <= end and b > a else (0, 0)
        for a, b in enc["offset_mapping"]
    ]
    return enc["input_ids"], offsets


def _encode(example: Example, tokenizer: Any) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Prompt ids, response ids and response offsets, tokenized exactly as `tokenize_examples` does."""
    add_special = not getattr(tokenizer, "chat_template", None)
    prompt, response = render(example, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"] if prompt else []
    ids, offsets = _response_offsets(tokenizer, response, example.response, not prompt and add_special)
    return prompt_ids, ids, offsets


def teacher_view(
    example: Example, student_tokenizer: Any, teacher_tokenizer: Any, max_length: int
) -> TeacherView:
    """The teacher's tokens for ``example`` and the positions compared with the student's.

    Both sides are truncated to ``max_length`` as training truncates; a segment counts only when
    all its tokens survive on both sides and both predicting positions exist.
    """
    student = _encode(example, student_tokenizer)
    return _view(example, student, student_tokenizer, teacher_tokenizer, max_length)


def generated_view(
    prompt: list[dict[str, str]],
    prompt_ids: list[int],
    response_ids: list[int],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    max_length: int,
) -> TeacherView:
    """The teacher's view of a response the student wrote: its exact tokens ``response_ids`` after
    ``prompt_ids`` (the student's prompt, possibly cut), against the teacher's rendering of ``prompt``
    and of the response's text. The student's side is never re-tokenized: each sampled token keeps
    its own characters (``_written_offsets``), so the compared positions are those of the row the
    student trains on, even where it sampled a tokenization its tokenizer would not produce."""
    text, offsets = _written_offsets(student_tokenizer, response_ids)
    student = (prompt_ids, response_ids, offsets)
    return _view(Example(prompt, text), student, student_tokenizer, teacher_tokenizer, max_length)


def _written_offsets(tokenizer: Any, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` (special tokens dropped) and each token's characters within it.

    Decoding a growing prefix gives each token the characters it adds; a token that completes a
    multi-byte character takes the whole character, and special tokens add none (``(0, 0)``).
    """
    offsets, previous = [], 0
    for n in range(1, len(ids) + 1):
        end = len(tokenizer.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd"))
        offsets.append((previous, end) if end > previous else (0, 0))
        previous = max(previous, end)
    return tokenizer.decode(ids, skip_special_tokens=True), offsets


def _view(
    example: Example,
    student: tuple[list[int], list[int], list[tuple[int, int]]],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    max_length: int,
) -> TeacherView:
    s_prompt, s_ids, s_off = student
    t_prompt, t_ids, t_off = _encode(example, teacher_tokenizer)
    spans = align_offsets(t_off, s_off)
    one_to_one = spans.one_to_one.clone()
    if len(spans) and (
        _prepends_space(teacher_tokenizer, t_ids, t_off, example.response)
        != _prepends_space(student_tokenizer, s_ids, s_off, example.response)
    ):
        # SentencePiece writes a text's first word as "▁word" (" word"), a byte-level BPE as "word": the
        # first segment's next tokens differ in text, so they are compared without the token map (ULD).
        one_to_one[0] = False
    t_start = spans.teacher_start + len(t_prompt)
    s_start = spans.student_start + len(s_prompt)
    keep = (t_start > 0) & (s_start > 0)
    keep &= (spans.teacher_end + len(t_prompt) <= max_length) & (
        spans.student_end + len(s_prompt) <= max_length
    )
    return TeacherView(
        input_ids=(t_prompt + t_ids)[:max_length],
        teacher_pos=(t_start[keep] - 1).tolist(),
        student_pos=(s_start[keep] - 1).tolist(),
        one_to_one=one_to_one[keep].tolist(),
        prompt=example.prompt,
    )


def _prepends_space(tokenizer: Any, ids: list[int], offsets: list[tuple[int, int]], text: str) -> bool:
    """Whether the first token of ``text`` carries a word marker the text does not have."""
    first = next((i for i, (a, b) in enumerate(offsets) if b > a), None)
    if first is None or text[:1].isspace():
        return False
    return tokenizer.convert_ids_to_tokens(ids[first]).startswith("▁")
