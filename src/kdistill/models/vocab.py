"""Do teacher and student share a vocabulary? Say so plainly when they do not."""

from __future__ import annotations

from typing import Any

from kdistill.errors import KdistillError

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
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise KdistillError(mismatch_message(teacher_name, len(teacher_tok), student_name, len(student_tok)))
    width = min(teacher_logits, student_logits)
    if width < len(teacher_tok):
        raise KdistillError(
            f"the output heads ({teacher_logits:,} and {student_logits:,} logits) are smaller than the "
            f"shared tokenizer ({len(teacher_tok):,} tokens)"
        )
    return width
