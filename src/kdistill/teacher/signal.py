"""What a teacher tells the student, as typed values.

A loss takes one of these and never asks where it came from, so a live teacher and a cached one can
be swapped without touching a loss (the DistillKit design). All three describe the same N trained
token rows, already flattened to response positions only.

- ``Dense``: the full teacher logits ``(N, V)``.
- ``DenseHidden``: the teacher's final hidden states and its ``lm_head``, so the chunked loss can
  compute teacher logits a chunk of rows at a time and the ``(N, V)`` matrix never exists.
- ``Sparse``: the teacher's top-k token ids and their log-probabilities, as a teacher cache stores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def softcap_logits(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma-2 style final logit soft-capping ``cap * tanh(logits / cap)``; ``None`` leaves them as is."""
    if cap is None:
        return logits
    return cap * torch.tanh(logits / cap)


@dataclass(frozen=True)
class Dense:
    """Full teacher logits for N trained rows.

    Attributes:
        logits: ``(N, V)`` teacher logits, any float dtype (losses upcast to fp32).
    """

    logits: Tensor

    def rows(self, start: int, end: int) -> Tensor:
        """fp32 teacher logits ``(end - start, V)`` of rows ``start:end``."""
        return self.logits[start:end].float()


@dataclass(frozen=True)
class DenseHidden:
    """Teacher final hidden states plus its output head; logits are made on demand, chunk by chunk.

    Attributes:
        hidden: ``(N, Ht)`` teacher hidden states after the final norm, at the trained rows.
        head: ``(V, Ht)`` teacher ``lm_head`` weight.
        bias: optional ``(V,)`` ``lm_head`` bias.
        softcap: optional final logit soft-cap (Gemma-2); ``None`` means off.
    """

    hidden: Tensor
    head: Tensor
    bias: Tensor | None = None
    softcap: float | None = None

    def rows(self, start: int, end: int) -> Tensor:
        """fp32 teacher logits ``(end - start, V)`` of rows ``start:end``, computed without autograd."""
        with torch.no_grad():
            logits = F.linear(self.hidden[start:end], self.head, self.bias).float()
            return softcap_logits(logits, self.softcap)


@dataclass(frozen=True)
class Sparse:
    """The teacher's top-k tokens per row, as a teacher cache stores them.

    Format: ``ids`` ``(N, k)`` int64 are distinct token ids per row (any order) and ``logprobs``
    ``(N, k)`` are the teacher's log-softmax over the *full* vocabulary at temperature 1, taken at
    those ids. Nothing else is stored: the T = 1 mass outside the top k is ``1 - sum(exp(logprobs))``
    (clamped at 0, since rounding can push the sum past 1), and it is exactly 0 when ``k == V``.

    Temperature: logits are log-probs up to a per-row constant, so inside the top k the softmax of
    ``logits / T`` is exact. The tail's logits are unknown; we approximate them as all equal to the
    smallest kept logit, i.e. the tail holds ``m / p_min`` tokens of probability ``p_min``, which
    gives it the unnormalised weight ``m * p_min ** (1 / T - 1)`` next to ``p_i ** (1 / T)`` for the
    kept tokens. This is exact at ``T = 1`` and whenever ``k == V``; as every tail token is at most
    ``p_min``, it is a lower bound on the tail weight for ``T > 1`` and an upper bound for ``T < 1``.

    Attributes:
        ids: ``(N, k)`` int64 top-k token ids.
        logprobs: ``(N, k)`` teacher T = 1 log-probabilities at ``ids`` (full-vocabulary softmax).
    """

    ids: Tensor
    logprobs: Tensor

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> Sparse:
        """Top-k of full teacher logits ``(N, V)``, as a teacher cache would store them."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top, ids = logprobs.topk(k, dim=-1)
        return cls(ids=ids, logprobs=top)

    def rows(self, start: int, end: int) -> Sparse:
        """The same signal for rows ``start:end`` only."""
        return Sparse(ids=self.ids[start:end], logprobs=self.logprobs[start:end])

    def bucket_log_probs(self, vocab_size: int, temperature: float = 1.0) -> Tensor:
        """Teacher log-probs ``(N, k + 1)`` at temperature T over the k ids plus one tail bucket (last).

        See the class docstring for the tail approximation at ``T != 1``.
        """
        lp = self.logprobs.float()
        if self.ids.shape[-1] >= vocab_size:
            # Every token is kept, so the tail is empty by definition, not by rounding.
            tail = torch.full_like(lp[:, :1], float("-inf"))
        else:
            kept = torch.logsumexp(lp, dim=-1, keepdim=True).clamp(max=0.0)
            tail = torch.log(-torch.expm1(kept))  # log(1 - kept mass), -inf when nothing is left
            if temperature != 1.0:
                # Clamped so a kept -inf log-prob cannot turn the tail into inf or nan.
                p_min = lp.min(dim=-1, keepdim=True).values.clamp(min=-1e4)
                tail = tail + (1.0 / temperature - 1.0) * p_min
        return torch.log_softmax(torch.cat([lp / temperature, tail], dim=-1), dim=-1)


TeacherSignal = Dense | DenseHidden | Sparse
