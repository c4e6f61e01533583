"""The peak memory of a training run, part by part, estimated from the models' shapes alone.

Nothing is loaded: the numbers come from each model's config.json (or kdistill's table of known
models) and the run's settings. The formulas count what the run keeps alive at its peak:

- weights: the teacher at its quantization (fp32, bf16, int8, NF4, or the compact teacher's 5 bits
  a weight for exactly-4-bit GGUF weights), the student, its LoRA adapters;
- for what trains: fp32 gradients and AdamW's two fp32 moments;
- the student's activations kept for backward, per decoder layer and token (all layers, or with
  gradient checkpointing each layer's input plus one layer recomputed);
- the teacher's forward pass (one layer alive at a time, under inference mode);
- the chunked loss: a chunk's student and teacher logits and the blocks of its formula
  (`losses.chunked`), and the gradient of the trained rows' hidden states;
- hidden-state projections, their teacher states and optimizer state;
- on a CPU, the process itself (Python, torch, transformers: `CPU_PROCESS_BYTES`, measured).

On a CPU, loading can be the peak: a GGUF teacher is expanded to fp32 before it is compacted, and
a `from_teacher` student is copied from it. The CPU constants below were calibrated against measured
peak resident memory by `benchmarks/memory_estimate.py` (docs/memory.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 10**9
CPU_PROCESS_BYTES = (
    520 * 2**20
)  # imports, tokenizers, allocator slack of a `kdistill train` process (measured)
CUDA_CONTEXT_BYTES = (
    600 * 2**20
)  # CUDA context and kernels, outside torch's allocator (typical, not measured)
CPU_CHUNK_BYTES = 24 * 2**20  # losses.chunked: a chunk's fp32 logits on CPU
CPU_BLOCK_BYTES = 4 * 2**20  # losses.chunked: a block of the loss formula on CPU
LIVE_BLOCKS = 8  # blocks of the loss formula alive at once
CROSS_CHUNK_ROWS = 128  # losses.cross_vocab: aligned rows per chunk
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")


@dataclass(frozen=True)
class Model:
    """One model's numbers: per-layer weights, embeddings, and activations per token and layer."""

    layers: int
    layer_params: int
    embedding_params: int
    hidden: int
    intermediate: int
    vocab: int
    gated: bool = True  # gate, up and down projections (else up and down)

    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params


@dataclass(frozen=True)
class Plan:
    """What the estimate needs, as plain values (`memory_plan` builds it from a config)."""

    student: Model
    teacher: Model | None  # None: a teacher cache (no teacher weights)
    teacher_bits: float  # bits per weight of the teacher's decoder layers
    teacher_embedding_bytes: float  # bytes per weight of its embeddings and head
    student_bytes: int  # bytes per frozen weight of the student (a LoRA base), 4 if fully trained
    lora_params: int  # 0 when every weight trains
    rows: int  # micro-batch
    length: int  # tokens per row (the longest row, at most max_length)
    checkpointing: bool
    act_bytes: int  # 4 (fp32) on CPU, 2 under bf16 mixed precision
    lean_mlp: bool  # run.lean's gated MLPs (single process, fp32, full student)
    chunk_rows: int  # rows per chunk of the loss
    loss_vocab: int
    cross_vocab: int = 0  # the widest vocabulary of a teacher of another tokenizer
    hidden_pairs: int = 0
    teacher_hidden: int = 0
    cpu: bool = True
    load_fp32_teacher: bool = False  # a GGUF teacher is expanded to fp32 while loading
    generation_kv: int = 0  # the on-policy generation KV cache, bytes (0: no on-policy steps)
    processes: int = 1
    strategy: str = "ddp"


