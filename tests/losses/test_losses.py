"""Every divergence, dense and sparse, chunked and not, against a plain PyTorch reference.

The reference works on probabilities in float64 with textbook formulas; the library works on
log-probabilities in float32. Agreement of the loss and its gradients (hidden, head, bias) checks both
the formulas and the chunked autograd Function.
"""

import pytest
import torch
import torch.nn.functional as F

from kdistill.errors import KdistillError
from kdistill.losses import LOSSES, Dense, DenseHidden, Sparse, chunked, distill_loss_sums
from kdistill.losses.registry import divergence_choices

N, H, V, K = 29, 16, 97, 7
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"skew": 0.2}, "skew_reverse_kl": {"skew": 0.2}}
DIVERGENCES = {name: LOSSES[name].fn for name in divergence_choices()}  # the user-facing formulas


def kl(p, q):
    return (p * (p.log() - q.log())).where(p > 0, torch.zeros_like(p)).sum()


def reference_divergence(name, ps, pt, **params):
    """Divergence between student probs ``ps`` and teacher probs ``pt`` (same outcomes), summed."""
    if name == "forward_kl" or (name == "jsd" and params["beta"] == 0):
        return kl(pt, ps)
    if name == "reverse_kl" or (name == "jsd" and params["beta"] == 1):
        return kl(ps, pt)
    if name == "jsd":
        b = params["beta"]
        m = b * pt + (1 - b) * ps
        return b * kl(pt, m) + (1 - b) * kl(ps, m)
    if name == "skew_kl":
        return kl(pt, params["skew"] * pt + (1 - params["skew"]) * ps)
    if name == "skew_reverse_kl":
        return kl(ps, params["skew"] * ps + (1 - params["skew"]) * pt)
    if name == "tvd":
        return 0.5 * (pt - ps).abs().sum()
    raise AssertionError(name)


def reference_sparse_probs(student_logits, teacher_logits, k, temperature):
    """Student and teacher probs over the teacher's top-k ids plus one tail bucket, ``(N, k + 1)``."""
    ps_full = torch.softmax(student_logits / temperature, dim=-1)
    top_p, ids = torch.softmax(teacher_logits, dim=-1).topk(k, dim=-1)
    ps_kept = ps_full.gather(-1, ids)
    ps = torch.cat([ps_kept, 1 - ps_kept.sum(-1, keepdim=True)], dim=-1)
    # Documented approximation: the tail's tokens all sit at the smallest kept probability.
    tail = (1 - top_p.sum(-1, keepdim=True)).clamp(min=0)
    tail_w = tail * top_p.min(-1, keepdim=True).values ** (1 / temperature - 1)
    w = torch.cat([top_p ** (1 / temperature), tail_w], dim=-1)
    return ps, w / w.sum(-1, keepdim=True)


def reference_loss(
    hidden,
    head,
    bias,
    labels,
    teacher_logits,
    name,
    *,
    kd_weight,
    ce_weight,
    temperature=1.0,
    softcap=None,
    k=None,
    params=None,
):
    """kd_weight * divergence + ce_weight * CE, computed naively in float64 from the input-dtype logits."""
    z = F.linear(hidden, head, bias).double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ce = F.cross_entropy(z, labels, reduction="sum")
    if teacher_logits is None:
        return ce_weight * ce
    t = teacher_logits.double()
    if k is None:
        ps, pt = torch.softmax(z / temperature, -1), torch.softmax(t / temperature, -1)
    else:
        ps, pt = reference_sparse_probs(z, t, k, temperature)
    return kd_weight * reference_divergence(name, ps, pt, **(params or {})) + ce_weight * ce


