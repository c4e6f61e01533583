"""The loss registry: its entries, its checks, the docs' table, and adding a divergence in one entry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kdistill.errors import KdistillError
from kdistill.losses import LOSSES, Dense, Loss, Param, check_loss, distill_loss_sums
from kdistill.losses.divergences import aligned_log_probs
from kdistill.losses.registry import divergence_choices, shared_params, suggest

ROOT = Path(__file__).resolve().parents[2]


def test_the_sampled_loss_reads_labels_and_is_no_user_choice() -> None:
    assert [n for n, loss in LOSSES.items() if loss.needs_labels] == ["sampled_reverse_kl"]
    assert "sampled_reverse_kl" not in divergence_choices()
    assert divergence_choices() == ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def test_parameters_are_shared_by_name() -> None:
    params = shared_params()
    assert set(params) == {"beta", "skew"}
    assert LOSSES["skew_kl"].params["skew"] is LOSSES["skew_reverse_kl"].params["skew"]


@pytest.mark.parametrize(
    ("param", "inside", "outside", "interval"),
    [
        (Param(0.5, 0.0, 1.0, "h"), [0.0, 0.5, 1.0], [-0.01, 1.01], "[0, 1]"),
        (Param(0.1, 0.0, 1.0, "h", high_open=True), [0.0, 0.99], [1.0, -1e-9], "[0, 1)"),
        (Param(1.0, 0.0, 2.0, "h", low_open=True), [1e-9, 2.0], [0.0, 2.5], "(0, 2]"),
    ],
)
def test_param_ranges_and_their_ends(param: Param, inside: list, outside: list, interval: str) -> None:
    assert param.interval() == interval
    assert all(param.refusal(v) is None for v in inside)
    assert all(param.refusal(v) == f"must be in {interval}" for v in outside)


def test_check_loss_fills_defaults_and_refuses_mistakes() -> None:
    loss, params = check_loss("jsd")
    assert loss is LOSSES["jsd"] and params == {"beta": 0.5}
    assert check_loss("skew_kl", {"skew": 0.3})[1] == {"skew": 0.3}
    with pytest.raises(KdistillError, match=r"'skew_kl': skew must be in \[0, 1\), got 1"):
        check_loss("skew_kl", {"skew": 1})
    with pytest.raises(KdistillError, match="unknown divergence 'kl'; did you mean 'forward_kl'"):
        check_loss("kl")
    with pytest.raises(KdistillError, match="'tvd' takes no parameter 'beta'; it takes none"):
        check_loss("tvd", {"beta": 0.5})


def test_suggestions_by_alias_and_by_spelling() -> None:
    assert suggest("kl") == "forward_kl" and suggest("RKL") == "reverse_kl"
    assert suggest("skew_revers_kl") == "skew_reverse_kl"
    assert suggest("wasserstein") is None


def test_docs_table_lists_every_user_choice_with_its_parameters() -> None:
    text = (ROOT / "docs" / "loss.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \|(.*)$", text, flags=re.M))
    assert list(rows) == list(divergence_choices())
    for name, row in rows.items():
        shown = re.findall(r"`loss\.(\w+)`", row.split("|")[-2])
        assert shown == list(LOSSES[name].params), name
        for key, param in LOSSES[name].params.items():
            assert f"`loss.{key}` in {param.interval()}, default {param.default:g}" in row, name


def test_a_new_divergence_is_one_function_and_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worked example of docs/loss.md: squared Hellinger distance with a scale parameter.
    def hellinger(student_logits, teacher, *, temperature=1.0, scale):
        student, target = aligned_log_probs(student_logits, teacher, temperature)
        return scale * 0.5 * ((target / 2).exp() - (student / 2).exp()).pow(2).sum()

    scale = Param(1.0, 0.0, 10.0, "Factor in front of the distance.", low_open=True)
    entry = Loss(hellinger, "squared Hellinger distance", {"scale": scale})
    monkeypatch.setitem(LOSSES, "hellinger", entry)
    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(6, 4, generator=g), torch.randn(11, 4, generator=g)
    teacher, labels = torch.randn(6, 11, generator=g), torch.randint(0, 11, (6,), generator=g)
    kw = dict(kd_weight=1.0, ce_weight=0.0, divergence="hellinger", chunk_size=4)
    out = distill_loss_sums(hidden, head, labels, Dense(teacher), divergence_kwargs={"scale": 2.0}, **kw)
    p, q = torch.softmax(teacher, -1), torch.softmax(hidden @ head.T, -1)
    torch.testing.assert_close(out.total, (p.sqrt() - q.sqrt()).pow(2).sum(), rtol=1e-5, atol=1e-6)
    with pytest.raises(KdistillError, match=r"scale must be in \(0, 10\], got 0"):
        distill_loss_sums(hidden, head, labels, Dense(teacher), divergence_kwargs={"scale": 0}, **kw)
