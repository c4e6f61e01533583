"""The on-policy row of `vs_peers.py --on-policy`: kdistill on-policy (lmbda 1; engine hf, and engine
vllm) against TRL's GKD trainer with lmbda 1 and TRL's DistillationTrainer (always on-policy, a chunked
loss), both sampling with `transformers.generate`, on the same work.

`--cores 2` gives every trainer both cores instead of one: TRL and kdistill's engine hf run 2 torch
threads on cores 0 and 1; kdistill's engine vllm arms train with 1 thread on core 0 and give the
engine core 1 (`engine.devices: "1"`: its processes pinned there, its threads bound), synced every
step, without and with `overlap` (the next step's rows sampled while this step trains). With one core
the vLLM arms are synced every step and every 2 steps.

The same prepared teacher, student and rows as `vs_peers.py` (the prompts are each row's tokens before
its response; DistillationTrainer takes them as text, which it tokenizes back to the same ids); every
step trains only on responses the student samples itself: at most `max_new_tokens`, temperature 1,
top_p 1, no top-k, EOS included; forward KL (TRL's beta 0), T = 1, alpha 1, the same steps, AdamW and
schedule. Each layout runs every arm: `same`, the setup's micro-batch x accumulation for all; `best`,
the step's rows in one micro-batch (TRL's best micro-batch while memory allows). kdistill samples all
the step's rows in one call in both; TRL's GKD trainer one micro-batch a call; DistillationTrainer the
whole step. Accounting (`peer_accounting.py`): the same warm-up steps excluded and the same steps timed
for every arm, trained tokens and rows ending at EOS counted from the labels each arm trains, peak
memory the summed PSS of the worker and every process it starts (the vLLM engine's included). The
vLLM engine's start, before the first step, is reported apart.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from peer_accounting import Ledger, summary, table

ARMS = {  # --cores: the arms; the last is the peer every ratio is to
    1: ("kdistill-hf", "kdistill-vllm", "kdistill-vllm-sync2", "trl-distillation", "trl-gkd"),
    2: ("kdistill-hf", "kdistill-vllm", "kdistill-vllm-overlap", "trl-distillation", "trl-gkd"),
}
PEER = "trl-gkd"
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


def place(spec: dict, engine: str) -> None:
    """This worker's cores and threads under `--cores 2` (see the module's docstring)."""
    if spec.get("cores", 1) == 1:
        return  # the invocation's own (taskset, OMP_NUM_THREADS, VLLM_CPU_OMP_THREADS_BIND)
    own = {0} if engine == "vllm" else {0, 1}  # the engine gets core 1 (`engine.devices`)
    os.sched_setaffinity(0, own)
    torch.set_num_threads(len(own))


def _eos(spec: dict) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec["work"]) / "teacher").eos_token_id


def _training(spec: dict) -> dict:
    layout = spec["layout"]
    return {"max_steps": spec["steps"], "batch_size": layout["batch"], "warmup_steps": 0,
            "gradient_accumulation_steps": layout["accum"], "learning_rate": spec["lr"], "seed": 0,
            "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": spec["steps"],
            "mixed_precision": "no"}  # fmt: skip


def run_kdistill(spec: dict, out: Path, engine: str, sync_steps: int = 1, overlap: bool = False) -> dict:
    """`kdistill train` with lmbda 1 on `engine` (vllm: synced every `sync_steps`, `overlap`)."""
    import yaml

    import kdistill.sampling.engine as engines
    from kdistill.cli import main
    from kdistill.sampling.base import OnPolicy

    place(spec, engine)
    ledger, eos, started = Ledger(), _eos(spec), {}
    rows = OnPolicy.rows

    def counted(self, window, step):  # the rows each step trains on
        given = rows(self, window, step)
        for batch in given.window:
            ledger.rows(batch["labels"], eos)
        return given

    OnPolicy.rows = counted
    work = Path(spec["work"])
    on_policy = {"lmbda": 1.0, "max_new_tokens": spec["max_new_tokens"], "temperature": 1.0, "top_p": 1.0,
                 "max_prompt_length": spec["max_length"], "engine": {"kind": engine}}  # fmt: skip
    if engine == "vllm":
        python = spec.get("vllm_python", str(VLLM_PYTHON))
        on_policy["engine"].update(python=python, sync_steps=sync_steps, overlap=overlap)  # KV cache sized
        if spec.get("cores", 1) == 2:
            on_policy["engine"]["devices"] = "1"
        enter = engines.VllmEngine.__enter__

        def timed_enter(self):  # the engine's start, before the first step
            began = time.perf_counter()
            result = enter(self)
            started["engine_start_s"] = time.perf_counter() - began
            return result

        engines.VllmEngine.__enter__ = timed_enter
    config = {
        "teacher": {"model": str(work / "teacher")},
        "student": {"model": str(work / "student"), "finetune": "full"},
        "data": {"source": str(work / "train.jsonl"), "validation_source": str(work / "validation.jsonl"),
                 "max_length": spec["max_length"]},
        "loss": {"alpha": 1.0, "temperature": 1.0, "divergence": "forward_kl"},
        "training": {**_training(spec), "on_policy": on_policy},
        "output_dir": str(out / "run"),
    }  # fmt: skip
    (out / "run.yaml").write_text(yaml.safe_dump(config))
    if main(["train", str(out / "run.yaml"), "--overwrite"]) != 0:
        sys.exit("kdistill train failed")
    return {**ledger.result(spec["warmup"], spec["timed"]), **started}


def _prompts(spec: dict) -> list[list[int]]:
    """Each prepared row's tokens before its response."""
    rows = json.loads((Path(spec["work"]) / "tokens.json").read_text())
    return [r["input_ids"][: next(i for i, x in enumerate(r["labels"]) if x != -100)] for r in rows]


