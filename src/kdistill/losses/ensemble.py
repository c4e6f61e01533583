"""Several teachers at once: a weighted sum of divergences, or one divergence to their mixture.

- ``sum``: ``sum_i w_i * D(p_i || q)``, the multi-teacher loop of the KD guide behind
  configs/seed.yaml. Each teacher pulls the student toward itself; where they disagree the optimum
  lies between them.
- ``mixture``: ``D(sum_i w_i p_i || q)``, distilling from the weighted mixture distribution itself.
  For forward KL the gradient is the same as ``sum`` (the targets average), but the value and every
  other divergence differ, and reverse KL to a mixture no longer has to pick one teacher's mode.

The weights sum to 1. A ``Sparse`` member enters a mixture as a full distribution whose tail mass
is spread evenly over the tokens outside its top k (``Sparse.dense_log_probs``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdistill.losses.divergences import Divergence
from kdistill.losses.signal import Ensemble, Sparse


def ensemble_divergence(
    student_logits: Tensor,
    teachers: Ensemble,
    divergence: Divergence,
    temperature: float,
    **kwargs: float,
) -> tuple[Tensor, Tensor]:
    """``(kd, parts)``: the combined divergence summed over rows, and each teacher's own ``(P,)`` (detached).

    ``teachers`` holds each member's rows as ``(n, V)`` logits or ``Sparse``, all for the same n rows.
    """
    parts = []
    if teachers.mode == "sum":
        kd = torch.zeros((), device=student_logits.device)
        for weight, member in zip(teachers.weights, teachers.members):
            part = divergence(student_logits, member, temperature=temperature, **kwargs)
            kd = kd + weight * part
            parts.append(part.detach())
        return kd, torch.stack(parts)
    vocab = student_logits.shape[-1]
    log_probs = [_dense_log_probs(m, vocab, temperature) for m in teachers.members]
    log_w = torch.tensor(teachers.weights, device=student_logits.device).log()
    mixture = torch.logsumexp(torch.stack(log_probs) + log_w[:, None, None], dim=0)
    # Normalised log-probs times T are logits whose softmax at T is the mixture itself.
    kd = divergence(student_logits, mixture * temperature, temperature=temperature, **kwargs)
    with torch.no_grad():
        for member in teachers.members:
            parts.append(divergence(student_logits.detach(), member, temperature=temperature, **kwargs))
    return kd, torch.stack(parts)


def _dense_log_probs(member: Tensor | Sparse, vocab: int, temperature: float) -> Tensor:
    if isinstance(member, Sparse):
        return member.dense_log_probs(vocab, temperature)
    return torch.log_softmax(member.float() / temperature, dim=-1)
