"""A transformers model written as a GGUF file that llama.cpp (and Ollama, LM Studio) loads.

Tensor names come from the `gguf` package's own name maps, and so do the tokenizer's merges, special
token ids and chat template (`gguf.SpecialVocab`). Written by hand, because the `gguf` package does not
do them: the choice of llama.cpp architecture, the hyperparameters, the token list with its types, and
two layout differences between transformers and llama.cpp's graphs:

- llama.cpp's Llama graph applies rotary embeddings to interleaved pairs of each head's query and key
  rows, where transformers rotates its two halves: those rows are permuted (llama.cpp's converter does
  the same, and transformers' GGUF loader undoes it);
- Gemma's norms scale by `1 + weight`, llama.cpp's by `weight`: 1 is added to every norm weight.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kdistill.errors import KdistillError
from kdistill.files import save_atomic

log = logging.getLogger("kdistill")

TYPES = ("f32", "f16", "q8_0")


@dataclass(frozen=True)
class _Arch:
    name: str  # llama.cpp's architecture
    permute_qk: bool  # interleaved rotary pairs (llama.cpp's "normal" rope) rather than halves ("neox")
    norm_offset: float  # added to every norm weight


# transformers' model_type -> how llama.cpp runs it. Mistral runs on llama.cpp's Llama graph, as its
# own converter writes it.
ARCHITECTURES = {
    "llama": _Arch("llama", True, 0.0),
    "mistral": _Arch("llama", True, 0.0),
    "qwen2": _Arch("qwen2", False, 0.0),
    "qwen3": _Arch("qwen3", False, 0.0),
    "gemma3_text": _Arch("gemma3", False, 1.0),
}

# transformers' pre-tokenizer (as tokenizer.json writes it) -> llama.cpp's name for the same splitting.
_DIGITS_THEN_BYTES = [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write_gguf(model: Any, tokenizer: Any, path: Path, kind: str = "f32") -> Path:
    """Write `model` (a transformers causal LM, full precision) and `tokenizer` to the GGUF file `path`,
    its matrices as `kind` (`f32`, `f16` or `q8_0`; vectors stay f32). Written atomically."""
    import gguf

    if kind not in TYPES:
        raise KdistillError(f"GGUF type {kind!r}: expected one of {', '.join(TYPES)}")
    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise KdistillError(
            f"GGUF export supports the architectures {', '.join(sorted(ARCHITECTURES))} (llama.cpp's llama, "
            f"qwen2, qwen3 and gemma3 graphs); this student is {config.model_type!r}"
        )
    tensors = _tensors(model, arch, kind)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch.name)
        _hyperparameters(writer, config, arch, kind)
        _vocabulary(writer, tokenizer, int(model.get_input_embeddings().weight.shape[0]))
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    kept = "The student it was made from is unchanged; free some space, then run `kdistill export` again"
    save_atomic(path, write, what=f"the GGUF export ({kind})", kept=kept)
    return path


def _tensors(model: Any, arch: _Arch, kind: str) -> list[tuple[str, np.ndarray, Any]]:
    """Every weight under its GGUF name, converted to what `kind` stores (with its quantization type)."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(_arch_enum(arch.name), config.num_hidden_layers)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reads the embedding when `output` is missing
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    out = []
    for hf_name, tensor in tqdm(state.items(), desc="export: converting weights", unit="tensor"):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KdistillError(f"GGUF export: no llama.cpp name for the weight {hf_name!r} ({arch.name})")
        data = tensor.detach().to(torch.float32)
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _interleaved(data, heads if hf_name.endswith("q_proj.weight") else kv_heads)
        if arch.norm_offset and hf_name.endswith("norm.weight"):
            data = data + arch.norm_offset
        out.append((name, *_stored(data.numpy(), name, kind)))
    return out