def _trl_args(spec: dict, out: Path) -> dict:
    layout = spec["layout"]
    return dict(
        output_dir=str(out / "run"), per_device_train_batch_size=layout["batch"], seed=0,
        gradient_accumulation_steps=layout["accum"], learning_rate=spec["lr"], max_steps=spec["steps"],
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        beta=0.0, temperature=1.0, bf16=False, gradient_checkpointing=False, use_cpu=True,
        logging_steps=spec["steps"], save_strategy="no", report_to="none", disable_tqdm=True,
    )  # fmt: skip


def _models(spec: dict) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(spec["work"])
    tokenizer = AutoTokenizer.from_pretrained(work / "teacher")
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    return tokenizer, student, teacher


def run_trl(spec: dict, out: Path) -> dict:
    """TRL's GKDTrainer with lmbda 1 (beta 0) on the same prompts."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from vs_peers import trl_row

    place(spec, "trl")
    ledger, eos = Ledger(), _eos(spec)
    data = Dataset.from_list(
        [trl_row(r) for r in json.loads((Path(spec["work"]) / "tokens.json").read_text())]
    )

    class Counted(GKDTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            ledger.rows(inputs["labels"], eos)
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = GKDConfig(**_trl_args(spec, out), lmbda=1.0, max_new_tokens=spec["max_new_tokens"],
                     max_length=spec["max_length"])  # fmt: skip
    tokenizer, student, teacher = _models(spec)
    trainer = Counted(model=student, teacher_model=teacher, args=args, train_dataset=data,
                      processing_class=tokenizer)  # fmt: skip
    trainer.train()
    return ledger.result(spec["warmup"], spec["timed"])


def run_trl_distillation(spec: dict, out: Path) -> dict:
    """TRL's DistillationTrainer (on-policy, its chunked loss, beta 0) on the same prompts, as text."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    place(spec, "trl")
    ledger, eos = Ledger(), _eos(spec)
    tokenizer, student, teacher = _models(spec)
    texts = [tokenizer.decode(p) for p in _prompts(spec)]
    data = Dataset.from_list([{"prompt": t} for t in texts])

    class Counted(DistillationTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            ids, mask = inputs["completion_ids"], inputs["completion_mask"]
            ledger.rows(ids.masked_fill(mask == 0, -100), eos)
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = DistillationConfig(**_trl_args(spec, out), max_completion_length=spec["max_new_tokens"], top_p=1.0,
                              top_k=0, shuffle_dataset=False)  # fmt: skip
    trainer = Counted(model=student, teacher_model=teacher, args=args, train_dataset=data,
                      processing_class=tokenizer)  # fmt: skip
    trainer.train()
    return ledger.result(spec["warmup"], spec["timed"])


JOBS = {
    "kdistill-hf": lambda spec, out: run_kdistill(spec, out, "hf"),
    "kdistill-vllm": lambda spec, out: run_kdistill(spec, out, "vllm"),
    "kdistill-vllm-sync2": lambda spec, out: run_kdistill(spec, out, "vllm", 2),
    "kdistill-vllm-overlap": lambda spec, out: run_kdistill(spec, out, "vllm", 1, True),
    "trl-gkd": run_trl,
    "trl-distillation": run_trl_distillation,
}


def layouts(spec: dict, best: int | None) -> dict[str, dict]:
    """`same`: the setup's micro-batch x accumulation for every arm; `best`: the step's rows in one
    micro-batch (or `best` rows a micro-batch)."""
    rows = spec["batch"] * spec["accum"]
    micro = best or rows
    return {
        f"same: micro-batch {spec['batch']} x accumulation {spec['accum']}": {"batch": spec["batch"],
                                                                             "accum": spec["accum"]},
        f"best: micro-batch {micro} x accumulation {rows // micro} (TRL's best)": {"batch": micro,
                                                                                  "accum": rows // micro},
    }  # fmt: skip


def compare(spec: dict, spec_path: Path, work: Path, reps: int, spawn, arms: tuple[str, ...]) -> dict:
    """Per layout, `reps` runs of each arm in rotating order; medians, ratios to TRL's GKD trainer."""
    result = {}
    for label, layout in layouts(spec, spec.get("best_batch")).items():
        spec_path.write_text(json.dumps({**spec, "layout": layout}))
        runs = []
        for rep in range(reps):
            turn = rep % len(arms)
            for arm in arms[turn:] + arms[:turn]:
                folder = work / f"on-policy-{arm}-{layout['batch']}x{layout['accum']}-{rep}"
                got = spawn(f"on-policy-{arm}", spec_path, folder)
                runs.append({"arm": arm, "rep": rep, **got})
        result[label] = {"runs": runs, **summary(runs, arms, PEER)}
    return result


def print_table(result: dict) -> None:
    print(
        "peak memory: the summed PSS of each arm's processes (the vLLM engine's included), sampled each "
        "second"
    )
    for label, part in result.items():
        print(f"\n{label}")
        print("\n".join(table(part["runs"], part, PEER)))
