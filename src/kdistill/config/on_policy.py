"""Pydantic models of `training.on_policy`: how often the student trains on its own samples, and what
samples them (`engine`: `hf` in the training process, or `vllm`; pydantic picks the variant by `kind`)."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from kdistill.config.strict import Strict


class HfConfig(Strict):
    """`engine: hf`: transformers' generate in the training process, always with the current weights."""

    kind: Literal["hf"] = "hf"
    generation_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows the student samples in one generate call; default every row of the optimizer "
        "step on this process (batch_size x gradient_accumulation_steps). Decoding reads every weight once "
        "per token for all rows of a call, so fewer, larger calls are faster while memory lasts. Scaled "
        "down with micro_batch_size and the out-of-memory back-off. Each row samples from its own seed, so "
        "the samples do not depend on it.",
    )


class VllmConfig(Strict):
    """`engine: vllm`: a vLLM server that kdistill starts on the student's weights (or one already
    running) and updates every `sync_steps` optimizer steps."""

    kind: Literal["vllm"] = "vllm"
    sync_steps: int = Field(
        1,
        ge=1,
        description="Optimizer steps between two updates of the engine's weights (LoRA: a new adapter; "
        "full: a weight reload). Samples between two updates come from weights up to sync_steps - 1 steps "
        "old (logged as gen/staleness).",
    )
    overlap: bool = Field(
        False,
        description="The engine samples the next step's rows while this step trains, so an engine on a "
        "device of its own keeps working. Every step then samples at least one step behind (gen/staleness "
        "from 1 to sync_steps, against 0 to sync_steps - 1 without).",
    )
    python: str = Field(
        ".venv-vllm/bin/python",
        description="The Python of vLLM's own environment (`make vllm-env`) that kdistill starts the "
        "student's engine with.",
    )
    server: str | None = Field(
        None,
        description="URL of a vLLM server that already serves the student (started as docs/on-policy.md "
        "shows, on a machine that reads this run's folder); kdistill then starts none.",
    )
    served_name: str = Field("student", description="The student's model name on the engine.")
    memory: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of the device's memory vLLM reserves (--gpu-memory-utilization; on its CPU "
        "backend, of RAM). Default: none; the engine's KV cache is sized for the rows a step samples "
        "(--kv-cache-memory-bytes: rows x (max_prompt_length + max_new_tokens) x layers x KV heads x "
        "head_dim, keys and values, in whole cache blocks, with a 25 % margin).",
    )
    start_timeout: float = Field(
        900.0, gt=0, description="Seconds the engine may take to start before the run stops."
    )
    devices: str | None = Field(
        None,
        pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$",
        description="Devices of the engine kdistill starts, such as '1', '2,3' or '4-7'. With CUDA: its "
        "CUDA_VISIBLE_DEVICES, tensor-parallel over them; on vLLM's CPU build: CPU cores, its processes "
        "pinned and its threads bound there (VLLM_CPU_OMP_THREADS_BIND). Default: the training process's.",
    )

    @field_validator("server")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port is None:
            raise ValueError(f"expected a URL such as http://127.0.0.1:8100, got {value!r}")
        return value.rstrip("/")

    @field_validator("devices", mode="before")
    @classmethod
    def _device_number(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # devices: 1

    @model_validator(mode="after")
    def _placed(self) -> VllmConfig:
        if self.devices is not None and self.server is not None:
            raise ValueError(
                f"training.on_policy.engine.devices={self.devices!r} places an engine kdistill starts; the "
                f"server at {self.server} runs where it was started"
            )
        return self


Engine = Annotated[HfConfig | VllmConfig, Field(discriminator="kind")]


class OnPolicyConfig(Strict):
    lmbda: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability that an optimizer step trains on responses the student writes itself "
        "(GKD's lambda); otherwise the step trains on the configured responses (data.responses). "
        "0 is off-policy training exactly; 1 is on-policy only.",
    )
    mode: Literal["divergence", "sampled"] = Field(
        "divergence",
        description="Loss on a generated batch: `divergence` applies loss.divergence at every generated "
        "position (alpha weighs it; no CE term); `sampled` uses only the teacher's log-probability of each "
        "sampled token, the reward log p - log q in a policy gradient (what a served teacher can give).",
    )
    max_new_tokens: int = Field(128, gt=0, description="Most tokens the student writes per response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the student's responses.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the tokens of this mass.")
    max_prompt_length: int = Field(
        256, gt=0, description="Prompt tokens kept (the last ones) when the student writes a response."
    )
    engine: Engine = Field(
        default_factory=HfConfig,
        description="What the student samples with, by `kind`: `hf` (transformers' generate in the "
        "training process) or `vllm` (a vLLM server on the student's weights). `engine: hf` or "
        "`engine: vllm` is that kind with its defaults.",
    )

    @field_validator("engine", mode="before")
    @classmethod
    def _kind_alone(cls, value: object) -> object:
        if isinstance(value, str):
            return {"kind": value}  # engine: vllm
        if isinstance(value, dict) and "kind" not in value:
            return {"kind": "hf", **value}  # the default kind, as `engine` left out is
        return value

    @model_validator(mode="after")
    def _engine_used(self) -> OnPolicyConfig:
        if self.engine.kind == "vllm" and self.lmbda == 0:
            raise ValueError(
                "training.on_policy.engine=vllm with lmbda=0: no step generates, so the engine would "
                "never be used; set lmbda > 0 or engine: hf"
            )
        return self
