"""Pruning by importance: scores against a hand-computed reference, exact equivalences, shapes, budgets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kdistill.config.student import FromTeacher
from kdistill.errors import KdistillError
from kdistill.models.prune import build_pruned, build_shape, count_params
from kdistill.models.prune.importance import Importance, removal_scores, score_units
from kdistill.models.prune.shape import PrunedShape, teacher_shape
from kdistill.models.prune.surgery import REFIT_RIDGE, Kept, choose, prune, top

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # != hidden / heads: head_dim must stay the teacher's
    max_position_embeddings=64,
)
ARCHS = {
    "llama": dict(tie_word_embeddings=True),
    "qwen2": dict(tie_word_embeddings=False),  # q/k/v biases
    "qwen3": dict(tie_word_embeddings=False),  # q_norm / k_norm per head_dim
    "gemma3_text": dict(tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=16),
}


def tiny_model(kind: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, **COMMON, **ARCHS[kind])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()  # rotary buffers stay fp32
    with torch.no_grad():  # random norms and biases, so that slicing them wrongly shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                one = name.endswith("weight") and kind != "gemma3_text"  # Gemma's norms scale by 1 + w
                p.copy_(torch.randn_like(p) * 0.3 + one)
    return model


def batches(n: int = 2, rows: int = 3, length: int = 10, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 96, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length - 3 :] = 0  # one padded row
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :4] = -100  # prompt
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def importance_cfg(**keys: object) -> FromTeacher:
    return FromTeacher(method="importance", **keys)


# ---- scores -----------------------------------------------------------------------------------------


def test_scores_equal_a_reference_computed_by_hand() -> None:
    model = tiny_model("llama")
    data = batches()
    got = score_units(model, data, progress=False)
    layers, heads = 4, 4
    influence = torch.zeros(layers, dtype=torch.float64)
    neurons = torch.zeros(layers, 48, dtype=torch.float64)
    head_norm = torch.zeros(layers, heads, dtype=torch.float64)
    channels = torch.zeros(32, dtype=torch.float64)
    tokens = 0
    for batch in data:
        mask = batch["attention_mask"].bool()
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        hidden = out.hidden_states
        for i, layer in enumerate(model.model.layers):
            x_in = hidden[i]
            # the layer's output, from its input, by hand: x + attn(norm(x)), then + mlp(norm(.))
            normed = layer.input_layernorm(x_in)
            attn_in = _attention_heads(model, layer, normed, batch["attention_mask"])  # (B, T, heads, size)
            mid = x_in + layer.self_attn.o_proj(attn_in.flatten(2))
            normed2 = layer.post_attention_layernorm(mid)
            act = torch.nn.functional.silu(layer.mlp.gate_proj(normed2)) * layer.mlp.up_proj(normed2)
            x_out = mid + layer.mlp.down_proj(act)
            if i < layers - 1:
                torch.testing.assert_close(x_out, hidden[i + 1])
            cos = (x_in * x_out).sum(-1) / (x_in.norm(dim=-1) * x_out.norm(dim=-1))
            influence[i] += (1 - cos)[mask].sum()
            neurons[i] += act.abs()[mask].sum(0)
            head_norm[i] += attn_in.norm(dim=-1)[mask].sum(0)
            channels += normed.abs()[mask].sum(0) + normed2.abs()[mask].sum(0)
        final = model.model.norm(x_out)
        channels += final.abs()[mask].sum(0)
        tokens += int(mask.sum())
    assert got.tokens == tokens
    torch.testing.assert_close(torch.tensor(got.influence, dtype=torch.float64), influence / tokens)
    torch.testing.assert_close(torch.stack(got.neurons), neurons / tokens)
    torch.testing.assert_close(torch.stack(got.heads), head_norm / tokens)
    torch.testing.assert_close(got.channels, channels / tokens)


def _attention_heads(model, layer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each query head's attention output `(B, T, heads, head_dim)`, written out (causal, GQA, RoPE)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, t, _ = x.shape
    attn = layer.self_attn
    q = attn.q_proj(x).view(b, t, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, 2, 16).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, 2, 16).transpose(1, 2)
    cos, sin = model.model.rotary_emb(x, torch.arange(t)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # query head h reads group h // 2
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (weights @ v).transpose(1, 2)


def test_removal_scores_are_the_loss_and_kl_without_each_layer() -> None:
    model = tiny_model("llama")
    data = batches(n=1)
    kl, loss = removal_scores(model, data, "kl", False), removal_scores(model, data, "loss", False)
    batch = data[0]
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        full = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    full = full.log_softmax(-1)
    for i in range(4):
        cut_model = prune(model, PrunedShape(3, 32, 48, 4, 2), _every(model, [j for j in range(4) if j != i]))
        with torch.no_grad():
            cut = cut_model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        cut = cut.log_softmax(-1)
        targets = batch["labels"][:, 1:][mask]
        assert kl[i] == pytest.approx(float((full.exp() * (full - cut)).sum(-1).mean()), rel=1e-9)
        assert loss[i] == pytest.approx(float(-cut.gather(-1, targets[:, None]).mean()), rel=1e-9)


def test_contiguous_removal_scores_each_block_and_keeps_the_rest() -> None:
    model = tiny_model("llama")
    data = batches(n=1)
    cfg = importance_cfg(num_layers=2, depth_score="contiguous_kl")
    pruned = build_pruned(model, cfg, data, progress=False)
    blocks = pruned.scores.importance.contiguous
    assert len(blocks) == 3  # two layers off: blocks start at 0, 1 and 2
    batch = data[0]
    mask = batch["labels"][:, 1:] != -100

    def logits(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]

    full = logits(model).log_softmax(-1)
    for start in range(3):
        rest = [j for j in range(4) if not start <= j < start + 2]
        cut = logits(prune(model, PrunedShape(2, 32, 48, 4, 2), _every(model, rest))).log_softmax(-1)
        assert blocks[start] == pytest.approx(float((full.exp() * (full - cut)).sum(-1).mean()), rel=1e-9)
    best = min(range(3), key=blocks.__getitem__)
    assert pruned.kept.layers == [j for j in range(4) if not best <= j < best + 2]
    depth = pruned.scores.depth()  # per layer: the cheapest block holding it; the removed block's lowest
    assert sorted(range(4), key=depth.__getitem__)[:2] == [best, best + 1]


def test_mlp_refit_is_the_least_squares_fit_of_the_full_mlp(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model("llama")
    data = batches()
    activations: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: activations[i].append(a[0]))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for batch in data:
            model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    cfg = importance_cfg(num_layers=3, intermediate_size=20, hidden_size=16, mlp_refit=True)
    plain = build_pruned(model, cfg.model_copy(update={"mlp_refit": False}), data, progress=False)
    pruned = build_pruned(model, cfg, data, progress=False)
    assert pruned.kept.to_json() == plain.kept.to_json()
    tokens = sum(int(b["attention_mask"].sum()) for b in data)  # 57 for 20 kept neurons: too few to trust
    assert f"mlp_refit: {tokens} calibration tokens for 20 kept MLP neurons a layer" in caplog.text
    for new, layer in enumerate(pruned.kept.layers):
        a = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(activations[layer], data)])
        w = model.model.layers[layer].mlp.down_proj.weight.detach()
        k, channels = pruned.kept.neurons[new], pruned.kept.channels
        inner = a[:, k].T @ a[:, k]
        ridge = REFIT_RIDGE * inner.diagonal().mean()
        # the normal equations of min |A Wᵀ - A_K W'ᵀ|² + r |W'|², by hand
        expected = torch.linalg.solve(
            inner + ridge * torch.eye(20, dtype=torch.float64), a[:, k].T @ a @ w.T
        ).T
        got = pruned.model.model.layers[new].mlp.down_proj.weight.detach()
        torch.testing.assert_close(got, expected[channels], rtol=1e-7, atol=1e-9)
        sliced = plain.model.model.layers[new].mlp.down_proj.weight.detach()
        full = a @ w.T[:, channels]
        errors = [float((full - a[:, k] @ w_k.T).square().sum()) for w_k in (got, sliced)]
        assert errors[0] < 0.9 * errors[1]
        # the rest of the layer is the plain cut's
        torch.testing.assert_close(
            pruned.model.model.layers[new].mlp.up_proj.weight,
            plain.model.model.layers[new].mlp.up_proj.weight,
        )
    whole = build_pruned(model, importance_cfg(num_layers=3, mlp_refit=True), data, progress=False)
    for new, layer in enumerate(whole.kept.layers):  # every neuron kept: the teacher's weights
        assert torch.equal(
            whole.model.model.layers[new].mlp.down_proj.weight, model.model.layers[layer].mlp.down_proj.weight
        )


def test_mlp_refit_needs_method_importance() -> None:
    with pytest.raises(ValueError, match="mlp_refit need method: importance"):
        FromTeacher(method="even", num_layers=2, mlp_refit=True)


def _every(model, layers: list[int]) -> Kept:
    return Kept(layers, [torch.arange(48)] * len(layers), [torch.arange(2)] * len(layers), torch.arange(32))


# ---- surgery ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ARCHS))
def test_pruning_nothing_gives_identical_logits(kind: str) -> None:
    teacher = tiny_model(kind)
    pruned = build_pruned(teacher, importance_cfg(num_layers=4), batches(), progress=False)
    ids = batches()[0]
    assert torch.equal(pruned.model(**_inputs(ids)).logits, teacher(**_inputs(ids)).logits)


@pytest.mark.parametrize("kind", list(ARCHS))
def test_pruned_student_equals_the_teacher_with_those_units_silenced(kind: str) -> None:
    """Dropping MLP neurons and key/value groups is zeroing their outputs; dropping a layer is skipping it."""
    teacher = tiny_model(kind)
    kept = Kept(
        layers=[0, 2, 3],
        neurons=[torch.tensor(sorted(torch.randperm(48)[:20].tolist())) for _ in range(3)],
        groups=[torch.tensor([1]), torch.tensor([0]), torch.tensor([1])],
        channels=torch.arange(32),
    )
    student = prune(teacher, PrunedShape(3, 32, 20, 2, 1), kept)
    assert student.config.head_dim == 16 and student.config.num_key_value_heads == 1
    silenced = tiny_model(kind)
    with torch.no_grad():
        for new, old in enumerate(kept.layers):
            layer = silenced.model.layers[old]
            drop = torch.ones(48, dtype=torch.bool)
            drop[kept.neurons[new]] = False
            layer.mlp.down_proj.weight[:, drop] = 0
            heads = torch.ones(4, 16, dtype=torch.bool)
            heads[kept.groups[new] * 2 : kept.groups[new] * 2 + 2] = False  # the group's two query heads
            layer.self_attn.o_proj.weight[:, heads.flatten()] = 0
    silenced.model.layers = torch.nn.ModuleList([silenced.model.layers[i] for i in kept.layers])
    silenced.config.num_hidden_layers = 3
    if kind == "gemma3_text":
        silenced.config.layer_types = [teacher.config.layer_types[i] for i in kept.layers]
        assert student.config.layer_types == silenced.config.layer_types
    ids = batches()[0]
    torch.testing.assert_close(student(**_inputs(ids)).logits, silenced(**_inputs(ids)).logits)


def test_known_importances_keep_exactly_those_rows_and_columns() -> None:
    teacher = tiny_model("llama")  # tied head, 2 key/value groups of 2 query heads
    importance = Importance(
        influence=[0.9, 0.1, 0.5, 0.8],
        neurons=[torch.arange(48.0).flip(0)] * 4,  # the first neurons matter most
        heads=[torch.tensor([0.0, 0.1, 5.0, 0.2])] * 4,  # group 1 (heads 2, 3) wins on its sum
        channels=torch.tensor([float(i % 5) for i in range(32)]),
        tokens=1,
    )
    shape = PrunedShape(layers=3, hidden=12, intermediate=10, heads=2, kv_heads=1)
    layers = top(importance.influence, shape.layers).tolist()
    kept = choose(importance, layers, shape, teacher_shape(teacher.config))
    assert kept.layers == [0, 2, 3]
    assert kept.neurons[0].tolist() == list(range(10)) and kept.groups[0].tolist() == [1]
    channels = [i for i in range(32) if i % 5 in (3, 4)][:12]
    assert kept.channels.tolist() == sorted([i for i in range(32) if i % 5 == 4] + [3, 8, 13, 18, 23, 28][:6])
    student = prune(teacher, shape, kept)
    t, s = teacher.model.layers[2], student.model.layers[1]
    ch, q, kv = kept.channels, torch.arange(32, 64), torch.arange(16, 32)
    assert torch.equal(s.self_attn.q_proj.weight, t.self_attn.q_proj.weight[q][:, ch])
    assert torch.equal(s.self_attn.k_proj.weight, t.self_attn.k_proj.weight[kv][:, ch])
    assert torch.equal(s.self_attn.v_proj.weight, t.self_attn.v_proj.weight[kv][:, ch])
    assert torch.equal(s.self_attn.o_proj.weight, t.self_attn.o_proj.weight[ch][:, q])
    assert torch.equal(s.mlp.gate_proj.weight, t.mlp.gate_proj.weight[:10][:, ch])
    assert torch.equal(s.mlp.down_proj.weight, t.mlp.down_proj.weight[ch][:, :10])
    assert torch.equal(s.input_layernorm.weight, t.input_layernorm.weight[ch])
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight[ch])
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, ch])
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    assert len(channels) <= 12


def test_untied_head_is_cut_by_the_same_channels() -> None:
    teacher = tiny_model("qwen2")
    kept = Kept([0, 1], [torch.arange(48)] * 2, [torch.arange(2)] * 2, torch.tensor([1, 5, 7, 30]))
    student = prune(teacher, PrunedShape(2, 4, 48, 4, 2), kept)
    assert student.lm_head.weight is not student.model.embed_tokens.weight
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, kept.channels])
    q = student.model.layers[0].self_attn.q_proj
    assert torch.equal(q.bias, teacher.model.layers[0].self_attn.q_proj.bias)


def test_gemma3_keeps_its_embedding_scale_and_tied_logit_scale() -> None:
    teacher = tiny_model("gemma3_text")
    channels = torch.arange(0, 32, 4)
    kept = Kept(list(range(4)), [torch.arange(48)] * 4, [torch.arange(2)] * 4, channels)
    student = prune(teacher, PrunedShape(4, 8, 48, 4, 2), kept)
    ids = torch.tensor([[5, 6, 7]])
    # the residual stream starts at the teacher's values on the kept channels
    torch.testing.assert_close(
        student.model.embed_tokens(ids), teacher.model.embed_tokens(ids)[..., channels]
    )
    # the tied head reads a c-times larger matrix; the final norm's (1 + w) is divided by c to match
    c = math.sqrt(32 / 8)
    normed = torch.randn(3, 8, dtype=torch.float64)
    head_in = normed * (1 + student.model.norm.weight)
    want = (normed * (1 + teacher.model.norm.weight[channels])) @ teacher.lm_head.weight[:, channels].T
    torch.testing.assert_close(student.lm_head(head_in), want)
    assert student.lm_head.weight is student.model.embed_tokens.weight and c == 2


def test_saved_pruned_folder_reloads_with_the_same_logits(tmp_path: Path) -> None:
    teacher = tiny_model("qwen3")
    cfg = importance_cfg(num_layers=3, hidden_size=24, intermediate_size=20, num_key_value_heads=1)
    student = build_pruned(teacher, cfg, batches(), progress=False).model
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert again.config.head_dim == 16 and again.config.num_attention_heads == 2
    ids = batches()[0]
    # equal weights; BLAS may sum in another order for tensors at other addresses (differences ~1e-17)
    assert all(torch.equal(p, q) for p, q in zip(again.state_dict().values(), student.state_dict().values()))
    torch.testing.assert_close(
        again(**_inputs(ids)).logits, student(**_inputs(ids)).logits, rtol=0, atol=1e-12
    )


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


# ---- shapes, budgets and refusals --------------------------------------------------------------------


def test_count_params_from_the_config_alone_matches_the_built_model() -> None:
    teacher = tiny_model("qwen2")
    cfg = importance_cfg(num_layers=2, hidden_size=16, intermediate_size=24, num_attention_heads=2)
    student = build_pruned(teacher, cfg, batches(), progress=False).model
    total, non_embedding = count_params(teacher.config, build_shape(teacher.config, cfg))
    assert total == sum(p.numel() for p in student.parameters())
    assert non_embedding == total - 2 * 96 * 16  # untied: embedding and head are both left out


def test_budget_recipe_mlp_to_its_floor_then_layers_then_mlp_back_up() -> None:
    config = tiny_model("llama").config
    full = count_params(config, teacher_shape(config))[0]
    shape = build_shape(config, importance_cfg(params=0.5))
    total = count_params(config, shape)[0]
    assert total <= full / 2
    assert shape.intermediate >= 16  # the floor, a third of 48
    # one more layer at the floor would not fit; one more MLP step would not fit either
    assert count_params(config, PrunedShape(shape.layers + 1, 32, 16, 4, 2))[0] > full / 2
    assert count_params(config, PrunedShape(shape.layers, 32, shape.intermediate + 8, 4, 2))[0] > full / 2
    fixed = build_shape(config, importance_cfg(params=0.5, num_layers=4, hidden_size=16))
    assert (fixed.layers, fixed.hidden) == (4, 16) and count_params(config, fixed)[0] <= full / 2
    count = build_shape(config, importance_cfg(params=total))
    assert count == shape


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"num_layers": 2, "hidden_size": 8}, "hidden_size need method: importance"),
        ({"method": "importance"}, "needs a target"),
        ({"method": "even"}, "method even needs num_layers"),
        ({"num_layers": 2, "params": 0.5}, "params need method: importance"),
    ],
)
def test_config_refuses_bad_combinations(keys: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FromTeacher(**keys)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"num_layers": 5}, "num_layers=5: the teacher has 4"),
        ({"hidden_size": 64}, "hidden_size=64: the teacher has 32"),
        ({"num_attention_heads": 3}, "give a multiple of 2"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, "num_attention_heads must be 2"),
        ({"params": 1000}, "no shape within 1,000 parameters"),
        ({"params": 0.5, "intermediate_size": 48, "num_layers": 4}, "raise params or give smaller"),
    ],
)
def test_shape_refuses_what_the_teacher_cannot_give(keys: dict, message: str) -> None:
    config = tiny_model("llama").config
    with pytest.raises(KdistillError, match=message):
        build_shape(config, importance_cfg(**keys))


def test_other_architectures_get_one_clear_message() -> None:
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    with pytest.raises(KdistillError, match="supports Llama / SmolLM2, Mistral, Qwen2, Qwen3, Gemma 3"):
        build_shape(config, importance_cfg(num_layers=1))