def _activations(p: Plan) -> int:
    """The student's activations kept for backward (per process)."""
    s, tokens = p.student, p.rows * p.length
    per_layer = 10 * s.hidden + (4 if s.gated and not p.lean_mlp else 2) * s.intermediate
    if p.lora_params:
        per_layer += (
            2 * s.hidden
        )  # LoRA keeps each adapted layer's input again (dropout) and its rank-r output
    kept = s.layers * s.hidden + per_layer if p.checkpointing else s.layers * per_layer
    return tokens * (kept + 3 * s.hidden) * p.act_bytes  # plus embeddings, final norm and states


def _teacher_forward(p: Plan) -> int:
    """One teacher layer's temporaries and the states it returns, under inference mode."""
    t = p.teacher
    if t is None:
        return 0
    tokens = p.rows * p.length
    states = (p.hidden_pairs + 2) * tokens * t.hidden
    return (tokens * (4 * t.hidden + 3 * t.intermediate) + states) * p.act_bytes


def _loss(p: Plan) -> int:
    """The chunked loss: two chunks of logits, the formula's blocks, and the hidden states' gradient."""
    chunk = p.chunk_rows * p.loss_vocab * 4
    blocks = LIVE_BLOCKS * (CPU_BLOCK_BYTES if p.cpu else chunk)
    trained = p.rows * p.length * p.student.hidden * 4 * 2
    cross = 6 * CROSS_CHUNK_ROWS * (p.cross_vocab + p.loss_vocab) * 4 if p.cross_vocab else 0
    return 2 * chunk + blocks + trained + cross


def parts(p: Plan) -> dict[str, int]:
    """Bytes per part of the training peak of one process."""
    s, t = p.student, p.teacher
    shard = p.processes if p.strategy in ("fsdp", "zero3") else 1
    opt_shard = p.processes if p.strategy != "ddp" else 1
    trainable = p.lora_params or s.params()
    projection = p.hidden_pairs * s.hidden * p.teacher_hidden
    teacher = 0.0
    if t is not None:
        teacher = (
            t.layers * t.layer_params * p.teacher_bits / 8 + t.embedding_params * p.teacher_embedding_bytes
        )
    out = {
        "process": CPU_PROCESS_BYTES if p.cpu else CUDA_CONTEXT_BYTES,
        "teacher weights": int(teacher),
        "student weights": (s.params() * (4 if not p.lora_params else p.student_bytes) + 4 * p.lora_params)
        // shard,
        "gradients": 4 * (trainable + projection) // opt_shard,
        "AdamW state": 8 * (trainable + projection) // opt_shard,
        "activations": _activations(p),
        "teacher forward": _teacher_forward(p),
        "chunked loss": _loss(p),
        "hidden projections": 4 * projection // shard
        + 8 * p.hidden_pairs * p.rows * p.length * p.teacher_hidden,
        "generation KV cache": p.generation_kv,
    }
    return {name: int(value) for name, value in out.items()}


def load_peak(p: Plan) -> int:
    """On CPU, the loading peak: the teacher fully in fp32 and a student copied out of it."""
    if not p.load_fp32_teacher or p.teacher is None:
        return 0
    t = p.teacher
    student = p.student.params() * 4 if not p.lora_params else 0
    return CPU_PROCESS_BYTES + t.params() * 4 + student


def peak(p: Plan) -> int:
    return max(sum(parts(p).values()), load_peak(p))


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
        ("teacher.quantization=4bit", quantizable and p.teacher_bits > 4.5, {"teacher_bits": 4.13}),
        (
            "a teacher cache (`kdistill cache`; teacher.cache)",
            cacheable,
            {"teacher": None, "hidden_pairs": 0},
        ),
    ]
    for text, useful, change in candidates:
        if peak(current) <= budget:
            return steps
        if useful:
            current = replace(current, **change)
            steps.append((text, peak(current)))
    length = p.length
    while length > 128 and peak(current) > budget:
        length //= 2
        current = replace(current, length=length)
        steps.append((f"data.max_length={length}", peak(current)))
    if peak(current) > budget and p.chunk_rows > 64:
        current = replace(current, chunk_rows=64)
        steps.append(("loss.chunk_size=64", peak(current)))
    return steps
