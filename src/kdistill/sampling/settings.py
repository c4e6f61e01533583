"""`training.on_policy` as the plain values the samplers take."""

from __future__ import annotations

from typing import Any

from kdistill.config import RunConfig
from kdistill.sampling.engine import EngineSettings
from kdistill.sampling.generate import Sampling


def sampling_settings(cfg: RunConfig, tokenizer: Any) -> Sampling | None:
    """`training.on_policy`'s generation settings as plain values; None while it is off."""
    o = cfg.training.on_policy
    if o.lmbda == 0:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Sampling(
        o.lmbda, o.max_new_tokens, o.temperature, o.top_p, o.max_prompt_length, tokenizer.eos_token_id, pad,
        generation_batch_size(cfg),
    )  # fmt: skip


def generation_batch_size(cfg: RunConfig) -> int:
    """Rows per generate call at the configured micro-batch: `training.on_policy.generation_batch_size`,
    by default the step's rows on the process (batch_size x gradient_accumulation_steps)."""
    t = cfg.training
    return t.on_policy.generation_batch_size or t.batch_size * t.gradient_accumulation_steps


def engine_settings(cfg: RunConfig) -> EngineSettings | None:
    """`training.on_policy.vllm` as plain values when the student samples on vLLM; None otherwise."""
    o = cfg.training.on_policy
    if o.lmbda == 0 or o.engine != "vllm":
        return None
    v = o.vllm
    length = o.max_prompt_length + o.max_new_tokens  # the longest sequence the engine holds
    return EngineSettings(
        v.python, v.server, v.served_name, v.memory, v.start_timeout, o.sync_steps, length, o.overlap,
        v.devices,
    )  # fmt: skip
