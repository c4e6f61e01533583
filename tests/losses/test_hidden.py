"""Hidden-state distillation: layer pairing, the loss against a naive reference, and saved projections."""

from __future__ import annotations

import pytest
import torch

from kdistill.errors import KdistillError
from kdistill.losses.hidden import (
    PROJECTIONS_FILE,
    HiddenProjections,
    auto_layer_pairs,
    hidden_loss_sums,
    load_projections,
    require_live_teacher,
    resolve_layer_pairs,
    save_projections,
)

B, T, HS, HT = 2, 5, 6, 8
PAIRS = [(1, 1), (3, 2), (4, 2)]


@pytest.mark.parametrize(
    "teacher, student, pairs",
    [
        (12, 4, [(3, 1), (6, 2), (9, 3), (12, 4)]),
        (30, 10, [(3 * s, s) for s in range(1, 11)]),
        (5, 2, [(3, 1), (5, 2)]),  # 2.5 rounds up
        (7, 3, [(2, 1), (5, 2), (7, 3)]),  # 2.33 -> 2, 4.67 -> 5
        (2, 4, [(1, 1), (1, 2), (2, 3), (2, 4)]),  # a deeper student shares teacher layers
        (4, 4, [(1, 1), (2, 2), (3, 3), (4, 4)]),
        (24, 1, [(24, 1)]),
    ],
)
def test_auto_pairs_spread_evenly_and_end_together(teacher, student, pairs):
    assert auto_layer_pairs(teacher, student) == pairs
    assert resolve_layer_pairs("auto", teacher, student) == pairs


def test_explicit_pairs_are_checked():
    assert resolve_layer_pairs([[0, 0], [12, 4]], 12, 4) == [(0, 0), (12, 4)]
    with pytest.raises(
        KdistillError, match=r"loss.hidden.layers: pair \[13, 4\] is out of range: teacher layers are 0..12"
    ):
        resolve_layer_pairs([[13, 4]], 12, 4)
    with pytest.raises(KdistillError, match="expected 'auto' or a list"):
        resolve_layer_pairs("even", 12, 4)
    with pytest.raises(KdistillError, match=r"integer pairs, got \[1, 2, 3\]"):
        resolve_layer_pairs([[1, 2, 3]], 12, 4)
    with pytest.raises(KdistillError, match="empty"):
        resolve_layer_pairs([], 12, 4)


def make_states(seed: int = 0, student_size: int = HS, teacher_size: int = HT):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(B, T, student_size, generator=g, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(B, T, teacher_size, generator=g) for _ in range(5)]
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    return student, teacher, mask


