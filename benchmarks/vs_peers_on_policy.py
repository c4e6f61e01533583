"""The on-policy row of `vs_peers.py --on-policy`: kdistill on-policy (lmbda 1; engine hf, and engine
vllm synced every step and every 2 steps) against TRL's GKD trainer with lmbda 1, which samples with
`transformers.generate`, on the same work.

`--cores 2` gives every trainer both cores instead of one: TRL and kdistill's engine hf run 2 torch
threads on cores 0 and 1; kdistill's engine vllm arms train with 1 thread on core 0 and give the
engine core 1 (`engine.devices: "1"`: its processes pinned there, its threads bound), the engine on a
device of its own, synced every step, without and with `overlap` (the next step's rows sampled while
this step trains).

The same prepared teacher, student and rows as `vs_peers.py` (the prompts are each row's tokens before
its response); every step trains only on responses the student samples itself: at most
`max_new_tokens`, temperature 1, top_p 1, no top-k, EOS included; forward KL (TRL's beta 0), T = 1,
alpha 1, the same steps, batch, accumulation, AdamW and schedule. The samples differ between trainers
(each its own random stream), so the work is compared per trained token: trained tokens/s is the
generated tokens that were trained, over the training loop's time (generation included). kdistill's
loop time comes from metrics.jsonl; the vLLM engine's start (before the loop) is reported apart. Peak
memory is the worker process's; for engine vllm the engine's processes' peak resident memory (the sum
of their VmHWM, shared pages counted in each: an upper bound) is added.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

TRAINERS = {  # --cores: the arms
    1: ("kdistill-hf", "kdistill-vllm", "kdistill-vllm-sync2", "trl"),
    2: ("kdistill-hf", "kdistill-vllm", "kdistill-vllm-overlap", "trl"),
}
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


def place(spec: dict, engine: str) -> None:
    """This worker's cores and threads under `--cores 2` (see the module's docstring)."""
    if spec.get("cores", 1) == 1:
        return  # the invocation's own (taskset, OMP_NUM_THREADS, VLLM_CPU_OMP_THREADS_BIND)
    own = {0} if engine == "vllm" else {0, 1}  # the engine gets core 1 (`engine.devices`)
    os.sched_setaffinity(0, own)
    torch.set_num_threads(len(own))


def run_kdistill(spec: dict, out: Path, engine: str, sync_steps: int = 1, overlap: bool = False) -> dict:
    """`kdistill train` with lmbda 1 on `engine` (vllm: synced every `sync_steps`, `overlap`); the
    training loop's time, trained tokens and the time steps spent sampling."""
    import yaml

    import kdistill.run.loop as loop
    import kdistill.sampling.engine as engines
    from kdistill.cli import main

    place(spec, engine)

    work, peaks, started = Path(spec["work"]), {}, {}
    on_policy = {"lmbda": 1.0, "max_new_tokens": spec["max_new_tokens"], "temperature": 1.0, "top_p": 1.0,
                 "max_prompt_length": spec["max_length"], "engine": {"kind": engine}}  # fmt: skip
    if engine == "vllm":
        # 10 % of RAM (2.4 GB here): the weights, the profiling run and a KV cache of about 0.9 GB, which
        # holds the run's few sequences many times over (vLLM refused 5 %).
        python = spec.get("vllm_python", str(VLLM_PYTHON))
        on_policy["engine"].update(python=python, memory=0.1, sync_steps=sync_steps, overlap=overlap)
        if spec.get("cores", 1) == 2:
            on_policy["engine"]["devices"] = "1"
        enter, leave = engines.VllmEngine.__enter__, engines.VllmEngine.__exit__

        def timed_enter(self):  # the engine's start, outside the loop's window
            began = time.perf_counter()
            result = enter(self)
            started["engine_start_s"] = time.perf_counter() - began
            return result

        def measured_exit(self, *exc):  # the engine's peak memory, read before it stops
            if self.server is not None and self.server.process.poll() is None:
                peaks["engine_peak_rss_mib"] = group_peak_mib(self.server.process.pid)
            return leave(self, *exc)

        engines.VllmEngine.__enter__, engines.VllmEngine.__exit__ = timed_enter, measured_exit
    config = {
        "teacher": {"model": str(work / "teacher")},
        "student": {"model": str(work / "student"), "finetune": "full"},
        "data": {"source": str(work / "train.jsonl"), "validation_source": str(work / "validation.jsonl"),
                 "max_length": spec["max_length"]},
        "loss": {"alpha": 1.0, "temperature": 1.0, "divergence": "forward_kl"},
        "training": {"max_steps": spec["steps"], "batch_size": spec["batch"],
                     "gradient_accumulation_steps": spec["accum"], "learning_rate": spec["lr"],
                     "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                     "logging_steps": spec["steps"], "mixed_precision": "no", "seed": 0,
                     "on_policy": on_policy},
        "output_dir": str(out / "run"),
    }  # fmt: skip
    steps = loop._steps

    def timed_steps(*args, **kwargs):  # the training loop, first step to last
        began = time.perf_counter()
        result = steps(*args, **kwargs)
        started["train_s"] = time.perf_counter() - began
        return result

    loop._steps = timed_steps
    (out / "run.yaml").write_text(yaml.safe_dump(config))
    if main(["train", str(out / "run.yaml"), "--overwrite"]) != 0:
        sys.exit("kdistill train failed")
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    r = [r for r in map(json.loads, lines) if "gen/rows" in r][-1]
    generated = r["gen/mean_length"] * r["gen/rows"]
    waited = generated / r["gen/tokens_per_s"] * (1 - r.get("gen/hidden_share", 0.0))  # steps' own
    return {"trained": r["trained_tokens"], "gen_s": waited, "generated": generated, "loss": r["loss/kd"],
            "hidden_share": r.get("gen/hidden_share", 0.0), **peaks, **started}  # fmt: skip


