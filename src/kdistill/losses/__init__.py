"""Distillation losses: divergences between teacher and student, and the chunked loss entry point."""

from kdistill.losses.chunked import DEFAULT_CHUNK_SIZE, LossSums, distill_loss_sums
from kdistill.losses.divergences import DIVERGENCES

__all__ = ["DEFAULT_CHUNK_SIZE", "DIVERGENCES", "LossSums", "distill_loss_sums"]
