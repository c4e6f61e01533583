"""The gradients of a chunked head: the buffers they accumulate in, and one chunk's share of them.

`losses.chunked` computes each chunk's logit gradient during its forward pass; these functions carry
that gradient back through the head into the hidden states', the head's and the bias's buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grad_buffers(ctx, hidden: Tensor, head: Tensor, needs: tuple[bool, bool, bool], head_scale):
    """The buffers the gradients of `hidden`, the head and its bias are accumulated in, chunk by chunk."""
    need_h, need_w, need_b = needs
    # Contiguous, whatever hidden's strides, so each chunk's rows can be written in place.
    grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    # The head gradient sums over chunks, so it accumulates in fp32 even for bf16 weights; with
    # `head_scale` it goes straight into the parameter's own gradient, already scaled.
    ctx.head_scale = head_scale if need_w else None
    if ctx.head_scale is not None:
        if head.grad is None:
            head.grad = torch.zeros_like(head)
        grad_w = ctx.direct_grad = head.grad
    else:
        grad_w = torch.zeros(head.shape, dtype=torch.float32, device=head.device) if need_w else None
    grad_b = torch.zeros(head.shape[0], dtype=torch.float32, device=head.device) if need_b else None
    return grad_h, grad_w, grad_b


def accumulate(
    grad_logits: Tensor, h: Tensor, w: Tensor, start: int, grad_h, grad_w, grad_b, w_scale: float = 1.0
) -> None:
    """Back-propagate one chunk's fp32 logit gradient ``(n, V)`` through the head into the buffers
    (the head's times ``w_scale``)."""
    if grad_b is not None:
        grad_b += grad_logits.sum(0)
    grad_logits = grad_logits.to(w.dtype)  # the matmul precision autograd would use
    if grad_h is not None:
        torch.mm(grad_logits, w, out=grad_h[start : start + h.shape[0]])
    if grad_w is None:
        return
    if w.dtype == grad_w.dtype:
        grad_w.addmm_(grad_logits.t(), h, alpha=w_scale)  # in place: no (V, H) temporary per chunk
    else:
        grad_w += grad_logits.t() @ h
