"""Distillation losses: divergences, the chunked loss entry point, hidden-state and cross-tokenizer losses."""

from kdistill.losses.alignment import AlignedText, SpanAlignment, align_text, stack_positions
from kdistill.losses.chunked import DEFAULT_CHUNK_SIZE, LossSums, distill_loss_sums
from kdistill.losses.cross_vocab import mapped_divergence, uld_distance
from kdistill.losses.divergences import DIVERGENCES
from kdistill.losses.hidden import HiddenProjections, HiddenSums, hidden_loss_sums
from kdistill.losses.vocab_map import VocabMap, build_vocab_map

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIVERGENCES",
    "AlignedText",
    "HiddenProjections",
    "HiddenSums",
    "LossSums",
    "SpanAlignment",
    "VocabMap",
    "align_text",
    "build_vocab_map",
    "distill_loss_sums",
    "hidden_loss_sums",
    "mapped_divergence",
    "stack_positions",
    "uld_distance",
]
