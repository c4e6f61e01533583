"""The peak memory of a training run, part by part, estimated from the models' shapes alone.

Nothing is loaded: the numbers come from each model's config.json (or kdistill's table of known
models) and the run's settings. A process holds some parts all along (the process itself, the
weights, AdamW's state) and others only during one phase of a step. The peak is the resident parts
plus the largest phase:

- forward: the student's activations kept for backward, the head's gradient (written during the
  forward pass by the chunked loss), the chunked loss's buffers, the teachers' outputs, the
  hidden-state loss, and, when a window holds several micro-batches, the gradients of the earlier
  ones (the widest runs first, before any gradient exists, but the others are as wide);
- backward: the gradients, and with gradient checkpointing the one layer recomputed (backward frees
  each layer's activations as it makes the layer's gradients, so the two are counted apart);
- teacher forward: one teacher layer's temporaries under inference mode, and the states it returns;
- generation (on-policy steps): the student's KV cache, its prompt pass and the sampling logits;
  with a vLLM engine the student samples in the engine's processes, resident beside training: the
  processes themselves, their copy of the weights and a KV cache sized for the step's rows
  (`sampling/engine_memory.py`; or the share of the device `engine.memory` gives vLLM), and a full
  student's weights are serialised once for it when it starts (engine sync);
- evaluation: a held-out batch without gradients.

The activations per token and layer count the tensors autograd saves in a transformers decoder
layer (tests/test_memory_estimate.py checks the count against `saved_tensors_hooks` on tiny models).

On a CPU, loading can be the peak: a GGUF teacher is expanded to fp32 before it is compacted, and
a `from_teacher` student is copied from the full-precision teacher. `CPU_PROCESS_BYTES` is the
process besides its tensors, measured (docs/memory.md says how).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9
# A `kdistill train` process besides its tensors: Python, torch, transformers, the tokenizers and the
# data, and the heap the allocator keeps after loading. Measured by benchmarks/memory_estimate.py
# (the quickstart's models and data built, its resident memory less their tensors: 490-500 MiB).
CPU_PROCESS_BYTES = 500 * 2**20
# CUDA context and kernels, outside torch's allocator (typical, not measured).
CUDA_CONTEXT_BYTES = 600 * 2**20
CPU_BLOCK_BYTES = 4 * 2**20  # losses.chunked: a block of the loss formula on CPU
LIVE_BLOCKS = 8  # blocks of the loss formula alive at once
CROSS_CHUNK_ROWS = 128  # losses.cross_vocab: aligned rows per chunk
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
PHASES = ("forward", "backward", "teacher forward", "generation", "evaluation", "engine sync")


@dataclass(frozen=True)
class Model:
    """One model's numbers: weights per layer and of the embeddings, and the widths of its tensors."""

    layers: int
    layer_params: int
    embedding_params: int
    hidden: int
    intermediate: int
    vocab: int
    q_width: int  # attention heads x head_dim
    kv_width: int  # key-value heads x head_dim
    gated: bool = True  # gate, up and down projections (else up and down)
    mlp_saved: int = 4  # (tokens, intermediate) tensors the MLP keeps for backward
    parallel: bool = False  # attention and MLP read one norm's output (Phi), else two pre-norms

    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params


@dataclass(frozen=True)
class Plan:
    """What the estimate needs, as plain values (`memory_plan` builds it from a config)."""

    student: Model
    teacher: Model | None  # None: a teacher cache (no teacher weights)
    teacher_bits: float  # bits per weight of the teacher's decoder layers
    teacher_embedding_bytes: float  # bytes per weight of its embeddings and head
    teacher_mapped: bool  # its fp32 checkpoint stays mapped and resident (bitsandbytes on CPU)
    student_bytes: int  # bytes per frozen weight of the student (a LoRA base), 4 if fully trained
    lora_params: int  # 0 when every weight trains
    rows: int  # micro-batch
    length: int  # tokens per row of the widest batch trained on
    checkpointing: bool
    act_bytes: int  # 4 (fp32) on CPU, 2 under bf16 mixed precision
    lean_mlp: bool  # run.lean's gated MLPs (single process, fp32, full student)
    chunk_rows: int  # rows per chunk of the loss
    loss_vocab: int
    cross_vocab: int = 0  # the widest vocabulary of a teacher of another tokenizer
    hidden_pairs: int = 0
    teacher_hidden: int = 0
    cpu: bool = True
    load_fp32_teacher: bool = False  # the teacher is in fp32 while loading (a GGUF, or a student cut)
    lora_rank: int = 0
    accumulating: bool = False  # a window of several micro-batches: later ones run beside gradients
    trained: int = 0  # tokens that train in that micro-batch (0: every token)
    eval_rows: int = 0  # rows per held-out evaluation batch (0: no held-out evaluation)
    prompt: int = 0  # on-policy steps: prompt tokens per row while the student writes (0: none)
    new_tokens: int = 0  # on-policy steps: tokens the student writes per row
    gen_rows: int = 0  # on-policy steps: rows per generate call (0: the micro-batch)
    engine_bytes: int = 0  # on-policy steps on a vLLM engine kdistill starts: the share `memory` gives it
    engine_parts: tuple[int, int, int] = (0, 0, 0)  # else its processes, weights and KV cache (bytes)
    engine: bool = False  # the student samples on a vLLM engine, not in this process
    processes: int = 1
    strategy: str = "ddp"
    calibration_tokens: int = 0  # a pruned student's calibration batch: rows x max_length (0: none)
    removal_scores: bool = False  # and its removal scores: fp64 log-probs of those tokens
    mlp_refit: bool = False  # and the MLP activations' Gram matrices (`from_teacher.mlp_refit`)


