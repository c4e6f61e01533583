"""The vLLM engine's memory from the plan: a KV cache for the step's rows, not a share of RAM."""

from __future__ import annotations

from transformers import AutoConfig

from kdistill.sampling.engine_memory import (
    ENGINE_PROCESS_BYTES,
    EngineShape,
    engine_bytes,
    kv_cache_bytes,
    shape_of_model,
)

# The quickstart's student: SmolLM2-135M cut to 10 layers (3 KV heads of 64, fp32, a tied head).
SMOLLM2_10 = EngineShape(layers=10, kv_heads=3, head_dim=64, params=10 * 3_540_096 + 2 * 49152 * 576)


def test_the_kv_cache_holds_every_row_in_whole_blocks_with_a_margin() -> None:
    # 4 rows of 256 + 64 tokens: 3 blocks of 128 each, 12 blocks, 15 with the 25 % margin; a block
    # holds keys and values of 128 tokens x 10 layers x 3 heads x 64 x 4 bytes = 1,966,080 bytes
    assert kv_cache_bytes(SMOLLM2_10, rows=4, length=320) == 15 * 1_966_080 == 29_491_200
    # 16 rows: 48 blocks, 60 with the margin; about 113 MiB against vLLM's default share of RAM
    assert kv_cache_bytes(SMOLLM2_10, rows=16, length=320) == 60 * 1_966_080
    assert kv_cache_bytes(SMOLLM2_10, rows=1, length=128) == 2 * 1_966_080  # 1.25 blocks round up
    # CUDA's 16-token blocks: 20 blocks a row
    assert kv_cache_bytes(SMOLLM2_10, rows=4, length=320, block=16) == 100 * 2 * 16 * 10 * 3 * 64 * 4


def test_the_engine_counts_its_processes_weights_and_cache() -> None:
    size = engine_bytes(SMOLLM2_10, rows=4, length=320)
    assert size == {
        "processes": 2 * ENGINE_PROCESS_BYTES,
        "weights": (35_400_960 + 56_623_104) * 4,  # the layers, the embedding and the untied head
        "KV cache": 29_491_200,
    }


def test_the_shape_comes_from_the_model_config() -> None:
    config = AutoConfig.for_model(
        "llama", num_hidden_layers=10, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
        vocab_size=49152, intermediate_size=1536,
    )  # fmt: skip
    shape = shape_of_model(config, params=1000, tied=True, dtype_bytes=4)
    assert shape == EngineShape(10, 3, 64, 1000 + 49152 * 576, 4)
    assert shape_of_model(config, params=1000, tied=False, dtype_bytes=2).params == 1000
