"""The GGUF writer on tiny random models of every supported architecture, read back by transformers'
own GGUF loader (a second, independent reader of the format)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import _build_tokenizer
from kdistill.errors import KdistillError
from kdistill.models.gguf_export import write_gguf

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'kdistill[gguf]')")

SHAPE = dict(
    vocab_size=336, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip
# transformers' GGUF loader reads Qwen 3's head size as its default (128) and Gemma 3's from the file.
EXTRA = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 128},
    "gemma3_text": {"head_dim": 16, "sliding_window": 64},
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("tok")
    _build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def _model(model_type: str, tie: bool = True):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SHAPE, **EXTRA[model_type], tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1, so that Gemma's (1 + w) offset is really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _reloaded_logits(model, tokenizer, path: Path, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    write_gguf(model, tokenizer, path, kind)
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(3, SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits, back(ids).logits


@pytest.mark.parametrize("model_type", sorted(EXTRA))
def test_f32_reloads_with_the_same_logits(model_type: str, tokenizer, tmp_path: Path) -> None:
    ours, back = _reloaded_logits(_model(model_type), tokenizer, tmp_path / "m.gguf", "f32")
    assert (ours - back).abs().max().item() <= 1e-4


def test_an_untied_head_is_written_and_read_back(tokenizer, tmp_path: Path) -> None:
    model = _model("llama", tie=False)
    with torch.no_grad():
        model.lm_head.weight.normal_()
    ours, back = _reloaded_logits(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert (ours - back).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_smaller_types_keep_the_top_token(kind: str, tokenizer, tmp_path: Path) -> None:
    model = _model("llama")
    ours, back = _reloaded_logits(model, tokenizer, tmp_path / "m.gguf", kind)
    agree = (ours.argmax(-1) == back.argmax(-1)).float().mean().item()
    assert agree >= 0.99
    assert 0 < (ours - back).abs().max().item() < 0.05  # really stored smaller, and close
    sizes = {k: write_gguf(model, tokenizer, tmp_path / f"{k}.gguf", k).stat().st_size for k in ("f32", kind)}
    assert sizes[kind] < 0.7 * sizes["f32"]


def test_the_tokenizer_and_chat_template_are_in_the_metadata(tokenizer, tmp_path: Path) -> None:
    import gguf

    path = write_gguf(_model("llama"), tokenizer, tmp_path / "m.gguf", "f32")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == SHAPE["vocab_size"]  # padded to the embedding's rows
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    types = fields["tokenizer.ggml.token_type"].contents()
    plain = next(i for i in vocab.values() if i not in tokenizer.added_tokens_decoder)
    assert types[vocab["</s>"]] == gguf.TokenType.CONTROL and types[plain] == gguf.TokenType.NORMAL
    assert len(tokenizer) < SHAPE["vocab_size"] and types[-1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temporary file left


def test_an_unsupported_architecture_is_one_message(tokenizer, tmp_path: Path) -> None:
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=336)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(KdistillError, match="supports the architectures gemma3_text, llama, mistral"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_a_gguf_file_given_as_the_model_loads_from_its_folder(tokenizer, tmp_path: Path) -> None:
    from kdistill.models.loading import load_model, resolve

    model = _model("llama")
    path = write_gguf(model, tokenizer, tmp_path / "teacher.gguf", "f32")
    source = resolve(str(path))
    assert (source.path, source.gguf_file) == (str(tmp_path), "teacher.gguf")
    back = load_model(source, torch.float32, "cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, model(ids).logits, atol=1e-4)
    with pytest.raises(KdistillError, match="is a GGUF file, but gguf_file names another: other.gguf"):
        resolve(str(path), gguf_file="other.gguf")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(KdistillError, match="is a file, not a model folder or a .gguf file"):
        resolve(str(tmp_path / "notes.txt"))
