"""One batch through student and teacher, down to the loss sums.

Logits are never computed for the whole sequence: both models stop at their final hidden states,
only the rows that train (response tokens) are kept, and the loss projects those through the
output head chunk by chunk. In a padded instruction batch most positions are prompt or padding,
so this alone removes most of the head's work.

With `loss.hidden` on, the same two forward passes also give the paired intermediate layers: the
teacher's under inference mode, the student's inside `StudentHidden.forward`, where the hidden-state
loss is computed too, so that its projections train, sync and shard with the student.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.data import IGNORE_INDEX
from kdistill.errors import KdistillError
from kdistill.losses import DEFAULT_CHUNK_SIZE, LossSums, distill_loss_sums
from kdistill.losses.hidden import HiddenProjections, hidden_loss_sums, require_live_teacher
from kdistill.teacher.cache import TeacherCache
from kdistill.teacher.signal import DenseHidden, Ensemble, Sparse


@dataclass(frozen=True)
class LossSettings:
    """Plain values the loss needs; built from the config once, by `kdistill.train.loop`."""

    alpha: float
    temperature: float
    divergence: str = "forward_kl"
    divergence_kwargs: dict | None = None
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    vocab_size: int | None = None  # common logit width when the two heads are padded differently
    multi_teacher: str = "sum"  # how several teachers combine: sum | mixture (see losses.ensemble)
    hidden_weight: float = 0.0  # loss.hidden.weight; 0: no hidden-state term and no layers kept
    hidden_distance: str = "mse"  # mse | cosine


@dataclass
class StepSums(LossSums):
    """`LossSums` with the hidden-state term, which `total` already includes (times its weight)."""

    hidden: torch.Tensor | None = None  # detached: sum over teachers of weight x hidden sums over rows
    hidden_parts: torch.Tensor | None = None  # (P,) detached: each teacher's own hidden sum


@dataclass
class HiddenTargets:
    """The teachers' paired layers at the trained rows, for the student's forward to compare with."""

    mask: torch.Tensor  # (B, T-1) bool: the trained rows
    states: list[dict[int, torch.Tensor]]  # per teacher: teacher layer -> its states there, (N, Ht)
    weights: list[float]  # per teacher: its normalised weight
    distance: str


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: nn.Module, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight `(V, H)` and bias, cut to the shared vocabulary."""
    head = _base(model).get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab_size is not None:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    return weight, bias


def softcap(model: nn.Module) -> float | None:
    return getattr(_base(model).config, "final_logit_softcapping", None)


class StudentHidden(nn.Module):
    """Wraps the student so its forward returns final hidden states, not logits.

    Going through one module's forward keeps DDP/FSDP wrappers in charge of gradient sync. For the
    same reason the hidden-state projections (one `HiddenProjections` per teacher, in the teachers'
    order) are a submodule here and are applied inside `forward`: accelerate prepares them with the
    student, DDP averages their gradients and the optimizer steps them with the student's weights.
    """

    def __init__(self, model: nn.Module, projections: Sequence[HiddenProjections] = ()) -> None:
        super().__init__()
        self.model = model
        self.projections = nn.ModuleList(projections)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: HiddenTargets | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Final hidden states `(B, T, H)`; with `hidden`, also the hidden-state sums (see `_hidden_sums`)."""
        decoder = _base(self.model).get_decoder()
        if hidden is None:
            return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        layers = sorted({s for p in self.projections for _, s in p.pairs})
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=layers)
        return out.last_hidden_state, self._hidden_sums(out.hidden_states, hidden)

    def _hidden_sums(
        self, states: Sequence[torch.Tensor | None], hidden: HiddenTargets
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(total, parts)`: the teacher-weighted sum of each teacher's hidden sums, and those `(P,)`."""
        # The mask marks trained rows among the first T - 1 positions; states cover all T: pad with False.
        rows = F.pad(hidden.mask, (0, 1), value=False)
        # The teachers' states are already those rows, (N, Ht), in the same order: take every one.
        every = torch.ones(int(hidden.mask.sum()), dtype=torch.bool, device=rows.device)
        total, parts = torch.zeros((), device=rows.device), []
        for projections, teacher, weight in zip(self.projections, hidden.states, hidden.weights, strict=True):
            sums = hidden_loss_sums(states, teacher, rows, projections, hidden.distance, teacher_mask=every)
            total = total + weight * sums.total
            parts.append(sums.total.detach())
        return total, torch.stack(parts)


