"""Distillation losses: the teacher signal types, divergences, the chunked head, hidden-state distances
and KD across vocabularies. Every function returns sums over tokens; the objective normalises once."""

from kdistill.losses.chunked import DEFAULT_CHUNK_SIZE, LossSums, distill_loss_sums
from kdistill.losses.cross_vocab import aligned_kd_sum, mapped_divergence, uld_distance
from kdistill.losses.hidden import HiddenProjections, HiddenSums, hidden_loss_sums
from kdistill.losses.registry import LOSSES, Loss, Param, check_loss
from kdistill.losses.signal import Dense, DenseHidden, Ensemble, Sparse
from kdistill.losses.vocab_map import VocabMap, build_vocab_map

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "Dense",
    "DenseHidden",
    "Ensemble",
    "HiddenProjections",
    "HiddenSums",
    "LOSSES",
    "Loss",
    "LossSums",
    "Param",
    "Sparse",
    "VocabMap",
    "aligned_kd_sum",
    "build_vocab_map",
    "check_loss",
    "distill_loss_sums",
    "hidden_loss_sums",
    "mapped_divergence",
    "uld_distance",
]
