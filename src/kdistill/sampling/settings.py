"""`training.on_policy` as the plain values the samplers take, and the sampler a run holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdistill.config import RunConfig
from kdistill.sampling.base import InProcess, OnPolicyParts, PassThrough, Sampler
from kdistill.sampling.engine import EngineSettings
from kdistill.sampling.engine_sampler import EngineSampler, OverlapSampler
from kdistill.sampling.generate import Sampling


def sampling_settings(cfg: RunConfig, tokenizer: Any) -> Sampling:
    """`training.on_policy`'s generation settings as plain values (`lmbda` 0: off-policy)."""
    o = cfg.training.on_policy
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
        rows=step_rows(cfg),
    )


def step_rows(cfg: RunConfig) -> int:
    """Rows an optimizer step samples on one training process: batch_size x gradient_accumulation_steps."""
    return cfg.training.batch_size * cfg.training.gradient_accumulation_steps


def build_sampler(
    parts: OnPolicyParts,
    engine: EngineSettings | None,
    *,
    batch_size: int,
    micro: Callable[[], int],
    folder: Path,
    tokenizer: Any,
    processes: Any,
) -> Sampler:
    """The sampler `parts.sampling` and `engine` (None: in process) ask for: a pass-through while
    on-policy training is off, else in process (`batch_size` rows a batch, `micro()` a micro-batch now),
    on the vLLM engine (its files in `folder`), or on that engine a step ahead (`overlap`). `processes`
    is the run's accelerator."""
    if parts.sampling.lmbda == 0:
        return PassThrough()
    if engine is None:
        return InProcess(parts, batch_size, micro)
    kind = OverlapSampler if engine.overlap else EngineSampler
    return kind(parts, engine, folder, tokenizer, processes)