def run_trl(spec: dict, out: Path) -> dict:
    """TRL's GKDTrainer with lmbda 1 (beta 0) on the same prompts, timed from train begin to end."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from vs_peers import trl_row

    place(spec, "trl")
    work = Path(spec["work"])
    data = Dataset.from_list([trl_row(r) for r in json.loads((work / "tokens.json").read_text())])
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            clock["begin"] = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            clock["end"] = time.perf_counter()

    class Counted(GKDTrainer):  # the generated tokens it trains, and the time it spends sampling
        trained, gen_s = 0, 0.0

        def generate_on_policy_outputs(self, *args, **kwargs):
            began = time.perf_counter()
            result = GKDTrainer.generate_on_policy_outputs(*args, **kwargs)
            Counted.gen_s += time.perf_counter() - began
            return result

        def compute_loss(self, model, inputs, *args, **kwargs):
            Counted.trained += int((inputs["labels"] != -100).sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = GKDConfig(
        output_dir=str(out / "run"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["accum"], learning_rate=spec["lr"], max_steps=spec["steps"],
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        lmbda=1.0, beta=0.0, temperature=1.0, max_new_tokens=spec["max_new_tokens"],
        max_length=spec["max_length"], bf16=False, gradient_checkpointing=False, use_cpu=True,
        logging_steps=spec["steps"], save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(work / "teacher")
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    trainer = Counted(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.add_callback(Clock())
    result = trainer.train()
    return {"train_s": clock["end"] - clock["begin"], "trained": Counted.trained, "gen_s": Counted.gen_s,
            "loss": result.training_loss}  # fmt: skip


def group_peak_mib(pgid: int) -> float:
    """The summed VmHWM of every process in process group `pgid`, in MiB."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        if "VmHWM:" in status:
            total += int(status.split("VmHWM:")[1].split()[0])
    return total / 1024


def compare(spec_path: Path, work: Path, reps: int, spawn) -> dict:
    """`reps` runs of each trainer, in rotating order; medians and ratios against TRL."""
    runs, trainers = [], TRAINERS[json.loads(spec_path.read_text()).get("cores", 1)]
    for rep in range(reps):
        turn = rep % len(trainers)
        order = trainers[turn:] + trainers[:turn]
        for name in order:
            result = spawn(f"on-policy-{name}", spec_path, work / f"on-policy-{name}-{rep}")
            peak = result["peak_rss_mib"] + result.get("engine_peak_rss_mib", 0.0)
            runs.append({"trainer": name, "rep": rep, **result, "total_peak_rss_mib": peak,
                         "trained_tokens_per_s": result["trained"] / result["train_s"]})  # fmt: skip
    medians = {
        name: {
            k: statistics.median(r[k] for r in runs if r["trainer"] == name)
            for k in ("trained_tokens_per_s", "train_s", "gen_s", "total_peak_rss_mib", "trained")
        }
        for name in trainers
    }
    trl = medians["trl"]
    ratios = {
        name: {"tokens_per_s": m["trained_tokens_per_s"] / trl["trained_tokens_per_s"],
               "peak_rss": m["total_peak_rss_mib"] / trl["total_peak_rss_mib"]}
        for name, m in medians.items()
    }  # fmt: skip
    return {"runs": runs, "medians": medians, "ratios_to_trl": ratios}


def print_table(result: dict) -> None:
    print("| trainer | rep | trained tokens | train s | of it sampling s | trained tokens/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        print(
            f"| {r['trainer']} | {r['rep']} | {r['trained']:.0f} | {r['train_s']:.1f} | {r['gen_s']:.1f} | "
            f"{r['trained_tokens_per_s']:.1f} | {r['total_peak_rss_mib']:.0f} |"
        )
    for name, ratio in result["ratios_to_trl"].items():
        m = result["medians"][name]
        print(
            f"median {name}: {m['trained_tokens_per_s']:.1f} trained tokens/s "
            f"({ratio['tokens_per_s']:.2f}x TRL), "
            f"{m['total_peak_rss_mib']:.0f} MiB peak ({ratio['peak_rss']:.2f}x TRL)"
        )
