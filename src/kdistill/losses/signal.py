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

import math
from dataclasses import dataclass, replace

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
    """The teacher's top-k tokens per row, as a teacher cache stores them, and optionally tail samples.

    Format: ``ids`` ``(N, e)`` int64 token ids and ``logprobs`` ``(N, e)``, the teacher's log-softmax
    over the *full* vocabulary at temperature 1 at those ids. The first ``num_top`` entries (all of
    them when ``num_top`` is None) are the top k, distinct, in any order.

    The mass outside the top k: without ``tail``, the T = 1 tail mass is ``1 - sum(exp(top))``
    (clamped at 0, since rounding can push the sum past 1), exactly 0 when ``k == V``; at ``T != 1``
    the tail's logits are unknown and are approximated as all equal to the smallest kept logit (the
    tail holds ``m / p_min`` tokens of probability ``p_min``, unnormalised weight
    ``m * p_min ** (1 / T - 1)``): exact at ``T = 1`` and ``k == V``, a lower bound on the tail for
    ``T > 1``. That bound is loose: at T = 2 most of a 49k-vocabulary teacher's tempered mass lies
    outside its top 64. So a cache also stores ``tail``, the exact log tail mass at ``temperature``.

    Tail samples: entries after ``num_top`` are draws (with replacement) from the teacher's tail at
    ``temperature``. Forward KL then splits into the exact top-k part and the tail part
    ``m * E_tail[log p_t - log p_s]``, estimated without bias from the draws (the random-sampling KD
    of Anshumann et al. 2025 applied to the tail only); see ``target_weights``.

    Attributes:
        ids: ``(N, e)`` int64 token ids, top k first, then tail samples.
        logprobs: ``(N, e)`` teacher T = 1 log-probabilities at ``ids`` (full-vocabulary softmax).
        num_top: how many leading entries are the top k; ``None`` means all.
        tail: optional ``(N,)`` log of the teacher's mass outside the top k at ``temperature``.
        temperature: the temperature of ``tail`` and of the samples' draw.
        label_logprobs: optional ``(N,)`` teacher T = 1 log-probability of each row's trained token,
            in or outside the top k (a served teacher gives it; the sampled on-policy loss reads it).
    """

    ids: Tensor
    logprobs: Tensor
    num_top: int | None = None
    tail: Tensor | None = None
    temperature: float | None = None
    label_logprobs: Tensor | None = None

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> Sparse:
        """Top-k of full teacher logits ``(N, V)``, as a teacher cache would store them."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top, ids = logprobs.topk(k, dim=-1)
        return cls(ids=ids, logprobs=top)

    @property
    def k(self) -> int:
        return self.ids.shape[-1] if self.num_top is None else self.num_top

    @property
    def has_samples(self) -> bool:
        return self.num_top is not None and self.num_top < self.ids.shape[-1]

    def select(self, index: slice | Tensor) -> Sparse:
        """The same signal for the rows ``index`` picks (a slice, a bool mask or row indices)."""
        tail = None if self.tail is None else self.tail[index]
        label = None if self.label_logprobs is None else self.label_logprobs[index]
        ids, logprobs = self.ids[index], self.logprobs[index]
        return replace(self, ids=ids, logprobs=logprobs, tail=tail, label_logprobs=label)

    def rows(self, start: int, end: int) -> Sparse:
        """The same signal for rows ``start:end`` only."""
        return self.select(slice(start, end))

    def to(self, device: torch.device) -> Sparse:
        """The same signal on ``device``."""
        if self.ids.device == device:
            return self
        tail = None if self.tail is None else self.tail.to(device)
        label = None if self.label_logprobs is None else self.label_logprobs.to(device)
        ids, logprobs = self.ids.to(device), self.logprobs.to(device)
        return replace(self, ids=ids, logprobs=logprobs, tail=tail, label_logprobs=label)

    def top(self) -> Sparse:
        """The top-k entries only (tail samples dropped), keeping the exact tail mass."""
        if not self.has_samples:
            return self
        return replace(self, ids=self.ids[:, : self.k], logprobs=self.logprobs[:, : self.k], num_top=None)

    def _exact_tail(self, temperature: float) -> bool:
        if self.tail is None:
            return False
        if self.temperature is None or abs(self.temperature - temperature) > 1e-6:
            raise ValueError(
                f"this teacher signal stores its tail at temperature {self.temperature}, "
                f"not at the requested {temperature}"
            )
        return True

    def bucket_log_probs(self, vocab_size: int, temperature: float = 1.0) -> Tensor:
        """Teacher log-probs ``(N, k + 1)`` at temperature T over the top-k ids plus one tail bucket (last).

        See the class docstring for the tail. Tail samples, if any, are ignored here.
        """
        lp = self.logprobs[:, : self.k].float()
        if self._exact_tail(temperature) and self.k < vocab_size:
            tail = self.tail.float()[:, None]
            kept = torch.log_softmax(lp / temperature, dim=-1) + log1mexp(tail)
            return torch.cat([kept, tail], dim=-1)
        if self.k >= vocab_size:
            # Every token is kept, so the tail is empty by definition, not by rounding.
            tail = torch.full_like(lp[:, :1], float("-inf"))
        else:
            kept = torch.logsumexp(lp, dim=-1, keepdim=True).clamp(max=0.0)
            tail = log1mexp(kept)  # log(1 - kept mass), -inf when nothing is left
            if temperature != 1.0:
                # Clamped so a kept -inf log-prob cannot turn the tail into inf or nan.
                p_min = lp.min(dim=-1, keepdim=True).values.clamp(min=-1e4)
                tail = tail + (1.0 / temperature - 1.0) * p_min
        return torch.log_softmax(torch.cat([lp / temperature, tail], dim=-1), dim=-1)

    def target_weights(self, temperature: float) -> tuple[Tensor, Tensor]:
        """``(weights, log_p)``, both ``(N, e)``, for the sampled forward-KL estimate.

        ``weights`` give each top-k entry its tempered teacher probability and each of the s tail
        draws ``m / s`` (m: tail mass at T), so they sum to 1 per row; ``log_p`` is the teacher's
        tempered log-probability at every entry. Then ``sum(weights * (log_p - log_q))`` is the exact
        top-k part of ``KL(p_t || q)`` plus an unbiased estimate of its tail part, and its gradient
        in the student logits is ``(q - weights) / T``, unbiased for the dense gradient.
        """
        if not (self.has_samples and self._exact_tail(temperature)):
            raise ValueError("target_weights needs tail samples and the tail mass at this temperature")
        lp = self.logprobs.float() / temperature
        tail = self.tail.float()[:, None]
        log_z = torch.logsumexp(lp[:, : self.k], dim=-1, keepdim=True) - log1mexp(tail)
        log_p = lp - log_z
        draws = self.ids.shape[-1] - self.k
        weights = torch.cat([log_p[:, : self.k].exp(), (tail.exp() / draws).expand(-1, draws)], dim=-1)
        return weights, log_p

    def dense_log_probs(self, vocab_size: int, temperature: float) -> Tensor:
        """``(N, V)`` teacher log-probs at T: the top k exact, the tail mass spread evenly over the rest.

        Used where a full distribution is needed (a mixture of several teachers); an approximation
        of the tail's shape, exact in its total mass.
        """
        bucket = self.bucket_log_probs(vocab_size, temperature)
        rest = max(vocab_size - self.k, 1)
        out = (bucket[:, -1:] - math.log(rest)).expand(-1, vocab_size).clone()
        return out.scatter_(-1, self.ids[:, : self.k].long(), bucket[:, :-1])


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, -inf at 0 (Maechler's stable form)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass(frozen=True)
class Ensemble:
    """Several teachers' signals for the same N rows, combined by ``mode`` (see ``losses.ensemble``).

    Attributes:
        members: one signal per teacher (``Dense``, ``DenseHidden`` or ``Sparse``; after ``rows``,
            ``(n, V)`` logits or ``Sparse``).
        weights: one weight per teacher, summing to 1.
        mode: ``sum`` (weighted sum of divergences) or ``mixture`` (divergence to the weighted mixture).
    """

    members: tuple
    weights: tuple[float, ...]
    mode: str = "sum"

    def rows(self, start: int, end: int) -> Ensemble:
        """Each member's rows ``start:end``: fp32 logits for dense members, ``Sparse`` for sparse ones."""
        members = tuple(m[start:end] if isinstance(m, Tensor) else m.rows(start, end) for m in self.members)
        return Ensemble(members, self.weights, self.mode)
