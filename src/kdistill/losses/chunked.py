"""Distillation + cross-entropy loss sums computed straight from hidden states, a chunk of rows at a time.

The ``(N, V)`` logits of a 150k-token vocabulary are the largest tensors in a distillation step, and
naive autograd keeps several of them alive at once (logits, log-softmaxes, products, their grads).
Here the student's logits, and the teacher's for ``DenseHidden``, are made for ``chunk_size`` rows at a
time. Each chunk's loss is differentiated on the spot, inside the forward pass (in smaller blocks of
rows on CPU, see ``_block_rows``), the logits are overwritten by their gradient, and that gives the
gradient of the chunk's hidden states and a running gradient of the head before the chunk is freed.
The only full-size buffers are ``grad_hidden (N, H)`` and ``grad_head (V, H)``; backward scales them.
This is the design of Liger-Kernel's fused linear losses, written from scratch here. It costs no
extra matmuls: the head product runs once in forward and twice for the gradients, as under autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdistill.losses.chunk_gradients import accumulate, grad_buffers
from kdistill.losses.divergences import Divergence
from kdistill.losses.ensemble import ensemble_divergence
from kdistill.losses.registry import check_loss
from kdistill.losses.signal import Dense, DenseHidden, Ensemble, Sparse, softcap_logits

# Rows per chunk: the matmuls with the heads run on this many rows at once. A chunk holds two
# (512, V) fp32 buffers (student logits, later their gradient, and teacher logits), a seventh of the
# naive path's memory at N = 2048, and 512 rows keep the matmuls efficient; 256-1024 measured the
# same speed on CPU. See benchmarks/loss_memory.py.
DEFAULT_CHUNK_SIZE = 512
_CPU_BLOCK_BYTES = 4 * 2**20  # see _block_rows
_CPU_CHUNK_BYTES = 24 * 2**20  # see distill_loss_sums


@dataclass
class LossSums:
    """Loss sums over the N trained rows; the objective divides by the token count once."""

    total: Tensor  # scalar, differentiable: kd_weight * kd + ce_weight * ce
    kd: Tensor  # scalar, detached: divergence summed over rows (not multiplied by T**2)
    ce: Tensor  # scalar, detached: cross-entropy summed over rows (T = 1)
    kd_parts: Tensor | None = None  # (P,) detached: each teacher's own divergence sum (an Ensemble)


@dataclass(frozen=True)
class _Spec:
    """Everything a chunk needs besides the tensors that receive gradients."""

    labels: Tensor
    teacher: Dense | DenseHidden | Sparse | Ensemble | None
    kd_weight: float
    ce_weight: float
    temperature: float
    divergence: Divergence
    divergence_kwargs: dict = field(default_factory=dict)
    softcap: float | None = None
    with_labels: bool = False  # the loss reads each row's label (`needs_labels` in the registry)


def _rows_loss(logits: Tensor, labels: Tensor, target: Tensor | Sparse | Ensemble | None, spec: _Spec):
    """``(total, kd, ce, *parts)`` sums for some rows, from their raw fp32 student logits ``(n, V)``.

    ``target`` is the teacher for the same rows: ``(n, V)`` fp32 logits, a ``Sparse``, an
    ``Ensemble`` of those (then ``parts`` holds each teacher's own divergence), or None.
    """
    z = softcap_logits(logits, spec.softcap)
    # logsumexp - z[label] is log-softmax at the label without keeping a second (n, V) tensor alive.
    ce = (torch.logsumexp(z, dim=-1) - z.gather(-1, labels[:, None]).squeeze(-1)).sum()
    parts, params = (), spec.divergence_kwargs
    if spec.with_labels:
        params = {**params, "labels": labels}
    if target is None:
        kd = torch.zeros((), device=z.device)
    elif isinstance(target, Ensemble):
        kd, stacked = ensemble_divergence(z, target, spec.divergence, spec.temperature, **params)
        parts = tuple(stacked.unbind())
    else:
        kd = spec.divergence(z, target, temperature=spec.temperature, **params)
    return (spec.kd_weight * kd + spec.ce_weight * ce, kd, ce, *parts)


def _naive(hidden: Tensor, head: Tensor, bias: Tensor | None, spec: _Spec) -> LossSums:
    """Reference path: full ``(N, V)`` logits under ordinary autograd."""
    logits = F.linear(hidden, head, bias).float()
    target = None if spec.teacher is None else spec.teacher.rows(0, hidden.shape[0])
    total, kd, ce, *parts = _rows_loss(logits, spec.labels, target, spec)
    kd_parts = torch.stack(parts).detach() if parts else None
    return LossSums(total=total, kd=kd.detach(), ce=ce.detach(), kd_parts=kd_parts)


def _block_rows(logits: Tensor) -> int:
    """Rows per block of the loss formula inside a chunk.

    On CPU, glibc hands allocations above 32 MB straight back to the kernel, so every fresh (n, V)
    temporary costs page faults, about a third of the CPU time measured here. Blocks whose fp32
    temporaries stay small are recycled from the heap instead. The formula keeps about eight of them
    alive at once, so their size is also the loss's share of the step's peak memory: on SmolLM2,
    24 MB blocks cost 190 MB of it, and 4 MB blocks run as fast. On GPU the caching allocator
    already reuses memory, and larger kernels are better, so a block is the whole chunk.
    """
    if logits.is_cuda:
        return logits.shape[0]
    return max(1, _CPU_BLOCK_BYTES // (4 * logits.shape[1]))


def _slice_target(target, start: int, end: int) -> Tensor | Sparse | Ensemble | None:
    if isinstance(target, Sparse | Ensemble):
        return target.rows(start, end)
    return None if target is None else target[start:end]


class _ChunkedLoss(torch.autograd.Function):
    """Loss sums whose gradients are computed chunk by chunk during forward; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, head, bias, spec, chunk_size, needs, head_scale):
        n, w, b, want_grad = (
            hidden.shape[0],
            head.detach(),
            None if bias is None else bias.detach(),
            any(needs),
        )
        grad_h, grad_w, grad_b = grad_buffers(ctx, hidden, head, needs, head_scale)
        sums = torch.zeros(3 + _num_parts(spec), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            h = hidden[start:end].detach()
            with torch.no_grad():
                logits = F.linear(h, w, b).float()
            # The teacher's rows, made once per chunk: (n, V) logits for a dense teacher.
            target = None if spec.teacher is None else spec.teacher.rows(start, end)
            step = _block_rows(logits)
            for a in range(0, end - start, step):  # the formula block by block (see _block_rows)
                rows, labels = slice(a, a + step), spec.labels[start + a : min(end, start + a + step)]
                z, block_target = logits[rows], _slice_target(target, a, a + step)
                if not want_grad:
                    sums += torch.stack(_rows_loss(z, labels, block_target, spec))
                    continue
                z = z.detach().requires_grad_(True)
                with torch.enable_grad():
                    losses = _rows_loss(z, labels, block_target, spec)
                    (grad,) = torch.autograd.grad(losses[0], z)
                sums += torch.stack(losses).detach()
                logits[rows] = grad  # the block's logits, no longer needed, become their gradient
            del target
            if want_grad:  # the logits now hold their gradient
                accumulate(logits, h, w, start, grad_h, grad_w, grad_b, head_scale or 1.0)
            del logits  # free the chunk before the next one is made
        ctx.grads = (
            grad_h,
            None if grad_w is None or ctx.head_scale is not None else grad_w.to(head.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        total, kd, ce = (s.clone() for s in sums[:3].unbind())  # separate tensors, not views of one buffer
        parts = sums[3:].clone()
        ctx.mark_non_differentiable(kd, ce, parts)
        return total, kd, ce, parts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_kd, _grad_ce, _grad_parts):
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError(
                "distill_loss_sums: backward can run only once (retain_graph is not supported)"
            )
        del ctx.grads
        if ctx.head_scale is not None:
            _check_head_scale(float(grad_total), ctx.head_scale, ctx.direct_grad)
            del ctx.direct_grad
        # In place: the buffers are ours alone, and a copy of grad_head would double the peak.
        scaled = tuple(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads)
        return (*scaled, None, None, None, None)


def _check_head_scale(factor: float, expected: float, grad: Tensor) -> None:
    """Backward's factor must be the one the head's gradient was already scaled by.

    A NaN or infinite factor (a poisoned loss) poisons that gradient too, as autograd would have, so
    that the non-finite-gradient guard sees it; any other mismatch is a caller's mistake.
    """
    if not math.isfinite(factor):
        grad.fill_(factor)
    elif not math.isclose(factor, expected, rel_tol=1e-6):
        raise RuntimeError(f"distill_loss_sums: head_grad_scale={expected} but backward got {factor}")


def _check_inputs(
    hidden: Tensor, head: Tensor, labels: Tensor, teacher, kd_weight: float, chunk_size: int | None
) -> None:
    if hidden.dim() != 2 or head.dim() != 2 or hidden.shape[1] != head.shape[1]:
        raise ValueError(
            f"expected hidden (N, H) and head (V, H), got {tuple(hidden.shape)} and {tuple(head.shape)}"
        )
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"expected labels of shape ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if teacher is None and kd_weight != 0:
        raise ValueError(f"kd_weight is {kd_weight} but no teacher signal was given")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")


def distill_loss_sums(
    student_hidden: Tensor,
    student_head: Tensor,
    labels: Tensor,
    teacher: Dense | DenseHidden | Sparse | Ensemble | None,
    *,
    kd_weight: float,
    ce_weight: float,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    divergence_kwargs: dict | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    student_bias: Tensor | None = None,
    student_softcap: float | None = None,
    head_grad_scale: float | None = None,
) -> LossSums:
    """``kd_weight * divergence + ce_weight * cross_entropy``, each summed over the N trained rows.

    Args:
        student_hidden: ``(N, H)`` student final hidden states (after the final norm); row i predicts
            ``labels[i]``. Gradients flow to it if it requires grad (e.g. from a LoRA model).
        student_head: ``(V, H)`` student ``lm_head`` weight: a parameter, a tied input embedding or a
            non-leaf. No head gradient is computed when it does not require grad (frozen under LoRA).
        labels: ``(N,)`` int64 next-token ids, all valid (no -100).
        teacher: the teacher signal for the same rows; ``None`` only when ``kd_weight == 0``.
        kd_weight, ce_weight: the weights of the two terms; the objective passes ``alpha * T**2`` and
            ``1 - alpha``.
        temperature: divides student and teacher logits inside the divergence (CE always uses T = 1).
        divergence: a key of ``registry.LOSSES``; ``divergence_kwargs`` go to it (``beta=``, ``skew=``;
            the registry's defaults fill the rest), and each row's label too if the loss needs labels.
        chunk_size: rows per chunk; ``None`` runs the naive unchunked reference path.
        student_bias, student_softcap: the head's optional ``(V,)`` bias (Phi-2 has one) and Gemma-2
            final-logit soft-cap ``cap * tanh(z / cap)``.
        head_grad_scale: the factor the caller will back-propagate ``total`` with. Given, and the head
            a trained fp32 parameter, the head's gradient is added to ``student_head.grad`` during this
            call, already times the factor: no second ``(V, H)`` buffer beside the accumulated gradient.
            Single process only (no DDP/FSDP gradient hooks); backward checks that it got that factor.

    Returns ``LossSums``: ``total`` is differentiable, ``kd`` and ``ce`` are detached, all fp32 scalars;
    gradients reach the inputs in their own dtypes.
    """
    loss, params = check_loss(divergence, divergence_kwargs)
    _check_inputs(student_hidden, student_head, labels, teacher, kd_weight, chunk_size)
    spec = _Spec(
        labels, teacher, kd_weight, ce_weight, temperature, divergence=loss.fn, divergence_kwargs=params,
        softcap=student_softcap, with_labels=loss.needs_labels,
    )  # fmt: skip
    if chunk_size is None:
        return _naive(student_hidden, student_head, student_bias, spec)
    chunk_size = chunk_rows(chunk_size, student_head.shape[0], student_hidden.device)
    inputs = (student_hidden, student_head, student_bias)
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in inputs)
    direct = head_grad_scale is not None and student_head.is_leaf and student_head.dtype == torch.float32
    scale = head_grad_scale if direct else None
    total, kd, ce, parts = _ChunkedLoss.apply(
        student_hidden, student_head, student_bias, spec, chunk_size, needs, scale
    )
    return LossSums(total=total, kd=kd, ce=ce, kd_parts=parts if _num_parts(spec) else None)


def chunk_rows(chunk_size: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk of `(rows, vocab)` logits: `chunk_size`, and on CPU no more than 24 MB of fp32.

    Then neither the student's logits nor the teacher's take a fresh mapping of their own (see
    `_block_rows`), and a chunk holds two such buffers, not 2 x (512, V).
    """
    if device.type != "cpu":
        return chunk_size
    return min(chunk_size, max(1, _CPU_CHUNK_BYTES // (4 * vocab)))


def _num_parts(spec: _Spec) -> int:
    return len(spec.teacher.members) if isinstance(spec.teacher, Ensemble) else 0
