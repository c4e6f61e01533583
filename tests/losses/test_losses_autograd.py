"""How the chunked loss meets autograd: tied, frozen and non-leaf heads, LoRA students, no-grad mode.

Each case is compared with the naive path (``chunk_size=None``), which is plain autograd and is itself
checked against a textbook reference in test_losses.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.losses import Dense, DenseHidden, Sparse, distill_loss_sums

N, H, V = 24, 16, 64
KW = dict(kd_weight=1.5, ce_weight=0.5, temperature=2.0)


def loss_and_grads(params, build, chunk_size, **kwargs):
    """Run ``build()`` to get (hidden, head), take the loss, return it with the grads of ``params``."""
    for p in params:
        p.grad = None
    hidden, head, labels, teacher = build()
    out = distill_loss_sums(hidden, head, labels, teacher, chunk_size=chunk_size, **KW, **kwargs)
    out.total.backward()
    return out.total.detach(), [None if p.grad is None else p.grad.clone() for p in params]


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)


def test_tied_embedding_gets_gradient_from_both_paths():
    torch.manual_seed(0)
    emb, mix = nn.Embedding(V, H), nn.Linear(H, H)
    ids, labels, teacher = torch.randint(0, V, (N,)), torch.randint(0, V, (N,)), Dense(torch.randn(N, V))

    def build():
        # The embedding weight is used twice: to embed the inputs and as the output head.
        return torch.tanh(mix(emb(ids))), emb.weight, labels, teacher

    params = [emb.weight, *mix.parameters()]
    naive = loss_and_grads(params, build, None)
    assert_same(loss_and_grads(params, build, 5), naive)
    # The head path alone would leave rows of unused input ids with the head gradient only;
    # check that the embedding path really added to the rows that were looked up.
    head_only = loss_and_grads(
        [emb.weight], lambda: (torch.tanh(mix(emb(ids))).detach(), emb.weight, labels, teacher), 5
    )[1][0]
    assert not torch.allclose(naive[1][0][ids], head_only[ids])


def test_frozen_head_and_hidden_only_grads():
    torch.manual_seed(1)
    hidden = torch.randn(N, H, requires_grad=True)
    head = torch.randn(V, H)  # frozen, as under LoRA
    teacher = DenseHidden(torch.randn(N, H), torch.randn(V, H))
    labels = torch.randint(0, V, (N,))
    params = [hidden]
    assert_same(
        loss_and_grads(params, lambda: (hidden, head, labels, teacher), 7),
        loss_and_grads(params, lambda: (hidden, head, labels, teacher), None),
    )


def test_head_only_grads_and_non_leaf_head():
    torch.manual_seed(2)
    hidden, weight = torch.randn(N, H), torch.randn(V, H, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    labels, teacher = torch.randint(0, V, (N,)), Sparse.from_logits(torch.randn(N, V), 5)

    def build():
        return hidden, weight * 0.5, labels, teacher  # a non-leaf head; hidden needs no grad

    params = [weight, bias]
    assert_same(
        loss_and_grads(params, build, 9, student_bias=bias, divergence="jsd"),
        loss_and_grads(params, build, None, student_bias=bias, divergence="jsd"),
    )


def test_upstream_gradient_scales_the_result():
    torch.manual_seed(3)
    hidden, head = torch.randn(N, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    labels, teacher = torch.randint(0, V, (N,)), Dense(torch.randn(N, V))
    grads = []
    for chunk_size in (None, 10):
        out = distill_loss_sums(hidden, head, labels, teacher, chunk_size=chunk_size, **KW)
        grads.append(torch.autograd.grad(out.total * 3.0 / N, (hidden, head)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_grad_mode_and_empty_rows():
    torch.manual_seed(4)
    hidden, head = torch.randn(N, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    labels, teacher = torch.randint(0, V, (N,)), Dense(torch.randn(N, V))
    ref = distill_loss_sums(hidden, head, labels, teacher, chunk_size=None, **KW)
    with torch.no_grad():
        out = distill_loss_sums(hidden, head, labels, teacher, chunk_size=4, **KW)
    assert not out.total.requires_grad
    torch.testing.assert_close(out.total, ref.total.detach())
    torch.testing.assert_close(out.kd, ref.kd)
    empty = distill_loss_sums(hidden[:0], head, labels[:0], Dense(torch.randn(0, V)), chunk_size=4, **KW)
    empty.total.backward()
    assert empty.total.item() == 0.0 and head.grad.abs().sum().item() == 0.0


def test_lora_student_from_transformers():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(config),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    input_ids = torch.randint(0, V, (2, 12))
    teacher = Dense(torch.randn(22, V))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    lora = [p for _, p in trainable]
    lora_b = [i for i, (name, _) in enumerate(trainable) if "lora_B" in name]

    def build():
        out = model(input_ids=input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, :-1].reshape(-1, H)  # after the final norm, as the lm_head sees it
        # Sanity: the final hidden states times the head are the model's own logits.
        torch.testing.assert_close(
            F.linear(hidden, model.get_output_embeddings().weight),
            out.logits[:, :-1].reshape(-1, V),
            rtol=1e-4,
            atol=1e-5,
        )
        return hidden, model.get_output_embeddings().weight, input_ids[:, 1:].reshape(-1), teacher

    assert_same(loss_and_grads(lora, build, 5), loss_and_grads(lora, build, None))
    # lora_B starts at zero, so only it gets a non-zero gradient on the first step.
    chunked_grads = loss_and_grads(lora, build, 5)[1]
    assert lora_b and all(chunked_grads[i].abs().sum() > 0 for i in lora_b)
