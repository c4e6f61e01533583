"""`kdistill bench`: parameters, size on disk, peak memory and speed of teacher and student.

Each model is measured in a fresh process (`python -m kdistill.eval.bench SPEC OUT`), one after
the other, so that its peak memory is its own: GPU memory allocated on CUDA, the process's maximum
resident set on CPU (which includes Python and torch themselves, as a user's process would).

- prompt tokens/s: a forward pass over `batch_size x prompt_tokens` random token ids, repeated;
- generation tokens/s: greedy decoding of `new_tokens` tokens after that prompt with the KV cache
  (end-of-sequence suppressed so every run decodes the same count), minus the prompt's own time;
- size on disk: the weights written with `save_pretrained` (safetensors) in the dtype they run in.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kdistill.config import load_config
from kdistill.errors import KdistillError
from kdistill.eval.load import load_bench_teacher, run_folder
from kdistill.files import RunFiles
from kdistill.models.compact import expanded_weights
from kdistill.models.parts import default_device, for_inference


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 256
    new_tokens: int = 64
    batch_size: int = 1
    repeats: int = 3


def load_bench_specs(target: str, teacher: str | None, scratch: Path) -> dict[str, dict[str, Any]]:
    """What each child process loads: `{"teacher": {"teacher": TeacherConfig}, "student": {"folder": ...}}`.

    A LoRA student is merged into its base first (here, in `scratch`), so the child measures the model
    a user would deploy and not the base model used to rebuild it.
    """
    from kdistill.config import TeacherConfig

    run_dir = run_folder(target)
    cfg = load_config(run_dir / RunFiles.CONFIG) if run_dir else None
    teacher_cfg = TeacherConfig(model=teacher) if teacher else (cfg.teacher if cfg else None)
    specs: dict[str, dict[str, Any]] = {}
    if teacher_cfg is not None:
        specs["teacher"] = {"teacher": teacher_cfg.model_dump(mode="json")}
    folder = str(run_dir or target)
    if run_dir is not None and not (run_dir / "config.json").is_file():
        folder = str(_merged_copy(run_dir, cfg, scratch))
    specs["student"] = {"folder": folder}
    return specs


def _merged_copy(run_dir: Path, cfg: Any, scratch: Path) -> Path:
    if (run_dir / "merged" / "config.json").is_file():
        return run_dir / "merged"
    from kdistill.eval.load import load_run_student

    model = load_run_student(run_dir, cfg, None, torch.device("cpu"))
    model.save_pretrained(scratch / "merged")
    return scratch / "merged"


def bench(target: str, teacher: str | None, settings: BenchSettings) -> dict[str, Any]:
    """Measure teacher and student, each in its own process; returns the `bench.json` dict."""
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-") as scratch:
        specs = load_bench_specs(target, teacher, Path(scratch))
        measured = {
            role: _measure_in_child(role, spec, settings, Path(scratch)) for role, spec in specs.items()
        }
    result = {
        "student": target,
        "teacher": specs.get("teacher", {}).get("teacher", {}).get("model"),
        "settings": asdict(settings),
        "machine": machine(),
        **measured,
    }
    if "teacher" in measured:
        result["ratios"] = ratios(measured["student"], measured["teacher"])
    return result


def ratios(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
    """Student over teacher for every measurement (below 1 = smaller; above 1 = faster for tok/s)."""
    return {k: student[k] / teacher[k] for k in MEASURES if teacher.get(k)}


CHILD_ERROR = "kdistill: error: "  # how a measuring child process reports a KdistillError
MEASURES = ("parameters", "disk_bytes", "peak_memory_bytes", "prompt_tok_s", "generate_tok_s")


def machine() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _measure_in_child(
    role: str, spec: dict[str, Any], settings: BenchSettings, scratch: Path
) -> dict[str, Any]:
    out = scratch / f"measure-{role}.json"
    payload = json.dumps({"spec": spec, "settings": asdict(settings)})
    command = [sys.executable, "-m", "kdistill.eval.bench", payload, str(out)]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0 or not out.is_file():
        name = spec.get("folder") or spec["teacher"]["model"]
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        said = next((line for line in reversed(lines) if line.startswith(CHILD_ERROR)), None)
        if said is not None:  # the child's own one-line message: what the user can fix
            raise KdistillError(f"bench: the {role} {name}: {said.removeprefix(CHILD_ERROR)}")
        detail = "\n".join(lines[-15:]) if os.environ.get("KDISTILL_DEBUG") else lines[-1]
        raise KdistillError(f"bench: measuring the {role} {name} failed (exit {done.returncode}): {detail}")
    return json.loads(out.read_text())


def _load(spec: dict[str, Any], device: torch.device) -> Any:
    from kdistill.config import TeacherConfig

    if "teacher" in spec:
        return load_bench_teacher(TeacherConfig.model_validate(spec["teacher"]), device)
    from kdistill.models.build import pick_dtype
    from kdistill.models.loading import load_model, resolve

    return for_inference(
        load_model(resolve(spec["folder"]), pick_dtype("auto", device), device), generate=True
    )


def measure(spec: dict[str, Any], settings: BenchSettings) -> dict[str, Any]:
    """Load one model and measure it (run in a fresh process by `bench`)."""
    device = default_device()
    started = time.perf_counter()
    model = _load(spec, device)
    loaded = time.perf_counter() - started
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    shape = (settings.batch_size, settings.prompt_tokens)
    ids = torch.randint(3, vocab - 1, shape, generator=generator).to(device)
    # Only the last position's logits where the model allows it, as generation's own prompt pass does.
    keep = {"logits_to_keep": 1} if model._supports_logits_to_keep() else {}
    prompt_s = _timed(lambda: model(input_ids=ids, use_cache=False, **keep), settings.repeats, device)
    generate_s = _timed(lambda: _generate(model, ids, settings.new_tokens), settings.repeats, device)
    result = {
        "parameters": float(sum(p.numel() for p in model.parameters())),
        "peak_memory_bytes": float(_peak_memory(device)),
        "prompt_tok_s": settings.batch_size * settings.prompt_tokens / prompt_s,
        "generate_tok_s": settings.batch_size * settings.new_tokens / max(generate_s - prompt_s, 1e-9),
        "load_s": loaded,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    with tempfile.TemporaryDirectory(prefix="kdistill-size-") as folder:
        model.save_pretrained(folder)  # after the memory reading: saving may allocate buffers of its own
        result["disk_bytes"] = float(sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors")))
    return result


@torch.inference_mode()
def _timed(work: Any, repeats: int, device: torch.device) -> float:
    """Median seconds of `work()` over `repeats` runs, after one warm-up run."""
    work()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _generate(model: Any, ids: torch.Tensor, new_tokens: int) -> Any:
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    with expanded_weights(model):  # a compact teacher expands once, not once a token
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes


if __name__ == "__main__":
    # The child process: `python -m kdistill.eval.bench SPEC_JSON OUT_PATH`.
    job = json.loads(sys.argv[1])
    try:
        numbers = measure(job["spec"], BenchSettings(**job["settings"]))
    except KdistillError as err:  # one line for the parent to relay, not a traceback
        print(f"{CHILD_ERROR}{err}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    Path(sys.argv[2]).write_text(json.dumps(numbers))
