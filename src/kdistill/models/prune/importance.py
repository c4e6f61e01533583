"""Importance of a teacher's units, from its activations on calibration rows (Minitron, ShortGPT).

One forward pass per batch, with hooks, scores every unit at once, over the real (unpadded) tokens:
- a layer: block influence, the mean of 1 - cos(input, output) of its hidden states (ShortGPT, Men et
  al. 2024): a layer that barely turns the residual stream matters little;
- an MLP neuron: the mean magnitude of its activation act(gate) * up, the input of down_proj;
- a query head: the mean L2 norm of its output, the head's slice of o_proj's input;
- an embedding channel: the mean magnitude of the normalised hidden state, summed over every place it
  is read (the inputs of each layer's attention and MLP, which the RMSNorms give, and the final norm).
Minitron ("Compact Language Models via Pruning and Knowledge Distillation", Muralidharan et al. 2024)
scores neurons, heads and channels so. `removal_scores` gives the costlier depth score: the teacher's
loss, or its KL from the full teacher, with one layer removed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kdistill.models.prune.quality import response_log_probs


@dataclass
class Importance:
    """Each unit's score (higher: more important), per layer where units are per layer."""

    influence: list[float]  # block influence of each layer
    neurons: list[torch.Tensor]  # (intermediate,) per layer
    heads: list[torch.Tensor]  # (query heads,) per layer
    channels: torch.Tensor  # (hidden,)
    tokens: int
    removal: list[float] | None = None  # loss or KL with each layer removed, when scored
    contiguous: list[float] | None = None  # loss or KL with each block of `width` layers removed, by start
    gram: list[torch.Tensor] | None = None  # per layer: the MLP activations' (intermediate, intermediate) AᵀA

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "layers": {
                "block_influence": self.influence,
                "removal": self.removal,
                "contiguous_block_removal": self.contiguous,
            },
            "mlp_neurons": [n.tolist() for n in self.neurons],
            "attention_heads": [h.tolist() for h in self.heads],
            "embedding_channels": self.channels.tolist(),
        }


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def score_units(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], progress: bool = True, gram: bool = False
) -> Importance:
    """Every unit's activation score over the real tokens of `batches` (one forward pass each); with
    `gram`, also each layer's Gram matrix of its MLP activations (for `surgery.refit_mlp`)."""
    layers = decoder_layers(model)
    config = model.config
    heads, size = config.num_attention_heads, _head_dim(config)
    sums = _Sums(len(layers), config.intermediate_size, heads, config.hidden_size)
    state: dict[str, torch.Tensor] = {}
    grams = [torch.zeros(0) for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        handles += [
            layer.register_forward_hook(_influence(sums, state, i), with_kwargs=True),
            layer.self_attn.o_proj.register_forward_pre_hook(_head_norms(sums, state, i, heads, size)),
            layer.mlp.down_proj.register_forward_pre_hook(_magnitudes(sums.neurons, state, i)),
            *([layer.mlp.down_proj.register_forward_pre_hook(_gram(grams, state, i))] if gram else []),
            layer.self_attn.q_proj.register_forward_pre_hook(_channels(sums, state)),
            layer.mlp.gate_proj.register_forward_pre_hook(_channels(sums, state)),
        ]
    try:
        for batch in tqdm(list(batches), desc="calibration", unit="batch", disable=not progress):
            state["mask"] = batch["attention_mask"].bool()
            out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            sums.channels += _masked_sum(out.last_hidden_state.abs(), state["mask"])
            sums.tokens += int(state["mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    n = max(sums.tokens, 1)
    return Importance(
        influence=(sums.influence / n).tolist(),
        neurons=[row / n for row in sums.neurons],
        heads=[row / n for row in sums.heads],
        channels=sums.channels / n,
        tokens=sums.tokens,
        gram=[g.cpu() for g in grams] if gram else None,
    )


class _Sums:
    def __init__(self, layers: int, intermediate: int, heads: int, hidden: int) -> None:
        f64 = torch.float64
        self.influence = torch.zeros(layers, dtype=f64)
        self.neurons = torch.zeros(layers, intermediate, dtype=f64)
        self.heads = torch.zeros(layers, heads, dtype=f64)
        self.channels = torch.zeros(hidden, dtype=f64)
        self.tokens = 0


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(B, T, D)` summed over the tokens where `mask` `(B, T)` is set: `(D,)` in float64, on the CPU."""
    return values[mask].double().sum(0).cpu()


def _influence(sums: _Sums, state: dict[str, torch.Tensor], i: int) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        inp = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        cos = torch.nn.functional.cosine_similarity(inp.double(), out.double(), dim=-1)
        sums.influence[i] += float((1 - cos)[state["mask"]].sum())

    return hook


def _head_norms(sums: _Sums, state: dict[str, torch.Tensor], i: int, heads: int, size: int) -> Any:
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        sums.heads[i] += _masked_sum(x.view(*x.shape[:-1], heads, size).norm(dim=-1), state["mask"])

    return hook


def _magnitudes(target: torch.Tensor, state: dict[str, torch.Tensor], i: int) -> Any:
    def hook(module: nn.Module, args: tuple) -> None:
        target[i] += _masked_sum(args[0].abs(), state["mask"])

    return hook


def _gram(grams: list[torch.Tensor], state: dict[str, torch.Tensor], i: int) -> Any:
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0][state["mask"]]
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        grams[i] = x.T @ x if grams[i].numel() == 0 else grams[i].addmm_(x.T, x)

    return hook


def _channels(sums: _Sums, state: dict[str, torch.Tensor]) -> Any:
    def hook(module: nn.Module, args: tuple) -> None:
        sums.channels += _masked_sum(args[0].abs(), state["mask"])

    return hook


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class _Skip(nn.Module):
    """A removed decoder layer: its input passes through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def removal_scores(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    metric: str,
    progress: bool = True,
    blocks: list[list[int]] | None = None,
) -> list[float]:
    """Per layer (or per block of layers in `blocks`), the per-token `kl` (from the full model) or
    `loss` at response tokens without it.

    Batch by batch, so only one batch's full-model log-probs are held: `1 + blocks` forward passes each.
    """
    layers = decoder_layers(model)
    blocks = blocks if blocks is not None else [[i] for i in range(len(layers))]
    totals, tokens = torch.zeros(len(blocks), dtype=torch.float64), 0
    batches = list(batches)
    bar = tqdm(total=len(batches) * len(blocks), desc=f"removal {metric}", unit="pass", disable=not progress)
    for batch in batches:
        mask = batch["labels"][:, 1:] != -100
        targets = batch["labels"][:, 1:][mask]
        full = response_log_probs(model, batch, mask, torch.float64)
        for i, block in enumerate(blocks):
            kept = [layers[j] for j in block]
            for j in block:
                layers[j] = _Skip()
            try:
                cut = response_log_probs(model, batch, mask, torch.float64)
            finally:
                for j, layer in zip(block, kept):
                    layers[j] = layer
            if metric == "kl":
                totals[i] += float((full.exp() * (full - cut)).sum())
            else:
                totals[i] -= float(cut.gather(-1, targets[:, None]).sum())
            bar.update()
        tokens += int(mask.sum())
    bar.close()
    return (totals / max(tokens, 1)).tolist()