def make_inputs(dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    head = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    t_hidden = torch.randn(N, H, generator=g).to(dtype)
    t_head = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    return hidden, head, b, labels, t_hidden, t_head


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def check_against_reference(name, signal, chunk_size, dtype, temperature, softcap, rtol, atol):
    hidden, head, bias, labels, t_hidden, t_head = make_inputs(dtype)
    t_logits = F.linear(t_hidden, t_head).float()  # rounded like a bf16 teacher head would round it
    teacher = {
        "dense": Dense(t_logits),
        "hidden": DenseHidden(t_hidden, t_head),
        "sparse": Sparse.from_logits(t_logits, K),
    }[signal]
    kw = dict(kd_weight=1.7, ce_weight=0.4, temperature=temperature)
    out = distill_loss_sums(
        hidden,
        head,
        labels,
        teacher,
        divergence=name,
        divergence_kwargs=PARAMS.get(name),
        chunk_size=chunk_size,
        student_bias=bias,
        student_softcap=softcap,
        **kw,
    )
    ref = reference_loss(
        hidden,
        head,
        bias,
        labels,
        t_logits,
        name,
        softcap=softcap,
        params=PARAMS.get(name),
        k=K if signal == "sparse" else None,
        **kw,
    )
    assert out.total.dtype == torch.float32 and not out.kd.requires_grad and not out.ce.requires_grad
    torch.testing.assert_close(out.total.double(), ref, rtol=rtol, atol=atol)
    got, want = grads(out.total, (hidden, head, bias)), grads(ref, (hidden, head, bias))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk_size", [None, 5, 1000])
@pytest.mark.parametrize("signal", ["dense", "hidden", "sparse"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_matches_reference_fp32(name, signal, chunk_size):
    check_against_reference(name, signal, chunk_size, torch.float32, 2.0, None, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [None, 8])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_matches_reference_bf16(name, chunk_size):
    check_against_reference(name, "hidden", chunk_size, torch.bfloat16, 1.5, None, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_softcap_and_temperature_below_one(name):
    check_against_reference(name, "sparse", 6, torch.float32, 0.7, 3.0, rtol=1e-4, atol=1e-4)


def test_plain_cross_entropy_without_teacher():
    hidden, head, _, labels, _, _ = make_inputs()
    out = distill_loss_sums(hidden, head, labels, None, kd_weight=0.0, ce_weight=1.0)
    ref = F.cross_entropy(hidden @ head.T, labels, reduction="sum")
    torch.testing.assert_close(out.total, ref)
    torch.testing.assert_close(out.ce, ref.detach())
    assert out.kd.item() == 0.0
    for g, w in zip(grads(out.total, (hidden, head)), grads(ref, (hidden, head)), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("chunk_size", [1, 4, N - 1, N, N + 5])
@pytest.mark.parametrize("name", ["forward_kl", "tvd"])
def test_chunked_equals_unchunked(name, chunk_size):
    hidden, head, bias, labels, t_hidden, t_head = make_inputs()
    teacher = DenseHidden(t_hidden, t_head, softcap=4.0)
    kw = dict(kd_weight=2.0, ce_weight=0.5, temperature=1.3, divergence=name, student_bias=bias)
    ref = distill_loss_sums(hidden, head, labels, teacher, chunk_size=None, **kw)
    out = distill_loss_sums(hidden, head, labels, teacher, chunk_size=chunk_size, **kw)
    for a, b in [(out.total, ref.total), (out.kd, ref.kd), (out.ce, ref.ce)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        grads(out.total, (hidden, head, bias)), grads(ref.total, (hidden, head, bias)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("signal", ["dense", "hidden", "sparse"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_blocks_inside_a_chunk(name, signal, monkeypatch):
    # Real vocabularies split each chunk into blocks of rows on CPU; force 3-row blocks here.
    monkeypatch.setattr(chunked, "_CPU_BLOCK_BYTES", 4 * V * 3)
    check_against_reference(name, signal, 10, torch.float32, 2.0, 5.0, rtol=1e-4, atol=1e-4)
    if signal == "hidden":
        check_against_reference(name, signal, 10, torch.bfloat16, 2.0, 5.0, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("signal", ["dense", "hidden"])
def test_chunks_are_capped_on_cpu(signal, monkeypatch):
    # On CPU no chunk's logits exceed _CPU_CHUNK_BYTES, whatever chunk_size says: 4-row chunks here.
    monkeypatch.setattr(chunked, "_CPU_CHUNK_BYTES", 4 * V * 4)
    calls = []
    real = chunked._block_rows  # called once per chunk, with the chunk's logits
    monkeypatch.setattr(chunked, "_block_rows", lambda logits: calls.append(len(logits)) or real(logits))
    check_against_reference("forward_kl", signal, 512, torch.float32, 2.0, None, rtol=1e-5, atol=1e-5)
    assert max(calls) == 4 and len(calls) > 1


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_dense_equals_sparse_at_full_k(name, temperature):
    hidden, head, _, labels, t_hidden, t_head = make_inputs()
    t_logits = t_hidden @ t_head.T
    kw = dict(
        kd_weight=1.0,
        ce_weight=0.0,
        temperature=temperature,
        divergence=name,
        divergence_kwargs=PARAMS.get(name),
        chunk_size=10,
    )
    dense = distill_loss_sums(hidden, head, labels, Dense(t_logits), **kw)
    sparse = distill_loss_sums(hidden, head, labels, Sparse.from_logits(t_logits, V), **kw)
    torch.testing.assert_close(sparse.total, dense.total, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(sparse.total, (hidden, head)), grads(dense.total, (hidden, head)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_identical_distributions_give_zero(name):
    logits = torch.randn(N, V)
    fn, params = DIVERGENCES[name], PARAMS.get(name, {})
    assert fn(logits, logits.clone(), temperature=2.0, **params).abs().item() < 1e-5
    # Sparse at T = 1 is exact, so bucketing the same distribution on both sides also gives 0.
    assert fn(logits, Sparse.from_logits(logits, K), **params).abs().item() < 1e-5


def test_divergences_are_positive_for_different_distributions():
    s, t = torch.randn(N, V), torch.randn(N, V)
    for name, fn in DIVERGENCES.items():
        assert fn(s, t, **PARAMS.get(name, {})).item() > 0.1, name
        assert fn(s, Sparse.from_logits(t, K), **PARAMS.get(name, {})).item() > 0.1, name


def test_jsd_endpoints_and_zero_skew_are_the_plain_kls():
    s, t = torch.randn(N, V), torch.randn(N, V)
    for teacher in (t, Sparse.from_logits(t, K)):
        fwd = DIVERGENCES["forward_kl"](s, teacher, temperature=1.5)
        rev = DIVERGENCES["reverse_kl"](s, teacher, temperature=1.5)
        torch.testing.assert_close(DIVERGENCES["jsd"](s, teacher, temperature=1.5, beta=0.0), fwd)
        torch.testing.assert_close(DIVERGENCES["jsd"](s, teacher, temperature=1.5, beta=1.0), rev)
        torch.testing.assert_close(DIVERGENCES["skew_kl"](s, teacher, temperature=1.5, skew=0.0), fwd)
        torch.testing.assert_close(DIVERGENCES["skew_reverse_kl"](s, teacher, temperature=1.5, skew=0.0), rev)


def test_temperature_divides_both_sides():
    s, t = torch.randn(N, V), torch.randn(N, V)
    for name, fn in DIVERGENCES.items():
        params = PARAMS.get(name, {})
        torch.testing.assert_close(fn(s, t, temperature=2.5, **params), fn(s / 2.5, t / 2.5, **params))


def test_sparse_tail_is_exact_at_unit_temperature():
    t = torch.randn(N, V)
    sparse = Sparse.from_logits(t, K)
    probs = sparse.bucket_log_probs(V).exp()
    full = torch.softmax(t, -1)
    torch.testing.assert_close(probs[:, :K], full.gather(-1, sparse.ids))
    torch.testing.assert_close(probs[:, K], 1 - full.gather(-1, sparse.ids).sum(-1))


def test_bad_parameters_speak_to_the_user():
    hidden, head, _, labels, _, _ = make_inputs(bias=False)
    with pytest.raises(KdistillError, match="unknown divergence 'kl'"):
        distill_loss_sums(
            hidden, head, labels, Dense(torch.randn(N, V)), kd_weight=1, ce_weight=0, divergence="kl"
        )
    with pytest.raises(KdistillError, match="takes no parameter 'alpha'"):
        distill_loss_sums(
            hidden,
            head,
            labels,
            Dense(torch.randn(N, V)),
            kd_weight=1,
            ce_weight=0,
            divergence_kwargs={"alpha": 1},
        )
    with pytest.raises(KdistillError, match=r"'jsd': beta must be in \[0, 1\], got 1.5"):
        distill_loss_sums(
            hidden,
            head,
            labels,
            Dense(torch.randn(N, V)),
            kd_weight=1,
            ce_weight=0,
            divergence="jsd",
            divergence_kwargs={"beta": 1.5},
        )
    with pytest.raises(ValueError, match="no teacher"):
        distill_loss_sums(hidden, head, labels, None, kd_weight=1.0, ce_weight=1.0)
