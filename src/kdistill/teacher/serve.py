"""`kdistill serve`: the vLLM command of every served teacher of a run (`serving.process` runs them)."""

from __future__ import annotations

from kdistill.config import RunConfig
from kdistill.errors import KdistillError
from kdistill.models.build import teacher_source
from kdistill.models.loading import model_folder
from kdistill.serving.process import local_port, vllm_command


def serve_commands(
    cfg: RunConfig, python: str, memory: float | None = None
) -> list[tuple[str, list[str], str]]:
    """`(name, command, url)` of a server for every served teacher of `cfg` (its first URL, which must
    be on this machine); vLLM reads the teacher's weights as kdistill loads them (a GGUF file through
    kdistill's fp32 conversion)."""
    served = [(name, t) for name, t in cfg.teacher_list() if t.server]
    if not served:
        raise KdistillError("no teacher has `server`: set teacher.server to the URL to serve it at")
    commands = []
    for name, teacher in served:
        url = teacher.server[0]
        folder = model_folder(teacher_source(teacher))
        port, served = local_port(url), teacher.served_name or name
        command = vllm_command(python, folder, served, port, cfg.cache.top_k, memory, cfg.data.max_length)
        commands.append((name, command, url))
    return commands
