"""Distillation + cross-entropy loss sums computed straight from hidden states, a chunk of rows at a time.

The ``(N, V)`` logits of a 150k-token vocabulary are the largest tensors in a distillation step, and
naive autograd keeps several of them alive at once (logits, log-softmaxes, products, their grads).
Here the student's logits, and the teacher's for ``DenseHidden``, are made for ``chunk_size`` rows at a
time. Each chunk's loss is differentiated on the spot, inside the forward pass, into the gradient of
the chunk's hidden states and a running gradient of the head, and the chunk is freed. The only
full-size buffers are ``grad_hidden (N, H)`` and ``grad_head (V, H)``; backward just scales them.
This is the design of Liger-Kernel's fused linear losses, written from scratch here. It costs no
extra matmuls: the head product runs once in forward and twice for the gradients, as under autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdistill.errors import KdistillError
from kdistill.losses.divergences import DIVERGENCES, Divergence
from kdistill.teacher.signal import Dense, DenseHidden, Sparse, softcap_logits

# 256 rows keeps a chunk's fp32 temporaries (a few (256, V) tensors) well under a quarter of the
# naive path's even at N = 2048, while the (256, H) x (H, V) matmuls stay large enough to run at
# full speed on CPU and GPU. See benchmarks/loss_memory.py.
DEFAULT_CHUNK_SIZE = 256


@dataclass
class LossSums:
    """Loss sums over the N trained rows; the objective divides by the token count once."""

    total: Tensor  # scalar, differentiable: kd_weight * kd + ce_weight * ce
    kd: Tensor  # scalar, detached: divergence summed over rows (not multiplied by T**2)
    ce: Tensor  # scalar, detached: cross-entropy summed over rows (T = 1)


@dataclass(frozen=True)
class _Spec:
    """Everything a chunk needs besides the tensors that receive gradients."""

    labels: Tensor
    teacher: Dense | DenseHidden | Sparse | None
    kd_weight: float
    ce_weight: float
    temperature: float
    divergence: Divergence
    divergence_kwargs: dict = field(default_factory=dict)
    softcap: float | None = None


def _rows_loss(logits: Tensor, start: int, end: int, spec: _Spec) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, kd, ce)`` sums for rows ``start:end`` given their raw fp32 student logits ``(n, V)``."""
    z = softcap_logits(logits, spec.softcap)
    labels = spec.labels[start:end, None]
    # logsumexp - z[label] is log-softmax at the label without keeping a second (n, V) tensor alive.
    ce = (torch.logsumexp(z, dim=-1) - z.gather(-1, labels).squeeze(-1)).sum()
    if spec.teacher is None:
        kd = torch.zeros((), device=z.device)
    else:
        target = spec.teacher.rows(start, end)
        kd = spec.divergence(z, target, temperature=spec.temperature, **spec.divergence_kwargs)
    return spec.kd_weight * kd + spec.ce_weight * ce, kd, ce


def _naive(hidden: Tensor, head: Tensor, bias: Tensor | None, spec: _Spec) -> LossSums:
    """Reference path: full ``(N, V)`` logits under ordinary autograd."""
    logits = F.linear(hidden, head, bias).float()
    total, kd, ce = _rows_loss(logits, 0, hidden.shape[0], spec)
    return LossSums(total=total, kd=kd.detach(), ce=ce.detach())


def _chunk_grad(h: Tensor, head: Tensor, bias: Tensor | None, start: int, spec: _Spec, want_grad: bool):
    """One chunk's ``(total, kd, ce)`` and the loss gradient w.r.t. its fp32 logits (None if not wanted)."""
    with torch.no_grad():
        logits = F.linear(h, head, bias).float()
    if not want_grad:
        with torch.no_grad():
            return *_rows_loss(logits, start, start + h.shape[0], spec), None
    logits.requires_grad_(True)
    with torch.enable_grad():
        total, kd, ce = _rows_loss(logits, start, start + h.shape[0], spec)
        (grad_logits,) = torch.autograd.grad(total, logits)
    return total.detach(), kd.detach(), ce.detach(), grad_logits


def _accumulate(grad_logits: Tensor, h: Tensor, w: Tensor, start: int, grad_h, grad_w, grad_b) -> None:
    """Back-propagate one chunk's fp32 logit gradient ``(n, V)`` through the head into the buffers."""
    if grad_b is not None:
        grad_b += grad_logits.sum(0)
    grad_logits = grad_logits.to(w.dtype)  # the matmul precision autograd would use
    if grad_h is not None:
        torch.mm(grad_logits, w, out=grad_h[start : start + h.shape[0]])
    if grad_w is None:
        return
    if w.dtype == grad_w.dtype:
        grad_w.addmm_(grad_logits.t(), h)  # in place: no (V, H) temporary per chunk
    else:
        grad_w += grad_logits.t() @ h


