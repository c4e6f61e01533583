"""Divergences between a teacher's and a student's next-token distributions.

Every public function here has the same shape of call::

    divergence(student_logits, teacher, *, temperature=1.0, **params) -> Tensor

- ``student_logits``: ``(N, V)`` student logits, any float dtype; computed in fp32.
- ``teacher``: ``(N, V)`` dense teacher logits, or a ``Sparse`` top-k signal for the same N rows.
- ``temperature``: both sides' logits are divided by T. The T**2 gradient correction of Hinton et al.
  is *not* applied here; the objective folds it into ``kd_weight``.
- returns a scalar: the divergence **summed over the N rows**, never a mean. The objective divides by
  the number of trained tokens once, across gradient accumulation and processes.
- ``params`` (``beta=``, ``skew=``): keyword-only and without defaults. ``registry.LOSSES`` holds each
  one's default and range once, and ``registry.check_loss`` fills and checks them; a formula here
  does not check its own parameters.

Sparse teacher: the student is evaluated on the teacher's k ids plus one extra bucket holding the
student's own probability mass outside those ids, and the teacher's tail mass fills the same bucket
(see ``Sparse``). Both sides are then proper distributions over k + 1 outcomes, so every divergence
below stays a true divergence (non-negative, 0 iff the bucketed distributions agree).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from kdistill.losses.signal import Sparse


def aligned_log_probs(
    student_logits: Tensor, teacher: Tensor | Sparse, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs over the same outcomes: ``(N, V)`` dense or ``(N, k + 1)`` sparse."""
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, Sparse):
        vocab, top = student.shape[-1], teacher.top()  # tail samples serve forward KL only
        return _bucket_student(student, top.ids), top.bucket_log_probs(vocab, temperature)
    return student, torch.log_softmax(teacher.float() / temperature, dim=-1)


def _bucket_student(log_probs: Tensor, ids: Tensor) -> Tensor:
    """Student log-probs ``(N, k + 1)``: at the teacher's ids, then the log-mass of all other tokens.

    The tail is a logsumexp over the tokens not in ``ids`` rather than ``log(1 - kept)``, which would
    cancel catastrophically when the kept mass is near 1. Kept tokens are filled with the most negative
    finite float (not -inf) so a row with nothing left (k == V) stays finite in forward and backward.
    """
    ids = ids.long()  # caches may store int32 ids; gather and scatter need int64
    kept = log_probs.gather(-1, ids)
    rest = log_probs.scatter(-1, ids, torch.finfo(log_probs.dtype).min)
    return torch.cat([kept, torch.logsumexp(rest, dim=-1, keepdim=True)], dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum p * (log p - log q)`` over all elements, with ``0 * log 0 = 0``.

    The difference is zeroed before the product where ``p == 0``, so an ``-inf`` there cannot send a
    nan into the backward pass.
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum()


def _mix(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """``log(weight * p + (1 - weight) * q)``; the endpoints return one side exactly."""
    if weight == 0.0:
        return log_q
    if weight == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


def forward_kl(student_logits: Tensor, teacher: Tensor | Sparse, *, temperature: float = 1.0) -> Tensor:
    """Forward KL ``KL(p_t || p_s)`` summed over rows; mass-covering (Hinton et al. 2015).

    With a ``Sparse`` teacher that carries tail samples, the tail's part is estimated from them
    without bias (see ``Sparse.target_weights``) instead of being collapsed into one bucket.

    Args: ``student_logits`` ``(N, V)``, ``teacher`` ``(N, V)`` logits or ``Sparse``. Returns a scalar.
    """
    if isinstance(teacher, Sparse) and teacher.has_samples:
        weights, log_p = teacher.target_weights(temperature)
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher.ids.long())
        return (weights * torch.where(weights > 0, log_p - log_q, 0.0)).sum()
    student, target = aligned_log_probs(student_logits, teacher, temperature)
    return _kl(target, student)


def reverse_kl(student_logits: Tensor, teacher: Tensor | Sparse, *, temperature: float = 1.0) -> Tensor:
    """Reverse KL ``KL(p_s || p_t)`` summed over rows; mode-seeking (MiniLLM, Gu et al. 2024).

    Args: ``student_logits`` ``(N, V)``, ``teacher`` ``(N, V)`` logits or ``Sparse``. Returns a scalar.
    """
    student, target = aligned_log_probs(student_logits, teacher, temperature)
    return _kl(student, target)


def generalized_jsd(
    student_logits: Tensor, teacher: Tensor | Sparse, *, temperature: float = 1.0, beta: float
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), summed over rows.

    With the mixture ``m = beta * p_t + (1 - beta) * p_s`` it is
    ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``, TRL's ``generalized_jsd_loss`` convention.
    That formula tends to 0 at both ends, so, as in TRL, ``beta = 0`` is defined as forward KL and
    ``beta = 1`` as reverse KL and handled explicitly.

    Args: ``student_logits`` ``(N, V)``, ``teacher`` ``(N, V)`` logits or ``Sparse``, ``beta`` in [0, 1].
    """
    student, target = aligned_log_probs(student_logits, teacher, temperature)
    if beta == 0.0:
        return _kl(target, student)
    if beta == 1.0:
        return _kl(student, target)
    mixture = _mix(target, student, beta)
    return beta * _kl(target, mixture) + (1.0 - beta) * _kl(student, mixture)


def skew_kl(
    student_logits: Tensor, teacher: Tensor | Sparse, *, temperature: float = 1.0, skew: float
) -> Tensor:
    """Skew KL ``KL(p_t || a * p_t + (1 - a) * p_s)`` summed over rows (DistiLLM, Ko et al. 2024).

    Mixing a little teacher into the student keeps the divergence finite and its gradients bounded
    where the student puts almost no mass. ``skew = 0`` is forward KL.

    Args: ``student_logits`` ``(N, V)``, ``teacher`` ``(N, V)`` logits or ``Sparse``, ``skew`` in [0, 1).
    """
    student, target = aligned_log_probs(student_logits, teacher, temperature)
    return _kl(target, _mix(target, student, skew))


def skew_reverse_kl(
    student_logits: Tensor, teacher: Tensor | Sparse, *, temperature: float = 1.0, skew: float
) -> Tensor:
    """Skew reverse KL ``KL(p_s || a * p_s + (1 - a) * p_t)`` summed over rows (DistiLLM, Ko et al. 2024).

    ``skew = 0`` is reverse KL.

    Args: ``student_logits`` ``(N, V)``, ``teacher`` ``(N, V)`` logits or ``Sparse``, ``skew`` in [0, 1).
    """
    student, target = aligned_log_probs(student_logits, teacher, temperature)
    return _kl(student, _mix(student, target, skew))


def tvd(student_logits: Tensor, teacher: Tensor | Sparse, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance ``0.5 * sum |p_t - p_s|`` summed over rows (used for KD by Wen et al. 2023).

    Args: ``student_logits`` ``(N, V)``, ``teacher`` ``(N, V)`` logits or ``Sparse``. Returns a scalar.
    """
    student, target = aligned_log_probs(student_logits, teacher, temperature)
    return 0.5 * (target.exp() - student.exp()).abs().sum()


# The call every divergence has (see the module's docstring); ``registry.LOSSES`` names them.
Divergence = Callable[..., Tensor]
