"""Rows for a teacher with another tokenizer: its own tokens, aligned to the student's, once per example.

Each model reads the example through its own template (a teacher without a chat template gets the
plain one), so the prompts differ; the response text is the same on both sides. Both response
token lists are aligned through their character offsets within that text (`losses.alignment`), and
each aligned segment becomes one compared pair of positions: the teacher position and the student
position that both predict the segment's first token. Template tokens after the response (EOS,
`<|im_end|>`) lie outside the shared text and take part in the student's cross-entropy only.

The alignment is computed here, when the data is built, and never per step; a teacher cache stores
it with the teacher's outputs (`teacher.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdistill.data.formats import Example
from kdistill.data.tokenize import IGNORE_INDEX, Tokenized, render
from kdistill.losses.alignment import align_offsets


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
    s_prompt, s_ids, s_off = _encode(example, student_tokenizer)
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
    )


def _prepends_space(tokenizer: Any, ids: list[int], offsets: list[tuple[int, int]], text: str) -> bool:
    """Whether the first token of ``text`` carries a word marker the text does not have."""
    first = next((i for i, (a, b) in enumerate(offsets) if b > a), None)
    if first is None or text[:1].isspace():
        return False
    return tokenizer.convert_ids_to_tokens(ids[first]).startswith("▁")
