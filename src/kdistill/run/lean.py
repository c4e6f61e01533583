"""Single-process memory savings that change no number beyond float rounding.

A tied input embedding gets a sparse gradient (`sparse_tied_embedding`), and gated MLPs keep half
their activations for backward: `down(silu(gate(x)) * up(x))`.

Autograd keeps four `(tokens, intermediate)` tensors per layer for the backward pass of the usual
gated MLP (Llama, Mistral, Qwen, SmolLM): the two projections, the SiLU of the first and the product.
Here only the two projections are kept and the two elementwise results are recomputed in backward
(no matmul is repeated). On a 10-layer SmolLM2 student that is 48 of the step's 169 MB of
activations at 394 tokens, for no measurable time. The gradients are the same up to
float rounding (tests/test_step_memory.py). Under `training.gradient_checkpointing` the lean MLP
runs again inside each recomputed layer, with the same gradients (tests/test_checkpointing.py).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from kdistill.models.parts import base_model
from kdistill.run.accelerator import single_process


class _GatedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
        gate, up = F.linear(x, w_gate), F.linear(x, w_up)
        ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        return F.linear(F.silu(gate) * up, w_down)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        act = gate * sig
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_prod = grad_out @ w_down  # (..., I)
        grad_w_down = flat_out.t() @ (act * up).reshape(-1, up.shape[-1]) if ctx.needs_input_grad[3] else None
        grad_up = grad_prod * act
        grad_gate = grad_prod.mul_(up).mul_(sig * (1 + gate * (1 - sig)))  # d silu / d gate
        del act, sig
        flat_x = x.reshape(-1, x.shape[-1])
        flat_gate, flat_up = grad_gate.reshape(-1, gate.shape[-1]), grad_up.reshape(-1, up.shape[-1])
        grad_x = (grad_gate @ w_gate).add_(grad_up @ w_up) if ctx.needs_input_grad[0] else None
        grad_w_gate = flat_gate.t() @ flat_x if ctx.needs_input_grad[1] else None
        grad_w_up = flat_up.t() @ flat_x if ctx.needs_input_grad[2] else None
        return grad_x, grad_w_gate, grad_w_up, grad_w_down


def _forward(self: nn.Module, x: Tensor) -> Tensor:
    if not torch.is_grad_enabled():
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return _GatedMLP.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


def _is_plain_gated_mlp(module: nn.Module) -> bool:
    """Three bias-free `nn.Linear`s (not LoRA-wrapped) named gate/up/down and a SiLU activation."""
    names = ("gate_proj", "up_proj", "down_proj")
    if not all(type(getattr(module, n, None)) is nn.Linear for n in names):
        return False
    if any(getattr(module, n).bias is not None for n in names):
        return False
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def lean_gated_mlps(model: nn.Module) -> int:
    """Give every plain gated MLP of `model` the leaner backward, in place; returns how many.

    Single process only: FSDP and ZeRO-3 gather a layer's weights when that layer is called, and
    this forward reads the three weights directly.
    """
    count = 0
    for module in model.modules():
        if _is_plain_gated_mlp(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def sparse_tied_embedding(model: torch.nn.Module) -> bool:
    """Give a trained input embedding that is tied to the output head a sparse gradient; True if done.

    Dense, its backward fills a `(V, H)` zero tensor, writes the few rows of the batch's tokens and
    adds the whole tensor to the head's gradient: on SmolLM2 a 113 MB buffer and two passes over it
    per micro-batch. Sparse, autograd adds those rows into the head's dense gradient in place, so
    the parameter's gradient stays dense and exactly the same. Single process only (`lean_student`):
    the gradient hooks of DDP, FSDP and DeepSpeed expect dense contributions.
    """
    base = base_model(model)
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    tied = head is not None and isinstance(embedding, torch.nn.Embedding) and head.weight is embedding.weight
    if not tied or not embedding.weight.requires_grad:
        return False
    embedding.sparse = True
    return True


def lean_student(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """The savings of this module, in a single process: a sparse tied-embedding gradient, and lean
    gated MLPs in fp32 only (without autocast in the way)."""
    if not single_process(accelerator):
        return
    sparse_tied_embedding(model)
    if accelerator.mixed_precision == "no":
        lean_gated_mlps(model)
