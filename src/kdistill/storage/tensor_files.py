"""Checkpoint files read without unpickling code: tensors and plain values only.

`torch.load(weights_only=True)` refuses every type but tensors, numbers, strings and containers
(and the few named here), so a crafted `.pt` file in a checkpoint cannot run code on `--resume`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from kdistill.errors import KdistillError


def load_tensors(path: Path) -> Any:
    """A `.pt` file of this checkpoint, read without unpickling anything but tensors and plain values.

    `torch.load(weights_only=True)` refuses every other type, so a crafted file cannot run code.
    """
    advice = f"Remove {path.parent} to resume from the checkpoint before it, or --overwrite to start again"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise KdistillError(f"--resume: cannot read {path} ({err.strerror or err}). {advice}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise KdistillError(
            f"--resume: {path} is not a checkpoint file kdistill wrote ({_why(err)}); it was not "
            f"unpickled, since that could run code. {advice}"
        ) from None


@contextlib.contextmanager
def tensors_only(accelerator: Accelerator, path: Path) -> Iterator[None]:
    """Every `torch.load` inside reads tensors and plain values only, DeepSpeed's included.

    DeepSpeed reads its files with `weights_only=False`; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD
    overrides that. Its optimizer files also hold three plain records (the loss scale, the ZeRO stage,
    fragment addresses), allowed here by name.
    """
    allowed = []
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed = [LossScaler, ZeroStageEnum, fragment_address]
    before = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as err:
        raise KdistillError(
            f"--resume: checkpoint {path} holds a file that is not what kdistill and "
            f"{accelerator.distributed_type.value} write ({_why(err)}); it was not unpickled, since that "
            f"could run code. Remove {path} to resume from the checkpoint before it, or --overwrite"
        ) from None
    finally:
        if before is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = before


_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _why(err: Exception) -> str:
    """The line of torch's long refusal that says what was found (such as an unsupported global)."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ")[0] if lines else type(err).__name__
