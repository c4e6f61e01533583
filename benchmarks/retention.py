"""Which way of training keeps the most of the teacher at equal wall-clock: the arms of issue 26.

    python benchmarks/retention.py                          # every arm, 15 minutes each, then nothing else
    python benchmarks/retention.py --arms finetune,kd_live  # a subset; the others' saved results are kept
    python benchmarks/retention.py --continue-best          # the best saved arm on to 30 and 60 minutes
    python benchmarks/retention.py --continue-best --continue kd_live  # that arm, whatever the others
    python benchmarks/retention.py --table                  # print the saved results only
    python benchmarks/retention.py --held-out kd_live       # add standard errors to a saved arm

`configs/retention.yaml` is the recipe: SmolLM2-135M-Instruct teaching a student pruned by importance to
47 % of its parameters, on the Dolly training rows. The student is pruned once (`kdistill prune`, not
counted) and every arm starts from that same folder, with the same data, loss settings and seed, and
the same wall-clock budget (`--minutes`), the teacher's cost included:

- `finetune`: fine-tuning alone (`loss.alpha: 0`: the teacher never runs in a step);
- `kd_live`: off-policy KD, the teacher run live at every step;
- `kd_cache`: off-policy KD from a teacher cache over the first `--cache-rows` training rows; the time
  `kdistill cache` takes (the teacher's load included) is spent from the arm's budget, and it trains
  on those rows for the minutes left, epoch after epoch;
- `onpolicy_0.5`, `onpolicy_1`: `training.on_policy.lmbda` 0.5 and 1 (generation is inside the steps);
- `seqkd`: sequence-level KD (`data.responses: teacher`) on the first `--seqkd-rows` rows; the time the
  teacher takes to write their responses is spent from the arm's budget.

The budget reaches `kdistill train` as `training.max_minutes` (docs/config.md, "A time budget"). Each
arm is then evaluated through `kdistill eval` on `dolly-validation.jsonl` (held-out perplexity, KL,
top-1, ROUGE-L of greedy answers, the teacher's NLL of them, their length and repeated 4-grams) and on
every benchmark of `../shared/data/eval` (at most `--limit` items a task, MMLU sampled across its
subjects; the teacher is measured once and its scores reused with `--teacher-scores`). Each arm's
result is written to `--out/ARM.json` as soon as it is done. `--continue-best` resumes the arm with the
lowest held-out KL (or `--continue ARM`) to 30 and then 60 minutes (`--resume` with a larger
`training.max_minutes`; the cosine then restarts from the share of the new budget spent, so each point
ends annealed) and evaluates it at each, with `kdistill bench` beside it for decode speed; a saved
curve goes on from its last point while the run folder is still there. Held-out
figures and the mean retention carry their standard errors (`± ...` in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kdistill.eval.retention import retention

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RECIPE = ROOT / "configs" / "retention.yaml"
ARMS = ("finetune", "kd_live", "kd_cache", "onpolicy_0.5", "onpolicy_1", "seqkd")
ON_POLICY = {"max_new_tokens": 64, "temperature": 1.0, "max_prompt_length": 192}


def arm_changes(arm: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """What each arm changes in the recipe."""
    return {
        "finetune": {"loss": {"alpha": 0.0}},
        "kd_live": {},
        "kd_cache": {
            "teacher": {"cache": str(work / "teacher-cache")},
            "data": {"max_rows": args.cache_rows + 64},  # + the 64 held out by validation_size
            "training": {"num_epochs": 1000.0},  # the budget stops it
        },
        "onpolicy_0.5": {"training": {"on_policy": {**ON_POLICY, "lmbda": 0.5}}},
        "onpolicy_1": {"training": {"on_policy": {**ON_POLICY, "lmbda": 1.0}}},
        "seqkd": {
            "data": {"responses": "teacher", "max_rows": args.seqkd_rows + 64,
                     "generation": {"max_new_tokens": args.seqkd_tokens}},
            "training": {"num_epochs": 1000.0},
        },
    }[arm]  # fmt: skip


def merged(config: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    for key, value in changes.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def kdistill(*argv: str, log: Path) -> float:
    """`kdistill ARGV` in a fresh process, its output in `log`; returns its wall seconds."""
    started = time.perf_counter()
    with open(log, "a") as handle:
        command = [sys.executable, "-m", "kdistill", *argv]
        code = subprocess.call(command, stdout=handle, stderr=handle, cwd=ROOT)  # the recipe's paths
    if code != 0:
        raise SystemExit(f"kdistill {' '.join(argv)} failed ({log}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def pruned_student(recipe: Path, work: Path) -> Path:
    """The common start: the recipe's student, pruned once (not counted in any budget)."""
    folder = work / "student"
    if not (folder / "config.json").is_file():
        print(f"pruning the student into {folder} (once) ...", flush=True)
        kdistill("prune", str(recipe), "--output", str(folder), log=work / "prune.log")
    return folder


