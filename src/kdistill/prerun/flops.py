"""How many floating-point operations a distillation step needs, and what this machine's matmul peaks at.

The count is of *useful* work: the matrix multiplies the loss needs, whatever a given trainer computes
on top. It follows the usual model-FLOPs convention (Kaplan et al. 2020; PaLM's MFU, Chowdhery et al.
2022), applied per token and with kdistill's two refinements spelled out:

- **Body.** A token through a linear layer of `n` weights costs `2n` forward. Training it costs
  `2n` more for the gradient with respect to the layer's input, and `2n` more for the gradient of
  its weights, only if they train. Per non-padding token the student therefore costs
  `4 * N_body + 2 * N_trained`, which is the familiar `6N` for full fine-tuning. For LoRA, the
  frozen base still passes gradients down (the `4 * N_body`) and only the adapters' weights get
  theirs (`2 * N_trained`). "6 x parameters trained" alone would undercount LoRA about threefold.
  A live teacher costs `2 * N_body` per token, forward only.
- **Output head.** The loss reads logits only where a token trains (response positions), so the
  head (`V x H`) counts at trained tokens only: `2VH` forward per model, `2VH` backward for the
  student's hidden states, `2VH` more if the student's head trains. Logits a trainer computes at
  prompt or padding positions are not useful work.
- **Attention.** Scores `QK^T` and the weighted sum `AV` cost `4 * d_attn` per query-key pair per
  layer forward (`d_attn` = heads x head size), and twice that backward. Under the causal mask a
  row of `n` tokens has `n(n+1)/2` pairs; padding has none.

Embedding lookups, norms, activations and softmax are not counted: they are not matmuls. Because the
count depends only on the batch, two trainers given the same rows get the same FLOPs, and their
FLOP/s ratio is their tokens/s ratio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from kdistill.models.compact import CompactLinear
from kdistill.models.parts import base_model, text_config


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs to know about one causal LM."""

    body: int  # weights and biases of every linear layer except the output head
    trained_body: int  # those of them that require grad
    head: int  # V x H of the output head (its bias, if any, is negligible)
    head_trained: bool
    layers: int
    attention_width: int  # query heads x head size


def model_shape(model: nn.Module) -> ModelShape:
    """Count the linear layers of a transformers causal LM (peft-wrapped or not)."""
    base = base_model(model)
    head = base.get_output_embeddings()
    body = trained = 0
    for module in base.modules():
        if isinstance(module, CompactLinear):  # a frozen teacher's compactly stored weight
            body += module.weight_numel() + (0 if module.bias is None else module.bias.numel())
        elif isinstance(module, nn.Linear) and module is not head:
            # in x out rather than the weight's numel: a 4-bit bitsandbytes weight packs two a byte.
            sizes = [(module.in_features * module.out_features, module.weight)]
            sizes += [] if module.bias is None else [(module.bias.numel(), module.bias)]
            for size, param in sizes:
                body += size
                trained += size if param.requires_grad else 0
    config = text_config(base.config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        body=body,
        trained_body=trained,
        head=head.weight.numel(),
        head_trained=head.weight.requires_grad,
        layers=config.num_hidden_layers,
        attention_width=heads * head_dim,
    )


def attention_pairs(attention_mask: torch.Tensor) -> int:
    """Query-key pairs under the causal mask: `sum n(n+1)/2` over rows of `n` tokens; mask `(B, T)`."""
    lengths = attention_mask.sum(dim=1).long()
    return int((lengths * (lengths + 1) // 2).sum())


def student_flops(shape: ModelShape, tokens: int, trained: int, pairs: int) -> int:
    """Forward and backward of a trained student over `tokens` tokens, `trained` of them in the loss."""
    body = tokens * (4 * shape.body + 2 * shape.trained_body)
    head = trained * shape.head * (6 if shape.head_trained else 4)
    attention = 3 * 4 * shape.layers * shape.attention_width * pairs
    return body + head + attention


def teacher_flops(shape: ModelShape, tokens: int, trained: int, pairs: int) -> int:
    """Forward of a frozen teacher: its body at every token, its head at trained tokens only."""
    return (
        tokens * 2 * shape.body + trained * 2 * shape.head + 4 * shape.layers * shape.attention_width * pairs
    )


def step_flops(student: ModelShape, teachers: list[ModelShape], tokens: int, trained: int, pairs: int) -> int:
    """Useful FLOPs of a distillation step; `teachers` lists the live ones only (a cache costs none)."""
    own = student_flops(student, tokens, trained, pairs)
    return own + sum(teacher_flops(t, tokens, trained, pairs) for t in teachers)


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 3, dtype=torch.float32) -> float:
    """This machine's best measured FLOP/s over square matmuls of `sizes`, in this process's threads.

    The best of `repeats` timings per size, after one warm-up: the closest a real workload can get,
    so that achieved / peak reads as utilisation.
    """
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up: thread pool and allocator
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best