def layer_activations(p: Plan) -> int:
    """Values one student decoder layer keeps for backward, per token of a padded batch.

    Pre-norm layers (Llama, Mistral, Qwen, SmolLM2) keep each norm's input, its normalised input (for
    the norm's weight; not when it is frozen) and its output; one-norm layers (Phi) keep about three
    hidden-sized tensors. Attention keeps q, k and v (k and v repeated to every head when padding
    masks them) and its output, and torch's copy of the padding mask, (T, T) per row. The MLP keeps
    `mlp_saved` intermediate-sized tensors (a gated one 4, or 2 in `run.lean`; 5 for a `gelu_new`
    written out in Python), LoRA the rank-r input of each adapter.
    """
    s = p.student
    norms = 3 if s.parallel else (4 if p.lora_params else 6)
    mlp = 2 if p.lean_mlp else s.mlp_saved
    adapters = (7 if s.gated else 6) * p.lora_rank
    return norms * s.hidden + 4 * s.q_width + p.length + mlp * s.intermediate + adapters


def _activations(p: Plan) -> int:
    """The student's activations kept for backward at the end of its forward pass (per process)."""
    s, tokens = p.student, p.rows * p.length
    per_token = s.layers * (s.hidden if p.checkpointing else layer_activations(p))
    return tokens * (per_token + 3 * s.hidden) * p.act_bytes  # plus the final norm


def _one_layer(p: Plan) -> int:
    """One decoder layer's activations: the layer backward recomputes under checkpointing."""
    return p.rows * p.length * layer_activations(p) * p.act_bytes


def _inference_layer(m: Model, rows: int, length: int, act_bytes: int) -> int:
    """One decoder layer's temporaries under inference mode: the residual, norm, q/k/v and attention
    output, the MLP's intermediates, and the padding mask."""
    per_token = 3 * m.hidden + 2 * m.q_width + 2 * m.kv_width + 3 * m.intermediate + length
    return rows * length * per_token * act_bytes


def _trained(p: Plan) -> int:
    return p.trained or p.rows * p.length


def _teacher_forward(p: Plan, rows: int) -> int:
    """One teacher layer's temporaries under inference mode, and the states it returns: the last
    (and each paired) layer's output, and their trained rows gathered and copied."""
    t = p.teacher
    if t is None or not rows:
        return 0
    trained = _trained(p) * rows // p.rows
    states = (p.hidden_pairs + 1) * (rows * p.length + 2 * trained) * t.hidden * p.act_bytes
    return _inference_layer(t, rows, p.length, p.act_bytes) + states


def _loss_buffers(p: Plan) -> int:
    """The chunked loss's transient buffers: two chunks of logits and the formula's blocks; with a
    teacher of another tokenizer, a chunk of aligned rows through both vocabularies (logits, a copy,
    softmax, and ULD's sorted values and int64 indices: six of each, counted as if every row took ULD)."""
    chunk = p.chunk_rows * p.loss_vocab * 4
    blocks = LIVE_BLOCKS * (CPU_BLOCK_BYTES if p.cpu else chunk)
    cross = 6 * CROSS_CHUNK_ROWS * (p.cross_vocab + p.loss_vocab) * 4 if p.cross_vocab else 0
    return 2 * chunk + blocks + cross


def _evaluation(p: Plan) -> int:
    """A held-out batch without gradients: one student and one teacher layer, and the loss's buffers."""
    if not p.eval_rows:
        return 0
    student = _inference_layer(p.student, p.eval_rows, p.length, p.act_bytes)
    return student + _teacher_forward(p, p.eval_rows) + _loss_buffers(p)


def _generation(p: Plan) -> tuple[int, int]:
    """On-policy steps: the student's KV cache at its longest, and its prompt pass with the sampling
    logits (fp32 logits, processed scores and probabilities of the last position)."""
    if not p.new_tokens or p.engine:
        return 0, 0
    s, grown, rows = p.student, p.prompt + p.new_tokens, p.gen_rows or p.rows
    kv = 2 * s.layers * s.kv_width * rows * grown * p.act_bytes
    # RowSeeded adds the tempered scores, their log-softmax and the noise: 3 more fp32 rows of logits.
    return kv, _inference_layer(s, rows, p.prompt, p.act_bytes) + 6 * rows * s.vocab * 4


