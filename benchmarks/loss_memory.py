"""Peak memory and time of the distillation loss, naive vs chunked, forward + backward together.

    python benchmarks/loss_memory.py [--json] [--quick] [--cases 151936x2048x576:forward_kl ...]

The teacher is ``DenseHidden``: teacher hidden states plus a teacher head, with the same hidden size
as the student for simplicity, so the naive path builds full teacher logits and the chunked path
only a chunk of them. Inputs are fp32 on CPU (bf16 matmuls are slow on most CPUs) or bf16 on CUDA.

Every (case, method) runs in a fresh subprocess, so one peak cannot hide another and an
out-of-memory kill takes down only that run. Memory is the high-water mark above a baseline taken
after the inputs are allocated: VmHWM on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. A naive
case whose estimated size exceeds 85% of the available memory is skipped rather than run, so the
machine does not thrash; skipped and killed runs are reported as null with the reason.

Times are wall-clock (``time.perf_counter``) for one forward + backward. ``cpu_ratio`` compares
process CPU time (``time.process_time``) too, which other processes' load disturbs less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

VOCABS, TOKENS, HIDDENS = (49152, 151936, 262144), (2048, 8192), (576, 2048)
# Full-size fp32 (N, V) tensors the naive path holds at its peak (logits, teacher logits,
# log-softmaxes, probabilities, products and their gradients); measured 6-8 here.
NAIVE_FULL_TENSORS = 8


def default_cases() -> list[dict]:
    from kdistill.losses.registry import divergence_choices

    cases = [
        dict(vocab=v, tokens=n, hidden=h, divergence="forward_kl")
        for v in VOCABS
        for n in TOKENS
        for h in HIDDENS
    ]
    others = [d for d in divergence_choices() if d != "forward_kl"]  # each at its registered defaults
    return cases + [dict(vocab=151936, tokens=2048, hidden=576, divergence=d) for d in others]


def parse_case(text: str) -> dict:
    """``VOCABxTOKENSxHIDDEN[:divergence]`` -> case dict."""
    shape, _, div = text.partition(":")
    vocab, tokens, hidden = (int(x) for x in shape.split("x"))
    return dict(vocab=vocab, tokens=tokens, hidden=hidden, divergence=div or "forward_kl")


def proc_field(path: str, key: str) -> str | None:
    """The value after ``key:`` in a /proc file such as /proc/meminfo, or None."""
    with open(path) as f:
        pairs = (line.split(":", 1) for line in f if ":" in line)
        return next((value.strip() for name, value in pairs if name.strip() == key), None)


def mem_available_bytes() -> int:
    return int(proc_field("/proc/meminfo", "MemAvailable").split()[0]) * 1024


def machine() -> dict:
    """Where the numbers come from."""
    info = dict(platform=platform.platform(), cpu=proc_field("/proc/cpuinfo", "model name") or "?")
    info.update(cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads())
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return info


def naive_estimate_bytes(case: dict) -> int:
    """Inputs (two heads, two hidden-state matrices) plus the naive path's full-size intermediates."""
    inputs = 4 * case["hidden"] * (2 * case["vocab"] + 2 * case["tokens"])
    return inputs + 4 * case["tokens"] * case["vocab"] * NAIVE_FULL_TENSORS


# ----------------------------------------------------------------------------- child process


