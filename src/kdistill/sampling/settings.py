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
        lmbda=o.lmbda,
        max_new_tokens=o.max_new_tokens,
        temperature=o.temperature,
        top_p=o.top_p,
        max_prompt_length=o.max_prompt_length,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        generation_batch_size=generation_batch_size(cfg),
    )


def generation_batch_size(cfg: RunConfig) -> int:
    """Rows per generate call at the configured micro-batch: `training.on_policy.engine`'s
    `generation_batch_size` (engine hf), by default the step's rows on the process (batch_size x
    gradient_accumulation_steps)."""
    t = cfg.training
    engine = t.on_policy.engine
    given = engine.generation_batch_size if engine.kind == "hf" else None
    return given or t.batch_size * t.gradient_accumulation_steps


def engine_settings(cfg: RunConfig) -> EngineSettings | None:
    """`training.on_policy.engine` as plain values when the student samples on vLLM; None otherwise."""
    o = cfg.training.on_policy
    e = o.engine
    if o.lmbda == 0 or e.kind != "vllm":
        return None
    return EngineSettings(
        python=e.python,
        server=e.server,
        served_name=e.served_name,
        memory=e.memory,
        start_timeout=e.start_timeout,
        sync_steps=e.sync_steps,
        max_model_len=o.max_prompt_length + o.max_new_tokens,  # the longest sequence the engine holds
        overlap=e.overlap,
        devices=e.devices,
    )
