"""`kdistill validate --memory`'s verdict on a `Plan`: the breakdown, whether it fits, and the changes
that would make it fit, each with the peak it leaves."""

from __future__ import annotations

from dataclasses import replace

from kdistill.config import RunConfig
from kdistill.prerun.memory import GB, PHASE_OF, PHASES, Plan, load_peak, parts, peak, phase_totals


def memory_lines(cfg: RunConfig, plan: Plan, budget: int, device_name: str) -> list[str]:
    """The breakdown, the verdict on `device_name` (`budget` bytes per process) and the advice."""
    where = "per process" if plan.processes > 1 else "one process"
    lines = [
        f"memory ({where}, {plan.processes} x {plan.strategy}; micro-batch {plan.rows} x {plan.length} "
        f"tokens, checkpointing {'on' if plan.checkpointing else 'off'}):"
    ]
    phases = phase_totals(plan)
    for name, size in parts(plan).items():
        if size:
            lines.append(f"  {name:<24} {size / GB:7.2f} GB  {PHASE_OF.get(name, 'resident')}")
    largest = max(PHASES, key=lambda phase: phases[phase])
    total, loading = phases["resident"] + phases[largest], load_peak(plan)
    lines.append(
        f"  {'training peak':<24} {total / GB:7.2f} GB  resident {phases['resident'] / GB:.2f} + "
        f"{largest} {phases[largest] / GB:.2f} (the largest phase)"
    )
    if loading > total:
        what = "and calibrating" if plan.calibration_tokens else "while loading"
        lines.append(f"  {'loading peak':<24} {loading / GB:7.2f} GB  the teacher in fp32 {what}")
    fits = peak(plan) <= budget
    lines.append(
        f"verdict: {'fits' if fits else 'does NOT fit'} on {device_name} ({budget / GB:.1f} GB): "
        f"estimated peak {peak(plan) / GB:.2f} GB"
    )
    if fits:
        return lines
    cacheable = plan.teacher is not None and cfg.data.responses == "dataset"
    quantizable = not plan.cpu or plan.teacher_bits > 8
    steps = suggestions(plan, budget, quantizable, cacheable)
    if not steps or steps[-1][1] > budget:  # the peak after the last change
        lines.append(
            "no change below makes it fit; use more processes with --strategy fsdp or zero3, or a smaller "
            "student"
        )
    lines += [f"  then {text}: {size / GB:.2f} GB" for text, size in steps]
    return lines


def _helps(changed: Plan, current: Plan) -> bool:
    """A change worth suggesting lowers the peak by at least 1 %."""
    return peak(changed) < 0.99 * peak(current)


def suggestions(p: Plan, budget: int, quantizable: bool, cacheable: bool) -> list[tuple[str, int]]:
    """The cheapest changes that make `p` fit in `budget`, in order, each with the peak after it
    (changes accumulate; the list stops at the first that fits)."""
    steps = []
    current = p
    rows = p.rows
    while rows > 1 and peak(current) > budget:
        rows = max(1, rows // 2)
        current = replace(current, rows=rows)
        steps.append((f"training.micro_batch_size={rows}", peak(current)))
    candidates = [
        ("training.gradient_checkpointing=true", not p.checkpointing, {"checkpointing": True}),
        (
            "teacher.quantization=4bit",
            quantizable and p.teacher_bits > 4.5,
            {"teacher_bits": 4.13, "teacher_mapped": p.cpu, "teacher_embedding_bytes": 0 if p.cpu else 2},
        ),
        (
            "a teacher cache (`kdistill cache`; teacher.cache)",
            cacheable,
            {"teacher": None, "hidden_pairs": 0},
        ),
    ]
    for text, useful, change in candidates:
        if peak(current) <= budget:
            return steps
        changed = replace(current, **change)
        if useful and _helps(changed, current):
            current = changed
            steps.append((text, peak(current)))
    length = p.length
    while length > 128 and peak(current) > budget:
        shorter = replace(current, length=length // 2, trained=current.trained // 2)
        if not _helps(shorter, current):
            break  # the peak hardly depends on the length any more
        current, length = shorter, length // 2
        steps.append((f"data.max_length={length}", peak(current)))
    if peak(current) > budget and p.chunk_rows > 64:
        current = replace(current, chunk_rows=64)
        steps.append(("loss.chunk_size=64", peak(current)))
    return steps
