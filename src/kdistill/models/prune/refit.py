"""`mlp_refit`: a pruned student's MLP down projections refit by least squares on the calibration rows.

Cutting neurons drops their share of a layer's MLP output, and cutting layers drops their updates of
the residual stream. Each kept layer's down projection is refit so that, on the teacher's own
activations, it writes what the teacher adds to the residual stream from that layer up to the next
kept one: its full MLP output plus the updates of the layers removed right after it (Llama, Mistral,
Qwen). Gemma 3 normalises the MLP output before adding it, so there the refit reproduces the full MLP
output alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kdistill.models.prune.importance import decoder_layers
from kdistill.models.prune.surgery import Kept

# The ridge, as a share of the kept activations' mean energy: it steadies the solve where kept neurons
# are nearly collinear. On the quickstart's student, 1e-4 gave the lowest KL of 1e-5 .. 1e-2.
REFIT_RIDGE = 1e-4


def absorbs_removed_layers(layer: nn.Module) -> bool:
    """Whether the layer adds its down projection's output to the residual stream as it is (not
    Gemma 3, which normalises it first), so that it can take over the removed layers' updates."""
    return not hasattr(layer, "post_feedforward_layernorm")


def skipped_until(kept: Sequence[int], total: int) -> dict[int, int]:
    """For each kept layer, the last teacher layer before the next kept one (itself when none is
    removed in between; the teacher's last layer for the last kept layer)."""
    ends = [*kept[1:], total]
    return {k: end - 1 for k, end in zip(kept, ends, strict=True)}


@torch.no_grad()
def refit_mlp(
    student: nn.Module,
    teacher: nn.Module,
    kept: Kept,
    batches: Sequence[dict[str, torch.Tensor]],
    progress: bool = True,
) -> None:
    """Refit the down projection of every student layer, in place, from one teacher pass.

    For kept teacher layer `k` with activations `A` (the input of `down_proj` at the real tokens of
    `batches`), kept neurons `K` and target `T` (what the teacher adds to the residual stream from
    `k`'s MLP up to the next kept layer, on the kept embedding channels), the student's down
    projection is the ridge least-squares solution
    `W' = argmin |T - A_K W'ᵀ|² + r |W'|² = Tᵀ A_K (A_Kᵀ A_K + r I)⁻¹`, solved in float64.
    """
    layers = decoder_layers(teacher)
    ends = skipped_until(kept.layers, len(layers))
    absorbs = {k for k in kept.layers if ends[k] > k and absorbs_removed_layers(layers[k])}
    width = layers[0].mlp.down_proj.in_features
    refit = [k for k, n in zip(kept.layers, kept.neurons, strict=True) if len(n) < width or k in absorbs]
    if not refit:
        return  # nothing cut after any kept layer: the teacher's weights are the solution
    channels = kept.channels.to(next(teacher.parameters()).device)
    sums: dict[int, list[torch.Tensor]] = {}  # kept layer -> [A_Kᵀ A_K, Tᵀ A_K]
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for k in refit:
        neurons = kept.neurons[kept.layers.index(k)].to(channels.device)
        handles.append(layers[k].mlp.down_proj.register_forward_hook(_down(seen, k, neurons)))
        if k in absorbs:
            for i in (k, ends[k]):
                handles.append(layers[i].register_forward_hook(_output(seen, i)))
    try:
        for batch in tqdm(list(batches), desc="mlp refit", unit="batch", disable=not progress):
            seen["mask"] = batch["attention_mask"].bool()
            teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for k in refit:
                acts, target = seen[f"acts{k}"], seen[f"mlp{k}"]
                if k in absorbs:
                    target = target + seen[f"out{ends[k]}"] - seen[f"out{k}"]
                target = target.index_select(-1, channels)
                inner, cross = acts.T @ acts, target.T @ acts
                if k in sums:
                    sums[k][0] += inner
                    sums[k][1] += cross
                else:
                    sums[k] = [inner, cross]
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    for k in refit:
        new = kept.layers.index(k)
        inner, cross = (t.double().cpu() for t in sums[k])
        ridge = REFIT_RIDGE * inner.diagonal().mean() * torch.eye(len(inner), dtype=torch.float64)
        solved = torch.linalg.solve(inner + ridge, cross.T).T
        target = decoder_layers(student)[new].mlp.down_proj.weight
        target.copy_(solved.to(device=target.device, dtype=target.dtype))


def _dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _down(seen: dict[str, torch.Tensor], k: int, neurons: torch.Tensor) -> Any:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        mask = seen["mask"]
        seen[f"acts{k}"] = args[0][mask].index_select(-1, neurons).to(_dtype(args[0]))
        seen[f"mlp{k}"] = output[mask].to(_dtype(output))

    return hook


def _output(seen: dict[str, torch.Tensor], i: int) -> Any:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        seen[f"out{i}"] = out[seen["mask"]].to(_dtype(out))

    return hook