def vm_hwm_bytes() -> int:
    """Peak resident memory of this process so far (VmHWM, else ru_maxrss)."""
    hwm = proc_field("/proc/self/status", "VmHWM")
    return int(hwm.split()[0]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> int:
    """Reset VmHWM to the current resident size (Linux >= 4.0) and return that size."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return vm_hwm_bytes()  # cannot reset: the peak so far is the best baseline there is
    return int(proc_field("/proc/self/status", "VmRSS").split()[0]) * 1024


def run_case(case: dict, method: str, chunk_size: int) -> dict:
    """Measure one forward + backward in this process; return peak MB above baseline and ms."""
    from kdistill.losses import DenseHidden, distill_loss_sums

    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n, v, h = case["tokens"], case["vocab"], case["hidden"]
    g = torch.Generator(device=dev).manual_seed(0)
    # Scaled in place: a temporary copy of a (V, H) head would raise the high-water mark before
    # the baseline is taken.
    hidden = torch.randn(n, h, device=dev, dtype=dtype, generator=g).requires_grad_()
    head = torch.randn(v, h, device=dev, dtype=dtype, generator=g).mul_(h**-0.5).requires_grad_()
    teacher = DenseHidden(torch.randn(n, h, device=dev, dtype=dtype, generator=g),
                          torch.randn(v, h, device=dev, dtype=dtype, generator=g).mul_(h**-0.5))  # fmt: skip
    labels = torch.randint(0, v, (n,), device=dev, generator=g)

    def step() -> tuple[float, float]:
        hidden.grad = head.grad = None
        start, start_cpu = time.perf_counter(), time.process_time()
        out = distill_loss_sums(
            hidden, head, labels, teacher, kd_weight=4.0, ce_weight=0.5, temperature=2.0,
            divergence=case["divergence"],
            chunk_size=None if method == "naive" else chunk_size,
        )  # fmt: skip
        out.total.backward()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000, (time.process_time() - start_cpu) * 1000

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if cuda else reset_peak_rss()
    # A warm-up run, when it is cheap enough, keeps one-off costs out of the timing.
    times = [step() for _ in range(2 if n * v * h <= 2048 * 49152 * 576 else 1)]
    peak = torch.cuda.max_memory_allocated() if cuda else vm_hwm_bytes()
    return dict(peak_mb=(peak - baseline) / 2**20, ms=times[-1][0], cpu_ms=times[-1][1], runs=len(times))


def child_main(payload: str) -> None:
    args = json.loads(payload)
    try:  # be the first the kernel's OOM killer picks, never a neighbour's process
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    try:
        result = run_case(args["case"], args["method"], args["chunk_size"])
    except (MemoryError, torch.OutOfMemoryError) as e:
        result = dict(error=f"out of memory ({type(e).__name__})")
    except RuntimeError as e:
        if "alloc" not in str(e).lower():
            raise
        result = dict(error=f"out of memory ({str(e).splitlines()[0][:80]})")
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent process


def spawn(case: dict, method: str, chunk_size: int) -> tuple[dict | None, str]:
    """Run one measurement in a fresh interpreter; (result, note) with result None on failure."""
    payload = json.dumps(dict(case=case, method=method, chunk_size=chunk_size))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, __file__, "--_case", payload], capture_output=True, text=True, env=env
    )
    if proc.returncode < 0:
        return None, f"{method}: killed by signal {-proc.returncode} (likely out of memory)"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None, f"{method}: failed ({(proc.stderr.strip().splitlines() or ['?'])[-1][:100]})"
    result = json.loads(lines[-1])
    return (None, f"{method}: {result['error']}") if "error" in result else (result, "")


def measure(case: dict, chunk_size: int, repeats: int) -> dict:
    """One table row. With repeats > 1 the methods alternate and each keeps its fastest run, which
    filters out other processes' load better than a mean."""
    results: dict[str, list[dict]] = {"naive": [], "chunked": []}
    notes = []
    for _ in range(repeats):
        for method in results:
            need, avail = naive_estimate_bytes(case), mem_available_bytes()
            if method == "naive" and not torch.cuda.is_available() and need > 0.85 * avail:
                notes.append(
                    f"naive skipped: estimated {need / 1e9:.1f} GB > 85% of available {avail / 1e9:.1f} GB"
                )
                continue
            result, note = spawn(case, method, chunk_size)
            if result is None:
                notes.append(note)
            else:
                results[method].append(result)
    row = dict(case)
    for method, runs in results.items():
        row[f"{method}_peak_mb"] = round(max(r["peak_mb"] for r in runs), 1) if runs else None
        row[f"{method}_ms"] = round(min(r["ms"] for r in runs), 1) if runs else None
        row[f"{method}_cpu_ms"] = round(min(r["cpu_ms"] for r in runs), 1) if runs else None
    both = bool(results["naive"] and results["chunked"])
    row["mem_ratio"] = round(row["chunked_peak_mb"] / row["naive_peak_mb"], 3) if both else None
    row["time_ratio"] = round(row["chunked_ms"] / row["naive_ms"], 3) if both else None
    row["cpu_ratio"] = round(row["chunked_cpu_ms"] / row["naive_cpu_ms"], 3) if both else None
    row["note"] = "; ".join(dict.fromkeys(notes))  # each distinct reason once
    return row


COLUMNS = ("vocab", "tokens", "hidden", "divergence", "naive_peak_mb", "chunked_peak_mb",
           "naive_ms", "chunked_ms", "mem_ratio", "time_ratio", "cpu_ratio", "note")  # fmt: skip


def markdown(rows: list[dict], info: dict, chunk_size: int) -> str:
    head = [f"Machine: {info['platform']}; CPU {info['cpu']}; {info['cores']} cores; torch {info['torch']}; "
            f"{info['threads']} threads; device {info['device']}; chunk_size {chunk_size}.", "",
            "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip
    cell = lambda x: "null" if x is None else str(x)  # noqa: E731 - a one-line formatter
    return "\n".join(head + ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows])


SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def save(prefix: str, rows: list[dict], info: dict, chunk_size: int) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(dict(machine=info, chunk_size=chunk_size, rows=rows), f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(rows, info, chunk_size) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list on stdout")
    parser.add_argument("--quick", action="store_true", help="a small grid that runs in about a minute")
    parser.add_argument(
        "--cases", nargs="+", help="VOCABxTOKENSxHIDDEN[:divergence], e.g. 151936x2048x576:jsd"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="rows per chunk (default: the library's)"
    )
    parser.add_argument("--out", help="also write OUT.json and OUT.md")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method, alternating; fastest kept")
    parser.add_argument("--_case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._case:
        return child_main(args._case)
    sys.path.insert(0, SRC)
    from kdistill.losses import DEFAULT_CHUNK_SIZE

    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    if args.cases:
        cases = [parse_case(c) for c in args.cases]
    elif args.quick:
        cases = [dict(vocab=32768, tokens=1024, hidden=256, divergence=d) for d in ("forward_kl", "jsd")]
    else:
        cases = default_cases()
    info, rows = machine(), []
    print(markdown([], info, chunk_size), file=sys.stderr, flush=True)
    for case in cases:
        rows.append(measure(case, chunk_size, args.repeats))
        print(markdown(rows[-1:], info, chunk_size).splitlines()[-1], file=sys.stderr, flush=True)
        if args.out:  # after every case, so a long run that is stopped still leaves its results
            save(args.out, rows, info, chunk_size)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, info, chunk_size))


if __name__ == "__main__":
    main()
