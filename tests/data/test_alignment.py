"""Cross-tokenizer alignment and vocabulary mapping on hand-made tokenizers (real ones: test_real_tokenizers).

The tiny tokenizers are built from explicit vocabularies (nothing trained, nothing downloaded) so
their splits are known by hand: a GPT-2-style byte-level BPE, a SentencePiece-style character
tokenizer with byte fallback and a BOS, and a WordPiece tokenizer that drops whitespace (gaps).
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from helpers import AlignedText, align_offsets, align_text, mapped_share_of_ids, stack_positions
from kdistill.errors import KdistillError
from kdistill.losses import Sparse
from kdistill.losses.cross_vocab import mapped_divergence, uld_distance
from kdistill.losses.vocab_map import build_vocab_map, token_surfaces

TEXT = "the  cat é😀 dog日本"


@pytest.fixture(scope="module")
def byte_bpe() -> PreTrainedTokenizerFast:
    merges = [("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t"), ("t", "h"), ("th", "e")]
    vocab = {"<s>": 0, "</s>": 1}
    for token in sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def sp_char() -> PreTrainedTokenizerFast:
    merges = [("▁", "t"), ("h", "e"), ("d", "o"), ("do", "g"), ("▁", "c")]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for token in [f"<0x{b:02X}>" for b in range(256)] + list("▁abcdefghijklmnopqrstuvwxyzé日"):
        vocab[token] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def wordpiece() -> PreTrainedTokenizerFast:
    vocab = ["[UNK]", "the", "cat", "##s", "c", "##a", "##t", "dog"]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def segments(aligned: AlignedText, teacher, student, text: str) -> list[tuple[list[str], list[str], str]]:
    """Each segment as (teacher tokens, student tokens, its text): readable in an assertion."""
    t_tok = teacher.convert_ids_to_tokens(aligned.teacher_ids)
    s_tok = student.convert_ids_to_tokens(aligned.student_ids)
    s = aligned.spans
    rows = zip(s.teacher_start, s.teacher_end, s.student_start, s.student_end, s.char_start, s.char_end)
    return [(t_tok[a:b], s_tok[c:d], text[e:f]) for a, b, c, d, e, f in (map(int, r) for r in rows)]


def test_byte_level_against_sentencepiece_by_hand(byte_bpe, sp_char):
    aligned = align_text(TEXT, byte_bpe, sp_char)
    assert segments(aligned, byte_bpe, sp_char, TEXT) == [
        (["the"], ["▁t", "he"], "the"),  # one teacher token over two student tokens
        (["Ġ"], ["▁"], " "),  # the first of two spaces is a token of its own on both sides
        (["Ġcat"], ["▁c", "a", "t"], " cat"),
        (["Ġ"], ["▁"], " "),
        (["Ã", "©"], ["é"], "é"),  # two byte-level tokens share the character é
        (["ð", "Ł", "ĺ", "Ģ"], ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"], "😀"),  # bytes against byte fallback
        (["Ġ"], ["▁"], " "),
        (["d", "o", "g"], ["dog"], "dog"),  # three teacher tokens under one student token
        (["æ", "Ĺ", "¥"], ["日"], "日"),
        (["æ", "ľ", "¬"], ["<0xE6>", "<0x9C>", "<0xAC>"], "本"),
    ]
    spans = aligned.spans
    # The student starts with BOS (offsets (0, 0)): it is in no segment but predicts the first one.
    assert spans.student_start.tolist()[:3] == [1, 3, 4] and spans.student_pos.tolist()[:3] == [0, 2, 3]
    # The teacher has no BOS, so nothing predicts its first token: that segment cannot enter a loss.
    assert spans.teacher_pos.tolist()[:3] == [-1, 0, 1]
    assert spans.usable.tolist() == [False] + [True] * 9
    assert spans.one_to_one.tolist() == [False, True, False, True, False, False, True, False, False, False]


def test_whitespace_gaps_are_bridged(byte_bpe, wordpiece):
    # WordPiece drops spaces (its offsets leave gaps); unknown words become one [UNK] over the word.
    text = "the  cats é dog"
    aligned = align_text(text, byte_bpe, wordpiece)
    assert segments(aligned, byte_bpe, wordpiece, text) == [
        (["the", "Ġ"], ["the"], "the "),  # the teacher's extra space token joins the segment before it
        (["Ġcat"], ["cat"], " cat"),
        (["s", "Ġ"], ["##s"], "s "),
        (["Ã", "©", "Ġ"], ["[UNK]"], "é "),
        (["d", "o", "g"], ["dog"], "dog"),
    ]
    reverse = align_text(text, wordpiece, byte_bpe)
    assert [(b, a, c) for a, b, c in segments(reverse, wordpiece, byte_bpe, text)] == segments(
        aligned, byte_bpe, wordpiece, text
    )


def test_offsets_with_special_tokens_and_edge_cases():
    # BOS (0, 0) and EOS (0, 0) on the teacher; a token spanning two of the student's.
    spans = align_offsets([(0, 0), (0, 2), (2, 5), (0, 0)], [(0, 1), (1, 2), (2, 3), (3, 5)])
    assert spans.teacher_start.tolist() == [1, 2] and spans.teacher_end.tolist() == [2, 3]
    assert spans.student_start.tolist() == [0, 2] and spans.student_end.tolist() == [2, 4]
    assert spans.char_start.tolist() == [0, 2] and spans.char_end.tolist() == [2, 5]
    assert spans.teacher_pos.tolist() == [0, 1] and spans.usable.tolist() == [False, True]
    # No common boundary inside: one segment covering everything.
    whole = align_offsets([(0, 3), (3, 6)], [(0, 4), (4, 6)])
    assert [len(whole), int(whole.teacher_end[0]), int(whole.student_end[0])] == [1, 2, 2]
    assert len(align_offsets([], [(0, 1)])) == 0 and len(align_offsets([(0, 0)], [(0, 1)])) == 0


@pytest.mark.parametrize("pair", ["bpe-sp", "sp-bpe", "bpe-wp", "wp-sp"])
def test_random_texts_give_a_consistent_segmentation(pair, byte_bpe, sp_char, wordpiece):
    toks = {"bpe": byte_bpe, "sp": sp_char, "wp": wordpiece}
    teacher, student = (toks[name] for name in pair.split("-"))
    rng = random.Random(0)
    pool = list("thecatsdog") + [" ", " ", "  ", "\t", "\n", "é", "😀", "日", "本", "e\u0301", "👍🏽"]
    for _ in range(200):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 30)))
        t_enc = teacher(text, return_offsets_mapping=True)
        s_enc = student(text, return_offsets_mapping=True)
        spans = align_offsets(t_enc["offset_mapping"], s_enc["offset_mapping"])
        if not len(spans):
            continue
        # Segments tile both token lists without holes or overlaps, and are never empty on a side.
        assert (spans.teacher_end[:-1] == spans.teacher_start[1:]).all()
        assert (spans.student_end[:-1] == spans.student_start[1:]).all()
        assert (spans.teacher_end > spans.teacher_start).all() and (
            spans.student_end > spans.student_start
        ).all()
        assert (spans.char_end[:-1] == spans.char_start[1:]).all()
        # Every token of a segment lies inside the segment's characters.
        for side, offsets in (("teacher", t_enc["offset_mapping"]), ("student", s_enc["offset_mapping"])):
            start, end = getattr(spans, f"{side}_start"), getattr(spans, f"{side}_end")
            for a, b, c0, c1 in zip(
                start.tolist(), end.tolist(), spans.char_start.tolist(), spans.char_end.tolist()
            ):
                assert all(c0 <= o[0] and o[1] <= c1 for o in offsets[a:b] if o[1] > o[0]), (text, side)
        # The last teacher token with text is always covered.
        last = max(i for i, o in enumerate(t_enc["offset_mapping"]) if o[1] > o[0])
        assert int(spans.teacher_end[-1]) == last + 1


def test_within_stack_and_serialisation(byte_bpe, sp_char, tmp_path):
    aligned = align_text(TEXT, byte_bpe, sp_char)
    tail = aligned.spans.within(TEXT.index("dog"))
    assert segments(AlignedText(aligned.teacher_ids, aligned.student_ids, tail), byte_bpe, sp_char, TEXT) == [
        (["d", "o", "g"], ["dog"], "dog"),
        (["æ", "Ĺ", "¥"], ["日"], "日"),
        (["æ", "ľ", "¬"], ["<0xE6>", "<0x9C>", "<0xAC>"], "本"),
    ]
    assert len(aligned.spans.within(0, TEXT.index(" cat"))) == 2
    example, pos_t, pos_s = stack_positions([aligned.spans, tail])
    assert example.tolist() == [0] * 9 + [1] * 3
    assert pos_t[-3:].tolist() == [10, 13, 16] and pos_s[-3:].tolist() == [
        13,
        14,
        15,
    ]  # "d", "æ", "æ" at 11, 14, 17; "dog", "日", "<0xE6>" at 14, 15, 16
    save_file(aligned.to_tensors(), str(tmp_path / "a.safetensors"))
    again = AlignedText.from_tensors(load_file(str(tmp_path / "a.safetensors")))
    assert segments(again, byte_bpe, sp_char, TEXT) == segments(aligned, byte_bpe, sp_char, TEXT)
    with pytest.raises(KdistillError, match="not a fast tokenizer"):
        align_text(TEXT, object(), sp_char)


def test_surfaces_normalise_byte_level_and_sentencepiece_markers(byte_bpe, sp_char):
    bpe, sp = token_surfaces(byte_bpe), token_surfaces(sp_char)
    bpe_id, sp_id = byte_bpe.convert_tokens_to_ids, sp_char.convert_tokens_to_ids
    assert [bpe[bpe_id(t)] for t in ["Ġcat", "Ã", "Ċ", "the"]] == [b" cat", b"\xc3", b"\n", b"the"]
    assert [sp[sp_id(t)] for t in ["▁c", "▁", "<0xF0>", "é", "日"]] == [
        b" c",
        b" ",
        b"\xf0",
        "é".encode(),
        "日".encode(),
    ]
    assert bpe[bpe_id("<s>")] is None and sp[sp_id("</s>")] is None


def test_vocab_map_pairs_tokens_of_equal_surface(byte_bpe, sp_char):
    mapping = build_vocab_map(sp_char, byte_bpe)
    table = mapping.lookup()
    sp_id, bpe_id = sp_char.convert_tokens_to_ids, byte_bpe.convert_tokens_to_ids
    assert table[sp_id("▁c")] == bpe_id("Ġc") and table[sp_id("t")] == bpe_id("t")
    assert table[sp_id("<0xC3>")] == bpe_id("Ã")
    # Both " " (the word marker) and the byte token 0x20 decode to one space: both map to "Ġ".
    assert table[sp_id("▁")] == table[sp_id("<0x20>")] == bpe_id("Ġ")
    # No "Ġt", "he", "Ã©" or "dog" in the byte-level vocabulary; <unk> is special.
    unmapped = ["▁t", "he", "é", "dog", "<unk>"]
    assert [int(table[sp_id(t)]) for t in unmapped] == [-1] * 5
    assert table[sp_id("</s>")] == bpe_id("</s>")  # EOS is paired with EOS
    t_surf, s_surf = token_surfaces(sp_char), token_surfaces(byte_bpe)
    for t, s in zip(mapping.teacher_ids.tolist(), mapping.student_ids.tolist()):
        assert t == sp_id("</s>") or t_surf[t] == s_surf[s]
    assert (
        mapped_share_of_ids(torch.tensor([sp_id("▁c"), sp_id("é"), sp_id("t"), sp_id("dog")]), mapping) == 0.5
    )


@pytest.mark.parametrize("loss", ["mapped_kl", "uld"])
def test_aligned_rows_feed_a_cross_vocabulary_loss_that_trains(loss, byte_bpe, sp_char):
    # Teacher = the SentencePiece-style tokenizer with fixed random logits per position, given as a
    # top-8 Sparse signal; student = the byte-level one with free logits per position.
    texts = [TEXT, "the dog é cat"]
    aligned = [align_text(text, sp_char, byte_bpe) for text in texts]
    example, pos_t, pos_s = stack_positions([a.spans for a in aligned])
    vt, vs = len(sp_char), len(byte_bpe)
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(len(a.teacher_ids), vt, generator=g) * 3 for a in aligned]
    student = [torch.zeros(len(a.student_ids), vs, requires_grad=True) for a in aligned]
    signal = Sparse.from_logits(torch.stack([teacher[e][p] for e, p in zip(example, pos_t)]), 8)
    mapping = build_vocab_map(sp_char, byte_bpe)
    optimizer = torch.optim.Adam(student, lr=0.1)
    losses = []
    for _ in range(60):
        rows = torch.stack([student[e][p] for e, p in zip(example, pos_s)])
        if loss == "mapped_kl":
            value = mapped_divergence(rows, signal, mapping, temperature=2.0)
        else:
            value = uld_distance(rows, signal, temperature=2.0, teacher_vocab_size=vt)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    # 10 + 6 segments, less each text's first: the byte-level student has no BOS to predict it from.
    assert example.tolist() == [0] * 9 + [1] * 5
    assert losses[-1] < 0.2 * losses[0], losses[::10]
