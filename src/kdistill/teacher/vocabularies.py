"""Which teachers share the student's vocabulary, and how the others are aligned to it.

A teacher whose tokenizer maps every token to the same id as the student's is compared logit by
logit over the shared width. Any other teacher is distilled across tokenizers (`loss.alignment`):
both tokenizers read the same text, positions are aligned through character offsets
(`data.cross`), and distributions are compared through a map between the vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdistill.config import RunConfig
from kdistill.errors import KdistillError
from kdistill.losses import VocabMap, build_vocab_map
from kdistill.losses.vocab_map import require_fast
from kdistill.models.build import student_source, teacher_source
from kdistill.models.loading import ModelSource, load_config_only, load_tokenizer
from kdistill.models.parts import logit_width


@dataclass
class Vocabularies:
    """The student's tokenizer, the logit width it shares with same-vocabulary teachers, and the rest.

    Attributes:
        tokenizer: the student's tokenizer.
        width: logits compared token by token (the student's own width without such a teacher).
        cross: teacher name -> tokenizer, for each live-model teacher with another vocabulary.
        cross_width: teacher name -> that teacher's logit width.
    """

    tokenizer: Any
    width: int
    cross: dict[str, Any] = field(default_factory=dict)
    cross_width: dict[str, int] = field(default_factory=dict)

    def mapping(self, name: str) -> VocabMap:
        """The vocabulary map of teacher `name` to the student (built on first use: it takes seconds)."""
        if name not in self._maps:
            self._maps[name] = build_vocab_map(self.cross[name], self.tokenizer)
        return self._maps[name]

    def __post_init__(self) -> None:
        self._maps: dict[str, VocabMap] = {}


def load_vocabularies(
    cfg: RunConfig, config_of: Callable[[ModelSource], Any] = load_config_only
) -> Vocabularies:
    """Load the tokenizers and model configs, sort teachers into same- and cross-vocabulary ones.

    A cache-only teacher is sorted when its cache is opened (its manifest records its tokenizer).
    `config_of` reads a model's config (the caller's memo: a GGUF file's takes seconds to parse).
    """
    named = [(name, t) for name, t in cfg.teacher_list() if t.model is not None]
    if cfg.student.model is None and not named:
        raise KdistillError("student.from_teacher needs the teacher's model; give teacher.model")
    s_source = student_source(cfg.student) if cfg.student.model is not None else teacher_source(named[0][1])
    s_tok, s_width = load_tokenizer(s_source), logit_width(config_of(s_source))
    student_name = cfg.student.model or named[0][1].model
    vocabs = Vocabularies(s_tok, s_width)
    for name, teacher in named:
        source = teacher_source(teacher)
        t_tok, t_width = load_tokenizer(source), logit_width(config_of(source))
        if same_vocabulary(t_tok, s_tok):
            vocabs.width = min(
                vocabs.width, shared_vocab_size(teacher.model, t_tok, t_width, student_name, s_tok, s_width)
            )
            continue
        why = (
            f"teacher {name!r} uses another tokenizer than the student; aligning them needs character offsets"
        )
        require_fast(t_tok, f"teacher {name!r}", why)
        require_fast(s_tok, "student", why)
        vocabs.cross[name], vocabs.cross_width[name] = t_tok, t_width
    check_cross_options(cfg, list(vocabs.cross))
    return vocabs


def check_cross_options(cfg: RunConfig, cross: list[str]) -> None:
    """Options that cannot work with a teacher of another tokenizer, refused with the reason."""
    if not cross:
        return
    if cfg.loss.multi_teacher == "mixture" and len(cfg.teacher_list()) > 1:
        raise KdistillError(
            f"loss.multi_teacher: mixture averages the teachers' distributions over one vocabulary, but "
            f"teacher {cross[0]!r} uses another tokenizer than the student; use loss.multi_teacher: sum"
        )
    if cfg.loss.hidden.weight > 0:
        raise KdistillError(
            f"loss.hidden pairs the teacher's and the student's states position by position, but teacher "
            f"{cross[0]!r} uses another tokenizer than the student (its positions differ); set "
            "loss.hidden.weight: 0 or use a teacher of the student's tokenizer"
        )
    if cfg.data.responses == "teacher":
        raise KdistillError(
            "data.responses: teacher is not supported with a teacher of another tokenizer; use the dataset's "
            "responses (data.responses: dataset)"
        )


def known_alignment(cfg: RunConfig) -> dict[str, str]:
    """Well-known hub models: teacher name -> its alignment line, from kdistill's table (loads nothing)."""
    student = cfg.student.model or cfg.teacher_list()[0][1].model
    lines = {}
    for name, teacher in cfg.teacher_list():
        if teacher.model in KNOWN_VOCABULARIES and student in KNOWN_VOCABULARIES:
            (t_size, t_family), (s_size, s_family) = (
                KNOWN_VOCABULARIES[teacher.model],
                KNOWN_VOCABULARIES[student],
            )
            how = "same tokenizer"
            if t_family != s_family:
                sizes = f"{t_family}, {t_size:,} tokens -> {s_family}, {s_size:,}"
                how = f"loss.alignment {cfg.loss.alignment}: {sizes}"
            lines[name] = f"teacher {name}: {how} (from kdistill's table of known models)"
    return lines


def same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> bool:
    """Whether the two tokenizers give every token the same id (logits then compare token by token)."""
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


# Vocabularies of well-known hub models, so `kdistill validate` can name a mismatch even offline.
# (tokenizer entries, tokenizer family)
KNOWN_VOCABULARIES = {
    "mistralai/Mistral-7B-v0.1": (32_000, "Mistral/Llama SentencePiece"),
    "mistralai/Mistral-7B-Instruct-v0.2": (32_000, "Mistral/Llama SentencePiece"),
    "meta-llama/Llama-2-7b-hf": (32_000, "Llama-2 SentencePiece"),
    "microsoft/phi-2": (50_295, "GPT-2 byte-level BPE"),
    "Qwen/Qwen2.5-7B-Instruct": (151_665, "Qwen2 byte-level BPE"),
    "Qwen/Qwen2.5-1.5B-Instruct": (151_665, "Qwen2 byte-level BPE"),
}


def mismatch_message(teacher: str, teacher_size: int, student: str, student_size: int) -> str:
    return (
        f"teacher and student use different tokenizers: teacher '{teacher}' has a {teacher_size:,}-token "
        f"vocabulary, student '{student}' a {student_size:,}-token one, so their logits cannot be compared "
        "token by token; kdistill aligns such a pair instead (loss.alignment)"
    )


def shared_vocab_size(
    teacher_name: str,
    teacher_tok: Any,
    teacher_logits: int,
    student_name: str,
    student_tok: Any,
    student_logits: int,
) -> int:
    """The logit width both heads share, after checking the tokenizers map tokens to the same ids.

    Heads are often padded past the tokenizer (Phi-2: 51,200 logits for 50,295 tokens), so equal
    tokenizers with unequal heads are fine: only the first `min(...)` logits are compared.
    """
    if not same_vocabulary(teacher_tok, student_tok):
        raise KdistillError(mismatch_message(teacher_name, len(teacher_tok), student_name, len(student_tok)))
    width = min(teacher_logits, student_logits)
    if width < len(teacher_tok):
        raise KdistillError(
            f"the output heads ({teacher_logits:,} and {student_logits:,} logits) are smaller than the "
            f"shared tokenizer ({len(teacher_tok):,} tokens)"
        )
    return width