def teacher_responses(config: Path) -> float:
    """Seconds the teacher takes to write the responses of `config`'s training rows (cached on disk,
    where the `kdistill train` that follows finds them); the teacher's load is not counted."""
    import torch

    from kdistill.config import load_config
    from kdistill.eval.load import load_bench_teacher
    from kdistill.models.loading import load_tokenizer, resolve
    from kdistill.teacher.responses import load_data

    cfg = load_config(config)
    teacher = load_bench_teacher(cfg.teacher, torch.device("cpu"))
    tokenizer = load_tokenizer(resolve(cfg.student.model))
    started = time.perf_counter()
    load_data(cfg, tokenizer, teacher)
    return time.perf_counter() - started


def train_arm(arm: str, args: argparse.Namespace, work: Path, minutes: float, resume: bool) -> dict[str, Any]:
    """Train `arm` for `minutes` of wall-clock, the teacher's preparation included: from the pruned
    student, or (`resume`, for --continue-best) on from its run folder with the budget raised."""
    folder, config, prep_file = work / arm, work / f"{arm}.yaml", work / f"{arm}.prep.json"
    recipe = yaml.safe_load(args.recipe.read_text())
    recipe["student"] = {"model": str(pruned_student(args.recipe, work)), "finetune": "full"}
    recipe = merged(recipe, arm_changes(arm, args, work)) | {"output_dir": str(folder)}
    for key in ("source", "validation_source"):  # relative to the project's root, as `kdistill` runs
        if recipe["data"].get(key) and not Path(recipe["data"][key]).is_absolute():
            recipe["data"][key] = str((ROOT / recipe["data"][key]).resolve())
    if resume:  # the cache or the responses are there: their cost was spent once, at the start
        prep = json.loads(prep_file.read_text())["seconds"]
    else:
        prep = prepare(arm, recipe, config, work)
        prep_file.write_text(json.dumps({"seconds": prep}))
    left = minutes - prep / 60
    if left <= 0:
        raise SystemExit(
            f"{arm}: the teacher's preparation took {prep / 60:.1f} min of a {minutes} min budget"
        )
    recipe["training"]["max_minutes"] = round(left, 4)
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(f"{arm}: training {left:.2f} min after {prep / 60:.2f} min of teacher preparation", flush=True)
    kdistill("train", str(config), "--resume" if resume else "--overwrite", log=work / f"{arm}.log")
    summary = json.loads((folder / "summary.json").read_text())
    return {"arm": arm, "minutes": minutes, "prep_s": prep, "train_s": summary["train_seconds"],
            "steps": summary["steps"]}  # fmt: skip


def prepare(arm: str, recipe: dict[str, Any], config: Path, work: Path) -> float:
    """Seconds of the teacher's work before training, done from scratch: the cache of `kd_cache`, the
    responses of `seqkd`; 0 for the other arms."""
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    if arm == "kd_cache":
        shutil.rmtree(work / "teacher-cache", ignore_errors=True)
        return kdistill("cache", str(config), log=work / f"{arm}.log")
    if arm == "seqkd":
        shutil.rmtree(Path(os.environ["KDISTILL_CACHE"]) / "responses", ignore_errors=True)
        return teacher_responses(config)
    return 0.0


def private_cache(work: Path) -> None:
    """A kdistill cache of the benchmark's own, so that no response cached by another run is reused; the
    converted GGUF teacher is shared with the user's cache."""
    from kdistill.files import cache_root

    shared, own = cache_root() / "gguf", work / "kdistill-cache"
    own.mkdir(exist_ok=True)
    if shared.is_dir() and not (own / "gguf").exists():
        (own / "gguf").symlink_to(shared)
    os.environ["KDISTILL_CACHE"] = str(own)  # the `kdistill` processes started after inherit it


