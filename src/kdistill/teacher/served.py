"""A teacher behind OpenAI-compatible completions servers: its top-k at every position of a row.

vLLM's `/v1/completions` with `prompt_logprobs: k` returns, for each prompt token after the first, the
server model's k most likely tokens at that position with their log-probabilities at T = 1 (and the
prompt token's own, when it is not among them). kdistill sends each row's token ids as the prompt, so
the server reads exactly the tokens the student trains on, and keeps the entries that predict a
trained token: the same `Sparse` signal a teacher cache stores (top k; the tail's mass is what they
leave). The T = 1 log-probs are exact; at another temperature the tail's shape is unknown, and the
divergences use `Sparse`'s stated approximation (tail tokens as likely as the least likely kept one).

Requests go out concurrently, spread round-robin over the URLs; a request that fails (no answer, or a
5xx answer) is retried on the next URL after a back-off, a bounded number of times, the start-up
check's requests too. Retries are counted (`retries`, which training logs as `teacher/retries`), and
a request that fails every try says how many retries were made against which URLs. JSON over HTTP
needs no more than the standard library here, which keeps kdistill free of an HTTP client dependency.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kdistill.data import trained_rows
from kdistill.errors import KdistillError, ServerUnreachable
from kdistill.losses import Sparse
from kdistill.serving.http import request_json
from kdistill.teacher.base import Teacher, TeacherSignal

log = logging.getLogger("kdistill")

MAX_WAIT = 30.0  # seconds: the longest back-off between two tries
WARN_EVERY = 10.0  # seconds: at most one warning line this often while a server fails


@dataclass(frozen=True)
class ServerSettings:
    """Where a served teacher is and how to talk to it (plain values from the config)."""

    urls: tuple[str, ...]
    model: str  # the model's name on the server
    top_k: int
    timeout: float = 300.0  # seconds for one request
    retries: int = 4  # further tries of a failed request, each on the next URL
    backoff: float = 0.5  # seconds before the first retry, doubled for each next one (at most MAX_WAIT)
    concurrency: int = 8  # requests in flight


class ServerClient:
    """Top-k log-probs of a served teacher for rows of token ids (see the module docstring)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.urls = [u.rstrip("/") for u in settings.urls]
        self._next = 0
        self.retries = 0  # retries made so far, by every request together
        self._lock = threading.Lock()  # requests run in threads: `retries` and the warnings are shared
        self._warned = -WARN_EVERY

    def check(self, rows: Sequence[Sequence[int]], tokenizer: Any) -> None:
        """Before anything trains: every server answers and serves the model, gives k log-probs, and
        tokenizes `rows`' text into the same ids as `tokenizer`."""
        for url in self.urls:
            served = [m.get("id") for m in self._call(url, "/v1/models", None).get("data", [])]
            if self.settings.model not in served:
                raise KdistillError(
                    f"server {url} does not serve a model named {self.settings.model!r}; it serves {served}. "
                    "Set teacher.served_name to one of those"
                )
            if rows:
                self._request(url, list(rows[0][:8]))  # a too small --max-logprobs fails here
            for ids in rows[:4]:
                text = tokenizer.decode(ids)
                body = {"model": self.settings.model, "prompt": text, "add_special_tokens": False}
                theirs = self._call(url, "/tokenize", body).get("tokens")
                ours = tokenizer(text, add_special_tokens=False)["input_ids"]
                if theirs != ours:
                    raise KdistillError(
                        f"server {url} tokenizes differently from the configured tokenizer: {text[:60]!r} "
                        f"gives {str(theirs)[:80]} there and {str(ours)[:80]} here; serve the same tokenizer"
                    )

    def signal(self, batch: dict[str, torch.Tensor]) -> Sparse:
        """The teacher's `Sparse` signal at the batch's trained rows, in the loss's (row-major) order."""
        mask = trained_rows(batch["labels"])[0].cpu()
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        rows = [batch["input_ids"][b, :n].tolist() for b, n in enumerate(lengths)]
        ids, logprobs, labels = [], [], []
        for b, (row_ids, row_lp, row_label) in enumerate(self.top_k(rows)):
            keep = mask[b, : len(row_ids)].nonzero().squeeze(-1)  # trained position p predicts p + 1
            ids.append(row_ids[keep])
            logprobs.append(row_lp[keep])
            labels.append(row_label[keep])
        device = batch["input_ids"].device
        return Sparse(
            ids=torch.cat(ids).to(device),
            logprobs=torch.cat(logprobs).to(device),
            label_logprobs=torch.cat(labels).to(device),
        )

    def top_k(self, rows: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per row of L ids, `(ids, logprobs, label_logprobs)`: `ids` and `logprobs` are `(L - 1, k)`,
        entry p the teacher's top k for the token at position p + 1 given the tokens before it;
        `label_logprobs` `(L - 1,)` is the teacher's log-prob of that token itself."""
        urls = [self.urls[(self._next + i) % len(self.urls)] for i in range(len(rows))]
        self._next += len(rows)
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            answers = list(pool.map(lambda url, row: self._request(url, list(row)), urls, rows))
        return [self._parse(answer, row) for answer, row in zip(answers, rows)]

    def _request(self, url: str, ids: list[int]) -> list[Any]:
        body = {
            "model": self.settings.model,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.settings.top_k,
        }
        answer = self._call(url, "/v1/completions", body)
        try:
            return answer["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise KdistillError(
                f"server {url} gave no prompt_logprobs (an OpenAI-compatible server with vLLM's "
                f"`prompt_logprobs` extension is needed); it answered {str(answer)[:200]}"
            ) from None

    def _parse(
        self, positions: list[Any], row: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top k of every position after the first, by rank, and the log-prob of the row's own token
        there (vLLM adds the prompt token's entry, with its rank, when it is outside the top k)."""
        length = len(row)
        k = self.settings.top_k
        if len(positions) != length:
            raise KdistillError(
                f"the server gave log-probs for {len(positions)} positions of a {length}-token row"
            )
        ids = torch.zeros((max(length - 1, 0), k), dtype=torch.long)
        logprobs = torch.zeros((max(length - 1, 0), k), dtype=torch.float32)
        labels = torch.zeros(max(length - 1, 0), dtype=torch.float32)
        for p, entries in enumerate(positions[1:]):
            own = entries.get(str(row[p + 1]))
            labels[p] = float("nan") if own is None else own["logprob"]
            top = sorted(entries.items(), key=lambda item: item[1].get("rank") or 0)[:k]
            if len(top) < k:
                raise KdistillError(f"the server gave {len(top)} log-probs at a position, {k} were asked for")
            ids[p] = torch.tensor([int(token) for token, _ in top])
            logprobs[p] = torch.tensor([entry["logprob"] for _, entry in top])
        return ids, logprobs, labels

    def _call(self, url: str, path: str, body: dict | None) -> dict[str, Any]:
        """One JSON request (GET without `body`), retried on the next URLs with back-off; an answer that
        retrying cannot change (4xx) is not retried."""
        started, tried = time.monotonic(), []
        for attempt in range(1 + self.settings.retries):
            target = self.urls[(self.urls.index(url) + attempt) % len(self.urls)]
            tried.append(target)
            try:
                return request_json(target + path, body, self.settings.timeout)
            except KdistillError as err:
                message = err.args[0]
                if message.startswith("permanent:"):
                    raise KdistillError(message.removeprefix("permanent: ")) from None
                if attempt == self.settings.retries:
                    seconds = time.monotonic() - started
                    raise ServerUnreachable(self._gave_up(message, tried, seconds)) from None
                wait = min(self.settings.backoff * 2**attempt, MAX_WAIT)
                self._count_retry(message, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _count_retry(self, message: str, wait: float) -> None:
        """Count one retry; warn (at most every WARN_EVERY seconds) that a server is failing."""
        with self._lock:
            self.retries += 1
            now = time.monotonic()
            if now - self._warned < WARN_EVERY:
                return
            self._warned = now
        log.warning("teacher %s; retrying in %.1f s (retries so far: %d)", message, wait, self.retries)

    def _gave_up(self, message: str, tried: list[str], seconds: float) -> str:
        """The error of a request that failed every try: the last failure, then the retries and URLs."""
        urls = ", ".join(dict.fromkeys(tried))
        retries = f"{len(tried) - 1} {'retry' if len(tried) == 2 else 'retries'}"
        return (
            f"{message}; gave up after {retries} over {seconds:.1f} s "
            f"against {urls} ({self.retries} retries by this run's requests in all). Check that the server "
            "runs; to ride out a longer outage, raise teacher.retries"
        )


@dataclass
class ServedTeacher(Teacher):
    """A teacher asked over HTTP (`ServerClient`): it scores any rows, but gives no hidden states.

    It shares the student's tokenizer (`roster.checked_server` refuses another), so it has no `mapping`.
    """

    client: ServerClient

    has_hidden: ClassVar[bool] = False
    grades_samples: ClassVar[bool] = True
    runs_here: ClassVar[bool] = False

    def signal(
        self, batch: dict[str, Any], split: str, vocab: int | None = None, layers: Sequence[int] = ()
    ) -> TeacherSignal:
        if layers:  # setup refuses this first; kept so that no caller gets a silent zero loss
            raise KdistillError(
                f"loss.hidden needs a live teacher, but teacher {self.name!r} is served "
                f"({', '.join(self.client.urls)}): a server gives top-k log-probs, not hidden states"
            )
        return TeacherSignal(self.client.signal(batch))

    def retries(self) -> int:
        return self.client.retries
