"""Benchmarks through lm-evaluation-harness, used as a library on an already-loaded model.

lm-eval scores each choice by the log-likelihood of its text after the prompt; `acc` takes the
likeliest choice, `acc_norm` the likeliest per character. Standard errors are lm-eval's own (the
sample standard error of the mean of per-item 0/1 scores).

lm-eval's `HFLM` projects every input position through the LM head and log-softmaxes the whole
vocabulary at each, although it reads only the continuation's positions (about a third of them
on ARC-Easy, PIQA and HellaSwag). The head is 28M of SmolLM2-135M's 135M parameters, and most of
a 10-layer student's, so `continuation_lm` has lm-eval's own `_loglikelihood_tokens` compute
logits at the scored positions only. The body's computation is unchanged, and the
log-likelihoods are those `HFLM` gives (tested, to float32 rounding).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kdistill.errors import KdistillError
from kdistill.eval.tasks import LM_EVAL_HUB, LM_EVAL_NAMES, task_configs

log = logging.getLogger("kdistill")


def run_benchmarks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    source: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    num_fewshot: int | None = None,
    all_positions: bool = False,
) -> dict[str, dict[str, float]]:
    """Accuracies of `model` on `tasks`: `{task: {"acc", "acc_stderr", ["acc_norm", ...], "n"}}`.

    `model` is a loaded causal LM (a `PreTrainedModel`, LoRA already merged); `source` is a folder of
    benchmark files or `LM_EVAL_HUB` (`tasks.benchmark_source`); `limit` evaluates the first N items of
    each task; `all_positions` uses lm-eval's plain `HFLM` (logits at every
    position), the reference the faster default is tested against.
    """
    if not tasks:
        return {}
    lm_eval, hflm, task_manager = _import_lm_eval()
    configs = task_configs(tasks, source)
    hub = source == LM_EVAL_HUB
    lm_class = hflm if all_positions else continuation_lm(hflm)
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    was_training = model.training
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=configs,
        # Local tasks only, unless lm-eval's own are asked for: skips indexing ~200 folders.
        task_manager=task_manager(include_defaults=hub),
        limit=limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=1000,  # `mean` has a closed-form standard error; this only enables stderrs
        log_samples=False,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    model.train(was_training)
    return {name: _scores(results, LM_EVAL_NAMES[name] if hub else f"kdistill_{name}") for name in tasks}


def _scores(results: dict[str, Any], key: str) -> dict[str, float]:
    raw = results["results"][key]
    scores: dict[str, float] = {}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in raw:
            scores[metric] = float(raw[f"{metric},none"])
            stderr = raw.get(f"{metric}_stderr,none")
            scores[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, int | float) else float("nan")
    # A group of tasks (lm-eval's own `mmlu`) has no sample count of its own.
    scores["n"] = float(results.get("n-samples", {}).get(key, {}).get("effective", float("nan")))
    return scores


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise KdistillError(
            f"benchmarks need lm-evaluation-harness ({err}); install it with: pip install 'kdistill[eval]'"
        ) from None
    # lm-eval logs every request batch and a warning per pre-loaded model at INFO/WARNING.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval, HFLM, TaskManager


def continuation_lm(hflm: type) -> type:
    """`hflm` (lm-eval's `HFLM`) projecting only the positions lm-eval scores through the LM head.

    lm-eval right-pads a batch to `L` tokens, log-softmaxes what `_model_call` returns, and reads
    row i's continuation at positions `[start_i, inplen_i)`, shifted by `L - width` when the
    returned logits cover only the last `width` positions (its rule for virtual tokens). So
    `_model_call` returns [batch, L - min(start_i), vocab] logits: the scored positions computed
    through transformers' `logits_to_keep` mask, zeros elsewhere, which lm-eval never reads.
    Rows are matched to their requests by their tokens; a batch with a row that matches none (such
    as lm-eval's batch-size probe) gets lm-eval's own full call.
    """

    class ContinuationLM(hflm):  # type: ignore[misc, valid-type]
        _spans: dict[tuple[int, ...], int] = {}
        _masks_logits: bool | None = None

        def _loglikelihood_tokens(
            self, requests: list, disable_tqdm: bool = False, override_bs: Any = None
        ) -> Any:
            self._spans = _scored_starts(requests, self.max_length)
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            finally:
                self._spans = {}

        def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
            plain = attn_mask is not None or labels is not None or self.mixed_precision_dtype is not None
            mask = None if plain else _scored_mask(inps, self._spans)
            if mask is None or not self._slices_by_mask():
                return super()._model_call(inps, attn_mask, labels)
            width = inps.shape[1] - int(mask.any(0).nonzero()[0])
            with torch.no_grad():
                scored = self.model(inps, logits_to_keep=mask).logits  # [scored positions, vocab]
            logits = scored.new_zeros(inps.shape[0], width, scored.shape[-1])
            logits[mask[:, -width:]] = scored
            return logits

        def _slices_by_mask(self) -> bool:
            # transformers' `logits_to_keep` takes a [batch, L] boolean mask in most causal LMs
            # (`slice_logits_to_keep`); one two-token call tells whether this model does.
            if self._masks_logits is None:
                probe = torch.zeros(1, 2, dtype=torch.long, device=self.device)
                try:
                    with torch.no_grad():
                        out = self.model(
                            probe, logits_to_keep=torch.tensor([[False, True]], device=self.device)
                        )
                    self._masks_logits = out.logits.dim() == 2 and out.logits.shape[0] == 1
                except (TypeError, ValueError, IndexError, RuntimeError):
                    self._masks_logits = False
                if not self._masks_logits:
                    log.info("benchmarks: the model takes no logits_to_keep mask; scoring every position")
            return self._masks_logits

    return ContinuationLM


def _scored_starts(requests: list, max_length: int) -> dict[tuple[int, ...], int]:
    """`{input tokens: first scored position}` for lm-eval's `(key, context, continuation)` requests.

    The input is built as lm-eval's `_loglikelihood_tokens` builds it: context + continuation, cut
    from the left to `max_length + 1` tokens, less the last token; its last `len(continuation)`
    positions predict the continuation.
    """
    starts: dict[tuple[int, ...], int] = {}
    for _, context, continuation in requests:
        inp = tuple((context + continuation)[-(max_length + 1) :][:-1])
        start = max(0, len(inp) - len(continuation))
        starts[inp] = min(start, starts.get(inp, start))
    return starts


def _scored_mask(inps: torch.Tensor, starts: dict[tuple[int, ...], int]) -> torch.Tensor | None:
    """[batch, L] bool: the positions of the right-padded batch `inps` [batch, L] that lm-eval scores.

    None when a row matches no request. Padding is zeros, which may also be a row's own last
    tokens, so every split of a row into tokens + zeros that names a request is marked.
    """
    if not starts:
        return None
    mask = torch.zeros(inps.shape, dtype=torch.bool)
    for i, row in enumerate(inps.tolist()):
        end, found = len(row), False
        while True:
            start = starts.get(tuple(row[:end]))
            if start is not None:
                mask[i, start:end], found = True, True
            if end == 0 or row[end - 1] != 0:
                break
            end -= 1
        if not found:
            return None
    return mask.to(inps.device)