class _ChunkedLoss(torch.autograd.Function):
    """Loss sums whose gradients are computed chunk by chunk during forward; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, head, bias, spec, chunk_size, needs):  # noqa: D102 - see class docstring
        need_h, need_w, need_b = needs
        n, w, b = hidden.shape[0], head.detach(), None if bias is None else bias.detach()
        grad_h = torch.zeros_like(hidden) if need_h else None
        # The head gradient sums over chunks, so it accumulates in fp32 even for bf16 weights.
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size].detach()
            *losses, grad_logits = _chunk_grad(h, w, b, start, spec, any(needs))
            sums += torch.stack(losses)
            if grad_logits is None:
                continue
            _accumulate(grad_logits, h, w, start, grad_h, grad_w, grad_b)
            del grad_logits  # free the chunk before the next one is made
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(head.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        total, kd, ce = (s.clone() for s in sums.unbind())  # separate tensors, not views of one buffer
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_kd, _grad_ce):  # noqa: D102 - see class docstring
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError(
                "distill_loss_sums: backward can run only once (retain_graph is not supported)"
            )
        del ctx.grads
        # In place: the buffers are ours alone, and a copy of grad_head would double the peak.
        scaled = tuple(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads)
        return (*scaled, None, None, None)


def _check_inputs(hidden: Tensor, head: Tensor, labels: Tensor, teacher, kd_weight: float) -> None:
    if hidden.dim() != 2 or head.dim() != 2 or hidden.shape[1] != head.shape[1]:
        raise ValueError(
            f"expected hidden (N, H) and head (V, H), got {tuple(hidden.shape)} and {tuple(head.shape)}"
        )
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"expected labels of shape ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if teacher is None and kd_weight != 0:
        raise ValueError(f"kd_weight is {kd_weight} but no teacher signal was given")


def distill_loss_sums(
    student_hidden: Tensor,
    student_head: Tensor,
    labels: Tensor,
    teacher: Dense | DenseHidden | Sparse | None,
    *,
    kd_weight: float,
    ce_weight: float,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    divergence_kwargs: dict | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    student_bias: Tensor | None = None,
    student_softcap: float | None = None,
) -> LossSums:
    """``kd_weight * divergence + ce_weight * cross_entropy``, each summed over the N trained rows.

    Args:
        student_hidden: ``(N, H)`` student final hidden states (after the final norm); row i predicts
            ``labels[i]``. Gradients flow to it if it requires grad (e.g. from a LoRA model).
        student_head: ``(V, H)`` student ``lm_head`` weight: a parameter, a tied input embedding or a
            non-leaf. No head gradient is computed when it does not require grad (frozen under LoRA).
        labels: ``(N,)`` int64 next-token ids, all valid (no -100).
        teacher: the teacher signal for the same rows; ``None`` only when ``kd_weight == 0``.
        kd_weight: weight of the divergence; the objective passes ``alpha * T**2``.
        ce_weight: weight of the cross-entropy; the objective passes ``1 - alpha``.
        temperature: divides student and teacher logits inside the divergence (CE always uses T = 1).
        divergence: a key of ``DIVERGENCES``; ``divergence_kwargs`` go to it (``beta=``, ``skew=``).
        chunk_size: rows per chunk; ``None`` runs the naive unchunked reference path.
        student_bias: optional ``(V,)`` ``lm_head`` bias (Phi-2 has one).
        student_softcap: optional Gemma-2 final logit soft-cap ``cap * tanh(z / cap)``.

    Returns:
        ``LossSums``: ``total`` is differentiable, ``kd`` and ``ce`` are detached. All are fp32 scalars;
        gradients reach the inputs in their own dtypes.
    """
    if divergence not in DIVERGENCES:
        raise KdistillError(f"unknown divergence {divergence!r}; expected one of {sorted(DIVERGENCES)}")
    _check_inputs(student_hidden, student_head, labels, teacher, kd_weight)
    spec = _Spec(
        labels=labels,
        teacher=teacher,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        temperature=temperature,
        divergence=DIVERGENCES[divergence],
        divergence_kwargs=dict(divergence_kwargs or {}),
        softcap=student_softcap,
    )
    if chunk_size is None:
        return _naive(student_hidden, student_head, student_bias, spec)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    needs = tuple(
        grad_on and t is not None and t.requires_grad for t in (student_hidden, student_head, student_bias)
    )
    total, kd, ce = _ChunkedLoss.apply(student_hidden, student_head, student_bias, spec, chunk_size, needs)
    return LossSums(total=total, kd=kd, ce=ce)