def reference(student, teacher, mask, weights, distance):
    """Mean over pairs of the per-row distance summed over masked rows, one row at a time in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for index, (t, s) in enumerate(PAIRS):
        for b, i in mask.nonzero().tolist():
            x = student[s][b, i].double()
            x = weights[index].double() @ x if weights else x
            y = teacher[t][b, i].double()
            if distance == "mse":
                total = total + ((x - y) ** 2).sum() / len(y)
            else:
                total = total + 1 - (x @ y) / (x.norm() * y.norm())
    return total / len(PAIRS)


@pytest.mark.parametrize("distance", ["mse", "cosine"])
@pytest.mark.parametrize("student_size", [HS, HT])
def test_matches_reference_with_gradients(distance, student_size):
    student, teacher, mask = make_states(student_size=student_size)
    proj = HiddenProjections(PAIRS, student_size, HT)
    weights = [m.weight for m in proj.maps]
    assert len(weights) == (len(PAIRS) if student_size != HT else 0)  # equal sizes: no parameters at all
    out = hidden_loss_sums(student, teacher, mask, proj, distance)
    want = reference(student, teacher, mask, weights, distance)
    assert out.count == 5
    torch.testing.assert_close(out.total.double(), want, rtol=1e-5, atol=1e-6)
    inputs = [student[1], student[2], *weights]
    for got, exp in zip(
        torch.autograd.grad(out.total, inputs), torch.autograd.grad(want, inputs), strict=True
    ):
        torch.testing.assert_close(got.double(), exp.double(), rtol=1e-5, atol=1e-6)


def test_only_trained_rows_count():
    student, teacher, mask = make_states()
    proj = HiddenProjections(PAIRS, HS, HT)
    before = hidden_loss_sums(student, teacher, mask, proj).total
    changed = [s.detach().clone().masked_fill(~mask[..., None], 1e3) for s in student]
    torch.testing.assert_close(hidden_loss_sums(changed, teacher, mask, proj).total, before)
    empty = hidden_loss_sums(student, teacher, torch.zeros_like(mask), proj)
    assert empty.count == 0 and empty.total.item() == 0.0
    with pytest.raises(KdistillError, match="loss.hidden.distance: expected one of mse, cosine, got 'l1'"):
        hidden_loss_sums(student, teacher, mask, proj, "l1")


def test_projection_learns_to_match():
    # A teacher space that is a fixed linear image of the student's: the loss falls under training.
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(B, T, HS, generator=g) for _ in range(3)]
    true_map = torch.randn(HT, HS, generator=g)
    teacher = [s @ true_map.T for s in student] + [torch.zeros(B, T, HT)] * 2
    proj = HiddenProjections([(1, 1)], HS, HT)
    mask = torch.ones(B, T, dtype=torch.bool)
    optimizer = torch.optim.Adam(proj.parameters(), lr=0.05)
    losses = []
    for _ in range(100):
        loss = hidden_loss_sums(student, teacher, mask, proj).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_save_and_reload(tmp_path):
    student, teacher, mask = make_states()
    proj = HiddenProjections(PAIRS, HS, HT)
    path = save_projections(proj, tmp_path / "student")
    assert path == tmp_path / "student" / PROJECTIONS_FILE and not list(path.parent.glob("*.tmp"))
    again = load_projections(tmp_path / "student")
    assert again.pairs == PAIRS and (again.student_size, again.teacher_size) == (HS, HT)
    for a, b in zip(proj.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(
        hidden_loss_sums(student, teacher, mask, again).total,
        hidden_loss_sums(student, teacher, mask, proj).total,
    )
    # Equal sizes save a file with no tensors that still knows its pairs.
    save_projections(HiddenProjections([(2, 1)], HT, HT), tmp_path / "same")
    assert load_projections(tmp_path / "same").pairs == [(2, 1)]
    with pytest.raises(KdistillError, match="no hidden-state projections at"):
        load_projections(tmp_path / "nowhere")


def test_a_cached_teacher_is_refused_clearly():
    require_live_teacher(False, "HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(
        KdistillError, match="loss.hidden needs a live teacher, but the teacher is the cache 'runs/cache'"
    ):
        require_live_teacher(True, "runs/cache")


def test_teacher_rows_can_differ_from_student_rows():
    # A teacher with another tokenizer: its aligned rows sit at other positions, in the same order.
    student, teacher, mask = make_states()
    proj = HiddenProjections(PAIRS, HS, HT)
    # One extra teacher token in front (say a BOS the student lacks): teacher row i + 1 is student row i.
    shifted = [torch.cat([torch.randn(B, 1, HT), t], dim=1) for t in teacher]
    teacher_mask = torch.cat([torch.zeros(B, 1, dtype=torch.bool), mask], dim=1)
    got = hidden_loss_sums(student, shifted, mask, proj, "cosine", teacher_mask=teacher_mask)
    torch.testing.assert_close(got.total, hidden_loss_sums(student, teacher, mask, proj, "cosine").total)
    with pytest.raises(ValueError, match="teacher_mask selects 4 rows but mask 5"):
        hidden_loss_sums(student, teacher, mask, proj, teacher_mask=mask & (torch.arange(T) > 0))
