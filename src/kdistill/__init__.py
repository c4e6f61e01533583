"""kdistill: knowledge distillation of language models.

The Python API (`kdistill.api`) is importable from here: `kdistill.train`, `kdistill.evaluate`,
`kdistill.export`, `kdistill.prune`, `kdistill.load_config` and `kdistill.KdistillError`. They load
on first use, so that `import kdistill` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdistill.errors import KdistillError

if TYPE_CHECKING:
    from kdistill.api import evaluate, export, load_config, prune, train

__version__ = "0.1.0"
__all__ = ["KdistillError", "evaluate", "export", "load_config", "prune", "train"]


def __getattr__(name: str) -> Any:
    if name in ("evaluate", "export", "load_config", "prune", "train"):
        from kdistill import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdistill' has no attribute {name!r}")
