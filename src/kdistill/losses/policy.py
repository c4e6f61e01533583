"""On-policy distillation as reinforcement learning: a policy gradient on the student's sampled tokens.

The student q sampled token ``x_t`` after its own prefix; the teacher p scored it. The per-token
reverse-KL estimate ``k_t = log q(x_t) - log p(x_t)`` is a (negative) reward, and

    loss_t = k_t + sg(k_t) * (log q(x_t) - sg(log q(x_t)))

has the value ``k_t`` (whose mean over samples is ``KL(q || p)`` at that prefix) and the gradient
``sg(k_t) * grad log q(x_t)``, the score-function estimate of the gradient of that KL (``E_q[grad
log q] = 0``, so nothing else is needed). ``sg`` stops gradients. Each token's reward is its own
(no reward-to-go), as in the on-policy distillation recipes of Thinking Machines' Tinker and of
Agarwal et al. 2024 (GKD) with a sampled estimate. Only ``log p(x_t)`` is needed from the teacher,
which is what a teacher behind a server can return.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdistill.losses.signal import Sparse


def sampled_reverse_kl(
    student_logits: Tensor, teacher: Tensor | Sparse, *, labels: Tensor, temperature: float = 1.0
) -> Tensor:
    """Sum over rows of the policy-gradient loss above.

    Args:
        student_logits: ``(N, V)`` student logits at the positions that predict ``labels``.
        teacher: ``(N, V)`` teacher logits for the same rows (only ``labels``' entries are read), or a
            ``Sparse`` signal with ``label_logprobs`` (a served teacher's log-prob of each sampled
            token, at T = 1 only: a tempered log-prob needs the teacher's whole distribution).
        labels: ``(N,)`` the student's sampled tokens.
        temperature: both sides' logits are divided by T.
    Returns a scalar: ``sum_t k_t`` in value, the policy gradient in ``grad``.
    """
    index = labels.long()[:, None]
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, index).squeeze(-1)
    if isinstance(teacher, Sparse):
        if teacher.label_logprobs is None or temperature != 1.0:
            raise ValueError(
                "the sampled on-policy loss needs the teacher's log-prob of every sampled token at T = 1"
            )
        log_p = teacher.label_logprobs.float()
    else:
        log_p = torch.log_softmax(teacher.float() / temperature, dim=-1).gather(-1, index).squeeze(-1)
    estimate = (log_q - log_p).detach()
    return (estimate + estimate * (log_q - log_q.detach())).sum()
