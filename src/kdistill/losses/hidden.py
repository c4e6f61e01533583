"""Hidden-state distillation: match chosen student layers to teacher layers (FitNets, TinyBERT).

Layers are numbered as transformers' ``output_hidden_states`` numbers them: 0 is the embedding
output and ``i`` the output of decoder layer ``i`` (1-based), so a model of L layers has 0..L
(in transformers 5, entry L is ``last_hidden_state``, after the final norm).
A pair ``(t, s)`` compares the student's state ``s`` with the teacher's state ``t``. Where hidden
sizes differ, a learned linear map per pair (no bias, as in TinyBERT) takes the student's state into
the teacher's space; it trains with the student, is saved beside it and is never exported with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.files import save_atomic

PROJECTIONS_FILE = "hidden_projections.safetensors"
DISTANCES = ("mse", "cosine")

LayerPairs = list[tuple[int, int]]


def auto_layer_pairs(teacher_layers: int, student_layers: int) -> LayerPairs:
    """One pair per student layer, spread evenly over the teacher's depth, last with last.

    Student layer ``s`` (1..S) pairs with teacher layer ``round(s * T / S)`` (halves round up), so
    each student layer sits at the same relative depth as its teacher layer; the embeddings are
    not paired. E.g. T=12, S=4 gives (3, 1), (6, 2), (9, 3), (12, 4).
    """
    if teacher_layers < 1 or student_layers < 1:
        raise KdistillError(f"cannot pair layers of models with {teacher_layers} and {student_layers} layers")
    return [
        ((2 * s * teacher_layers + student_layers) // (2 * student_layers), s)
        for s in range(1, student_layers + 1)
    ]


def copied_layer_pairs(kept: Sequence[int]) -> LayerPairs:
    """A ``from_teacher`` student's layers paired with the teacher layers they were copied from.

    ``kept`` holds the teacher's 0-based decoder-layer indices the student keeps, in order; student
    layer ``i`` (1-based) is a copy of teacher layer ``kept[i - 1]``, whose output is teacher state
    ``kept[i - 1] + 1``. E.g. 10 of 30 layers kept at 0, 3, 6, 10, ..., 29 give (1, 1), (4, 2), (7, 3),
    (11, 4), ..., (30, 10): the first pair starts equal, the last is both final (normed) outputs.
    """
    return [(k + 1, i + 1) for i, k in enumerate(kept)]


def resolve_layer_pairs(
    layers: str | Sequence[Sequence[int]],
    teacher_layers: int,
    student_layers: int,
    key: str = "loss.hidden.layers",
) -> LayerPairs:
    """``"auto"`` or an explicit ``[[teacher_layer, student_layer], ...]``, checked against both depths."""
    if isinstance(layers, str):
        if layers != "auto":
            raise KdistillError(
                f"{key}: expected 'auto' or a list of [teacher_layer, student_layer], got {layers!r}"
            )
        return auto_layer_pairs(teacher_layers, student_layers)
    pairs: LayerPairs = []
    for item in layers:
        if len(item) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in item):
            raise KdistillError(
                f"{key}: expected [teacher_layer, student_layer] integer pairs, got {list(item)!r}"
            )
        t, s = item
        if not (0 <= t <= teacher_layers and 0 <= s <= student_layers):
            raise KdistillError(
                f"{key}: pair [{t}, {s}] is out of range: teacher layers are 0..{teacher_layers}, "
                f"student layers 0..{student_layers} (0 is the embedding output)"
            )
        if (t, s) in pairs:  # counted twice, it would silently weigh that pair double
            raise KdistillError(f"{key}: pair [{t}, {s}] is listed twice")
        pairs.append((t, s))
    if not pairs:
        raise KdistillError(f"{key}: the list of layer pairs is empty")
    return pairs


def require_live_teacher(teacher_is_cache: bool, source: str, name: str | None = None) -> None:
    """Hidden-state distillation needs the teacher's hidden states, which a teacher cache does not store.

    ``name`` names the teacher among several (its ``loss/kd/NAME``).
    """
    if teacher_is_cache:
        who = "the teacher" if name is None else f"teacher '{name}'"
        raise KdistillError(
            f"loss.hidden needs a live teacher, but {who} is the cache '{source}': a teacher cache "
            "stores only the teacher's top-k tokens, not its hidden states. Give that teacher its `model` "
            "without `cache` so that it runs live, or set loss.hidden.weight: 0"
        )


class HiddenProjections(nn.Module):
    """One student-to-teacher linear map per layer pair, or none where the hidden sizes are equal.

    Args:
        pairs: ``[(teacher_layer, student_layer), ...]``.
        student_size, teacher_size: hidden sizes ``Hs`` and ``Ht``.
    """

    def __init__(self, pairs: Sequence[tuple[int, int]], student_size: int, teacher_size: int) -> None:
        super().__init__()
        self.pairs: LayerPairs = [(int(t), int(s)) for t, s in pairs]
        self.student_size, self.teacher_size = student_size, teacher_size
        maps = [nn.Linear(student_size, teacher_size, bias=False) for _ in self.pairs]
        # Equal sizes need no map: the states are compared as they are (an empty list, no parameters).
        self.maps = nn.ModuleList(maps if student_size != teacher_size else [])

    def forward(self, index: int, states: Tensor) -> Tensor:
        """Pair ``index``'s student states ``(..., Hs)`` in the teacher's space ``(..., Ht)``, fp32."""
        states = states.float()
        return self.maps[index](states) if len(self.maps) else states


@dataclass(frozen=True)
class HiddenSums:
    """The hidden loss summed over trained rows (mean over layer pairs), and how many rows that is."""

    total: Tensor
    count: int


def _distance(student: Tensor, teacher: Tensor, distance: str) -> Tensor:
    """Per-row distance ``(N,)``: mean squared error over the hidden size, or ``1 - cosine similarity``."""
    if distance == "mse":
        return (student - teacher).pow(2).mean(-1)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    raise KdistillError(f"loss.hidden.distance: expected one of {', '.join(DISTANCES)}, got {distance!r}")


def hidden_loss_sums(
    student_states: Sequence[Tensor | None],
    teacher_states: Sequence[Tensor] | Mapping[int, Tensor],
    mask: Tensor,
    projections: HiddenProjections,
    distance: str = "mse",
    teacher_mask: Tensor | None = None,
) -> HiddenSums:
    """Distance between paired hidden states at the trained rows, summed over rows.

    Args:
        student_states: the student's ``hidden_states`` tuple, each ``(B, T, Hs)`` (None where unpaired).
        teacher_states: the teacher's, each ``(B, Tt, Ht)``, ``Tt = T`` unless ``teacher_mask`` (detached);
            or a mapping of the paired teacher layers to their states, of any shape ``teacher_mask`` fits
            (the trainer passes the teacher's trained rows ``(N, Ht)`` with an all-True ``(N,)`` mask).
        mask: ``(B, T)`` bool, True at rows that train (the KD loss's own rows).
        projections: the pairs and their student-to-teacher maps.
        distance: ``"mse"`` or ``"cosine"``.
        teacher_mask: ``(B, Tt)`` bool, the teacher's rows when its tokenizer differs (``None``: ``mask``).
            It must select as many rows as ``mask``, in the same order: the aligned positions of
            ``data.alignment`` qualify, as segments run in text order on both sides.
    Returns:
        ``total``: per-row distances summed over rows and averaged over pairs (so the weight does not
        depend on how many pairs there are); ``count``: the number of trained rows. The objective
        divides by the trained-token count once.
    """
    if teacher_mask is None:
        teacher_mask = mask
    elif int(teacher_mask.sum()) != int(mask.sum()):
        raise ValueError(f"teacher_mask selects {int(teacher_mask.sum())} rows but mask {int(mask.sum())}")
    total = torch.zeros((), device=mask.device)
    for index, (t, s) in enumerate(projections.pairs):
        student = projections(index, student_states[s][mask])
        teacher = teacher_states[t][teacher_mask].detach().float()
        total = total + _distance(student, teacher, distance).sum()
    return HiddenSums(total / max(len(projections.pairs), 1), int(mask.sum()))


def projections_filename(teacher: str | None = None) -> str:
    """``hidden_projections.safetensors``, or ``hidden_projections.NAME.safetensors`` for one of several."""
    if teacher is None:
        return PROJECTIONS_FILE
    return f"hidden_projections.{re.sub(r'[^A-Za-z0-9_.-]', '_', teacher)}.safetensors"


def save_projections(
    projections: HiddenProjections, folder: str | Path, filename: str = PROJECTIONS_FILE
) -> Path:
    """Write ``folder/filename`` atomically (pairs and sizes in its metadata)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in projections.state_dict().items()}
    metadata = {
        "pairs": json.dumps(projections.pairs),
        "student_size": str(projections.student_size),
        "teacher_size": str(projections.teacher_size),
    }
    save_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load_projections(folder: str | Path, filename: str = PROJECTIONS_FILE) -> HiddenProjections:
    """Rebuild the projections saved by ``save_projections`` as ``folder/filename``."""
    path = Path(folder) / filename
    if not path.is_file():
        raise KdistillError(
            f"no hidden-state projections at {path} (loss.hidden saves them beside the student)"
        )
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        try:
            pairs = [tuple(p) for p in json.loads(meta["pairs"])]
            sizes = int(meta["student_size"]), int(meta["teacher_size"])
        except (KeyError, ValueError) as err:
            raise KdistillError(f"{path}: not a kdistill projections file (metadata {meta!r})") from err
        state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    projections = HiddenProjections(pairs, *sizes)
    try:
        projections.load_state_dict(state)
    except RuntimeError as err:  # torch lists missing keys and shape mismatches: name the file instead
        raise KdistillError(
            f"{path}: its tensors do not fit {len(pairs)} pairs of sizes {sizes[0]} -> {sizes[1]} ({err})"
        ) from err
    return projections