def _interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows reordered from transformers' halves to llama.cpp's interleaved rotary pairs."""
    pairs = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def _stored(data: np.ndarray, name: str, kind: str) -> tuple[np.ndarray, Any]:
    """`data` as written: vectors (norms, biases) in f32, matrices in `kind` (q8_0 needs rows of 32)."""
    import gguf

    if data.ndim < 2 or kind == "f32":
        return data, None
    if kind == "q8_0" and data.shape[-1] % 32 == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, q8), q8
    if kind == "q8_0":
        log.info("export: %s stays f16 (rows of %d values, q8_0 needs multiples of 32)", name, data.shape[-1])
    return data.astype(np.float16), None


def _arch_enum(name: str) -> Any:
    import gguf

    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def _hyperparameters(writer: Any, config: Any, arch: _Arch, kind: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(getattr(config, "_name_or_path", "") or "kdistill student")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope(config)))
    writer.add_vocab_size(config.vocab_size)
    if arch.name == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch.name == "gemma3" and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}[kind]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))


def _rope(config: Any) -> float:
    """The rotary base; a scaled rope (llama 3.1, YaRN) is refused rather than written wrong."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:  # Gemma 3: one set of parameters per kind of layer
        params = params["full_attention"]
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise KdistillError(f"GGUF export: rope scaling {kind!r} is not supported; only plain rotary bases")
    return params.get("rope_theta", getattr(config, "rope_theta", 10000.0))


def _vocabulary(writer: Any, tokenizer: Any, rows: int) -> None:
    """The token list with types (and scores), merges, special ids and chat template; the list is padded
    with unused tokens to the embedding's rows, as llama.cpp needs one token per row."""
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise KdistillError("GGUF export needs a fast tokenizer (tokenizer.json); this one is slow")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        spec = json.loads((Path(folder) / "tokenizer.json").read_text())
        byte_fallback = spec["model"].get("type") == "BPE" and spec["model"].get("byte_fallback", False)
        if spec["model"].get("type") != "BPE":
            raise KdistillError(
                f"GGUF export supports BPE tokenizers (byte-level, or with byte fallback); this one is "
                f"{spec['model'].get('type')!r}"
            )
        if byte_fallback:  # SentencePiece-like (Llama 2, Mistral, Gemma): llama.cpp's "llama" tokenizer
            tokens, scores, types = _sentencepiece_tokens(Path(folder))
            writer.add_tokenizer_model("llama")
        else:
            tokens, types = _byte_level_tokens(tokenizer)
            scores = None
            writer.add_tokenizer_model("gpt2")
            pre = _pre_tokenizer(spec.get("pre_tokenizer"))
            if pre is None:
                log.warning("export: unknown pre-tokenizer; llama.cpp will split text with its default rules")
            else:
                writer.add_tokenizer_pre(pre)
        for i in range(len(tokens), rows):
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
            if scores is not None:
                scores.append(-1000.0)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if scores is not None:
            writer.add_token_scores(scores)
        special = gguf.SpecialVocab(folder, load_merges=not byte_fallback, n_vocab=len(tokens))
        special.add_to_gguf(writer, quiet=True)


def _byte_level_tokens(tokenizer: Any) -> tuple[list[bytes], list[int]]:
    """GPT-2-style tokens as their byte-level strings; special added tokens are CONTROL (llama.cpp then
    parses them in prompts and does not print them), other added tokens USER_DEFINED."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(len(by_id)):
        token = added[i].content if i in added else by_id[i]
        tokens.append(token.encode())
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _sentencepiece_tokens(folder: Path) -> tuple[list[bytes], list[float], list[int]]:
    import gguf

    vocab = gguf.vocab.LlamaHfVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    return tokens, scores, types


def _pre_tokenizer(spec: dict | None) -> str | None:
    """llama.cpp's name for the pre-tokenizer of `spec` (tokenizer.json's `pre_tokenizer`), if known."""
    if not spec:
        return None
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    shapes = [{k: v for k, v in s.items() if k in ("type", "individual_digits", "use_regex")} for s in steps]
    if shapes == _DIGITS_THEN_BYTES:
        return "smollm"
    pattern = next((s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"), None)
    if pattern is not None:
        return {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}.get(re.sub(r"\s+$", "", pattern))
    return None