def parts(p: Plan) -> dict[str, int]:
    """Bytes per part of one process's peak; `PHASE_OF` says when each part is alive."""
    s, t = p.student, p.teacher
    shard = p.processes if p.strategy in ("fsdp", "zero3") else 1
    opt_shard = p.processes if p.strategy != "ddp" else 1
    trainable = p.lora_params or s.params()
    projection = p.hidden_pairs * s.hidden * p.teacher_hidden
    teacher = 0.0
    if t is not None:
        teacher = (
            t.layers * t.layer_params * p.teacher_bits / 8
            + t.embedding_params * p.teacher_embedding_bytes
            + (t.params() * 4 if p.teacher_mapped else 0)
        )
    head_grad = 0 if p.lora_params else s.vocab * s.hidden * 4 // shard
    # DDP all-reduces through buckets that hold a second copy of the gradients.
    grads = 4 * (trainable + projection) // opt_shard * (2 if p.processes > 1 and p.strategy == "ddp" else 1)
    kv, prompt_pass = _generation(p)
    out = {
        "process": CPU_PROCESS_BYTES if p.cpu else CUDA_CONTEXT_BYTES,
        "teacher weights": int(teacher),
        "student weights": (s.params() * (4 if not p.lora_params else p.student_bytes) + 4 * p.lora_params)
        // shard,
        "AdamW state": 8 * (trainable + projection) // opt_shard,
        "hidden projections": 4 * projection // shard,
        "activations": _activations(p),
        "head gradient": head_grad,
        # plus the gradient of the trained rows' hidden states and the teacher's final states there
        "chunked loss": _loss_buffers(p) + _trained(p) * (s.hidden + (t.hidden if t else 0)) * 4,
        "hidden-state loss": 4 * p.hidden_pairs * _trained(p) * (s.hidden + 2 * p.teacher_hidden),
        "gradients (accumulating)": (grads - head_grad) if p.accumulating else 0,
        "gradients": grads,
        "recomputed layer": _one_layer(p) if p.checkpointing else 0,
        "teacher forward": _teacher_forward(p, p.rows),
        "held-out batch": _evaluation(p),
        "generation KV cache": kv,
        "prompt pass and logits": prompt_pass,
        "vLLM engine's share": p.engine_bytes,
        "vLLM engine processes": p.engine_parts[0],
        "vLLM engine weights": p.engine_parts[1],
        "vLLM engine KV cache": p.engine_parts[2],
        # safetensors serialises a full student into one buffer for the engine's first file (a --resume
        # writes it with the optimizer state loaded); later syncs copy in place (engine_weights.py)
        "weights for the engine": s.params() * 4 if p.engine and p.cpu and not p.lora_params else 0,
    }
    return {name: int(value) for name, value in out.items()}


PHASE_OF = {
    "activations": "forward",
    "head gradient": "forward",
    "chunked loss": "forward",
    "hidden-state loss": "forward",
    "gradients (accumulating)": "forward",
    "gradients": "backward",
    "recomputed layer": "backward",
    "teacher forward": "teacher forward",
    "held-out batch": "evaluation",
    "generation KV cache": "generation",
    "prompt pass and logits": "generation",
    "weights for the engine": "engine sync",
}  # every other part is resident


def phase_totals(p: Plan) -> dict[str, int]:
    """Bytes of the resident parts, and of each phase's own parts."""
    totals = dict.fromkeys(("resident", *PHASES), 0)
    for name, size in parts(p).items():
        totals[PHASE_OF.get(name, "resident")] += size
    return totals


def training_peak(p: Plan) -> int:
    """The resident parts plus the largest phase."""
    totals = phase_totals(p)
    return totals["resident"] + max(totals[phase] for phase in PHASES)


def load_peak(p: Plan) -> int:
    """On CPU, the loading peak: the teacher fully in fp32, a pruned student's calibration on it, and
    a student copied out of it."""
    if not p.load_fp32_teacher or p.teacher is None:
        return 0
    t = p.teacher
    student = p.student.params() * 4 if not p.lora_params else 0
    return CPU_PROCESS_BYTES + t.params() * 4 + calibration_bytes(p) + student


def calibration_bytes(p: Plan) -> int:
    """Calibration's own tensors: one batch through one teacher layer under no_grad (its residual,
    norm, attention and MLP widths in fp32), and with removal scores the full and the cut model's fp64
    log-probs at those tokens, with one temporary of that size; with `mlp_refit`, every layer's fp32
    Gram matrix of its MLP activations and two fp64 ones while a layer is refit."""
    t = p.teacher
    if not p.calibration_tokens or t is None:
        return 0
    layer = p.calibration_tokens * (4 * t.hidden + 2 * t.q_width + 3 * t.intermediate) * 4
    grams = (t.layers * 4 + 2 * 8) * t.intermediate**2 if p.mlp_refit else 0
    return layer + grams + (3 * p.calibration_tokens * t.vocab * 8 if p.removal_scores else 0)


def peak(p: Plan) -> int:
    return max(training_peak(p), load_peak(p))
