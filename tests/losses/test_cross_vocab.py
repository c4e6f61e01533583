"""Divergences across vocabularies (mapped KL family, ULD, mapped mass share) against float64 references.

The references work row by row on probabilities in float64 with a plain dict for the mapping; the
library works on log-probabilities in float32. Loss and gradient agreement checks both.
"""

from __future__ import annotations

import pytest
import torch

from kdistill.losses import DenseHidden, Sparse
from kdistill.losses.cross_vocab import aligned_kd_sum, mapped_divergence, uld_distance
from kdistill.losses.divergences import forward_kl
from kdistill.losses.vocab_map import VocabMap, mapped_mass_share

VT, VS, N = 13, 11, 6
# Teacher 0 and 2 both decode to student 4; teacher 4, 7, 10, 11 and student 5, 6, 8 have no counterpart.
MAPPING = VocabMap(
    torch.tensor([0, 1, 2, 3, 5, 6, 8, 9, 12]), torch.tensor([4, 0, 4, 7, 1, 2, 9, 3, 10]), VT, VS
)


def _logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(N, VT, generator=g) * 2
    teacher[:3, [0, 2]] += 4.0  # the two teacher tokens sharing a student token are both in the top k
    return torch.randn(N, VS, generator=g, requires_grad=True), teacher


def _reference_teacher(teacher: torch.Tensor, k: int | None, temperature: float) -> list[dict[int, float]]:
    """Per row: teacher probability of each of its ids (top k, tempered as ``Sparse`` does) and of "tail"."""
    rows = []
    for z in teacher.double():
        if k is None:
            rows.append(dict(enumerate(torch.softmax(z / temperature, -1).tolist())))
            continue
        top, ids = torch.softmax(z, -1).topk(k)
        weights = torch.cat(
            [
                top ** (1 / temperature),
                (1 - top.sum()).clamp(min=0)[None] * top.min() ** (1 / temperature - 1),
            ]
        )
        weights = weights / weights.sum()
        rows.append({**dict(zip(ids.tolist(), weights[:k])), "tail": weights[k]})
    return rows


def reference_mapped(student, teacher, name, k=None, temperature=1.0, beta=0.5):
    """Forward/reverse KL or JSD between the projected teacher and the student, row by row in float64."""
    pairs = dict(zip(MAPPING.teacher_ids.tolist(), MAPPING.student_ids.tolist()))
    total = torch.zeros((), dtype=torch.float64)
    for ps, row in zip(
        torch.softmax(student.double() / temperature, -1), _reference_teacher(teacher, k, temperature)
    ):
        pt: dict = {"other": 0.0}
        for t, p in row.items():
            key = pairs.get(t, "other")
            pt[key] = pt.get(key, 0.0) + p
        outcomes = sorted(set(pairs.values())) if k is None else sorted(set(pt) - {"other"})
        p = torch.stack(
            [torch.as_tensor(pt.get(s, 0.0), dtype=torch.float64) for s in outcomes]
            + [torch.as_tensor(pt["other"], dtype=torch.float64)]
        )
        q = torch.cat([ps[outcomes], ps[[s for s in range(VS) if s not in outcomes]].sum()[None]])
        kl = lambda a, b: (a * (a / b).log()).where(a > 0, 0.0).sum()  # noqa: E731
        m = beta * p + (1 - beta) * q
        total = (
            total
            + {
                "forward_kl": kl(p, q),
                "reverse_kl": kl(q, p),
                "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m),
            }[name]
        )
    return total


@pytest.mark.parametrize("k", [None, 5, 9])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_mapped_divergence_matches_reference(name, k):
    student, teacher_logits = _logits()
    teacher = teacher_logits if k is None else Sparse.from_logits(teacher_logits, k)
    params = {"beta": 0.3} if name == "jsd" else {}
    got = mapped_divergence(student, teacher, MAPPING, divergence=name, temperature=1.5, **params)
    want = reference_mapped(student, teacher_logits, name, k=k, temperature=1.5, **params)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    g_got, g_want = (torch.autograd.grad(x, student)[0] for x in (got, want))
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-4, atol=1e-5)