def evaluate(folder: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """`kdistill eval` of the run in `folder`, into its run folder; the teacher's benchmark scores are
    measured once per `--out` and reused after."""
    teacher = out / "teacher-scores.json"
    argv = [
        "eval", str(folder), "--validation", str(DATA / "instruct" / "dolly-validation.jsonl"),
        "--rows", str(args.eval_rows), "--rouge-rows", str(args.rouge_rows),
        "--max-new-tokens", str(args.max_new_tokens), "--data-dir", str(DATA / "eval"),
        "--tasks", args.tasks, "--limit", str(args.limit), "--generations", "2",
    ]  # fmt: skip
    reuse = teacher.is_file() and json.loads(teacher.read_text())["benchmarks"].get("limit") == args.limit
    kdistill(*argv, *(["--teacher-scores", str(teacher)] if reuse else []), log=folder.parent / "eval.log")
    result = json.loads((folder / "eval.json").read_text())
    if not reuse and "benchmarks" in result:
        shutil.copyfile(folder / "eval.json", teacher)
    return result


def held_out_again(arm: str, args: argparse.Namespace, out: Path) -> None:
    """The held-out pass of `kdistill eval` again on `arm`'s run folder (no benchmarks, no answers), its
    standard errors added to the saved `ARM.json`. The pass is deterministic: its means must equal the
    saved ones, or the run folder has moved on (a continued run) and nothing is written."""
    saved_row = json.loads((out / f"{arm}.json").read_text())
    folder = args.work / arm
    kdistill(
        "eval", str(folder), "--validation", str(DATA / "instruct" / "dolly-validation.jsonl"),
        "--rows", str(args.eval_rows), "--rouge-rows", "0", "--generations", "0", "--tasks", "none",
        log=folder.parent / "eval.log",
    )  # fmt: skip
    again = json.loads((folder / "eval.json").read_text())["held_out"]
    for who in ("student", "teacher"):
        old = saved_row["eval"]["held_out"][who]
        if abs(again[who]["ce"] - old["ce"]) > 1e-6 * max(1.0, abs(old["ce"])):
            raise SystemExit(f"{arm}: the {who}'s held-out CE is {again[who]['ce']}, saved {old['ce']}")
        old |= {key: value for key, value in again[who].items() if key.endswith("_stderr")}
    (out / f"{arm}.json").write_text(json.dumps(saved_row, indent=2))
    print(f"{arm}: held-out standard errors added to {out / f'{arm}.json'}", flush=True)


def machine() -> dict[str, Any]:
    import torch

    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def figures(row: dict[str, Any]) -> dict[str, Any]:
    """One saved arm's figures, flat: `student_KEY` and `teacher_KEY` of the held-out section, the
    retention mean and its per-task rows."""
    ev = row["eval"]
    held = ev.get("held_out", {})
    out = {f"student_{k}": v for k, v in held.get("student", {}).items()}
    out |= {f"teacher_{k}": v for k, v in held.get("teacher", {}).items()}
    out["retention"] = ev.get("retention", {}).get("mean")
    # Recomputed from the tasks, so results saved before the mean had a standard error get one too.
    out["retention_stderr"] = (
        retention(ev["benchmarks"]["tasks"])["mean_stderr"] if "benchmarks" in ev else None
    )
    out["tasks"] = ev.get("retention", {}).get("tasks", {})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ("arm", "minutes", "steps", "teacher prep min", "held-out ppl", "KL", "top-1", "ROUGE-L",
            "teacher NLL of answers", "words", "rep. 4-grams", "retention")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    teacher = None
    for row in rows:
        f = figures(row)
        teacher = teacher or f
        cells = [row["arm"], f"{row['minutes']:g}", row["steps"], f"{row['prep_s'] / 60:.1f}"]
        keys = ("ppl", "kl", "top1", "rouge_l", "teacher_nll", "answer_words", "rep4")
        cells += [_n(f.get(f"student_{k}"), f.get(f"student_{k}_stderr")) for k in keys]
        error = "" if f["retention_stderr"] is None else f" ± {f['retention_stderr']:.1%}"
        cells.append("—" if f["retention"] is None else f"{f['retention']:.1%}{error}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if teacher:
        cells = [
            "teacher",
            "",
            "",
            "",
            _n(teacher.get("teacher_ppl"), teacher.get("teacher_ppl_stderr")),
            "0",
            "1",
        ]
        cells += [_n(teacher.get(f"teacher_{k}"), teacher.get(f"teacher_{k}_stderr"))
                  for k in ("rouge_l", "teacher_nll", "answer_words", "rep4")]  # fmt: skip
        lines.append("| " + " | ".join(cells + ["100%"]) + " |")
        lines += ["", _benchmarks(rows)]
    return "\n".join(lines)


def _benchmarks(rows: list[dict[str, Any]]) -> str:
    """Accuracy ± standard error per benchmark: the teacher, then each arm with its share retained."""
    tasks = figures(rows[0])["tasks"]
    header = ["benchmark", "teacher", *(r["arm"] for r in rows)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, t in tasks.items():
        cells = [f"{task} {t['metric']}", f"{t['teacher']:.3f} ± {t['teacher_stderr'] or 0:.3f}"]
        for row in rows:
            s = figures(row)["tasks"].get(task, {})
            kept = "n/c" if s.get("kept") is None else f"{s['kept']:.0%}"
            cells.append(f"{s.get('student', 0):.3f} ± {s.get('student_stderr') or 0:.3f} ({kept})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _n(value: Any, stderr: Any = None) -> str:
    """A figure to 4 significant digits, with ` ± stderr` where one was measured."""
    if value is None:
        return "—"
    return f"{value:.4g}" + ("" if stderr is None else f" ± {stderr:.2g}")


def saved(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"{arm}.json").read_text()) for arm in ARMS if (out / f"{arm}.json").is_file()]


def continue_best(args: argparse.Namespace, work: Path, out: Path) -> None:
    """`--continue` ARM, or the saved arm with the lowest held-out KL, on to 30 and 60 minutes. KL, not
    retention, picks it: at 500 items a task the retention of one arm has a standard error near 10
    points, wider than the gaps between arms, while the KL's is a few hundredths."""
    rows = [r for r in saved(out) if figures(r).get("student_kl") is not None]
    if args.continue_arm:
        rows = [r for r in rows if r["arm"] == args.continue_arm]
    if not rows:
        raise SystemExit(
            f"--continue-best: no saved arm {args.continue_arm or ''} with a held-out KL in {out}"
        )
    best = min(rows, key=lambda r: figures(r)["student_kl"])
    arm = best["arm"]
    curve_file = out / f"best-{arm}-curve.json"
    # A saved curve whose last point is where the run folder stands goes on from there; any other starts
    # again from the 15-minute arm.
    curve = json.loads(curve_file.read_text()) if curve_file.is_file() else []
    if not curve or curve[-1]["steps"] != json.loads((work / arm / "summary.json").read_text())["steps"]:
        curve = [best]
    for minutes in (m for m in (30.0, 60.0) if m > curve[-1]["minutes"]):
        row = train_arm(arm, args, work, minutes, resume=True)
        row |= {"eval": evaluate(work / arm, args, out), "machine": machine()}
        curve.append(row)
        curve[0] = json.loads((out / f"{arm}.json").read_text())  # with what --held-out added since
        curve_file.write_text(json.dumps(curve, indent=2))
    kdistill("bench", str(work / arm), log=work / "bench.log")
    shutil.copyfile(work / arm / "bench.json", out / f"best-{arm}-bench.json")
    print(table(curve))


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--minutes", type=float, default=15.0, help="each arm's wall-clock budget (default 15)")
    p.add_argument("--continue-best", action="store_true", help="the best saved arm on to 30 and 60 minutes")
    p.add_argument("--continue", dest="continue_arm", choices=ARMS, help="the arm --continue-best takes on")
    p.add_argument("--table", action="store_true", help="print the saved results and stop")
    p.add_argument("--held-out", default="", help="arms whose held-out pass runs again for standard errors")
    p.add_argument("--cache-rows", type=int, default=400, help="rows the kd_cache arm caches and trains on")
    # The teacher writes a 128-token answer in about 3 s on one core: 120 take 6 of the 15 minutes.
    p.add_argument("--seqkd-rows", type=int, default=120, help="rows the seqkd arm's teacher answers")
    p.add_argument("--seqkd-tokens", type=int, default=128, help="longest teacher response of seqkd")
    p.add_argument("--limit", type=int, default=500, help="benchmark items a task (default 500)")
    p.add_argument("--tasks", default="all", help="benchmark tasks for kdistill eval (default all)")
    p.add_argument("--eval-rows", type=int, default=200, help="held-out Dolly rows for ppl, KL, top-1")
    p.add_argument("--rouge-rows", type=int, default=64, help="held-out prompts answered greedily")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest greedy answer in eval")
    p.add_argument("--recipe", type=Path, default=RECIPE, help="the run config every arm starts from")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "retention-bench", help="run folders")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "retention")
    return p.parse_args()


def main() -> None:
    args = arguments()
    args.work, args.out, args.recipe = args.work.resolve(), args.out.resolve(), args.recipe.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    private_cache(args.work)
    print(f"machine: {json.dumps(machine())}", flush=True)
    if os.getloadavg()[0] > 3:
        print(
            "warning: the load average is above 3; other processes share the cores, so every arm trains "
            "fewer steps than on an idle machine (the comparison is fair only while the load stays alike)"
        )
    if args.continue_best:
        continue_best(args, args.work, args.out)
        return
    for arm in filter(None, args.held_out.split(",")):
        held_out_again(arm, args, args.out)
    for arm in [] if args.table or args.held_out else args.arms.split(","):
        if arm not in ARMS:
            raise SystemExit(f"--arms: unknown arm {arm!r}; the arms are {', '.join(ARMS)}")
        row = train_arm(arm, args, args.work, args.minutes, resume=False)
        row |= {"eval": evaluate(args.work / arm, args, args.out), "machine": machine()}
        (args.out / f"{arm}.json").write_text(json.dumps(row, indent=2))
        print(f"{arm}: written to {args.out / f'{arm}.json'}", flush=True)
    rows = saved(args.out)
    if rows:
        print(table(rows))
        (args.out / "table.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