def trained_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask `(B, T-1)` of positions whose next token trains, and those targets `(N,)`."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


@torch.inference_mode()
def teacher_hidden(
    teacher: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor, layers: Sequence[int] = ()
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The teacher's final hidden states `(N, H)` at the trained rows and those of `layers`; no autograd.

    `layers` are numbered as `output_hidden_states` numbers them (0 = embeddings). One forward pass
    gives both: the decoder keeps only the listed layers (transformers leaves the others None; a
    version that does not select keeps them all, and the listed ones are still read by index).
    """
    extra = {"output_hidden_states": sorted(set(layers))} if layers else {}
    out = _base(teacher).get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra
    )
    states = {t: out.hidden_states[t][:, :-1][mask] for t in set(layers)}
    return out.last_hidden_state[:, :-1][mask], states


@dataclass
class Teacher:
    """One teacher: exactly one of `model` (run live) and `cache` (read from disk)."""

    name: str
    weight: float  # normalised over the run's teachers
    model: nn.Module | None = None
    cache: TeacherCache | None = None


def teacher_signal(
    teacher: nn.Module,
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    vocab: int | None,
) -> DenseHidden:
    """A live teacher's hidden states at the trained rows, with its head; logits come later, by chunk."""
    return live_teacher(teacher, batch, mask, vocab)[0]


def live_teacher(
    teacher: nn.Module,
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    vocab: int | None,
    layers: Sequence[int] = (),
) -> tuple[DenseHidden, dict[int, torch.Tensor]]:
    """`teacher_signal`, and the states `(N, H)` of the teacher's `layers` from the same forward pass."""
    hidden, states = teacher_hidden(teacher, batch, mask, layers)
    # Cloning outside inference mode turns the rows into ordinary tensors the loss may save for backward.
    weight, bias = output_head(teacher, vocab)
    signal = DenseHidden(hidden=hidden.clone(), head=weight, bias=bias, softcap=softcap(teacher))
    return signal, {t: s.clone() for t, s in states.items()}


def combined_signal(
    teachers: list[Teacher],
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    split: str,
    vocab: int | None,
    mode: str,
) -> DenseHidden | Sparse | Ensemble:
    """The teachers' signal for a batch's trained rows: one teacher's own, or an `Ensemble`."""
    return teacher_outputs(teachers, batch, mask, split, vocab, mode)[0]


def teacher_outputs(
    teachers: list[Teacher],
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    split: str,
    vocab: int | None,
    mode: str,
    layers: Sequence[Sequence[int]] | None = None,
) -> tuple[DenseHidden | Sparse | Ensemble, list[dict[int, torch.Tensor]]]:
    """`combined_signal`, and per teacher the states `(N, H)` of its `layers[i]` (a cached one: none)."""
    signals, states = [], []
    for i, teacher in enumerate(teachers):
        wanted = layers[i] if layers is not None else ()
        if teacher.cache is not None:
            if wanted:  # setup refuses this first; kept so that no caller gets a silent zero loss
                require_live_teacher(True, str(teacher.cache.folder), teacher.name)
            if "row" not in batch:
                raise KdistillError("a cached teacher needs each batch's dataset row indices (batch['row'])")
            signal = teacher.cache.signal(split, batch["row"].cpu())
            signal = _to_device(signal, mask.device)
            if signal.ids.shape[0] != int(mask.sum()):
                raise KdistillError(
                    f"teacher cache {teacher.cache.folder} holds {signal.ids.shape[0]} tokens for this "
                    f"batch, the batch trains {int(mask.sum())}; rebuild it with `kdistill cache`"
                )
            layer_states = {}
        else:
            signal, layer_states = live_teacher(teacher.model, batch, mask, vocab, wanted)
        signals.append(signal)
        states.append(layer_states)
    if len(signals) == 1:
        return signals[0], states
    return Ensemble(tuple(signals), tuple(t.weight for t in teachers), mode), states


def _to_device(signal: Sparse, device: torch.device) -> Sparse:
    if signal.ids.device == device:
        return signal
    tail = None if signal.tail is None else signal.tail.to(device)
    return replace(signal, ids=signal.ids.to(device), logprobs=signal.logprobs.to(device), tail=tail)


def as_teachers(teacher: nn.Module | list[Teacher] | None) -> list[Teacher]:
    """A bare model (or None) as a one-teacher list, so callers with one live teacher stay simple."""
    if teacher is None:
        return []
    return teacher if isinstance(teacher, list) else [Teacher("teacher", 1.0, model=teacher)]


def batch_loss(
    student: nn.Module,
    teacher: nn.Module | list[Teacher] | None,
    batch: dict[str, Any],
    settings: LossSettings,
    signal: DenseHidden | Sparse | Ensemble | None = None,
    split: str = "train",
) -> tuple[LossSums, int]:
    """Loss sums over the batch's trained tokens, and how many tokens that is.

    `signal` is the teachers' output for this batch when the caller already has it (evaluation
    reuses it across passes); otherwise live teachers run and cached ones are read (rows of `split`).
    With `settings.hidden_weight > 0` the result is a `StepSums` whose `total` holds
    `hidden_weight * hidden` too; `student` is then a `StudentHidden` with one projection per teacher.
    """
    mask, targets = trained_rows(batch["labels"])
    wrapper = student.module if hasattr(student, "module") else student
    teachers = as_teachers(teacher)
    use_teacher = bool(teachers) and settings.alpha > 0
    use_hidden = settings.hidden_weight > 0
    if use_hidden and (signal is not None or len(wrapper.projections) != len(teachers)):
        raise ValueError("the hidden-state loss needs one projection per live teacher, and no given signal")
    states: list[dict[int, torch.Tensor]] = []
    if signal is None and (use_teacher or use_hidden):
        layers = [[t for t, _ in p.pairs] for p in wrapper.projections] if use_hidden else None
        vocab, mode = settings.vocab_size, settings.multi_teacher
        signal, states = teacher_outputs(teachers, batch, mask, split, vocab, mode, layers)
        signal = signal if use_teacher else None  # alpha = 0: the teachers ran for their layers only
    if use_hidden:
        targets_h = HiddenTargets(mask, states, [t.weight for t in teachers], settings.hidden_distance)
        final, (hidden, parts) = student(batch["input_ids"], batch["attention_mask"], targets_h)
    else:
        final = student(batch["input_ids"], batch["attention_mask"])
    sums = _logit_sums(final[:, :-1][mask], wrapper.model, targets, signal, use_teacher, settings)
    if not use_hidden:
        return sums, int(targets.numel())
    total = sums.total + settings.hidden_weight * hidden
    return StepSums(total, sums.kd, sums.ce, sums.kd_parts, hidden.detach(), parts), int(targets.numel())


def _logit_sums(
    rows: torch.Tensor,
    inner: nn.Module,
    targets: torch.Tensor,
    signal: DenseHidden | Sparse | Ensemble | None,
    use_teacher: bool,
    settings: LossSettings,
) -> LossSums:
    """KD and CE sums from the student's final hidden states at the trained rows `(N, H)`."""
    weight, bias = output_head(inner, settings.vocab_size)
    return distill_loss_sums(
        rows,
        weight,
        targets,
        signal,
        kd_weight=settings.alpha * settings.temperature**2 if use_teacher else 0.0,
        ce_weight=1.0 - settings.alpha if use_teacher else 1.0,
        temperature=settings.temperature,
        divergence=settings.divergence,
        divergence_kwargs=settings.divergence_kwargs,
        chunk_size=settings.chunk_size,
        student_bias=bias,
        student_softcap=softcap(inner),
    )