def test_mapped_dense_equals_sparse_at_full_k_and_identity_map_is_plain_kl():
    student, teacher = _logits(1)
    dense = mapped_divergence(student, teacher, MAPPING, temperature=2.0)
    sparse = mapped_divergence(student, Sparse.from_logits(teacher, VT), MAPPING, temperature=2.0)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    identity = VocabMap(torch.arange(VS), torch.arange(VS), VS, VS)
    same = teacher[:, :VS]
    plain = forward_kl(student, same, temperature=2.0)
    torch.testing.assert_close(mapped_divergence(student, same, identity, temperature=2.0), plain)
    torch.testing.assert_close(
        mapped_divergence(student, Sparse.from_logits(same, VS), identity, temperature=2.0), plain
    )
    assert mapped_divergence(same, same, identity).abs() < 1e-5


def reference_uld(student, teacher, temperature):
    ps = torch.softmax(student.double() / temperature, -1).sort(-1, descending=True).values
    pt = torch.softmax(teacher.double() / temperature, -1).sort(-1, descending=True).values
    width = max(ps.shape[-1], pt.shape[-1])
    pad = lambda p: torch.nn.functional.pad(p, (0, width - p.shape[-1]))  # noqa: E731
    return (pad(ps) - pad(pt)).abs().sum()


@pytest.mark.parametrize("teacher_vocab", [VT, VS, 7])
def test_uld_matches_padded_reference(teacher_vocab):
    student, teacher = _logits(2)
    teacher = teacher[:, :teacher_vocab]
    got = uld_distance(student, teacher, temperature=2.0)
    want = reference_uld(student, teacher, 2.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    g_got, g_want = (torch.autograd.grad(x, student)[0] for x in (got, want))
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-5, atol=1e-6)
    full = uld_distance(
        student, Sparse.from_logits(teacher, teacher_vocab), temperature=2.0, teacher_vocab_size=teacher_vocab
    )
    torch.testing.assert_close(full, got, rtol=1e-5, atol=1e-6)
    # Top-k lumps the ranks below k into one bucket per side, so it can only lose distance.
    assert (
        uld_distance(student, Sparse.from_logits(teacher, 3), teacher_vocab_size=teacher_vocab)
        <= uld_distance(student, teacher) + 1e-6
    )
    assert uld_distance(teacher, teacher.roll(1, dims=-1)) < 1e-5  # permuted vocabularies: no distance


def test_mapped_mass_share_on_tiny_inputs():
    # Row 0: ids 0 (p .5, mapped), 4 (p .3, unmapped), 1 (p .1, mapped); row 1: ids 7, 10 unmapped, 3 mapped.
    ids = torch.tensor([[0, 4, 1], [7, 10, 3]])
    probs = torch.tensor([[0.5, 0.3, 0.1], [0.4, 0.4, 0.2]])
    share = mapped_mass_share(Sparse(ids, probs.log()), MAPPING)
    torch.testing.assert_close(share, torch.tensor([0.6 / 0.9, 0.2]))
    logits = torch.randn(2, VT)
    mapped = torch.zeros(VT, dtype=torch.bool)
    mapped[MAPPING.teacher_ids] = True
    torch.testing.assert_close(
        mapped_mass_share(logits, MAPPING), torch.softmax(logits, -1)[:, mapped].sum(-1)
    )


def test_aligned_kd_passes_the_divergences_parameters() -> None:
    # loss.beta and loss.skew reach a teacher of another tokenizer as they reach the others.
    g = torch.Generator().manual_seed(3)
    rows, head = torch.randn(N, 5, generator=g), torch.randn(VS, 5, generator=g)
    t_rows, t_head = torch.randn(N, 7, generator=g), torch.randn(VT, 7, generator=g)
    teacher, one = DenseHidden(t_rows, t_head), torch.ones(N, dtype=torch.bool)
    kw = dict(temperature=2.0, divergence="jsd")
    got = aligned_kd_sum(rows, head, teacher, one, MAPPING, divergence_kwargs={"beta": 0.3}, **kw)
    want = mapped_divergence(rows @ head.T, t_rows @ t_head.T, MAPPING, beta=0.3, **kw)
    torch.testing.assert_close(got, want)
    default = aligned_kd_sum(rows, head, teacher, one, MAPPING, **kw)
    assert not torch.isclose(default, got)
