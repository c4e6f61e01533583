"""One interface for every kind of teacher: a batch in, the teacher's signal out.

A teacher runs live (`live.LiveTeacher`), is read from a cache (`cache.CachedTeacher`) or is asked
over HTTP (`served.ServedTeacher`). The step and evaluation call `Teacher.signal` and never ask
which kind they hold; what differs between kinds is said by two properties, which the pre-run
checks read from the class alone (`roster.teacher_kind`), before anything loads.

Adding a kind of teacher means one subclass here and one line in `roster.teacher_kind`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kdistill.losses import DenseHidden, Sparse, VocabMap


@dataclass
class TeacherSignal:
    """What one teacher says about one batch.

    Attributes:
        values: the teacher's distribution at its rows: `DenseHidden` (hidden states and head, the
            logits come later by chunk) from a live teacher, `Sparse` (top k) from a cache or a server.
            A server's `Sparse` also carries each row's token's T = 1 log-prob (`label_logprobs`),
            which the sampled on-policy loss reads; a dense signal holds the whole distribution.
        states: the layers asked for, `{layer: (N, H)}` at the same rows (live teachers only).
        pairs: a teacher of another tokenizer only: `(example, student_pos, one_to_one)`, each `(N,)`,
            the batch row, student position and one-to-one flag of each of its rows; None otherwise.
    """

    values: DenseHidden | Sparse
    states: dict[int, torch.Tensor] = field(default_factory=dict)
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def rows(self) -> int:
        """How many rows the signal holds."""
        return self.values.ids.shape[0] if isinstance(self.values, Sparse) else self.values.hidden.shape[0]


@dataclass
class Teacher(ABC):
    """One teacher of a run, with its weight among the run's teachers (normalised to sum to 1).

    `mapping` is set when the teacher's tokenizer differs from the student's: its rows are then its
    own tokens at the batch's aligned pairs (`data.alignment`), and `signal` returns the pairs too.
    """

    name: str
    weight: float
    mapping: VocabMap | None = field(default=None, kw_only=True)

    has_hidden: ClassVar[bool]  # can give hidden states of its layers (loss.hidden)
    grades_samples: ClassVar[bool]  # can score rows the student wrote (on-policy steps)
    runs_here: ClassVar[bool]  # its forward pass runs in this process: its weights and FLOPs are ours

    @abstractmethod
    def signal(
        self, batch: dict[str, Any], split: str, vocab: int | None = None, layers: Sequence[int] = ()
    ) -> TeacherSignal:
        """The teacher's signal for `batch`: at its trained rows (row-major, as the loss reads them),
        or for a teacher of another tokenizer at its aligned pairs.

        Args:
            batch: a collated batch; a cached teacher reads `batch["row"]`, the dataset rows.
            split: the dataset split the rows come from (`train`, `validation`); a cache is per split.
            vocab: the logits' width shared with the student (a live teacher's head is cut to it).
            layers: the layers wanted as hidden states (`output_hidden_states` numbering); a teacher
                without `has_hidden` refuses them.
        """

    def retries(self) -> int:
        """Requests this teacher retried so far (a served teacher's); none by default."""
        return 0

    def local_models(self) -> list[nn.Module]:
        """The models this process runs for the signal (what its FLOPs count); none by default."""
        return []
