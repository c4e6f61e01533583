"""A frozen teacher's linear weights kept in the exact compact form they came from.

On CPU a teacher computes in fp32, but its fp32 weights often hold far fewer bits than 32:

- a GGUF teacher (such as SmolLM2's Q4_1 package) is converted once to fp32 (`models.loading`), and
  each of its quantized weights is `q * d + m` for a 4-bit code `q` and a block's fp16 scale `d` and
  offset `m`, 32 weights to a block;
- a checkpoint published in bf16 and loaded in fp32 holds bf16 values.

Such a weight is stored here in that form (5 or 16 bits a weight instead of 32) and expanded to
the very same fp32 tensor each time its layer runs. The numbers are unchanged: the expansion repeats
the conversion's arithmetic, and a weight is compacted only when its expansion equals it bit for
bit. Expanding a layer costs far less than its matmul over a batch of tokens (for SmolLM2-135M about
1% of a forward pass), but not in decoding, where each forward is one token a row: `expanded_weights`
holds every layer's fp32 weight for the duration of a `generate` call instead. Only frozen fp32
`nn.Linear` layers are touched, never the output head, which the loss reads directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 32  # weights per block of a 4-bit GGUF format, along the input dimension
_SCRATCH: dict[tuple, torch.Tensor] = {}  # (out, in, device, inference) -> a buffer shared by layers
_PROBE_BLOCKS = 256  # blocks checked first, so that an ordinary fp32 weight is rejected quickly


@dataclass
class CompactReport:
    """How many linear weights were compacted, in which form, and the memory that saved."""

    q4_blocks: int = 0
    bf16: int = 0
    left: int = 0  # frozen fp32 linear weights with no exact compact form
    bytes_before: int = 0
    bytes_after: int = 0

    def describe(self) -> str:
        saved = (self.bytes_before - self.bytes_after) / 2**20
        return (
            f"{self.q4_blocks} linear weights stored as 4-bit blocks and {self.bf16} as bf16, "
            f"expanded exactly to fp32 as they run ({self.left} kept in fp32): {saved:.0f} MiB saved"
        )


class CompactLinear(nn.Module):
    """`nn.Linear` whose frozen weight is stored compactly and expanded exactly for each forward."""

    def __init__(self, linear: nn.Linear, form: str, parts: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features, self.form = linear.in_features, linear.out_features, form
        for name, tensor in parts.items():
            self.register_buffer(name, tensor)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.held: torch.Tensor | None = None  # the fp32 weight, inside `expanded_weights` only

    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    def expand(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weight `(out, in)`, equal bit for bit to the one it was made from (into `out`)."""
        if self.form == "bf16":
            return self.bf16.float() if out is None else out.copy_(self.bf16)
        return expand_q4(self.codes, self.scale, self.offset, (self.out_features, self.in_features), out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.held is not None:
            return F.linear(x, self.held, self.bias)
        if torch.is_grad_enabled():  # autograd may keep the weight for backward: a tensor of its own
            return F.linear(x, self.expand(), self.bias)
        # Without autograd the weight is dead once the product is made, so the layers of one shape
        # share one buffer: no fresh allocation (and no page faults) per layer and pass.
        # Inference mode gets buffers of its own: an inference tensor cannot be written outside it.
        device = next(self.buffers()).device
        key = (self.out_features, self.in_features, device, torch.is_inference_mode_enabled())
        scratch = _SCRATCH.get(key)
        if scratch is None:
            scratch = _SCRATCH[key] = torch.empty(key[:2], device=device)
        return F.linear(x, self.expand(scratch), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, form={self.form}"


@contextlib.contextmanager
def expanded_weights(model: nn.Module) -> Iterator[None]:
    """Every `CompactLinear` of `model` runs on its fp32 weight, expanded once on entry and freed on exit.

    For decoding, where a forward pass is one token a row and expanding the weights at each would cost
    more than the matmuls. The model's memory is that of its fp32 weights meanwhile. A model without
    compact layers is left as it is.
    """
    layers = [m for m in model.modules() if isinstance(m, CompactLinear)]
    # Ordinary tensors even when entered under inference mode, so any mode may use them.
    with torch.inference_mode(False), torch.no_grad():
        for layer in layers:
            layer.held = layer.expand()
    try:
        yield
    finally:
        for layer in layers:
            layer.held = None


def expand_q4(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    shape: tuple,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`code * scale + offset` per block, as two fp32 roundings (the GGUF dequantization's arithmetic).

    `codes` `(blocks, 16)` uint8 hold two 4-bit codes each: the low nibble is the block's weight i,
    the high nibble weight i + 16. `scale` and `offset` are `(blocks, 1)` fp16. Written into `out`
    (fp32, `shape`) when given.
    """
    out = torch.empty(shape, device=codes.device) if out is None else out
    out = out.view(codes.shape[0], 2, BLOCK // 2)
    out[:, 0] = codes & 15
    out[:, 1] = codes >> 4
    flat = out.view(codes.shape[0], BLOCK)
    flat.mul_(scale.float()).add_(offset.float())
    return flat.view(shape)


def q4_parts(weight: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The 4-bit block form of an fp32 weight `(out, in)`, or None when it has no exact one.

    In each block the smallest weight is the offset (its code is 0) and the largest is offset + 15
    scales, so the scale is their difference over 15 rounded to fp16; then every code and the
    expansion are checked against the weight, bit for bit.
    """
    if weight.dim() != 2 or weight.shape[1] % BLOCK or weight.dtype != torch.float32:
        return None
    blocks = weight.detach().reshape(-1, BLOCK)
    if _q4_codes(blocks[:_PROBE_BLOCKS]) is None:
        return None
    found = _q4_codes(blocks)
    if found is None:
        return None
    codes, scale, offset = found
    packed = codes[:, : BLOCK // 2] | (codes[:, BLOCK // 2 :] << 4)
    parts = {"codes": packed.contiguous(), "scale": scale.half(), "offset": offset.half()}
    if not torch.equal(expand_q4(parts["codes"], parts["scale"], parts["offset"], weight.shape), weight):
        return None
    return parts


def _q4_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    offset = blocks.amin(dim=1, keepdim=True)
    scale = ((blocks.amax(dim=1, keepdim=True) - offset) / 15).half().float()
    if not torch.equal(offset.half().float(), offset) or not torch.isfinite(scale).all():
        return None  # the offset must be an fp16 value, as the format stores it
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round((blocks - offset) / safe).clamp_(0, 15)
    if not torch.equal(codes * scale + offset, blocks):
        return None
    return codes.to(torch.uint8), scale, offset


def compact_frozen(model: nn.Module) -> CompactReport:
    """Replace every frozen fp32 `nn.Linear` of `model` (not its output head) that has an exact compact
    form by a `CompactLinear`, in place. Call it after anything that copies the model's weights."""
    report = CompactReport()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not head
        and module.weight.dtype == torch.float32
        and not module.weight.requires_grad
    ]
    for name, linear in targets:
        weight = linear.weight.detach()
        parts, form = q4_parts(weight), "q4_blocks"
        if parts is None and torch.equal(weight.bfloat16().float(), weight):
            parts, form = {"bf16": weight.bfloat16()}, "bf16"
        if parts is None:
            report.left += 1
            continue
        setattr(report, form, getattr(report, form) + 1)
        report.bytes_before += weight.numel() * 4
        report.bytes_after += sum(t.numel() * t.element_size() for t in parts.values())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, CompactLinear(linear, form, parts))
    if report.q4_blocks or report.bf16:
        _own_memory(model)
    return report


def _own_memory(model: nn.Module) -> None:
    """Copy the remaining weights out of the checkpoint's memory-mapped file.

    transformers maps a safetensors file and its fp32 tensors point into it. Pages of that mapping stay
    resident (and count in the process's memory) while any tensor still points into it, even those of
    the weights just compacted; copying the rest lets the mapping go.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
